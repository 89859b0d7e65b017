//! Slide formats beyond Aperio and generic TIFF, on generated files whose truth is known:
//! OME-TIFF (SubIFDs and flat pyramids, mpp from the OME-XML) and slides with unreadable tiles.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gigapath_wsi::grid::TilePlan;
use gigapath_wsi::slide_writer::{self, Metadata, Scene, SlideSpec};
use gigapath_wsi::stream::read_tile_rgb;
use gigapath_wsi::transform::RGB_TILE_LEN;
use gigapath_wsi::{
    tile_slide, BatchData, BatchFormat, MppSource, Slide, StreamConfig, TileStream, TilingOptions,
    TissueMethod, WsiError,
};

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

/// Tiles whose true tissue coverage (from the scene's shapes) is above 0.1.
fn true_kept(plan: &TilePlan) -> usize {
    let tile_um = plan.level0_tile_px as f64 * plan.mpp;
    let s = scene();
    let mut n = 0;
    for gy in 0..plan.grid_height {
        for gx in 0..plan.grid_width {
            n += (s.coverage(gx as f64 * tile_um, gy as f64 * tile_um, tile_um, 32) > 0.1) as usize;
        }
    }
    n
}

fn assert_tiles_near_truth(slide: &Slide) {
    for method in [TissueMethod::Otsu, TissueMethod::Saturation] {
        let opts = TilingOptions {
            method,
            ..TilingOptions::default()
        };
        let tiling = tile_slide(slide, &opts).unwrap();
        let truth = true_kept(&tiling.plan);
        let kept = tiling.tiles.len();
        let err = (kept as f64 - truth as f64).abs() / truth as f64;
        assert!(
            err <= 0.05,
            "{method}: kept {kept}, truth {truth} ({:.1}% off)",
            100.0 * err
        );
    }
}

#[test]
fn ome_tiff_with_subifds_opens_as_generic_tiff_with_mpp_from_the_ome_xml() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "s.ome.tiff",
        0.2527,
        vec![1, 2, 8],
        Metadata::Ome { sub_ifds: true },
    );
    let slide = Slide::open(&path, None).unwrap();
    let info = slide.info();
    // OpenSlide 3.4 walks the main IFD chain only: the SubIFDs pyramid is invisible to it.
    assert_eq!(info.vendor, "generic-tiff");
    assert_eq!(info.levels.len(), 1);
    let mpp = info.mpp.clone().unwrap();
    assert_eq!(mpp.source, MppSource::OmeXml);
    assert!((mpp.x - 0.2527).abs() < 1e-9 && (mpp.y - 0.2527).abs() < 1e-9);
    let plan = gigapath_wsi::grid::plan(&slide).unwrap();
    assert_eq!((plan.level0_tile_px, plan.read_level), (512, 0));
    assert_tiles_near_truth(&slide);
}

#[test]
fn flat_ome_tiff_pyramid_gives_levels_and_the_ome_mpp() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "f.ome.tif",
        0.2527,
        vec![1, 2, 8],
        Metadata::Ome { sub_ifds: false },
    );
    let slide = Slide::open(&path, None).unwrap();
    assert_eq!(slide.info().levels.len(), 3);
    assert_eq!(slide.mpp().unwrap().source, MppSource::OmeXml);
    // The 20x level (downsample 2) holds 256 px per tile: read there, not resampled.
    let plan = gigapath_wsi::grid::plan(&slide).unwrap();
    assert_eq!((plan.read_level, plan.resampled), (1, false));
    assert_tiles_near_truth(&slide);
}

/// (index, RGB pixels) of the tiles a stream delivered.
type ReadTiles = Vec<(usize, Vec<u8>)>;

/// Reads every kept tile through a stream; returns the skipped indices and the tiles read.
fn stream_all(
    path: &Path,
    tiling: &gigapath_wsi::Tiling,
    max_bad_tile_fraction: f64,
) -> Result<(Vec<usize>, ReadTiles), WsiError> {
    let tiles: Arc<[_]> = tiling.tiles.clone().into();
    let config = StreamConfig {
        batch_size: 5,
        threads: 3,
        window: 3,
        format: BatchFormat::Rgb,
        max_bad_tile_fraction,
    };
    let (mut skipped, mut read) = (Vec::new(), Vec::new());
    for batch in TileStream::start(path, &tiling.plan, tiles, &config)? {
        let batch = batch?;
        skipped.extend(batch.skipped.iter().map(|s| s.index));
        let BatchData::Rgb(rgb) = &batch.data else {
            panic!("wrong format")
        };
        assert_eq!(rgb.len(), batch.read_len() * RGB_TILE_LEN);
        for (i, px) in batch.read_indices().zip(rgb.chunks_exact(RGB_TILE_LEN)) {
            read.push((i, px.to_vec()));
        }
    }
    Ok((skipped, read))
}

