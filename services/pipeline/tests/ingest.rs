//! Ingest end to end on a generated cohort with small generated encoders: the expected points,
//! payloads, feature files and catalog states; bad slides and bad report rows recorded one by
//! one while the rest go on; re-runs that skip, retry and change weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gigapath_models::init::{init_slide_encoder, init_tile_encoder, SlideSize, TileSize};
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use gigapath_store::vector::{PayloadFilter, SearchRequest, REPORTS, SLIDE, SLIDES, TEXT};
use gigapath_store::FeatureFile;
use gigapath_synth::CohortSpec;

const TEXT_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/reference/text_bert_mlm"
);

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    cohort: PathBuf,
}

impl Fixture {
    fn new(per_subtype: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        make_models(&root.join("models"), 0);
        let cohort = root.join("cohort");
        let spec = CohortSpec {
            slides_per_subtype: per_subtype,
            slide_um: 700.0,
            ..CohortSpec::default()
        };
        gigapath_synth::generate(&cohort, &spec, &|_, _| {}).unwrap();
        Fixture {
            _dir: dir,
            root,
            cohort,
        }
    }

    fn config(&self, models: &str) -> Config {
        let mut cfg = Config::load(Some(&self.root.join("data")), None).unwrap();
        cfg.models.tile_encoder = Some(self.root.join(models).join("tile"));
        cfg.models.slide_encoder = Some(self.root.join(models).join("slide"));
        cfg.models.text_encoder = Some(PathBuf::from(TEXT_MODEL));
        cfg.models.text_pool = "cls".into();
        cfg.ingest.batch_size = 8;
        cfg.ingest.reader_threads = 2;
        cfg
    }
}

fn make_models(dir: &Path, seed: u64) {
    init_tile_encoder(
        &dir.join("tile"),
        TileSize {
            embed_dim: 48,
            depth: 1,
            num_heads: 3,
        },
        seed,
    )
    .unwrap();
    init_slide_encoder(
        &dir.join("slide"),
        SlideSize {
            in_chans: 48,
            embed_dim: 64,
            depth: 1,
            num_heads: 16,
        },
        seed + 1,
    )
    .unwrap();
}

#[test]
fn cohort_ingest_stores_every_slide_and_report_once() {
    let fx = Fixture::new(2);
    let pipeline = Pipeline::open(fx.config("models")).unwrap();
    let req = IngestRequest {
        inputs: vec![fx.cohort.join("slides")],
        reports: Some(fx.cohort.join("reports.jsonl")),
        ..IngestRequest::default()
    };
    let summary = pipeline.ingest(&req, &Quiet).unwrap();
    assert_eq!(summary.slides_found, 6);
    assert_eq!(summary.run.slides_ok, 6, "{:?}", summary.run.failures);
    assert_eq!(summary.reports.ok, 6);
    assert!(summary.reports.errors.is_empty());

    let manifest: gigapath_synth::Cohort =
        serde_json::from_slice(&std::fs::read(fx.cohort.join("manifest.json")).unwrap()).unwrap();
    let ids: Vec<String> = manifest.slides.iter().map(|s| s.slide_id.clone()).collect();
    let points = pipeline
        .block_on(pipeline.store.vectors.retrieve(SLIDES, &ids, true))
        .unwrap();
    assert_eq!(points.len(), 6);
    let mut tiles_total = 0;
    for (p, s) in points.iter().zip(&manifest.slides) {
        assert_eq!(p.id, s.slide_id);
        // Labels from the reports file travel to the slide's payload.
        assert_eq!(p.payload["labels"]["subtype"], s.subtype.label());
        assert_eq!(p.payload["site"], "kidney");
        assert_eq!(p.payload["cohort"], "synthetic-rcc");
        assert_eq!(p.vectors[SLIDE].len(), 64);
        assert!(
            !p.vectors.contains_key("joint"),
            "no alignment yet, no joint vector"
        );
        // The feature file holds one 48-d row per kept tile, with the tiler's grid.
        let grid = gigapath_wsi::gridfile::read_grid(
            &pipeline.tiles_dir(&s.slide_id).join("tiles.safetensors"),
        )
        .unwrap();
        let fp = pipeline.slide_models().unwrap().fingerprints["tile"].clone();
        let features = FeatureFile::read(pipeline.store.feature_path(&s.slide_id, &fp)).unwrap();
        assert_eq!(features.len(), grid.tiles.len());
        assert_eq!(features.dim, 48);
        assert_eq!(p.payload["tile_count"], grid.tiles.len() as u64);
        for (g, t) in features.grid_xy.iter().zip(&grid.tiles) {
            assert_eq!(*g, [t.gx as i32, t.gy as i32]);
        }
        tiles_total += grid.tiles.len() as u64;
    }
    assert_eq!(summary.run.tiles, tiles_total);

    // Reports are searchable by text embedding, and filterable by slide.
    let text = pipeline.text_model().unwrap();
    let query = text
        .encode(&["chromophobe carcinoma of the kidney"])
        .unwrap()
        .remove(0);
    let fingerprint = pipeline
        .block_on(
            pipeline
                .store
                .vectors
                .retrieve(REPORTS, &[format!("R-{}", ids[0])], false),
        )
        .unwrap()[0]
        .fingerprint
        .clone();
    let hits = pipeline
        .block_on(pipeline.store.vectors.search(&SearchRequest {
            collection: REPORTS.into(),
            vector: TEXT.into(),
            query,
            k: 10,
            filter: PayloadFilter::none().eq("slide_id", ids[0].clone()),
            fingerprint,
        }))
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].payload["slide_id"], ids[0].as_str());

    // A second run with the same weights does nothing; the catalog says why.
    let again = pipeline.ingest(&req, &Quiet).unwrap();
    assert_eq!((again.already_done, again.run.slides_ok), (6, 0));
    let status = pipeline.status().unwrap();
    assert_eq!(status.slides.get("embedded"), Some(&6));
    assert_eq!(status.jobs.done, 6);
    assert_eq!(status.points[SLIDES], 6);
    assert_eq!(status.points[REPORTS], 6);
    assert_eq!(status.fingerprints[SLIDES].len(), 1);
}

