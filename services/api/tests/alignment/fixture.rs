//! The shared fixture: a tiny synthetic cohort ingested, an alignment run trained (checkpoints
//! at steps 20 and 40) and the store re-embedded with the final checkpoint, served by one
//! service for every test of this binary; and the helpers the tests share.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use gigapath_api::Service;
use gigapath_models::init::{init_slide_encoder, init_tile_encoder, TINY};
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use gigapath_synth::{CohortReport, CohortSpec};
use gigapath_train::checkpoint::step_dir_name;
use gigapath_train::{RunConfig, Silent, TrainRequest};
use gigapath_zeroshot::PromptLibrary;
use serde_json::Value;

use crate::common::{http, text, Reply, TEXT_MODEL};

pub const KEY: &str = "test-admin-key-0123456789";
pub const SUBTYPES: [&str; 3] = ["CCRCC", "PRCC", "CHRCC"];
pub const SLIDES_PER_SUBTYPE: usize = 4;
pub const STEPS: u64 = 40;
/// The checkpoint the store is NOT embedded with (same run, earlier step: other weights).
pub const EARLY_STEP: u64 = 20;

pub struct Fixture {
    /// Removed with the fixture when it is a temporary one (see [`fixture`]).
    _dir: Option<tempfile::TempDir>,
    /// Served with the final checkpoint, the one the store was re-embedded with.
    pub cfg: Config,
    /// The checkpoint the store is not embedded with.
    pub early_checkpoint: PathBuf,
    /// The cohort's reports, one per slide.
    pub reports: Vec<CohortReport>,
    /// The prompt sets the service serves.
    pub prompts: PromptLibrary,
}

impl Fixture {
    pub fn slide_ids(&self) -> BTreeSet<String> {
        self.reports.iter().map(|r| r.slide_id.clone()).collect()
    }
    pub fn subtype_of(&self, slide_id: &str) -> &str {
        &self
            .reports
            .iter()
            .find(|r| r.slide_id == slide_id)
            .unwrap()
            .subtype
    }
}

/// Builds a fresh fixture in its own temporary folder (ingest, train, reembed).
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    build(&root, Some(dir))
}

