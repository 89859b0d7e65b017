//! Tiling generated slides whose true tissue is known: 20x, 40x with and without a 20x level,
//! and a slide with no level near 0.5 um/px; plus the tile stream and the grid file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gigapath_wsi::grid::{TilePlan, TILE_PX};
use gigapath_wsi::gridfile;
use gigapath_wsi::slide_writer::{self, Metadata, Scene, SlideSpec};
use gigapath_wsi::stream::read_tile_rgb;
use gigapath_wsi::transform::{crop_normalize, NORMALIZED_LEN, RGB_TILE_LEN};
use gigapath_wsi::{
    outputs, tile_slide, BatchData, BatchFormat, MppSource, Slide, StreamConfig, TileStream,
    TilingOptions, TissueMethod, WsiError,
};

/// Physical size of every test scene, microns.
const SCENE_UM: (f64, f64) = (2000.0, 1600.0);

fn scene() -> Scene {
    Scene::blobs(SCENE_UM.0, SCENE_UM.1)
}

fn write(dir: &Path, name: &str, mpp: f64, downsamples: Vec<u32>, metadata: Metadata) -> PathBuf {
    let path = dir.join(name);
    let spec = SlideSpec {
        width: (SCENE_UM.0 / mpp).round() as u64,
        height: (SCENE_UM.1 / mpp).round() as u64,
        mpp,
        downsamples,
        metadata,
        jpeg_quality: 90,
    };
    slide_writer::write_slide(&path, &spec, &scene()).unwrap();
    path
}

/// Tiles whose true tissue coverage (from the scene's shapes) is above the threshold.
fn true_kept(plan: &TilePlan, threshold: f64) -> Vec<(u32, u32)> {
    let tile_um = plan.level0_tile_px as f64 * plan.mpp;
    let s = scene();
    let mut kept = Vec::new();
    for gy in 0..plan.grid_height {
        for gx in 0..plan.grid_width {
            if s.coverage(gx as f64 * tile_um, gy as f64 * tile_um, tile_um, 32) > threshold {
                kept.push((gx, gy));
            }
        }
    }
    kept
}

fn check_tiling(path: &Path, expect_l: u32, expect_read_level: usize, expect_resampled: bool) {
    let slide = Slide::open(path, None).unwrap();
    for method in [TissueMethod::Otsu, TissueMethod::Saturation] {
        let opts = TilingOptions {
            method,
            tissue_threshold: 0.1,
            ..TilingOptions::default()
        };
        let tiling = tile_slide(&slide, &opts).unwrap();
        let plan = &tiling.plan;
        assert_eq!(plan.level0_tile_px, expect_l, "{}", path.display());
        assert_eq!(plan.read_level, expect_read_level);
        assert_eq!(plan.resampled, expect_resampled);
        let truth = true_kept(plan, 0.1);
        let kept = tiling.tiles.len();
        let err = (kept as f64 - truth.len() as f64).abs() / truth.len() as f64;
        eprintln!(
            "{} {method}: kept {kept}, true {}",
            path.display(),
            truth.len()
        );
        assert!(
            err <= 0.05,
            "{} {method}: kept {kept} tiles, true mask gives {} ({:.1}% off)",
            path.display(),
            truth.len(),
            100.0 * err
        );
        // Grid index = level-0 origin / level-0 tile side, and row-major order (y, then x).
        for t in &tiling.tiles {
            assert_eq!(t.x0, t.gx as u64 * expect_l as u64);
            assert_eq!(t.y0, t.gy as u64 * expect_l as u64);
            assert!(t.tissue > 0.1 && t.tissue <= 1.0);
        }
        assert!(tiling
            .tiles
            .windows(2)
            .all(|w| (w[0].gy, w[0].gx) < (w[1].gy, w[1].gx)));
    }
}

