//! A service started BEFORE `gigapath reembed` takes up the new alignment checkpoint without a
//! restart (issue 15): the re-embedding rewrites the stores and names the checkpoint in the data
//! dir's `gigapath.toml`; the service sees that file change, swaps its models, fingerprints and
//! prompt caches as one, and answers search and zero-shot with the new checkpoint instead of 409.
//! A later re-embedding with another checkpoint is followed the same way, and a data dir config
//! that no longer loads leaves the service serving with what it has.
//!
//! The re-embedding runs in this process through the service's own open store (an embedded data
//! dir is held by one process), with the same library call as `gigapath reembed`.

mod common;

use std::path::{Path, PathBuf};

use gigapath_api::Service;
use gigapath_models::init::{init_slide_encoder, init_tile_encoder, TINY};
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use gigapath_synth::CohortSpec;
use gigapath_train::checkpoint::step_dir_name;
use gigapath_train::{RunConfig, Silent, TrainRequest};
use serde_json::{json, Value};

use common::{post, text, Reply, TEXT_MODEL};

const KEY: &str = "reload-admin-key-0123456789";

fn ok(r: Reply, what: &str) -> Value {
    assert_eq!(r.status, 200, "{what}: {}", text(&r));
    r.json()
}

fn search_slides(addr: std::net::SocketAddr) -> Reply {
    post(
        addr,
        "/v1/search/slides",
        &json!({"query": "clear cell renal cell carcinoma", "k": 3}),
        None,
    )
}

fn search_reports(addr: std::net::SocketAddr) -> Reply {
    post(
        addr,
        "/v1/search/reports",
        &json!({"query": "papillary renal cell carcinoma", "k": 3}),
        None,
    )
}

/// Re-embeds the service's store with `checkpoint` as `gigapath reembed` does (which also writes
/// `models.alignment` into the data dir's config); returns the new slide and report fingerprints.
fn reembed(service: &Service, checkpoint: &Path) -> (String, String) {
    let mut models = service.state.pipeline.config.models.clone();
    models.alignment = Some(checkpoint.to_path_buf());
    let pipeline = service.state.pipeline.with_models(models).unwrap();
    let summary = gigapath_train::reembed(&pipeline, &Silent).unwrap();
    (summary.slide_fingerprint, summary.report_fingerprint)
}

#[test]
fn serve_takes_up_a_new_alignment_checkpoint_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let models = root.join("models");
    let (tile, slide) = TINY;
    init_tile_encoder(&models.join("tile"), tile, 0).unwrap();
    init_slide_encoder(&models.join("slide"), slide, 1).unwrap();
    let cohort = root.join("cohort");
    let spec = CohortSpec {
        slides_per_subtype: 2,
        slide_um: 600.0,
        ..CohortSpec::default()
    };
    gigapath_synth::generate(&cohort, &spec, &|_, _| {}).unwrap();

    let data = root.join("data");
    let mut cfg = Config::load(Some(&data), None).unwrap();
    cfg.models.tile_encoder = Some(models.join("tile"));
    cfg.models.slide_encoder = Some(models.join("slide"));
    cfg.models.text_encoder = Some(PathBuf::from(TEXT_MODEL));
    cfg.models.text_pool = "cls".into();
    cfg.ingest.batch_size = 8;
    cfg.serve.bind = "127.0.0.1:0".into();
    cfg.serve.api_keys = vec![KEY.into()];
    cfg.serve.run_worker = false;
    cfg.serve.slide_roots = vec![cohort.clone()];
    cfg.serve.prompts_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts");

    // gigapath ingest, then gigapath train (checkpoints at steps 10 and 20).
    let pipeline = Pipeline::open(cfg.clone()).unwrap();
    let summary = pipeline
        .ingest(
            &IngestRequest {
                inputs: vec![cohort.join("slides")],
                reports: Some(cohort.join("reports.jsonl")),
                ..IngestRequest::default()
            },
            &Quiet,
        )
        .unwrap();
    assert_eq!(summary.run.slides_ok, 6, "{summary:?}");
    let mut run = RunConfig::default();
    run.run.id = "reload-test".into();
    run.model.text_pool = "cls".into();
    run.optim.steps = 20;
    run.optim.batch_size = 4;
    run.optim.warmup_steps = 2;
    run.checkpoint.every_steps = 10;
    run.eval.every_steps = 0;
    run.validate().unwrap();
    let outcome = gigapath_train::train(
        &pipeline,
        &TrainRequest {
            config: run,
            stop_after: None,
        },
        &Silent,
    )
    .unwrap();
    let last = outcome.checkpoint.clone().expect("a final checkpoint");
    let early = outcome.run_dir.join(step_dir_name(10));
    assert!(early.is_dir(), "{}", early.display());
    drop(pipeline);

    // gigapath serve, with no alignment yet: text-to-slide search needs one.
    let service = Service::start(cfg.clone()).unwrap();
    let addr = service.addr;
    let before = search_slides(addr);
    assert_eq!(before.status, 409, "{}", text(&before));
    assert!(
        text(&before).contains("alignment checkpoint"),
        "{}",
        text(&before)
    );
    let plain = ok(search_reports(addr), "report search before reembed");
    let plain_fp = plain["fingerprint"].as_str().unwrap().to_string();

    // gigapath reembed --alignment <last>, while the service runs.
    let (slide_fp, report_fp) = reembed(&service, &last);
    assert_ne!(
        report_fp, plain_fp,
        "the report fingerprint names the alignment"
    );
    // The very next requests are answered with the new checkpoint (no restart, no 409).
    let hits = ok(search_slides(addr), "text-to-slide search after reembed");
    assert_eq!(hits["fingerprint"], slide_fp.as_str(), "{hits}");
    assert_eq!(hits["results"].as_array().map(Vec::len), Some(3), "{hits}");
    let reports = ok(search_reports(addr), "report search after reembed");
    assert_eq!(reports["fingerprint"], report_fp.as_str(), "{reports}");
    let ids: Vec<Value> = hits["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].clone())
        .collect();
    let zs = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "prompt_set": "rcc"}),
            None,
        ),
        "zero-shot after reembed",
    );
    assert_eq!(zs["results"].as_array().map(Vec::len), Some(3), "{zs}");

    // Slides queued over HTTP are queued for the new weights, as `gigapath ingest` on the data
    // dir would (the jobs of the earlier weights are done, these are not).
    let again = post(
        addr,
        "/v1/ingest",
        &json!({"slides": [cohort.join("slides").display().to_string()]}),
        Some(KEY),
    );
    assert_eq!(again.status, 202, "{}", text(&again));
    let again = again.json();
    assert_eq!(again["queued"].as_array().map(Vec::len), Some(6), "{again}");
    assert_eq!(again["already_done"], json!([]), "{again}");

    // Another checkpoint later: followed too (the cached prompt embeddings go with the old one).
    let (early_slide_fp, _) = reembed(&service, &early);
    assert_ne!(early_slide_fp, slide_fp);
    let hits = ok(search_slides(addr), "search after the second reembed");
    assert_eq!(hits["fingerprint"], early_slide_fp.as_str(), "{hits}");

    // A data dir config that no longer loads changes nothing: still served, still consistent.
    let own = data.join(gigapath_pipeline::config::DATA_DIR_CONFIG);
    let saved = std::fs::read_to_string(&own).unwrap();
    std::fs::write(&own, "[models\nbroken").unwrap();
    let hits = ok(search_slides(addr), "search with a broken data dir config");
    assert_eq!(hits["fingerprint"], early_slide_fp.as_str(), "{hits}");
    std::fs::write(&own, saved).unwrap();
    service.stop();
}
