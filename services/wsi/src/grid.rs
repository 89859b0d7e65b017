//! The tile grid: which magnification, which pyramid level, which tiles.
//!
//! Prov-GigaPath was trained on 256 px tiles at 0.5 um/px (20x). Scanners report mpp near, not
//! at, the nominal value (0.499, 0.2527), so the level-0 mpp is first snapped to the nearest
//! nominal magnification (0.5 x 2^k um/px) when it lies within [`SNAP_TOLERANCE`] of it, as
//! TRIDENT does and as the reference's "|mpp - 0.5| < 0.1" rule does at 20x. Then:
//!
//! - level-0 tile side `L = round(256 * 0.5 / nominal_mpp)`: 256 at 20x, 512 at 40x; an
//!   unsnapped slide (0.32 um/px) gets `256 * 0.5 / 0.32 = 400`;
//! - tile (gx, gy) covers level-0 pixels [gx L, (gx+1) L) x [gy L, (gy+1) L); only whole tiles;
//!   **grid index = level-0 origin / L**, the units the slide encoder expects;
//! - pixels are read from the coarsest level that still has >= 256 px per tile (1% slack for
//!   OpenSlide's 4.0003-style downsamples) and resampled to 256 px only when that level does not
//!   hold 256 px per tile already;
//! - a tile is kept when its tissue fraction is above the threshold (default 0.1, the
//!   reference's), and kept tiles are ordered row-major: y, then x.
//!
//! The true mpp, the nominal one and the rule are recorded in [`TilePlan`], which travels with
//! every grid file and feature file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::artifacts::{self, ArtifactMap, ArtifactOptions, ArtifactSummary};
use crate::error::{Result, WsiError};
use crate::mpp::{Mpp, MppSource};
use crate::slide::{Level, Slide};
use crate::thumbnail::{self, RgbImage};
use crate::tissue::{self, SegmentParams, TissueMask, TissueMethod};

/// Tile side seen by the tile encoder, in pixels.
pub const TILE_PX: u32 = 256;
/// Resolution the models were trained at, um/px.
pub const TARGET_MPP: f64 = 0.5;
/// Largest relative distance from a nominal magnification that still snaps to it.
pub const SNAP_TOLERANCE: f64 = 0.2;
/// Reference tissue threshold: keep tiles whose tissue fraction is above it.
pub const DEFAULT_TISSUE_THRESHOLD: f64 = 0.1;
/// The segmentation view holds at most this many pixels (about 120 MB of RGB); a slide whose
/// view would need more at one view pixel per tile is refused.
pub const MAX_VIEW_PX: u64 = 40_000_000;
/// Default most tiles in a slide's grid (kept or not): 2 M tiles of 256 px at 0.5 um/px cover
/// 26 cm^2, ten times the largest glass slide. Configurable ([`TilingOptions::max_tiles`]).
pub const DEFAULT_MAX_TILES: u64 = 2_000_000;
/// Least level-0 tile side: a tile of fewer level-0 pixels is upsampled more than 16x, which
/// means a level-0 resolution coarser than 8 um/px: not a microscope slide (or a wrong mpp).
pub const MIN_LEVEL0_TILE_PX: u32 = 16;
/// Largest tile side read from the slide (at the read level): a tile is read whole, so this
/// bounds each reader's buffer (2048^2 px, about 29 MB with OpenSlide's ARGB).
pub const MAX_READ_PX: u32 = 2048;
/// Largest tile the file may store its pixels in (`openslide.level[N].tile-width x -height`):
/// OpenSlide decodes a whole stored tile to read any pixel of it, so a header declaring huge
/// tiles would make one read allocate that much (8192^2 px: 256 MB of ARGB).
pub const MAX_STORED_TILE_PX: u64 = 8192 * 8192;

/// How the tile grid of one slide is cut and read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TilePlan {
    /// Level-0 width in pixels.
    pub level0_width: u64,
    /// Level-0 height in pixels.
    pub level0_height: u64,
    /// True level-0 mpp (mean of x and y).
    pub mpp: f64,
    /// Where `mpp` came from.
    pub mpp_source: MppSource,
    /// The nominal level-0 mpp the true one was snapped to (equal to `mpp` when unsnapped).
    pub nominal_mpp: f64,
    /// Whether `mpp` was within the tolerance of a nominal value and snapped to it.
    pub snapped: bool,
    /// Tile side at level 0, in level-0 pixels.
    pub level0_tile_px: u32,
    /// True microns per pixel of the 256 px tiles the encoder sees.
    pub tile_mpp: f64,
    /// Pyramid level read (0 = full resolution).
    pub read_level: usize,
    /// Level-0 pixels per pixel of the read level.
    pub read_level_downsample: f64,
    /// Tile side read at that level, in its pixels.
    pub read_px: u32,
    /// Whether read tiles are resized to 256 px.
    pub resampled: bool,
    /// Whole tiles across.
    pub grid_width: u32,
    /// Whole tiles down.
    pub grid_height: u32,
}