#[test]
fn bad_slides_and_bad_report_rows_are_recorded_and_the_rest_goes_on() {
    let fx = Fixture::new(1);
    let extra = fx.root.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("notes.svs"), "not a slide").unwrap();
    let glass = extra.join("glass.svs");
    gigapath_wsi::slide_writer::write_slide(
        &glass,
        &gigapath_wsi::slide_writer::SlideSpec {
            width: 1024,
            height: 1024,
            mpp: 0.5,
            downsamples: vec![1, 4],
            metadata: gigapath_wsi::slide_writer::Metadata::Aperio { app_mag: 20 },
            jpeg_quality: 90,
        },
        &gigapath_wsi::slide_writer::Scene {
            regions: vec![],
            background: [242, 241, 244],
        },
    )
    .unwrap();
    let reports = fx.root.join("reports.csv");
    std::fs::write(
        &reports,
        "slide_id,report_text,subtype\n\
         SYN-0001,\"Carcinoma of the kidney, clear-cell morphology.\",CCRCC\n\
         SYN-0002,,PRCC\n\
         NO-SUCH-SLIDE,Some text,PRCC\n\
         SYN-0003,too,many,fields\n",
    )
    .unwrap();
    let pipeline = Pipeline::open(fx.config("models")).unwrap();
    let req = IngestRequest {
        inputs: vec![fx.cohort.join("slides"), extra.clone()],
        reports: Some(reports),
        ..IngestRequest::default()
    };
    let summary = pipeline.ingest(&req, &Quiet).unwrap();
    assert_eq!(summary.run.slides_ok, 3);
    assert_eq!(summary.run.slides_failed, 2);
    let failures: BTreeMap<_, _> = summary.run.failures.iter().cloned().collect();
    assert!(
        failures["notes"].contains("not a slide format"),
        "{failures:?}"
    );
    assert!(failures["glass"].contains("no tissue"), "{failures:?}");
    let rec = pipeline
        .block_on(pipeline.store.catalog.slide("glass"))
        .unwrap()
        .unwrap();
    assert!(rec.error.unwrap().contains("no tissue"));
    assert_eq!(summary.reports.ok, 1);
    let messages: Vec<String> = summary
        .reports
        .errors
        .iter()
        .map(|e| format!("{}: {}", e.line, e.message))
        .collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(
        messages[0].starts_with("3: empty report text"),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("4: unknown slide id `NO-SUCH-SLIDE`"),
        "{messages:?}"
    );
    assert!(messages[2].starts_with("5: 4 fields"), "{messages:?}");
    assert_eq!(
        pipeline
            .block_on(pipeline.store.vectors.count(SLIDES, &PayloadFilter::none()))
            .unwrap(),
        3
    );

    // Failed slides are not retried by default, and are when asked.
    let again = pipeline
        .ingest(
            &IngestRequest {
                reports: None,
                ..req.clone()
            },
            &Quiet,
        )
        .unwrap();
    assert_eq!((again.previously_failed, again.run.slides_failed), (2, 0));
    let retried = pipeline
        .ingest(
            &IngestRequest {
                reports: None,
                retry_failed: true,
                ..req
            },
            &Quiet,
        )
        .unwrap();
    assert_eq!((retried.queued, retried.run.slides_failed), (2, 2));
}

