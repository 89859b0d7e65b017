//! Slide metadata: what OpenSlide hands us from a slide file's header, through the code that
//! turns it into a resolution and a tile plan.
//!
//! First byte selects:
//! - even: the rest is an OME-XML (or any) ImageDescription: `mpp::ome_pixel_size_um`;
//! - odd: the rest is a property list (`key=value` lines, see `gigapath_fuzz::properties`) as
//!   OpenSlide reports it: vendor keys (`openslide.mpp-x`, Aperio's description, `tiff.*`
//!   resolution tags, `openslide.level[i].*`), through `slide::describe_properties` (levels,
//!   stored tile sizes, mpp discovery in its order, background colour) and `grid::plan_levels`
//!   (snapping, level choice, the tile / read / stored-tile caps) and `grid::view_px_per_tile`.
//!   The pyramid comes from `openslide.level-count` and `openslide.level[i].width / height /
//!   downsample` (how OpenSlide itself reports it); `gigapath.user-mpp` is `--mpp` and
//!   `gigapath.max-tiles` is `tiling.max_tiles`.
#![no_main]

use std::path::Path;

use gigapath_wsi::grid::{self, MAX_READ_PX, MIN_LEVEL0_TILE_PX};
use gigapath_wsi::{mpp, slide};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if selector % 2 == 0 {
        if let Some((x, y)) = mpp::ome_pixel_size_um(&text) {
            assert!(
                x.is_finite() && x > 0.0 && y.is_finite() && y > 0.0,
                "{x} {y}"
            );
        }
        return;
    }
    let props = gigapath_fuzz::properties(&text);
    let prop = |name: &str| props.get(name).cloned();
    let num = |name: &str| prop(name).and_then(|v| v.trim().parse::<f64>().ok());
    let count = num("openslide.level-count").map_or(1, |c| c.clamp(0.0, 32.0) as usize);
    let sizes: Vec<(u64, u64)> = (0..count)
        .map(|i| {
            let side = |what: &str| {
                prop(&format!("openslide.level[{i}].{what}"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (side("width"), side("height"))
        })
        .collect();
    let downsamples: Vec<f64> = (0..count)
        .map(|i| num(&format!("openslide.level[{i}].downsample")).unwrap_or(1.0))
        .collect();
    let user_mpp = num("gigapath.user-mpp");
    // Slide::open validates --mpp before anything else.
    if let Some(v) = user_mpp {
        if mpp::validate(v).is_err() {
            return;
        }
    }
    let path = Path::new("fuzz.svs");
    let Ok(info) = slide::describe_properties(path, &prop, &sizes, &downsamples, user_mpp) else {
        return;
    };
    let _ = serde_json::to_string(&info).expect("slide info serialises");
    let Some(m) = info.mpp.clone() else {
        return;
    };
    assert!(
        m.x.is_finite() && m.x > 0.0 && m.y.is_finite() && m.y > 0.0,
        "{m:?}"
    );
    let max_tiles = prop("gigapath.max-tiles")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(grid::DEFAULT_MAX_TILES);
    let Ok(plan) = grid::plan_levels(path, &info.levels, &m, max_tiles) else {
        return;
    };
    // What the plan promises to the tiler and the readers.
    assert!(plan.level0_tile_px >= MIN_LEVEL0_TILE_PX, "{plan:?}");
    assert!(plan.read_px >= 1 && plan.read_px <= MAX_READ_PX, "{plan:?}");
    assert!(plan.grid_width >= 1 && plan.grid_height >= 1, "{plan:?}");
    assert!(
        plan.grid_width as u64 * plan.grid_height as u64 <= max_tiles,
        "{plan:?}"
    );
    assert!(plan.read_level < info.levels.len(), "{plan:?}");
    let json = serde_json::to_string(&plan).expect("plan serialises");
    let back: grid::TilePlan = serde_json::from_str(&json).expect("plan reads back");
    // serde_json (without its `float_roundtrip` feature, as the workspace builds it) may read a
    // float back 1 ulp off (found by this target); nothing compares stored plans for equality,
    // so floats are compared to 1e-15 and everything else exactly.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-15 * a.abs().max(b.abs());
    assert!(
        close(back.mpp, plan.mpp)
            && close(back.nominal_mpp, plan.nominal_mpp)
            && close(back.tile_mpp, plan.tile_mpp)
            && close(back.read_level_downsample, plan.read_level_downsample),
        "{back:?} != {plan:?}"
    );
    let exact = |p: &grid::TilePlan| {
        (
            p.level0_width,
            p.level0_height,
            p.mpp_source,
            p.snapped,
            p.level0_tile_px,
            p.read_level,
            p.read_px,
            p.resampled,
            p.grid_width,
            p.grid_height,
        )
    };
    assert_eq!(exact(&back), exact(&plan));
    let _ = grid::view_px_per_tile(&plan);
});