/// Nominal level-0 mpp for a true one: the nearest 0.5 x 2^k within the tolerance, if any.
pub fn snap_mpp(mpp: f64) -> Option<f64> {
    let k = (mpp / TARGET_MPP).log2().round();
    let nominal = TARGET_MPP * k.exp2();
    ((mpp - nominal).abs() / nominal < SNAP_TOLERANCE).then_some(nominal)
}

/// Plans the tile grid of `slide` (needs its mpp), with at most [`DEFAULT_MAX_TILES`] tiles.
pub fn plan(slide: &Slide) -> Result<TilePlan> {
    plan_with_limit(slide, DEFAULT_MAX_TILES)
}

/// Plans the tile grid of `slide`, refusing (before any pixel is read) a slide stored in tiles
/// over [`MAX_STORED_TILE_PX`], and a plan whose level-0 tile side is under
/// [`MIN_LEVEL0_TILE_PX`], whose grid has more than `max_tiles` tiles, or whose tiles would be
/// read more than [`MAX_READ_PX`] px a side.
pub fn plan_with_limit(slide: &Slide, max_tiles: u64) -> Result<TilePlan> {
    plan_levels(slide.path(), slide.levels(), &slide.mpp()?, max_tiles)
}

/// [`plan_with_limit`] from what the slide says about itself: its pyramid `levels` (level 0
/// first) and level-0 `mpp`; `path` only names the slide in errors. Pure (reads no pixels), so
/// the fuzz targets call it with arbitrary levels; no level is an error, not a panic.
pub fn plan_levels(path: &Path, levels: &[Level], mpp: &Mpp, max_tiles: u64) -> Result<TilePlan> {
    let true_mpp = mpp.mean();
    let snapped = snap_mpp(true_mpp);
    let nominal_mpp = snapped.unwrap_or(true_mpp);
    let absurd = |reason: String| WsiError::AbsurdPlan {
        path: path.to_path_buf(),
        reason,
    };
    let Some(level0) = levels.first() else {
        return Err(absurd("the slide has no pyramid levels".into()));
    };
    // Level 0 is the reference (downsample 1 as OpenSlide reports it); a level with a
    // downsample that is not a number >= 1 (NaN, inf, 0, negative from a damaged header) is
    // never read: it would make the read size NaN or 0 px (found with the `slide_metadata`
    // fuzz target).
    let level0_is_reference = (level0.downsample - 1.0).abs() < 0.01;
    if !level0_is_reference {
        return Err(absurd(format!(
            "level 0 reports downsample {}, not 1",
            level0.downsample
        )));
    }
    let readable = |l: &Level| l.downsample.is_finite() && l.downsample >= 1.0;
    for (i, level) in levels.iter().enumerate() {
        if let Some((tw, th)) = level.tile_size {
            if tw.saturating_mul(th) > MAX_STORED_TILE_PX {
                return Err(absurd(format!(
                    "level {i} is stored in {tw} x {th} px tiles, each decoded whole on read; over \
                     the maximum of {MAX_STORED_TILE_PX} px per stored tile"
                )));
            }
        }
    }
    let level0_tile_f = (TILE_PX as f64 * TARGET_MPP / nominal_mpp).round();
    if level0_tile_f < MIN_LEVEL0_TILE_PX as f64 {
        return Err(absurd(format!(
            "at {true_mpp} um/px ({}) a {TILE_PX} px tile at {TARGET_MPP} um/px spans {level0_tile_f} \
             level-0 px, under the minimum of {MIN_LEVEL0_TILE_PX} (level-0 resolution must be at most \
             {} um/px); check the slide's mpp or --mpp",
            mpp.source,
            TILE_PX as f64 * TARGET_MPP / MIN_LEVEL0_TILE_PX as f64
        )));
    }
    // At most 2^31: a tile side beyond any slide fails the grid checks below.
    let level0_tile_px = level0_tile_f.min(i32::MAX as f64) as u32;
    let (w0, h0) = (level0.width, level0.height);
    let (grid_width, grid_height) = (w0 / level0_tile_px as u64, h0 / level0_tile_px as u64);
    if grid_width == 0 || grid_height == 0 {
        return Err(WsiError::TooSmall {
            path: path.to_path_buf(),
            width: w0,
            height: h0,
            tile_px: level0_tile_px,
        });
    }
    let tiles = grid_width.saturating_mul(grid_height);
    if tiles > max_tiles {
        return Err(absurd(format!(
            "{w0} x {h0} px at {level0_tile_px} level-0 px per tile is a grid of {grid_width} x \
             {grid_height} = {tiles} tiles, over the maximum of {max_tiles} (tiling.max_tiles)"
        )));
    }
    let per_tile = |d: f64| level0_tile_px as f64 / d;
    let (read_level, level) = levels
        .iter()
        .enumerate()
        .filter(|(_, l)| readable(l) && per_tile(l.downsample) >= TILE_PX as f64 * 0.99)
        .max_by(|a, b| a.1.downsample.total_cmp(&b.1.downsample))
        .unwrap_or((0, level0));
    let exact = (per_tile(level.downsample) - TILE_PX as f64).abs() < TILE_PX as f64 * 0.01;
    let read_px = if exact {
        TILE_PX
    } else {
        per_tile(level.downsample)
            .round()
            .clamp(1.0, u32::MAX as f64) as u32
    };
    if read_px > MAX_READ_PX {
        return Err(absurd(format!(
            "a tile spans {read_px} px at level {read_level} (downsample {}), the closest level to \
             {TARGET_MPP} um/px; over the maximum of {MAX_READ_PX} px read per tile side",
            level.downsample
        )));
    }
    if level0_tile_px < TILE_PX {
        tracing::warn!(
            "{}: level 0 is coarser than {TARGET_MPP} um/px ({true_mpp} um/px); tiles are upsampled",
            path.display()
        );
    }
    Ok(TilePlan {
        level0_width: w0,
        level0_height: h0,
        mpp: true_mpp,
        mpp_source: mpp.source,
        nominal_mpp,
        snapped: snapped.is_some(),
        level0_tile_px,
        tile_mpp: level0_tile_px as f64 * true_mpp / TILE_PX as f64,
        read_level,
        read_level_downsample: level.downsample,
        read_px,
        resampled: !exact,
        grid_width: u32::try_from(grid_width).unwrap_or(u32::MAX),
        grid_height: u32::try_from(grid_height).unwrap_or(u32::MAX),
    })
}

