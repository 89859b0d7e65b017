//! One ingest of a folder of mixed formats, with known truth: an Aperio SVS, a generic TIFF
//! (resolution tags), an OME-TIFF (mpp only in the OME-XML), a TIFF with two unreadable tiles
//! (embedded without them, and they are listed) and one with too many (failed, saying why).

use std::path::Path;

use gigapath_models::init::{init_slide_encoder, init_tile_encoder, SlideSize, TileSize};
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use gigapath_store::FeatureFile;
use gigapath_wsi::slide_writer::{self, Metadata, Scene, SlideSpec};

const TEXT_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/reference/text_bert_mlm"
);

const MPP: f64 = 0.5;
const SIDE_UM: (f64, f64) = (1200.0, 1000.0);

fn write(path: &Path, metadata: Metadata) {
    let spec = SlideSpec {
        width: (SIDE_UM.0 / MPP) as u64,
        height: (SIDE_UM.1 / MPP) as u64,
        mpp: MPP,
        downsamples: vec![1, 4, 16],
        metadata,
        jpeg_quality: 90,
    };
    slide_writer::write_slide(path, &spec, &Scene::blobs(SIDE_UM.0, SIDE_UM.1)).unwrap();
}

/// The grid tiles the tiler keeps on the intact slide, as stored 256 px TIFF tiles (at 0.5
/// um/px one grid tile is one stored tile of level 0).
fn kept_tiles(path: &Path) -> Vec<(u32, u32)> {
    let slide = gigapath_wsi::Slide::open(path, None).unwrap();
    let tiling = gigapath_wsi::tile_slide(&slide, &Default::default()).unwrap();
    tiling.tiles.iter().map(|t| (t.gx, t.gy)).collect()
}

#[test]
fn a_mixed_folder_ingests_in_one_run_and_unreadable_tiles_are_skipped_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let models = root.join("models");
    init_tile_encoder(
        &models.join("tile"),
        TileSize {
            embed_dim: 48,
            depth: 1,
            num_heads: 3,
        },
        0,
    )
    .unwrap();
    init_slide_encoder(
        &models.join("slide"),
        SlideSize {
            in_chans: 48,
            embed_dim: 64,
            depth: 1,
            num_heads: 16,
        },
        1,
    )
    .unwrap();
    let slides = root.join("slides");
    std::fs::create_dir_all(&slides).unwrap();
    write(&slides.join("aperio.svs"), Metadata::Aperio { app_mag: 20 });
    write(&slides.join("generic.tiff"), Metadata::TiffResolution);
    write(&slides.join("ome.tif"), Metadata::Ome { sub_ifds: true });
    let damaged = slides.join("damaged.tiff");
    write(&damaged, Metadata::TiffResolution);
    let kept = kept_tiles(&damaged);
    let n = kept.len();
    assert!(n >= 20, "{n} kept tiles");
    let bad = [kept[3], kept[n - 2]];
    slide_writer::corrupt_tiles(&damaged, 0, &bad).unwrap();
    let ruined = slides.join("ruined.tiff");
    write(&ruined, Metadata::TiffResolution);
    slide_writer::corrupt_tiles(&ruined, 0, &kept[..n / 4]).unwrap();

    let mut cfg = Config::load(Some(&root.join("data")), None).unwrap();
    cfg.models.tile_encoder = Some(models.join("tile"));
    cfg.models.slide_encoder = Some(models.join("slide"));
    cfg.models.text_encoder = Some(TEXT_MODEL.into());
    cfg.models.text_pool = "cls".into();
    cfg.ingest.batch_size = 8;
    cfg.ingest.reader_threads = 2;
    cfg.tiling.max_bad_tile_fraction = 0.1;
    let pipeline = Pipeline::open(cfg).unwrap();
    let req = IngestRequest {
        inputs: vec![slides.clone()],
        ..IngestRequest::default()
    };
    let summary = pipeline.ingest(&req, &Quiet).unwrap();
    assert_eq!(summary.slides_found, 5);
    assert_eq!(
        (summary.run.slides_ok, summary.run.slides_failed),
        (4, 1),
        "{:?}",
        summary.run.failures
    );
    let (id, why) = &summary.run.failures[0];
    assert_eq!(id, "ruined");
    assert!(
        why.contains("tiling.max_bad_tile_fraction") && why.contains(&format!("of {n} kept tiles")),
        "{why}"
    );

    // The damaged slide is embedded from the tiles that could be read; the others are listed.
    let fp = pipeline.slide_models().unwrap().fingerprints["tile"].clone();
    let features = FeatureFile::read(pipeline.store.feature_path("damaged", &fp)).unwrap();
    assert_eq!(features.len(), n - 2);
    for (gx, gy) in bad {
        assert!(!features.grid_xy.contains(&[gx as i32, gy as i32]));
    }
    let csv =
        std::fs::read_to_string(pipeline.tiles_dir("damaged").join("skipped_tiles.csv")).unwrap();
    let listed: Vec<(u32, u32)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(listed, bad.to_vec());
    let tiles_summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pipeline.tiles_dir("damaged").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tiles_summary["skipped_tiles"], 2);
    // The OME-TIFF's mpp came from its OME-XML; every format gave its kept tiles.
    let ome: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pipeline.tiles_dir("ome").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ome["mpp_source"], "ome-xml");
    for id in ["aperio", "generic", "ome"] {
        let f = FeatureFile::read(pipeline.store.feature_path(id, &fp)).unwrap();
        assert_eq!(f.len(), n, "{id}");
    }
}

