//! Slide formats beyond Aperio and generic TIFF, on generated files whose truth is known:
//! OME-TIFF (SubIFDs and flat pyramids, mpp from the OME-XML) and slides with unreadable tiles.

use std::path::{Path, PathBuf};

use gigapath_wsi::grid::TilePlan;
use gigapath_wsi::synth::{self, Metadata, Scene, SlideSpec};
use gigapath_wsi::{tile_slide, MppSource, Slide, TilingOptions, TissueMethod};

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
    synth::write_slide(&path, &spec, &scene()).unwrap();
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