/// One kept tile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TileRef {
    /// Grid column: level-0 x origin / level-0 tile side.
    pub gx: u32,
    /// Grid row: level-0 y origin / level-0 tile side.
    pub gy: u32,
    /// Level-0 x of the tile's top-left pixel.
    pub x0: u64,
    /// Level-0 y of the tile's top-left pixel.
    pub y0: u64,
    /// Fraction of the tile that the mask calls tissue.
    pub tissue: f32,
}

/// What to segment with and what to keep.
#[derive(Debug, Clone)]
pub struct TilingOptions {
    /// How tissue is told from glass.
    pub method: TissueMethod,
    /// Keep a tile when its tissue fraction is above this, in [0, 1).
    pub tissue_threshold: f64,
    /// A slide whose grid has more tiles than this is refused before any pixel is read.
    pub max_tiles: u64,
    /// Pen marks, debris and out-of-focus tiles left out (off by default: see
    /// [`crate::artifacts`]).
    pub artifacts: ArtifactOptions,
    /// A corrected mask (GeoJSON, see [`crate::geojson`]) used instead of segmentation and the
    /// artifact rules.
    pub mask_geojson: Option<std::path::PathBuf>,
}

impl Default for TilingOptions {
    fn default() -> Self {
        TilingOptions {
            method: TissueMethod::Otsu,
            tissue_threshold: DEFAULT_TISSUE_THRESHOLD,
            max_tiles: DEFAULT_MAX_TILES,
            artifacts: ArtifactOptions::default(),
            mask_geojson: None,
        }
    }
}

/// A segmented and tiled slide.
pub struct Tiling {
    /// How the grid is cut and read.
    pub plan: TilePlan,
    /// The segmentation method that ran.
    pub method: TissueMethod,
    /// The tissue fraction a tile had to exceed to be kept.
    pub tissue_threshold: f64,
    /// The downsampled view segmentation ran on; `mask_px_per_tile` of its pixels span a tile.
    pub view: RgbImage,
    /// The tissue mask over `view`, artifacts removed (or the corrected one of `mask_geojson`).
    pub mask: TissueMask,
    /// View (and mask) pixels per tile side.
    pub mask_px_per_tile: u32,
    /// Level-0 pixels per view pixel.
    pub view_downsample: f64,
    /// Kept tiles, row-major (y, then x).
    pub tiles: Vec<TileRef>,
    /// View pixels left out as artifacts (all 0 when the rules are off).
    pub artifacts: ArtifactMap,
    /// What the artifact rules removed, when they ran.
    pub artifact_summary: Option<ArtifactSummary>,
    /// The GeoJSON the mask was read from, when it was not segmented.
    pub mask_geojson: Option<std::path::PathBuf>,
}