#[test]
fn aperio_20x_slide_tiles_at_level_0_without_resampling() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "s20.svs",
        0.499,
        vec![1, 4, 16],
        Metadata::Aperio { app_mag: 20 },
    );
    let slide = Slide::open(&path, None).unwrap();
    let info = slide.info();
    assert_eq!(info.vendor, "aperio");
    assert_eq!(info.objective_power, Some(20.0));
    assert_eq!(info.levels.len(), 3);
    let mpp = info.mpp.clone().unwrap();
    assert_eq!((mpp.x, mpp.source), (0.499, MppSource::Openslide));
    check_tiling(&path, 256, 0, false);
}

#[test]
fn forty_x_slide_reads_its_20x_level_when_it_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "s40.svs",
        0.2527,
        vec![1, 2, 8],
        Metadata::Aperio { app_mag: 40 },
    );
    // 512 level-0 px per tile; level 1 (downsample 2) holds exactly 256 px of it.
    check_tiling(&path, 512, 1, false);
}

#[test]
fn forty_x_slide_without_a_20x_level_is_resampled_from_level_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "s40r.tiff",
        0.25,
        vec![1, 4, 16],
        Metadata::TiffResolution,
    );
    let slide = Slide::open(&path, None).unwrap();
    assert_eq!(slide.info().vendor, "generic-tiff");
    let mpp = slide.mpp().unwrap();
    assert_eq!(mpp.source, MppSource::TiffResolution);
    assert!((mpp.x - 0.25).abs() < 1e-4, "mpp from TIFF tags {}", mpp.x);
    check_tiling(&path, 512, 0, true);
}

#[test]
fn slide_with_no_level_near_half_a_micron_is_cut_at_its_true_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "s032.svs",
        0.32,
        vec![1, 4],
        Metadata::Aperio { app_mag: 30 },
    );
    // 0.32 um/px snaps to nothing: 256 * 0.5 / 0.32 = 400 level-0 px, resized to 256.
    check_tiling(&path, 400, 0, true);
    let slide = Slide::open(&path, None).unwrap();
    let plan = gigapath_wsi::grid::plan(&slide).unwrap();
    assert!(!plan.snapped);
    assert!((plan.tile_mpp - 0.5).abs() < 0.001);
}

#[test]
fn slide_without_resolution_needs_the_users_mpp() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "nompp.tiff", 0.5, vec![1, 4], Metadata::None);
    let slide = Slide::open(&path, None).unwrap();
    match tile_slide(&slide, &TilingOptions::default()) {
        Err(WsiError::NoMpp(p)) => assert_eq!(p, path),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("tiled a slide without mpp"),
    }
    let slide = Slide::open(&path, Some(0.5)).unwrap();
    assert_eq!(slide.mpp().unwrap().source, MppSource::User);
    assert!(!tile_slide(&slide, &TilingOptions::default())
        .unwrap()
        .tiles
        .is_empty());
}

#[test]
fn written_pixels_read_back_close_to_the_scene() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "px.svs",
        0.5,
        vec![1, 4],
        Metadata::Aperio { app_mag: 20 },
    );
    let slide = Slide::open(&path, None).unwrap();
    // A 256 px window inside the large stroma ellipse, and one on glass.
    for (x0, y0) in [(1100u64, 1100u64), (20, 3000)] {
        let got = slide.read_rgb(0, x0, y0, 256, 256).unwrap();
        let want = scene().render(x0 as f64 * 0.5, y0 as f64 * 0.5, 0.5, 256, 256);
        let mad = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / got.len() as f64;
        assert!(mad < 6.0, "mean abs difference {mad} at ({x0}, {y0})");
    }
}