/// Builds the fixture under `root`; `dir` (when given) is removed with it.
fn build(root: &Path, dir: Option<tempfile::TempDir>) -> Fixture {
    // The `tiny` preset of `gigapath models init`.
    let models = root.join("models");
    let (tile, slide) = TINY;
    init_tile_encoder(&models.join("tile"), tile, 0).unwrap();
    init_slide_encoder(&models.join("slide"), slide, 1).unwrap();
    let cohort_dir = root.join("cohort");
    let spec = CohortSpec {
        slides_per_subtype: SLIDES_PER_SUBTYPE,
        slide_um: 600.0,
        ..CohortSpec::default()
    };
    gigapath_synth::generate(&cohort_dir, &spec, &|_, _| {}).unwrap();
    let reports: Vec<CohortReport> = std::fs::read_to_string(cohort_dir.join("reports.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), SUBTYPES.len() * SLIDES_PER_SUBTYPE);

    let mut cfg = Config::load(Some(&root.join("data")), None).unwrap();
    cfg.models.tile_encoder = Some(models.join("tile"));
    cfg.models.slide_encoder = Some(models.join("slide"));
    cfg.models.text_encoder = Some(PathBuf::from(TEXT_MODEL));
    cfg.models.text_pool = "cls".into();
    cfg.ingest.batch_size = 8;
    cfg.serve.bind = "127.0.0.1:0".into();
    cfg.serve.api_keys = vec![KEY.into()];
    cfg.serve.run_worker = false;
    cfg.serve.max_slide_ids = 20;
    cfg.serve.prompts_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts");

    // gigapath ingest
    let pipeline = Pipeline::open(cfg.clone()).unwrap();
    let summary = pipeline
        .ingest(
            &IngestRequest {
                inputs: vec![cohort_dir.join("slides")],
                reports: Some(cohort_dir.join("reports.jsonl")),
                ..IngestRequest::default()
            },
            &Quiet,
        )
        .unwrap();
    assert_eq!(summary.run.slides_ok, reports.len() as u64, "{summary:?}");

    // gigapath train (small and fast: 40 steps of 4 pairs, checkpoints at 20 and 40)
    let mut run = RunConfig::default();
    run.run.id = "api-test".into();
    run.model.text_pool = "cls".into();
    run.optim.steps = STEPS;
    run.optim.batch_size = 4;
    run.optim.warmup_steps = 5;
    run.optim.lr = 1e-3;
    run.checkpoint.every_steps = EARLY_STEP;
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
    assert_eq!(outcome.step, STEPS);
    let checkpoint = outcome.checkpoint.clone().expect("a final checkpoint");
    let early_checkpoint = outcome.run_dir.join(step_dir_name(EARLY_STEP));
    assert!(early_checkpoint.is_dir(), "{}", early_checkpoint.display());
    drop(pipeline); // one process holds the data dir

    // gigapath reembed --alignment <final checkpoint>
    cfg.models.alignment = Some(checkpoint);
    let pipeline = Pipeline::open(cfg.clone()).unwrap();
    let summary = gigapath_train::reembed(&pipeline, &Silent).unwrap();
    assert_eq!(
        (summary.slides, summary.reports),
        (reports.len() as u64, reports.len() as u64)
    );
    drop(pipeline);

    let prompts = PromptLibrary::load(&cfg.serve.prompts_dir).unwrap();
    Fixture {
        _dir: dir,
        cfg,
        early_checkpoint,
        reports,
        prompts,
    }
}

pub fn ok(r: Reply, what: &str) -> Value {
    assert_eq!(r.status, 200, "{what}: {}", text(&r));
    r.json()
}

pub fn results(v: &Value) -> &Vec<Value> {
    v["results"].as_array().unwrap()
}

pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

pub fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// Scores are cosines in [-1, 1], sorted best first, ids unique.
pub fn assert_ranked(hits: &[Value]) {
    for h in hits {
        let s = f(&h["score"]);
        assert!((-1.0001..=1.0001).contains(&s), "{h}");
    }
    assert!(
        hits.windows(2)
            .all(|w| f(&w[0]["score"]) >= f(&w[1]["score"])),
        "not sorted: {hits:?}"
    );
    let ids: BTreeSet<&str> = hits.iter().map(|h| h["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), hits.len(), "duplicate ids");
}

pub fn scores(v: &Value) -> BTreeMap<String, f64> {
    results(v)
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_string(), f(&h["score"])))
        .collect()
}

pub fn softmax(x: &[f64], scale: f64) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = x.iter().map(|v| ((v - m) * scale).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// A 4xx with the error body: `{ "error": { "code", "message" } }`, message containing `needle`.
pub fn assert_error(r: &Reply, status: u16, needle: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", text(r));
    let v = r.json();
    let code = v["error"]["code"].as_str().unwrap_or_default();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!code.is_empty(), "{what}: no error code in {v}");
    assert!(
        message.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: {needle:?} not in {message:?}"
    );
}

pub fn post_raw(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        Some(body),
    )
}

/// The fixture every test of this binary reads, and the service that serves it.
pub struct Shared {
    /// The fixture, served with its final checkpoint.
    pub fx: Fixture,
    /// The service's address.
    pub addr: SocketAddr,
    _service: Mutex<Service>,
}

/// The shared fixture and service, built on first use (about 20 s) and kept for the process.
/// A second service on the same embedded data dir is refused, so tests that need the data dir
/// with other weights build a [`fixture`] of their own.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        // A static is never dropped: the shared fixture lives in a fixed folder of the target
        // dir, replaced at each run, instead of a temporary folder left behind every time.
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("alignment-shared");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let fx = build(&root, None);
        let service = Service::start(fx.cfg.clone()).unwrap();
        Shared {
            addr: service.addr,
            fx,
            _service: Mutex::new(service),
        }
    })
}