/// Segments `slide` and keeps the tiles with enough tissue.
pub fn tile_slide(slide: &Slide, opts: &TilingOptions) -> Result<Tiling> {
    if !(opts.tissue_threshold.is_finite() && (0.0..1.0).contains(&opts.tissue_threshold)) {
        return Err(WsiError::InvalidParameter {
            name: "tissue threshold",
            value: opts.tissue_threshold.to_string(),
            why: "must be in [0, 1)",
        });
    }
    let plan = plan_with_limit(slide, opts.max_tiles)?;
    let mask_px_per_tile = view_px_per_tile(&plan).ok_or_else(|| WsiError::AbsurdPlan {
        path: slide.path().to_path_buf(),
        reason: format!(
            "the tissue view would exceed {MAX_VIEW_PX} px even at one view pixel per tile \
             ({} x {} tiles)",
            plan.grid_width, plan.grid_height
        ),
    })?;
    let view_downsample = plan.level0_tile_px as f64 / mask_px_per_tile as f64;
    let view = thumbnail::read_downsampled(slide, view_downsample, MAX_VIEW_PX)?;
    let params = SegmentParams::for_mask_scale(opts.method, mask_px_per_tile);
    if let Some(path) = &opts.mask_geojson {
        let (mask, artifacts) =
            crate::geojson::read_mask(path, view.width, view.height, view_downsample)?;
        let tiles = keep_tiles(&plan, &mask, mask_px_per_tile, opts.tissue_threshold);
        return Ok(Tiling {
            plan,
            method: opts.method,
            tissue_threshold: opts.tissue_threshold,
            view,
            mask,
            mask_px_per_tile,
            view_downsample,
            tiles,
            artifacts,
            artifact_summary: None,
            mask_geojson: Some(path.clone()),
        });
    }
    let a = &opts.artifacts;
    let mut artifacts = artifacts::label_view(&view, mask_px_per_tile, a);
    let ignore = a.enabled.then_some(artifacts.data.as_slice());
    let mut mask = tissue::segment_ignoring(&view, &params, ignore);
    artifacts::exclude(&mut mask, &artifacts);
    let mut tiles = keep_tiles(&plan, &mask, mask_px_per_tile, opts.tissue_threshold);
    let artifact_summary = a.enabled.then(|| {
        let out_of_focus_tiles = if a.blur {
            artifacts::drop_out_of_focus(
                slide,
                &plan,
                &mut tiles,
                &mut mask,
                &mut artifacts,
                mask_px_per_tile,
                a.blur_threshold,
            )
        } else {
            0
        };
        let area = artifacts.data.len().max(1) as f64;
        ArtifactSummary {
            pen_area_fraction: artifacts.count(artifacts::ArtifactKind::Pen) as f64 / area,
            debris_area_fraction: artifacts.count(artifacts::ArtifactKind::Debris) as f64 / area,
            out_of_focus_tiles,
        }
    });
    tracing::debug!(
        "{}: {} of {} tiles kept",
        slide.path().display(),
        tiles.len(),
        plan.grid_width as u64 * plan.grid_height as u64
    );
    Ok(Tiling {
        plan,
        method: opts.method,
        tissue_threshold: opts.tissue_threshold,
        view,
        mask,
        mask_px_per_tile,
        view_downsample,
        tiles,
        artifacts,
        artifact_summary,
        mask_geojson: None,
    })
}

/// View pixels per tile side: as many as [`MAX_VIEW_PX`] allows, from 32 (4 um at 20x) down to
/// 1, never more than the level-0 pixels of a tile (the view is never finer than level 0);
/// `None` when even one per tile is over the cap.
pub fn view_px_per_tile(plan: &TilePlan) -> Option<u32> {
    let view_px = |m: u32| {
        let ds = plan.level0_tile_px as f64 / m as f64;
        (plan.level0_width as f64 / ds).ceil() * (plan.level0_height as f64 / ds).ceil()
    };
    [32u32, 16, 8, 4, 2, 1]
        .into_iter()
        .filter(|&m| m <= plan.level0_tile_px)
        .find(|&m| view_px(m) <= MAX_VIEW_PX as f64)
}