#[test]
fn tile_stream_delivers_every_tile_in_order_as_read_directly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "st.svs",
        0.2527,
        vec![1, 4],
        Metadata::Aperio { app_mag: 40 },
    );
    let slide = Slide::open(&path, None).unwrap();
    let tiling = tile_slide(&slide, &TilingOptions::default()).unwrap();
    let tiles: Arc<[_]> = tiling.tiles.clone().into();
    assert!(tiles.len() > 20);
    let config = StreamConfig {
        batch_size: 7,
        threads: 3,
        window: 2,
        format: BatchFormat::Normalized,
        max_bad_tile_fraction: 0.0,
    };
    let mut next = 0;
    let mut direct = vec![0f32; NORMALIZED_LEN];
    for batch in TileStream::start(&path, &tiling.plan, tiles.clone(), &config).unwrap() {
        let batch = batch.unwrap();
        assert_eq!(batch.start, next);
        let BatchData::Normalized(px) = batch.data else {
            panic!("wrong format")
        };
        assert_eq!(px.len(), batch.len * NORMALIZED_LEN);
        // The last tile of each batch equals a direct read of that tile.
        let last = batch.start + batch.len - 1;
        crop_normalize(
            &read_tile_rgb(&slide, &tiling.plan, &tiles[last]).unwrap(),
            &mut direct,
        );
        assert_eq!(&px[(batch.len - 1) * NORMALIZED_LEN..], &direct[..]);
        next += batch.len;
    }
    assert_eq!(next, tiles.len());

    // RGB batches, and a stream dropped half-way stops its readers (the test would hang).
    let config = StreamConfig {
        format: BatchFormat::Rgb,
        ..config
    };
    let mut stream = TileStream::start(&path, &tiling.plan, tiles.clone(), &config).unwrap();
    let first = stream.next().unwrap().unwrap();
    let BatchData::Rgb(rgb) = first.data else {
        panic!("wrong format")
    };
    assert_eq!(rgb.len(), 7 * RGB_TILE_LEN);
    assert_eq!(rgb.len() / (TILE_PX as usize * TILE_PX as usize * 3), 7);
    drop(stream);
}

#[test]
fn grid_file_round_trips_and_outputs_are_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "g.svs",
        0.499,
        vec![1, 4],
        Metadata::Aperio { app_mag: 20 },
    );
    let slide = Slide::open(&path, None).unwrap();
    let tiling = tile_slide(&slide, &TilingOptions::default()).unwrap();
    let out = dir.path().join("out");
    let summary = outputs::write_tiling(&out, &slide, &tiling).unwrap();
    assert_eq!(summary.tiles, tiling.tiles.len());
    for f in [
        "tiles.safetensors",
        "tiles.csv",
        "mask.png",
        "thumbnail.png",
        "overlay.png",
        "mask.geojson",
        "summary.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let back = gridfile::read_grid(&out.join("tiles.safetensors")).unwrap();
    assert_eq!(back.tiles, tiling.tiles);
    assert_eq!(back.plan, tiling.plan);
    assert_eq!(back.tissue_method, "otsu");
    let csv = std::fs::read_to_string(out.join("tiles.csv")).unwrap();
    assert_eq!(csv.lines().count(), tiling.tiles.len() + 1);
    // No staging folder is left behind.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 7);
}

#[test]
fn glass_only_slide_keeps_no_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("glass.svs");
    let spec = SlideSpec {
        width: 2048,
        height: 2048,
        mpp: 0.5,
        downsamples: vec![1, 4],
        metadata: Metadata::Aperio { app_mag: 20 },
        jpeg_quality: 90,
    };
    let glass = Scene {
        regions: vec![],
        background: [242, 241, 244],
    };
    slide_writer::write_slide(&path, &spec, &glass).unwrap();
    let slide = Slide::open(&path, None).unwrap();
    for method in [TissueMethod::Otsu, TissueMethod::Saturation] {
        let tiling = tile_slide(
            &slide,
            &TilingOptions {
                method,
                tissue_threshold: 0.1,
                ..TilingOptions::default()
            },
        )
        .unwrap();
        assert_eq!(tiling.tiles.len(), 0, "{method} found tissue on glass");
    }
}