#[test]
fn artifact_rules_are_switched_in_the_config_and_recorded_with_the_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file = root.join("qc.toml");
    std::fs::write(
        &file,
        "[tiling]\nartifacts = true\nout_of_focus = false\nblur_threshold = 80.0\n",
    )
    .unwrap();
    let cfg = Config::load(Some(&root.join("data")), Some(&file)).unwrap();
    let a = cfg.tiling.artifact_options();
    assert!(a.enabled && a.pen && a.debris && !a.blur);
    assert_eq!(a.blur_threshold, 80.0);
    // Off by default: the reference's tiling.
    let default = Config::load(Some(&root.join("data2")), None).unwrap();
    assert!(!default.tiling.artifact_options().enabled);
    std::fs::write(&file, "[tiling]\nblur_threshold = -1.0\n").unwrap();
    let err = Config::load(Some(&root.join("data3")), Some(&file)).unwrap_err();
    assert!(err.to_string().contains("tiling.blur_threshold"), "{err}");

    // An ingest with the rules on: the slide's pen marks and blur are left out, and the tiles
    // folder says so.
    let models = root.join("models");
    init_tile_encoder(
        &models.join("tile"),
        TileSize {
            embed_dim: 48,
            depth: 1,
            num_heads: 3,
        },
        0,
    )
    .unwrap();
    init_slide_encoder(
        &models.join("slide"),
        SlideSize {
            in_chans: 48,
            embed_dim: 64,
            depth: 1,
            num_heads: 16,
        },
        1,
    )
    .unwrap();
    let slides = root.join("slides");
    std::fs::create_dir_all(&slides).unwrap();
    let (w_um, h_um) = (2000.0, 1600.0);
    let spec = SlideSpec {
        width: (w_um / MPP) as u64,
        height: (h_um / MPP) as u64,
        mpp: MPP,
        downsamples: vec![1, 4, 16],
        metadata: Metadata::Aperio { app_mag: 20 },
        jpeg_quality: 90,
    };
    slide_writer::write_slide(
        &slides.join("pen.svs"),
        &spec,
        &Scene::blobs_with_artifacts(w_um, h_um),
    )
    .unwrap();
    // A slide with a corrected mask beside it (`SLIDE_ID.geojson`): its tiles are the mask's,
    // grid tiles x 2..6, y 1..4 (256 level-0 px each at 0.5 um/px).
    write(&slides.join("masked.svs"), Metadata::Aperio { app_mag: 20 });
    let mask = serde_json::json!({"type": "FeatureCollection", "features": [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[512, 256], [1536, 256], [1536, 1024], [512, 1024], [512, 256]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}}
    }]});
    std::fs::write(slides.join("masked.geojson"), mask.to_string()).unwrap();
    let mut cfg = Config::load(Some(&root.join("data")), None).unwrap();
    cfg.models.tile_encoder = Some(models.join("tile"));
    cfg.models.slide_encoder = Some(models.join("slide"));
    cfg.models.text_encoder = Some(TEXT_MODEL.into());
    cfg.models.text_pool = "cls".into();
    cfg.tiling.artifacts = true;
    let pipeline = Pipeline::open(cfg).unwrap();
    let req = IngestRequest {
        inputs: vec![slides],
        ..IngestRequest::default()
    };
    let summary = pipeline.ingest(&req, &Quiet).unwrap();
    assert_eq!(summary.run.slides_ok, 2, "{:?}", summary.run.failures);
    let tiles: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pipeline.tiles_dir("pen").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tiles["artifacts"]["out_of_focus_tiles"], 9);
    assert!(tiles["artifacts"]["pen_area_fraction"].as_f64().unwrap() > 0.03);
    let fp = pipeline.slide_models().unwrap().fingerprints["tile"].clone();
    let features = FeatureFile::read(pipeline.store.feature_path("pen", &fp)).unwrap();
    assert_eq!(features.len() as u64, tiles["tiles"].as_u64().unwrap());
    let masked = FeatureFile::read(pipeline.store.feature_path("masked", &fp)).unwrap();
    let mut cells = masked.grid_xy.clone();
    cells.sort();
    let want: Vec<[i32; 2]> = (2..6).flat_map(|x| (1..4).map(move |y| [x, y])).collect();
    assert_eq!(cells, want);
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pipeline.tiles_dir("masked").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert!(summary["mask_geojson"]
        .as_str()
        .unwrap()
        .ends_with("masked.geojson"));
}