#[test]
fn new_weights_give_new_fingerprints_and_mixed_searches_are_refused() {
    let fx = Fixture::new(1);
    make_models(&fx.root.join("models2"), 5);
    let req = IngestRequest {
        inputs: vec![fx.cohort.join("slides")],
        ..IngestRequest::default()
    };
    let ids = ["SYN-0001".to_string()];
    let first = {
        let pipeline = Pipeline::open(fx.config("models")).unwrap();
        assert_eq!(pipeline.ingest(&req, &Quiet).unwrap().run.slides_ok, 3);
        pipeline
            .block_on(pipeline.store.vectors.retrieve(SLIDES, &ids, true))
            .unwrap()
            .remove(0)
    };
    // Re-ingest only one slide with other weights: the collection is now mixed.
    let pipeline = Pipeline::open(fx.config("models2")).unwrap();
    let one = IngestRequest {
        inputs: vec![fx.cohort.join("slides/SYN-0001.svs")],
        ..IngestRequest::default()
    };
    assert_eq!(pipeline.ingest(&one, &Quiet).unwrap().run.slides_ok, 1);
    let second = pipeline
        .block_on(pipeline.store.vectors.retrieve(SLIDES, &ids, true))
        .unwrap()
        .remove(0);
    assert_ne!(first.fingerprint, second.fingerprint);
    assert_ne!(first.vectors[SLIDE], second.vectors[SLIDE]);
    let err = pipeline
        .block_on(pipeline.store.vectors.search(&SearchRequest {
            collection: SLIDES.into(),
            vector: SLIDE.into(),
            query: second.vectors[SLIDE].clone(),
            k: 3,
            filter: PayloadFilter::none(),
            fingerprint: second.fingerprint.clone(),
        }))
        .unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
    // Both weights' feature files exist side by side; nothing half-written is left.
    let features = fx.root.join("data/features");
    let mut files = 0;
    for sub in std::fs::read_dir(&features).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            assert!(name.ends_with(".safetensors"), "stray file {name}");
            files += 1;
        }
    }
    assert_eq!(files, 4);
}

/// The same run against a PostgreSQL catalog (when `GIGAPATH_TEST_POSTGRES_URL` is set, as CI
/// does with `scripts/start-test-postgres.sh`), in a schema of its own.
#[test]
fn ingest_with_a_postgres_catalog() {
    let Ok(url) = std::env::var("GIGAPATH_TEST_POSTGRES_URL") else {
        eprintln!(
            "SKIPPED: set GIGAPATH_TEST_POSTGRES_URL (scripts/start-test-postgres.sh prints it)"
        );
        return;
    };
    let schema = format!("pipeline_{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = sqlx::PgPool::connect(&url)
            .await
            .expect("postgres reachable");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    });
    let sep = if url.contains('?') { '&' } else { '?' };
    let fx = Fixture::new(1);
    let mut cfg = fx.config("models");
    cfg.store.catalog_url = Some(format!("{url}{sep}options=-c%20search_path%3D{schema}"));
    let pipeline = Pipeline::open(cfg).unwrap();
    assert_eq!(pipeline.store.catalog.backend_name(), "postgres");
    let req = IngestRequest {
        inputs: vec![fx.cohort.join("slides")],
        reports: Some(fx.cohort.join("reports.jsonl")),
        ..IngestRequest::default()
    };
    let summary = pipeline.ingest(&req, &Quiet).unwrap();
    assert_eq!((summary.run.slides_ok, summary.reports.ok), (3, 3));
    let again = pipeline.ingest(&req, &Quiet).unwrap();
    assert_eq!(again.already_done, 3);
    let status = pipeline.status().unwrap();
    assert_eq!(status.catalog_backend, "postgres");
    assert_eq!(status.jobs.done, 3);
    drop(pipeline);
    rt.block_on(async {
        let admin = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&admin)
            .await
            .unwrap();
    });
}