#[test]
fn corrupt_tile_data_is_an_error_naming_the_slide_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "c.svs",
        0.5,
        vec![1, 4],
        Metadata::Aperio { app_mag: 20 },
    );
    let slide = Slide::open(&path, None).unwrap();
    let tiling = tile_slide(&slide, &TilingOptions::default()).unwrap();
    // Zero the second quarter of the file: level-0 JPEG tiles, while the header, the IFDs
    // (written after the pixels) and level 1 stay intact.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 4..n / 2].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let tiles: Arc<[_]> = tiling.tiles.clone().into();
    let config = StreamConfig {
        batch_size: 4,
        threads: 2,
        ..StreamConfig::default()
    };
    let results: Vec<_> = TileStream::start(&path, &tiling.plan, tiles, &config)
        .unwrap()
        .collect();
    let err = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("a read error");
    let msg = err.to_string();
    assert!(
        msg.contains("c.svs") && msg.contains("cannot read"),
        "{msg}"
    );
    // The stream stops at the first error.
    assert!(results.last().unwrap().is_err());
}

/// Writes a tiled TIFF whose header declares `side` x `side` px in `tile` px tiles, every tile
/// pointing at the same 64 bytes: a few hundred KB on disk however large the declared image.
fn write_declared_tiff(path: &Path, side: u32, tile: u32) {
    use tiff::encoder::{TiffEncoder, TiffKindStandard};
    use tiff::tags::Tag;
    let file = std::fs::File::create(path).unwrap();
    let mut tiff =
        TiffEncoder::<_, TiffKindStandard>::new_generic(std::io::BufWriter::new(file)).unwrap();
    let mut dir = tiff.image_directory().unwrap();
    let blob = dir.write_data(&[200u8; 64][..]).unwrap();
    let n = (side.div_ceil(tile) as usize).pow(2);
    dir.write_tag(Tag::ImageWidth, side).unwrap();
    dir.write_tag(Tag::ImageLength, side).unwrap();
    dir.write_tag(Tag::BitsPerSample, &[8u16, 8, 8][..])
        .unwrap();
    dir.write_tag(Tag::Compression, 1u16).unwrap();
    dir.write_tag(Tag::PhotometricInterpretation, 2u16).unwrap();
    dir.write_tag(Tag::SamplesPerPixel, 3u16).unwrap();
    dir.write_tag(Tag::PlanarConfiguration, 1u16).unwrap();
    dir.write_tag(Tag::TileWidth, tile).unwrap();
    dir.write_tag(Tag::TileLength, tile).unwrap();
    dir.write_tag(Tag::TileOffsets, &vec![blob as u32; n][..])
        .unwrap();
    dir.write_tag(Tag::TileByteCounts, &vec![64u32; n][..])
        .unwrap();
    dir.finish().unwrap();
}

/// A 1 MB TIFF that declares 3 x 10^6 px a side (10^7 once asked for 73 GB): refused from its
/// header, by the tile limit and, with that limit lifted, by the view cap, in well under a
/// second and without reading a pixel.
#[test]
fn forged_huge_tiff_is_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.tiff");
    write_declared_tiff(&path, 3_000_000, 8192);
    assert!(std::fs::metadata(&path).unwrap().len() < 2 << 20);
    let slide = Slide::open(&path, Some(0.5)).unwrap();
    assert_eq!(slide.level0_size(), (3_000_000, 3_000_000));

    let started = std::time::Instant::now();
    let err = tile_slide(&slide, &TilingOptions::default())
        .err()
        .expect("a 137 M-tile grid was accepted");
    let msg = err.to_string();
    assert!(matches!(err, WsiError::AbsurdPlan { .. }), "{msg}");
    assert!(
        msg.contains("11718 x 11718") && msg.contains("maximum of 2000000 (tiling.max_tiles)"),
        "{msg}"
    );

    let lifted = TilingOptions {
        max_tiles: u64::MAX,
        ..TilingOptions::default()
    };
    let msg = tile_slide(&slide, &lifted).err().unwrap().to_string();
    assert!(
        msg.contains("tissue view would exceed 40000000 px"),
        "{msg}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}: pixels were read",
        started.elapsed()
    );
}

