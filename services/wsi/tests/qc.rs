//! Quality control on generated slides whose artifacts are known: pen marks, debris and an
//! out-of-focus patch left out of the tissue; masks out as GeoJSON and back in.

use std::path::{Path, PathBuf};

use gigapath_wsi::artifacts::ArtifactOptions;
use gigapath_wsi::grid::TilePlan;
use gigapath_wsi::slide_writer::{self, Metadata, Scene, SlideSpec};
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
    slide_writer::write_slide(&path, &spec, &scene()).unwrap();
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

#[test]
fn mask_geojson_round_trips_pixel_for_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "rt.svs", 0.499, vec![1, 4, 16]);
    let slide = Slide::open(&path, None).unwrap();
    let opts = TilingOptions {
        artifacts: ArtifactOptions::all(),
        ..TilingOptions::default()
    };
    let tiling = tile_slide(&slide, &opts).unwrap();
    let out = dir.path().join("out");
    outputs::write_tiling(&out, &slide, &tiling).unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("mask.geojson")).unwrap()).unwrap();
    assert_eq!(doc["type"], "FeatureCollection");
    let names: std::collections::BTreeSet<&str> = doc["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["properties"]["classification"]["name"].as_str().unwrap())
        .collect();
    let want: std::collections::BTreeSet<&str> = ["Tissue", "Pen mark", "Debris", "Out of focus"]
        .into_iter()
        .collect();
    assert_eq!(names, want);
    // Level-0 coordinates: inside the slide, and reaching across most of it.
    let (w0, h0) = slide.level0_size();
    let mut max_x = 0.0f64;
    for f in doc["features"].as_array().unwrap() {
        for ring in f["geometry"]["coordinates"].as_array().unwrap() {
            let ring = ring.as_array().unwrap();
            assert_eq!(ring.first(), ring.last(), "closed ring");
            for p in ring {
                let (x, y) = (p[0].as_f64().unwrap(), p[1].as_f64().unwrap());
                let edge = tiling.view_downsample;
                assert!(x >= 0.0 && y >= 0.0 && x <= w0 as f64 + edge && y <= h0 as f64 + edge);
                max_x = max_x.max(x);
            }
        }
    }
    assert!(max_x > 0.8 * w0 as f64);

    // Read back instead of segmenting: the same mask, artifacts and tiles.
    let back = TilingOptions {
        mask_geojson: Some(out.join("mask.geojson")),
        ..TilingOptions::default()
    };
    let again = tile_slide(&slide, &back).unwrap();
    let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    assert!(tiling.mask.data.iter().filter(|&&v| v != 0).count() > 10_000);
    assert_eq!(differ(&again.mask.data, &tiling.mask.data), 0);
    assert_eq!(differ(&again.artifacts.data, &tiling.artifacts.data), 0);
    assert_eq!(again.tiles, tiling.tiles);
    let summary = outputs::write_tiling(&dir.path().join("again"), &slide, &again).unwrap();
    assert_eq!(summary.mask_geojson, Some(out.join("mask.geojson")));
}

/// A QuPath-style polygon feature.
fn polygon(class: Option<&str>, rings: &[&[(f64, f64)]]) -> serde_json::Value {
    let coords: Vec<Vec<[f64; 2]>> = rings
        .iter()
        .map(|r| {
            let mut pts: Vec<[f64; 2]> = r.iter().map(|&(x, y)| [x, y]).collect();
            pts.push(pts[0]);
            pts
        })
        .collect();
    let mut props = serde_json::json!({"objectType": "annotation"});
    if let Some(c) = class {
        props["classification"] = serde_json::json!({"name": c, "color": [0, 0, 0]});
    }
    serde_json::json!({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords}, "properties": props})
}

fn rect(x0: f64, y0: f64, x1: f64, y1: f64) -> Vec<(f64, f64)> {
    vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
}

#[test]
fn a_corrected_mask_decides_the_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "fix.svs", 0.5, vec![1, 4, 16]);
    let slide = Slide::open(&path, None).unwrap();
    let l = 256.0;
    // Tissue: grid tiles x 2..6, y 3..7 (16 tiles) drawn by hand, with a hole of one tile at
    // (4, 5); a second piece (unclassified) over tile (10, 1); a pen mark over tile (3, 4) and
    // an "Exclude" region over tile (5, 6).
    let features = vec![
        polygon(
            Some("Tissue"),
            &[
                &rect(2.0 * l, 3.0 * l, 6.0 * l, 7.0 * l),
                &rect(4.0 * l, 5.0 * l, 5.0 * l, 6.0 * l),
            ],
        ),
        polygon(None, &[&rect(10.0 * l, 1.0 * l, 11.0 * l, 2.0 * l)]),
        polygon(
            Some("Pen mark"),
            &[&rect(3.0 * l, 4.0 * l, 4.0 * l, 5.0 * l)],
        ),
        polygon(
            Some("Exclude: fold"),
            &[&rect(5.0 * l, 6.0 * l, 6.0 * l, 7.0 * l)],
        ),
    ];
    let file = dir.path().join("fixed.geojson");
    std::fs::write(
        &file,
        serde_json::to_vec(&serde_json::json!({"type": "FeatureCollection", "features": features}))
            .unwrap(),
    )
    .unwrap();
    let opts = TilingOptions {
        mask_geojson: Some(file.clone()),
        ..TilingOptions::default()
    };
    let tiling = tile_slide(&slide, &opts).unwrap();
    let kept: Vec<(u32, u32)> = tiling.tiles.iter().map(|t| (t.gx, t.gy)).collect();
    let mut want = vec![(10, 1)];
    for gy in 3..7 {
        for gx in 2..6 {
            if ![(4, 5), (3, 4), (5, 6)].contains(&(gx, gy)) {
                want.push((gx, gy));
            }
        }
    }
    want.sort_by_key(|&(x, y)| (y, x));
    assert_eq!(kept, want);
    assert!(tiling.tiles.iter().all(|t| t.tissue == 1.0));

    // Bad masks are refused naming the file, before anything is written.
    for (name, text) in [
        ("notjson.geojson", "{ nope".to_string()),
        (
            "empty.geojson",
            r#"{"type": "FeatureCollection", "features": []}"#.to_string(),
        ),
        (
            "points.geojson",
            r#"{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}"#
                .to_string(),
        ),
        (
            "badpoint.geojson",
            r#"{"type": "Polygon", "coordinates": [[[0, 0], ["a", 1], [5, 5]]]}"#.to_string(),
        ),
    ] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, text).unwrap();
        let opts = TilingOptions {
            mask_geojson: Some(bad.clone()),
            ..TilingOptions::default()
        };
        let err = match tile_slide(&slide, &opts) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{name} accepted"),
        };
        assert!(err.contains(name), "{err}");
    }
}