/// Tiles whose share of tissue mask pixels is above `threshold`, row-major.
fn keep_tiles(plan: &TilePlan, mask: &TissueMask, m: u32, threshold: f64) -> Vec<TileRef> {
    let mut tiles = Vec::new();
    let m2 = (m * m) as f64;
    for gy in 0..plan.grid_height {
        for gx in 0..plan.grid_width {
            let mut n = 0u32;
            for y in gy * m..((gy + 1) * m).min(mask.height) {
                let row = &mask.data[y as usize * mask.width as usize..][..mask.width as usize];
                let (a, b) = ((gx * m) as usize, (((gx + 1) * m).min(mask.width)) as usize);
                n += row[a..b].iter().map(|&v| v as u32).sum::<u32>();
            }
            let tissue = n as f64 / m2;
            if tissue > threshold {
                let l = plan.level0_tile_px as u64;
                tiles.push(TileRef {
                    gx,
                    gy,
                    x0: gx as u64 * l,
                    y0: gy as u64 * l,
                    tissue: tissue as f32,
                });
            }
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_mpps_snap_to_nominal_magnifications() {
        assert_eq!(snap_mpp(0.499), Some(0.5));
        assert_eq!(snap_mpp(0.2527), Some(0.25));
        assert_eq!(snap_mpp(0.23), Some(0.25));
        assert_eq!(snap_mpp(1.02), Some(1.0));
        // Either side of the reference's |mpp - 0.5| < 0.1, and slides between magnifications.
        assert_eq!(snap_mpp(0.41), Some(0.5));
        assert_eq!(snap_mpp(0.39), None);
        assert_eq!(snap_mpp(0.32), None);
        assert_eq!(snap_mpp(0.35), None);
    }

    /// Found with the `slide_metadata` fuzz target (docs/FUZZING.md): a level-0 downsample of
    /// NaN gave a plan reading 0 px tiles, and one that JSON (grid file metadata) cannot hold.
    /// Every level's downsample now has to be a number >= 1 to be read, and level 0's 1.
    #[test]
    fn fuzz_levels_with_nan_or_absurd_downsamples_are_never_read() {
        let level = |width: u64, downsample: f64| Level {
            width,
            height: width * 3 / 4,
            downsample,
            tile_size: None,
        };
        let mpp = Mpp {
            x: 0.5,
            y: 0.5,
            source: MppSource::Openslide,
        };
        let path = Path::new("fuzz.svs");
        for bad in [f64::NAN, f64::INFINITY, 0.0, -4.0, 0.5, 4.0] {
            let err = plan_levels(path, &[level(8192, bad)], &mpp, DEFAULT_MAX_TILES).unwrap_err();
            assert!(
                matches!(err, WsiError::AbsurdPlan { .. }),
                "level 0 downsample {bad}: {err}"
            );
        }
        for bad in [f64::NAN, f64::INFINITY, 0.0, -4.0, 0.5] {
            let plan = plan_levels(
                path,
                &[level(8192, 1.0), level(2048, bad)],
                &mpp,
                DEFAULT_MAX_TILES,
            )
            .unwrap();
            assert_eq!(
                (plan.read_level, plan.read_px),
                (0, 256),
                "level 1 downsample {bad}"
            );
            assert!(serde_json::to_string(&plan)
                .unwrap()
                .contains("\"read_level_downsample\":1.0"));
        }
    }

    #[test]
    fn kept_tiles_are_row_major_with_grid_from_origin() {
        let plan = TilePlan {
            level0_width: 1024,
            level0_height: 512,
            mpp: 0.25,
            mpp_source: MppSource::Openslide,
            nominal_mpp: 0.25,
            snapped: true,
            level0_tile_px: 512,
            tile_mpp: 0.5,
            read_level: 0,
            read_level_downsample: 1.0,
            read_px: 512,
            resampled: true,
            grid_width: 2,
            grid_height: 1,
        };
        // 4 mask px per tile; right tile 2/16 tissue (0.125 > 0.1), left tile 1/16 (dropped).
        let mut data = vec![0u8; 8 * 4];
        data[0] = 1;
        data[4] = 1;
        data[5] = 1;
        let mask = TissueMask {
            width: 8,
            height: 4,
            data,
            otsu_threshold: None,
        };
        let tiles = keep_tiles(&plan, &mask, 4, 0.1);
        assert_eq!(tiles.len(), 1);
        assert_eq!(
            (tiles[0].gx, tiles[0].gy, tiles[0].x0, tiles[0].y0),
            (1, 0, 512, 0)
        );
        assert_eq!(tiles[0].tissue, 0.125);
    }
}