/// A header may declare a modest image stored in enormous tiles, which OpenSlide would decode
/// whole (65536^2 px: 17 GB) at the first pixel read: refused from the header.
#[test]
fn huge_stored_tiles_are_refused_before_any_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bigtiles.tiff");
    write_declared_tiff(&path, 100_000, 65_536);
    let slide = Slide::open(&path, Some(0.5)).unwrap();
    assert_eq!(slide.levels()[0].tile_size, Some((65_536, 65_536)));
    let started = std::time::Instant::now();
    let msg = tile_slide(&slide, &TilingOptions::default())
        .err()
        .expect("a slide stored in 65536 px tiles was read")
        .to_string();
    assert!(
        msg.contains("level 0 is stored in 65536 x 65536 px tiles")
            && msg.contains("maximum of 67108864 px per stored tile"),
        "{msg}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

/// The limit is the caller's: a 20x slide of 8 x 6 tiles passes at 48 and fails at 47.
#[test]
fn max_tiles_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.svs");
    let spec = SlideSpec {
        width: 2048,
        height: 1536,
        mpp: 0.5,
        downsamples: vec![1, 4],
        metadata: Metadata::Aperio { app_mag: 20 },
        jpeg_quality: 90,
    };
    slide_writer::write_slide(&path, &spec, &Scene::blobs(1024.0, 768.0)).unwrap();
    let slide = Slide::open(&path, None).unwrap();
    let opts = |max_tiles| TilingOptions {
        max_tiles,
        ..TilingOptions::default()
    };
    let tiling = tile_slide(&slide, &opts(48)).unwrap();
    assert_eq!((tiling.plan.grid_width, tiling.plan.grid_height), (8, 6));
    let msg = tile_slide(&slide, &opts(47)).err().unwrap().to_string();
    assert!(
        msg.contains("8 x 6 = 48 tiles, over the maximum of 47"),
        "{msg}"
    );
}

/// Coarse resolutions, from the file or the user, would cut tiles of a few level-0 pixels (an
/// Aperio `MPP = 49.99` gave 468,616 tiles of 3 px; `--mpp 100` a 12.9 GB view): refused by the
/// minimum tile side, naming it and the mpp's source.
#[test]
fn coarse_mpp_is_refused_by_the_minimum_tile_side() {
    let dir = tempfile::tempdir().unwrap();
    let aperio = dir.path().join("coarse.svs");
    let spec = SlideSpec {
        width: 2048,
        height: 2048,
        mpp: 49.99,
        downsamples: vec![1, 4],
        metadata: Metadata::Aperio { app_mag: 1 },
        jpeg_quality: 90,
    };
    slide_writer::write_slide(&aperio, &spec, &scene()).unwrap();
    let slide = Slide::open(&aperio, None).unwrap();
    assert_eq!(slide.mpp().unwrap().source, MppSource::Openslide);
    let msg = tile_slide(&slide, &TilingOptions::default())
        .err()
        .expect("3 px tiles accepted")
        .to_string();
    assert!(
        msg.contains("spans 3 level-0 px, under the minimum of 16")
            && msg.contains("at most 8 um/px")
            && msg.contains("openslide properties"),
        "{msg}"
    );

    let bare = write(dir.path(), "nompp.tiff", 0.5, vec![1, 4], Metadata::None);
    let slide = Slide::open(&bare, Some(100.0)).unwrap();
    let msg = tile_slide(&slide, &TilingOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("under the minimum of 16") && msg.contains("--mpp"),
        "{msg}"
    );
    // 8 um/px is the coarsest accepted: 16 px tiles, a view no finer than level 0.
    let slide = Slide::open(&bare, Some(8.0)).unwrap();
    let tiling = tile_slide(&slide, &TilingOptions::default()).unwrap();
    assert_eq!(tiling.plan.level0_tile_px, 16);
    assert!(tiling.view_downsample >= 1.0);
}