#[test]
fn unreadable_tiles_are_skipped_and_named_up_to_the_allowed_fraction() {
    let dir = tempfile::tempdir().unwrap();
    // 0.5 um/px: a grid tile is exactly one stored 256 px TIFF tile of level 0.
    let path = write(
        dir.path(),
        "bad.tiff",
        0.5,
        vec![1, 4, 16],
        Metadata::TiffResolution,
    );
    let slide = Slide::open(&path, None).unwrap();
    let tiling = tile_slide(&slide, &TilingOptions::default()).unwrap();
    let n = tiling.tiles.len();
    assert!(n > 60, "{n} tiles");
    // Two kept tiles (in different batches and readers) damaged; the segmentation view reads
    // level 2, which stays intact.
    let bad = [7usize, 31];
    let stored: Vec<(u32, u32)> = bad
        .iter()
        .map(|&i| (tiling.tiles[i].gx, tiling.tiles[i].gy))
        .collect();
    slide_writer::corrupt_tiles(&path, 0, &stored).unwrap();
    let slide = Slide::open(&path, None).unwrap();
    let tiling2 = tile_slide(&slide, &TilingOptions::default()).unwrap();
    assert_eq!(
        tiling2.tiles, tiling.tiles,
        "the view does not read level 0"
    );

    let (skipped, read) = stream_all(&path, &tiling, 0.05).unwrap();
    assert_eq!(skipped, bad.to_vec());
    let indices: Vec<usize> = read.iter().map(|r| r.0).collect();
    let expected: Vec<usize> = (0..n).filter(|i| !bad.contains(i)).collect();
    assert_eq!(indices, expected);
    // Tiles after a failure (on a fresh handle) hold their own pixels.
    let fresh = Slide::open(&path, None).unwrap();
    for (i, px) in read.iter().filter(|r| [8usize, 32, n - 1].contains(&r.0)) {
        assert_eq!(
            px,
            &read_tile_rgb(&fresh, &tiling.plan, &tiling.tiles[*i]).unwrap()
        );
    }

    // Over the fraction (0 allowed; or 5% of n with more damaged): the slide fails, saying why.
    match stream_all(&path, &tiling, 0.0) {
        Err(WsiError::TooManyBadTiles {
            bad, total, first, ..
        }) => {
            assert_eq!((bad, total), (1, n));
            assert!(first.contains("JPEG"), "{first}");
        }
        other => panic!("expected too many bad tiles, got {:?}", other.map(|r| r.0)),
    }
    let more: Vec<(u32, u32)> = tiling.tiles[40..45].iter().map(|t| (t.gx, t.gy)).collect();
    slide_writer::corrupt_tiles(&path, 0, &more).unwrap();
    let err = stream_all(&path, &tiling, 0.05).unwrap_err().to_string();
    assert!(
        err.contains("bad.tiff") && err.contains("tiling.max_bad_tile_fraction"),
        "{err}"
    );
}

#[test]
fn damaged_tiles_in_the_level_the_view_reads_show_as_background_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    // A SubIFDs OME-TIFF: OpenSlide sees level 0 alone, so the tissue view reads level 0 too.
    let path = write(
        dir.path(),
        "one-level.ome.tiff",
        0.5,
        vec![1, 4],
        Metadata::Ome { sub_ifds: true },
    );
    let slide = Slide::open(&path, None).unwrap();
    assert_eq!(slide.levels().len(), 1);
    let intact = tile_slide(&slide, &TilingOptions::default()).unwrap();
    let damaged: Vec<(u32, u32)> = [5usize, 20]
        .iter()
        .map(|&i| (intact.tiles[i].gx, intact.tiles[i].gy))
        .collect();
    slide_writer::corrupt_tiles(&path, 0, &damaged).unwrap();
    let slide = Slide::open(&path, None).unwrap();
    let tiling = tile_slide(&slide, &TilingOptions::default()).unwrap();
    let kept: Vec<(u32, u32)> = tiling.tiles.iter().map(|t| (t.gx, t.gy)).collect();
    let want: Vec<(u32, u32)> = intact
        .tiles
        .iter()
        .map(|t| (t.gx, t.gy))
        .filter(|t| !damaged.contains(t))
        .collect();
    assert_eq!(kept, want);
    // The rest reads through.
    let (skipped, read) = stream_all(&path, &tiling, 0.0).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(read.len(), want.len());
}
