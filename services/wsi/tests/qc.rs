//! Quality control on generated slides whose artifacts are known: pen marks, debris and an
//! out-of-focus patch left out of the tissue; masks out as GeoJSON and back in.

use std::path::{Path, PathBuf};

use gigapath_wsi::artifacts::ArtifactOptions;
use gigapath_wsi::grid::TilePlan;
use gigapath_wsi::synth::{self, Metadata, Scene, SlideSpec};
use gigapath_wsi::{outputs, tile_slide, Slide, TilingOptions, TissueMethod};

const SCENE_UM: (f64, f64) = (2800.0, 2240.0);

fn scene() -> Scene {
    Scene::blobs_with_artifacts(SCENE_UM.0, SCENE_UM.1)
}

fn write(dir: &Path, name: &str, mpp: f64, downsamples: Vec<u32>) -> PathBuf {
    let path = dir.join(name);
    let spec = SlideSpec {
        width: (SCENE_UM.0 / mpp).round() as u64,
        height: (SCENE_UM.1 / mpp).round() as u64,
        mpp,
        downsamples,
        metadata: Metadata::Aperio { app_mag: 20 },
        jpeg_quality: 90,
    };
    synth::write_slide(&path, &spec, &scene()).unwrap();
    path
}

/// The tiles a perfect QC keeps: more than 10% clean tissue (no ink, no debris), and the
/// centre not out of focus.
fn true_kept(plan: &TilePlan) -> Vec<(u32, u32)> {
    let tile_um = plan.level0_tile_px as f64 * plan.mpp;
    let s = scene();
    let mut kept = Vec::new();
    for gy in 0..plan.grid_height {
        for gx in 0..plan.grid_width {
            let (x, y) = (gx as f64 * tile_um, gy as f64 * tile_um);
            let clean = s.clean_tissue_coverage(x, y, tile_um, 32);
            let centre = s.clean_tissue_at(x + tile_um / 2.0, y + tile_um / 2.0);
            if clean > 0.1 && !matches!(centre, Some((_, false))) {
                kept.push((gx, gy));
            }
        }
    }
    kept
}

fn check_artifacts(path: &Path) {
    let slide = Slide::open(path, None).unwrap();
    let s = scene();
    for method in [TissueMethod::Otsu, TissueMethod::Saturation] {
        let with = TilingOptions {
            method,
            artifacts: ArtifactOptions::all(),
            ..TilingOptions::default()
        };
        let tiling = tile_slide(&slide, &with).unwrap();
        let plan = &tiling.plan;
        let tile_um = plan.level0_tile_px as f64 * plan.mpp;
        let truth = true_kept(plan);
        let kept: Vec<(u32, u32)> = tiling.tiles.iter().map(|t| (t.gx, t.gy)).collect();
        let err = (kept.len() as f64 - truth.len() as f64).abs() / truth.len() as f64;
        eprintln!("{method}: kept {}, truth {}", kept.len(), truth.len());
        let missing: Vec<_> = truth.iter().filter(|t| !kept.contains(t)).collect();
        let extra: Vec<_> = kept.iter().filter(|t| !truth.contains(t)).collect();
        eprintln!("  missing {missing:?}, extra {extra:?}");
        assert!(
            err <= 0.05,
            "{method}: kept {} tiles, truth {} ({:.1}% off)",
            kept.len(),
            truth.len(),
            100.0 * err
        );
        // Pen-marked and debris-only areas are left out: every kept tile holds clean tissue,
        // none is out of focus.
        for &(gx, gy) in &kept {
            let (x, y) = (gx as f64 * tile_um, gy as f64 * tile_um);
            assert!(
                s.clean_tissue_coverage(x, y, tile_um, 32) > 0.02,
                "{method}: tile ({gx}, {gy}) kept with no clean tissue"
            );
            assert!(
                !matches!(
                    s.clean_tissue_at(x + tile_um / 2.0, y + tile_um / 2.0),
                    Some((_, false))
                ),
                "{method}: out-of-focus tile ({gx}, {gy}) kept"
            );
        }
        let summary = tiling.artifact_summary.clone().unwrap();
        assert_eq!(summary.out_of_focus_tiles, 9, "{method}");
        assert!(summary.pen_area_fraction > 0.03, "{summary:?}");
        assert!(summary.debris_area_fraction > 0.0, "{summary:?}");

        // Without the rules (the old behaviour) ink, debris and blur are tissue.
        let without = TilingOptions {
            method,
            ..TilingOptions::default()
        };
        let old = tile_slide(&slide, &without).unwrap();
        let dirty = old
            .tiles
            .iter()
            .filter(|t| {
                let (x, y) = (t.gx as f64 * tile_um, t.gy as f64 * tile_um);
                s.clean_tissue_coverage(x, y, tile_um, 32) <= 0.02
            })
            .count();
        eprintln!(
            "{method} without rules: kept {}, {dirty} without clean tissue",
            old.tiles.len()
        );
        assert!(dirty >= 5, "{method}: {dirty}");
        assert!(old.tiles.len() as f64 > truth.len() as f64 * 1.1);
    }
}

#[test]
fn pen_marks_debris_and_blur_are_left_out_at_20x() {
    let dir = tempfile::tempdir().unwrap();
    check_artifacts(&write(dir.path(), "a20.svs", 0.499, vec![1, 4, 16]));
}

#[test]
fn pen_marks_debris_and_blur_are_left_out_at_40x_read_from_level_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a40.svs", 0.2527, vec![1, 2, 8]);
    check_artifacts(&path);
    // Each rule can be turned off alone; the summary and overlay come with the outputs.
    let slide = Slide::open(&path, None).unwrap();
    let no_blur = TilingOptions {
        artifacts: ArtifactOptions {
            blur: false,
            ..ArtifactOptions::all()
        },
        ..TilingOptions::default()
    };
    let tiling = tile_slide(&slide, &no_blur).unwrap();
    assert_eq!(
        tiling.artifact_summary.as_ref().unwrap().out_of_focus_tiles,
        0
    );
    let out = dir.path().join("out");
    let summary = outputs::write_tiling(&out, &slide, &tiling).unwrap();
    assert!(summary.artifacts.unwrap().pen_area_fraction > 0.03);
    let overlay = image::open(out.join("overlay.png")).unwrap().to_rgb8();
    // Pen marks are tinted orange: red well above blue somewhere over the blue stroke.
    assert!(overlay
        .pixels()
        .any(|p| p[0] as i32 > p[2] as i32 + 60 && p[1] > 60));
}
