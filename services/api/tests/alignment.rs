//! The service WITH an alignment checkpoint, on a random loopback port over a real embedded store:
//! a tiny synthetic cohort is ingested, an alignment run is trained and the store re-embedded
//! with it (what `gigapath ingest`, `train` and `reembed` do, through the library crates), then
//! text-to-slide search, report search (text, slide -> reports, report -> slides), zero-shot
//! subtyping (prompt set and inline classes) and mutation prompts, prompt sets, prompt heatmaps
//! and the web page are checked on their values, with the bad inputs of issue #6. Finally the
//! same store is served with another checkpoint and with none: every request that would mix
//! embeddings of different weights answers 409 with a message that says what to do.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gigapath_api::Service;
use gigapath_models::init::{init_slide_encoder, init_tile_encoder, TINY};
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use gigapath_synth::{CohortReport, CohortSpec};
use gigapath_train::checkpoint::step_dir_name;
use gigapath_train::{RunConfig, Silent, TrainRequest};
use gigapath_zeroshot::PromptLibrary;
use serde_json::{json, Value};

use common::{get, http, post, text, Reply, TEXT_MODEL};

const KEY: &str = "test-admin-key-0123456789";
const SUBTYPES: [&str; 3] = ["CCRCC", "PRCC", "CHRCC"];
const SLIDES_PER_SUBTYPE: usize = 4;
const STEPS: u64 = 40;
/// The checkpoint the store is NOT embedded with (same run, earlier step: other weights).
const EARLY_STEP: u64 = 20;

struct Fixture {
    _dir: tempfile::TempDir,
    /// Served with the final checkpoint, the one the store was re-embedded with.
    cfg: Config,
    early_checkpoint: PathBuf,
    reports: Vec<CohortReport>,
    prompts: PromptLibrary,
}

impl Fixture {
    fn slide_ids(&self) -> BTreeSet<String> {
        self.reports.iter().map(|r| r.slide_id.clone()).collect()
    }
    fn subtype_of(&self, slide_id: &str) -> &str {
        &self
            .reports
            .iter()
            .find(|r| r.slide_id == slide_id)
            .unwrap()
            .subtype
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
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

fn ok(r: Reply, what: &str) -> Value {
    assert_eq!(r.status, 200, "{what}: {}", text(&r));
    r.json()
}

fn results(v: &Value) -> &Vec<Value> {
    v["results"].as_array().unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// Scores are cosines in [-1, 1], sorted best first, ids unique.
fn assert_ranked(hits: &[Value]) {
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

fn scores(v: &Value) -> BTreeMap<String, f64> {
    results(v)
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_string(), f(&h["score"])))
        .collect()
}

fn softmax(x: &[f64], scale: f64) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = x.iter().map(|v| ((v - m) * scale).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// A 4xx with the error body: `{ "error": { "code", "message" } }`, message containing `needle`.
fn assert_error(r: &Reply, status: u16, needle: &str, what: &str) {
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

fn post_raw(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        Some(body),
    )
}

#[test]
fn aligned_search_zero_shot_heatmap_and_fingerprint_guard() {
    let fx = fixture();
    let service = Service::start(fx.cfg.clone()).unwrap();
    let addr = service.addr;
    // One process holds an embedded data dir: a second service says so, with the detail.
    match Service::start(fx.cfg.clone()) {
        Ok(_) => panic!("a second service opened the same embedded data dir"),
        Err(e) => assert!(e.to_string().contains("cannot open the data dir"), "{e}"),
    }

    page_and_prompt_sets(addr, &fx);
    let slide_fp = slide_search(addr, &fx);
    report_search(addr, &fx, &slide_fp);
    zero_shot(addr, &fx);
    heatmap(addr, &fx);
    bad_inputs(addr, &fx);

    // Nothing above was a 500, and the server still serves.
    let m = text(&get(addr, "/metrics"));
    assert!(!m.contains("status=\"500\""), "a 500 was served:\n{m}");
    assert!(
        m.contains("gigapath_http_requests_total{route=\"/v1/zero-shot/subtype\",status=\"200\"}"),
        "{m}"
    );
    assert_eq!(get(addr, "/healthz").status, 200);
    service.stop();

    fingerprint_guard(&fx);
}

fn page_and_prompt_sets(addr: SocketAddr, fx: &Fixture) {
    // The OpenAPI document carries this server's limits and every error status.
    let doc = ok(get(addr, "/v1/openapi.json"), "openapi");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["SlideSearch"]["properties"]["k"]["maximum"],
        fx.cfg.serve.max_k
    );
    assert_eq!(
        schemas["SubtypeRequest"]["properties"]["slide_ids"]["maxItems"],
        fx.cfg.serve.max_slide_ids
    );
    for status in ["200", "400", "401", "404", "409", "413", "503"] {
        assert!(
            doc["paths"]["/v1/zero-shot/subtype"]["post"]["responses"]
                .get(status)
                .is_some(),
            "{status} not documented"
        );
    }
    // The web page.
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    let html = text(&page);
    assert!(html.to_lowercase().contains("<html"), "not a page");
    // Its script is a file of its own (the Content-Security-Policy allows no inline script).
    assert!(html.contains(r#"<script src="/app.js">"#), "{html}");
    let script = get(addr, "/app.js");
    assert_eq!(script.status, 200);
    let script = text(&script);
    for endpoint in [
        "/v1/search/",
        "/v1/zero-shot/subtype",
        "/v1/prompt-sets",
        "heatmap",
    ] {
        assert!(
            script.contains(endpoint),
            "the page does not call {endpoint}"
        );
    }

    // Prompt sets: what the prompts folder holds, with their sizes.
    let sets = ok(get(addr, "/v1/prompt-sets"), "prompt sets");
    let subtype = sets["subtype_sets"].as_array().unwrap();
    let names: BTreeSet<&str> = subtype
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = fx.prompts.subtype_sets().map(|s| s.name.as_str()).collect();
    assert_eq!(names, expected);
    for name in ["rcc", "nsclc", "brca"] {
        assert!(names.contains(name), "{name} missing: {names:?}");
    }
    let rcc = subtype.iter().find(|s| s["name"] == "rcc").unwrap();
    let lib_rcc = fx.prompts.subtype("rcc").unwrap();
    assert_eq!(rcc["labels"], json!(SUBTYPES));
    assert_eq!(rcc["templates"], lib_rcc.templates.len());
    assert!(lib_rcc.templates.len() >= 16, "MI-Zero 16 + H&E variants");
    assert_eq!(
        rcc["names_per_class"],
        json!(lib_rcc
            .classes
            .iter()
            .map(|c| c.names.len())
            .collect::<Vec<_>>())
    );
    let mutation = sets["mutation_sets"].as_array().unwrap();
    let luad = mutation
        .iter()
        .find(|s| s["name"] == "luad-mutations")
        .unwrap();
    for gene in ["EGFR", "KRAS", "TP53", "FAT1", "LRP1B"] {
        assert!(
            luad["genes"].as_array().unwrap().contains(&json!(gene)),
            "{gene}: {luad}"
        );
    }
    assert!(luad["templates"].as_u64().unwrap() >= 16);
}

/// Text -> slides over `joint` vectors, with filters. Returns the slides' guard fingerprint.
fn slide_search(addr: SocketAddr, fx: &Fixture) -> String {
    let n = fx.reports.len();
    let query = "clear cell renal cell carcinoma";
    let top5 = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 5}),
            None,
        ),
        "text -> slides",
    );
    assert_eq!(top5["vector"], "joint");
    let hits = results(&top5);
    assert_eq!(hits.len(), 5);
    assert_ranked(hits);
    let slide_fp = top5["fingerprint"].as_str().unwrap().to_string();
    assert!(
        !slide_fp.is_empty() && slide_fp.chars().all(|c| c.is_ascii_hexdigit()),
        "{slide_fp}"
    );
    for h in hits {
        let id = h["id"].as_str().unwrap();
        assert!(fx.slide_ids().contains(id), "{id}");
        let p = &h["payload"];
        assert_eq!(p["slide_id"], id);
        assert_eq!(p["fingerprint"], slide_fp.as_str());
        assert_eq!(p["labels"]["subtype"], fx.subtype_of(id), "{p}");
        assert_eq!(p["site"], "kidney", "{p}");
        assert_eq!(p["cohort"], "synthetic-rcc", "{p}");
        assert!(p["tile_count"].as_u64().unwrap() > 0);
    }
    // The slide record agrees: joint vector stored, same guard fingerprint, alignment role.
    let id0 = hits[0]["id"].as_str().unwrap();
    let detail = ok(get(addr, &format!("/v1/slides/{id0}")), "slide");
    assert_eq!(detail["vectors"], json!(["joint", "slide"]));
    assert_eq!(detail["fingerprint"], slide_fp.as_str());
    assert!(detail["fingerprints"]["alignment"].is_string(), "{detail}");

    // k larger than the collection: every slide once; the top 5 are the same with the same scores.
    let all = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100}),
            None,
        ),
        "k = 100",
    );
    let all_hits = results(&all);
    assert_eq!(all_hits.len(), n);
    assert_ranked(all_hits);
    let all_scores = scores(&all);
    for (id, s) in scores(&top5) {
        assert!(
            close(s, all_scores[&id], 1e-5),
            "{id}: {s} vs {}",
            all_scores[&id]
        );
    }
    // JSON Schema counts 10.0 as an integer: a whole float is a valid k.
    let v = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 3.0}),
            None,
        ),
        "k = 3.0",
    );
    assert_eq!(results(&v).len(), 3);
    // The same query twice: the same answer (cached nothing wrong, deterministic encoder).
    let again = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100}),
            None,
        ),
        "again",
    );
    assert_eq!(scores(&again), all_scores);
    // Another query ranks differently.
    let other = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": "chromophobe renal cell carcinoma with perinuclear halos", "k": 100}),
            None,
        ),
        "other query",
    );
    assert_ne!(scores(&other), all_scores);

    // Filters: a label, lists, cohort / site, slide ids, and their intersection.
    for subtype in SUBTYPES {
        let v = ok(
            post(
                addr,
                "/v1/search/slides",
                &json!({"query": query, "k": 100, "filter": {"labels": {"subtype": subtype}}}),
                None,
            ),
            "subtype filter",
        );
        let hits = results(&v);
        assert_eq!(hits.len(), SLIDES_PER_SUBTYPE, "{subtype}: {v}");
        assert_ranked(hits);
        for h in hits {
            assert_eq!(h["payload"]["labels"]["subtype"], subtype);
            let id = h["id"].as_str().unwrap();
            assert!(
                close(f(&h["score"]), all_scores[id], 1e-5),
                "filtered score differs"
            );
        }
    }
    let two = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100, "filter": {"labels": {"subtype": ["PRCC", "CHRCC"]}}}),
            None,
        ),
        "subtype list",
    );
    assert_eq!(results(&two).len(), 2 * SLIDES_PER_SUBTYPE);
    assert!(results(&two)
        .iter()
        .all(|h| h["payload"]["labels"]["subtype"] != "CCRCC"));
    for (filter, expected) in [
        (json!({"cohort": "synthetic-rcc"}), n),
        (json!({"cohort": ["elsewhere", "synthetic-rcc"]}), n),
        (json!({"cohort": "elsewhere"}), 0),
        (json!({"site": "kidney"}), n),
        (json!({"site": "lung"}), 0),
        (json!({"labels": {"subtype": "LUAD"}}), 0),
        (
            json!({"site": "kidney", "labels": {"subtype": "PRCC"}}),
            SLIDES_PER_SUBTYPE,
        ),
    ] {
        let v = ok(
            post(
                addr,
                "/v1/search/slides",
                &json!({"query": query, "k": 100, "filter": filter}),
                None,
            ),
            "filter",
        );
        assert_eq!(results(&v).len(), expected, "{filter}: {v}");
    }
    let some: Vec<String> = fx.slide_ids().into_iter().take(3).collect();
    let prcc: BTreeSet<String> = fx
        .reports
        .iter()
        .filter(|r| r.subtype == "PRCC")
        .map(|r| r.slide_id.clone())
        .collect();
    let v = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100, "filter": {"slide_id": some, "labels": {"subtype": "PRCC"}}}),
            None,
        ),
        "slide ids and subtype",
    );
    let got: BTreeSet<String> = scores(&v).into_keys().collect();
    let want: BTreeSet<String> = some.iter().filter(|s| prcc.contains(*s)).cloned().collect();
    assert_eq!(got, want);
    slide_fp
}

/// Reports by text (raw text vectors), slide -> reports and report -> slides (joint vectors).
fn report_search(addr: SocketAddr, fx: &Fixture, slide_fp: &str) {
    let n = fx.reports.len();
    // A report's own text finds it first, with cosine ~1.
    let r0 = &fx.reports[3];
    let v = ok(
        post(
            addr,
            "/v1/search/reports",
            &json!({"query": r0.report_text, "k": 3}),
            None,
        ),
        "text -> reports",
    );
    assert_eq!(v["vector"], "text");
    let report_fp = v["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(report_fp, slide_fp);
    let hits = results(&v);
    assert_eq!(hits.len(), 3);
    assert_ranked(hits);
    assert_eq!(hits[0]["id"], r0.report_id.as_str());
    assert!(f(&hits[0]["score"]) > 0.999, "{}", hits[0]);
    assert_eq!(hits[0]["payload"]["slide_id"], r0.slide_id.as_str());
    assert_eq!(hits[0]["payload"]["text"], r0.report_text.as_str());
    assert_eq!(hits[0]["payload"]["fingerprint"], report_fp.as_str());

    // Cross-modal, both ways: cosine is symmetric, so the score of (report R, slide S) is the
    // same whether R asks for slides or S asks for reports.
    let r_to_s = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"report_id": r0.report_id, "k": 100}),
            None,
        ),
        "report -> slides",
    );
    assert_eq!(r_to_s["vector"], "joint");
    assert_eq!(r_to_s["fingerprint"], slide_fp);
    assert_eq!(results(&r_to_s).len(), n);
    assert_ranked(results(&r_to_s));
    let s_to_r = ok(
        post(
            addr,
            "/v1/search/reports",
            &json!({"slide_id": r0.slide_id, "k": 100}),
            None,
        ),
        "slide -> reports",
    );
    assert_eq!(s_to_r["vector"], "joint");
    assert_eq!(s_to_r["fingerprint"], report_fp.as_str());
    assert_eq!(results(&s_to_r).len(), n);
    assert_ranked(results(&s_to_r));
    let rs = scores(&r_to_s);
    let sr = scores(&s_to_r);
    assert!(
        close(rs[&r0.slide_id], sr[&r0.report_id], 1e-4),
        "cos(R, S) = {} one way, {} the other",
        rs[&r0.slide_id],
        sr[&r0.report_id]
    );
    // Every pair of the cohort: same check for another slide.
    let r1 = &fx.reports[7];
    assert!(close(
        rs[&r1.slide_id],
        {
            let v = ok(
                post(
                    addr,
                    "/v1/search/reports",
                    &json!({"slide_id": r1.slide_id, "k": 100}),
                    None,
                ),
                "slide -> reports",
            );
            scores(&v)[&r0.report_id]
        },
        1e-4
    ));
    // Filters on reports.
    let v = ok(
        post(
            addr,
            "/v1/search/reports",
            &json!({"slide_id": r0.slide_id, "k": 100, "filter": {"slide_id": [r1.slide_id, r0.slide_id]}}),
            None,
        ),
        "filtered slide -> reports",
    );
    let got: BTreeSet<String> = scores(&v).into_keys().collect();
    assert_eq!(
        got,
        BTreeSet::from([r0.report_id.clone(), r1.report_id.clone()])
    );
    // Reports keep cohort and site among their labels: the same filter fields work on them.
    for (filter, expected) in [
        (json!({"cohort": "synthetic-rcc"}), n),
        (json!({"site": ["kidney", "lung"]}), n),
        (json!({"site": "lung"}), 0),
        (json!({"labels": {"subtype": "PRCC"}}), SLIDES_PER_SUBTYPE),
        (
            json!({"cohort": "synthetic-rcc", "labels": {"patient_id": r0.patient_id}}),
            1,
        ),
    ] {
        let v = ok(
            post(
                addr,
                "/v1/search/reports",
                &json!({"query": "renal cell carcinoma", "k": 100, "filter": filter}),
                None,
            ),
            "filtered text -> reports",
        );
        assert_eq!(results(&v).len(), expected, "{filter}: {v}");
        assert_ranked(results(&v));
        if filter["labels"]["subtype"] == "PRCC" {
            assert!(results(&v)
                .iter()
                .all(|h| h["payload"]["labels"]["subtype"] == "PRCC"));
        }
    }
}

fn zero_shot(addr: SocketAddr, fx: &Fixture) {
    let ids: Vec<String> = fx.slide_ids().into_iter().collect();
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "prompt_set": "rcc"}),
            None,
        ),
        "subtype with rcc",
    );
    let lib_rcc = fx.prompts.subtype("rcc").unwrap();
    let ens = &v["ensemble"];
    assert_eq!(ens["prompt_set"], "rcc");
    assert_eq!(ens["labels"], json!(SUBTYPES));
    assert_eq!(ens["templates"], lib_rcc.templates.len());
    assert_eq!(ens["names_per_class"], json!([4, 4, 4]));
    let scale = f(&ens["logit_scale"]);
    assert!(scale > 1.0 && scale <= 100.0, "logit scale {scale}");
    let res = results(&v);
    assert_eq!(res.len(), ids.len());
    let mut by_slide = BTreeMap::new();
    for (r, id) in res.iter().zip(&ids) {
        assert_eq!(r["slide_id"], id.as_str(), "answers in the order asked");
        assert_eq!(r["known_label"], fx.subtype_of(id));
        let probs: Vec<f64> = SUBTYPES.iter().map(|l| f(&r["probabilities"][l])).collect();
        let cos: Vec<f64> = SUBTYPES.iter().map(|l| f(&r["cosines"][l])).collect();
        assert_eq!(r["probabilities"].as_object().unwrap().len(), 3);
        assert!(close(probs.iter().sum::<f64>(), 1.0, 1e-4), "{r}");
        assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
        assert!(cos.iter().all(|c| (-1.0001..=1.0001).contains(c)));
        // probabilities = softmax(logit_scale x cosines); predicted = argmax.
        for (p, q) in probs.iter().zip(softmax(&cos, scale)) {
            assert!(close(*p, q, 1e-4), "{r}: softmax of the cosines x {scale}");
        }
        let best = (0..3)
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .unwrap();
        assert_eq!(r["predicted"], SUBTYPES[best], "{r}");
        by_slide.insert(id.clone(), cos);
    }

    // TITAN's no temperature: softmax over raw cosines, same cosines, same predictions.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "prompt_set": "rcc", "no_temperature": true}),
            None,
        ),
        "no temperature",
    );
    assert_eq!(f(&v["ensemble"]["logit_scale"]), 1.0);
    for r in results(&v) {
        let cos = &by_slide[r["slide_id"].as_str().unwrap()];
        let probs: Vec<f64> = SUBTYPES.iter().map(|l| f(&r["probabilities"][l])).collect();
        for (p, q) in probs.iter().zip(softmax(cos, 1.0)) {
            assert!(close(*p, q, 1e-4), "{r}");
        }
    }

    // Inline classes with the set's own names and templates: the same answer as the set.
    let classes: serde_json::Map<String, Value> = lib_rcc
        .classes
        .iter()
        .map(|c| (c.label.clone(), json!(c.names)))
        .collect();
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "classes": classes, "templates": lib_rcc.templates}),
            None,
        ),
        "inline = rcc",
    );
    assert_eq!(v["ensemble"]["prompt_set"], "inline");
    assert_eq!(
        v["ensemble"]["labels"],
        json!(["CCRCC", "CHRCC", "PRCC"]),
        "sorted"
    );
    assert_eq!(v["ensemble"]["templates"], lib_rcc.templates.len());
    for r in results(&v) {
        let cos = &by_slide[r["slide_id"].as_str().unwrap()];
        for (l, c) in SUBTYPES.iter().zip(cos) {
            assert!(close(f(&r["cosines"][l]), *c, 1e-4), "{r}");
        }
    }

    // Inline classes of one name and the template "CLASSNAME": a class embedding is then the
    // text's joint embedding, so its cosine is the slide's score in text -> slide search.
    let (a, b) = (
        "papillary renal cell carcinoma",
        "oncocytoma with central scar",
    );
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "templates": ["CLASSNAME"], "classes": {"A": [a], "B": [b]}}),
            None,
        ),
        "inline, one prompt per class",
    );
    assert_eq!(v["ensemble"]["templates"], 1);
    assert_eq!(v["ensemble"]["names_per_class"], json!([1, 1]));
    for (label, query) in [("A", a), ("B", b)] {
        let search = scores(&ok(
            post(
                addr,
                "/v1/search/slides",
                &json!({"query": query, "k": 100}),
                None,
            ),
            "search",
        ));
        for r in results(&v) {
            let id = r["slide_id"].as_str().unwrap();
            assert!(
                close(f(&r["cosines"][label]), search[id], 1e-4),
                "{id}: zero-shot cosine {} vs search score {}",
                r["cosines"][label],
                search[id]
            );
        }
    }
    // Labels are any distinct strings, also when they differ only in case.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": [ids[0]], "classes": {"prcc": [a], "PRCC": [b]}}),
            None,
        ),
        "inline, labels differing in case",
    );
    assert_eq!(v["ensemble"]["labels"], json!(["PRCC", "prcc"]));
    let r = &results(&v)[0];
    let (p_upper, p_lower) = (
        f(&r["probabilities"]["PRCC"]),
        f(&r["probabilities"]["prcc"]),
    );
    assert!(close(p_upper + p_lower, 1.0, 1e-4), "{r}");
    let expected = if p_upper > p_lower { "PRCC" } else { "prcc" };
    assert_eq!(r["predicted"], expected);
    // A template repeating CLASSNAME with long names: each filled prompt is cut at the text
    // limit (2000 characters) when embedded; the request is answered.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": [ids[0]], "templates": ["CLASSNAME ".repeat(150)], "classes": {"A": ["a".repeat(100)], "B": ["b".repeat(100)]}}),
            None,
        ),
        "inline, long filled prompts",
    );
    assert_eq!(results(&v).len(), 1);
    // Default templates for inline classes (the MI-Zero 16).
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": [ids[0]], "classes": {"A": [a], "B": [b]}}),
            None,
        ),
        "inline, default templates",
    );
    assert_eq!(v["ensemble"]["templates"], 16);

    // Mutations: P(mutated vs wild type) per gene, in [0, 1]; a subset gives the same values.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/mutation",
            &json!({"slide_ids": ids[..3]}),
            None,
        ),
        "mutation, all genes",
    );
    assert_eq!(v["prompt_set"], "luad-mutations");
    assert!(v["templates"].as_u64().unwrap() >= 16);
    let scale = f(&v["logit_scale"]);
    assert!(scale > 1.0);
    let full = results(&v);
    assert_eq!(full.len(), 3);
    for r in full {
        let p = r["probability_mutated"].as_object().unwrap();
        let genes: BTreeSet<&str> = p.keys().map(String::as_str).collect();
        assert_eq!(
            genes,
            BTreeSet::from(["EGFR", "FAT1", "KRAS", "LRP1B", "TP53"])
        );
        assert!(p.values().all(|x| (0.0..=1.0).contains(&f(x))), "{r}");
    }
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/mutation",
            &json!({"slide_ids": ids[..3], "genes": ["egfr", "TP53"], "prompt_set": "luad-mutations"}),
            None,
        ),
        "mutation, two genes",
    );
    for (r, whole) in results(&v).iter().zip(full) {
        let p = r["probability_mutated"].as_object().unwrap();
        assert_eq!(p.len(), 2, "{r}");
        for g in ["EGFR", "TP53"] {
            assert!(close(f(&p[g]), f(&whole["probability_mutated"][g]), 1e-5));
        }
    }
    // Without temperature the probabilities move towards 0.5 but stay on the same side.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/mutation",
            &json!({"slide_ids": ids[..3], "no_temperature": true}),
            None,
        ),
        "mutation, no temperature",
    );
    assert_eq!(f(&v["logit_scale"]), 1.0);
    for (r, whole) in results(&v).iter().zip(full) {
        for (g, p) in r["probability_mutated"].as_object().unwrap() {
            let (p, q) = (f(p), f(&whole["probability_mutated"][g]));
            assert!((p - 0.5).abs() <= (q - 0.5).abs() + 1e-6, "{g}: {p} vs {q}");
            assert!((p - 0.5) * (q - 0.5) >= 0.0, "{g}: {p} vs {q}");
        }
    }
}

fn heatmap(addr: SocketAddr, fx: &Fixture) {
    let id = fx.reports[0].slide_id.clone();
    let detail = ok(get(addr, &format!("/v1/slides/{id}")), "slide");
    let tiles = detail["tile_count"].as_u64().unwrap() as usize;
    let path = format!("/v1/slides/{id}/heatmap");
    let v = ok(
        post(
            addr,
            &path,
            &json!({"query": "papillary architecture"}),
            None,
        ),
        "heatmap",
    );
    assert_eq!(v["slide_id"], id.as_str());
    assert_eq!(v["approximate"], false, "no slide layers were fine-tuned");
    let (w, h, l) = (
        v["level0_width"].as_u64().unwrap(),
        v["level0_height"].as_u64().unwrap(),
        v["level0_tile_px"].as_u64().unwrap(),
    );
    assert!(l == 256 || l == 512, "tile side {l}");
    let cells = v["tiles"].as_array().unwrap();
    assert_eq!(cells.len(), tiles, "one value per kept tile");
    let mut seen = BTreeSet::new();
    for c in cells {
        let (gx, gy, cos) = (c[0].as_u64().unwrap(), c[1].as_u64().unwrap(), f(&c[2]));
        assert!(
            (gx + 1) * l <= w && (gy + 1) * l <= h,
            "{c} outside {w}x{h}"
        );
        assert!((-1.0001..=1.0001).contains(&cos));
        assert!(seen.insert((gx, gy)), "tile {c} twice");
    }
    // Deterministic, and prompt-dependent.
    let again = ok(
        post(
            addr,
            &path,
            &json!({"query": "papillary architecture"}),
            None,
        ),
        "heatmap again",
    );
    assert_eq!(again["tiles"], v["tiles"]);
    let other = ok(
        post(addr, &path, &json!({"query": "clear cytoplasm"}), None),
        "heatmap other",
    );
    assert_ne!(other["tiles"], v["tiles"]);
}

fn bad_inputs(addr: SocketAddr, fx: &Fixture) {
    let id = fx.reports[0].slide_id.clone();
    let ids = json!([id]);
    let huge = "a".repeat(300_000);
    let long = "a".repeat(2001);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        // search/slides
        (
            "/v1/search/slides",
            json!({}),
            400,
            "give `query` or `report_id`",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "report_id": "R-1"}),
            400,
            "not both",
        ),
        (
            "/v1/search/slides",
            json!({"query": "  \n "}),
            400,
            "query is empty",
        ),
        (
            "/v1/search/slides",
            json!({"query": long}),
            400,
            "limit is 2000",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "k": 0}),
            400,
            "k = 0",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "k": 101}),
            400,
            "between 1 and 100",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "k": 10_000_000_000u64}),
            400,
            "k = ",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "k": -1}),
            400,
            "invalid",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "k": "5"}),
            400,
            "invalid type",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "k": 2.5}),
            400,
            "invalid",
        ),
        (
            "/v1/search/slides",
            json!({"query": ["x"]}),
            400,
            "invalid type",
        ),
        (
            "/v1/search/slides",
            json!({"query": null}),
            400,
            "give `query`",
        ),
        (
            "/v1/search/slides",
            json!({"report_id": "NO-SUCH-REPORT"}),
            404,
            "unknown report `NO-SUCH-REPORT`",
        ),
        (
            "/v1/search/slides",
            json!({"report_id": 7}),
            400,
            "invalid type",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "filter": {"cohort": []}}),
            400,
            "non-empty",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "filter": {"cohort": ""}}),
            400,
            "non-empty",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "filter": {"colour": "red"}}),
            400,
            "unknown field",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "filter": {"labels": {"a.b": "c"}}}),
            400,
            "label name",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "filter": {"labels": {"subtype": 3}}}),
            400,
            "invalid",
        ),
        (
            "/v1/search/slides",
            json!({"query": "x", "filter": "subtype=PRCC"}),
            400,
            "invalid type",
        ),
        (
            "/v1/search/slides",
            json!([1, 2]),
            400,
            "expected a JSON object",
        ),
        (
            "/v1/search/slides",
            json!(["x", null, 3, {}]),
            400,
            "expected a JSON object",
        ),
        ("/v1/search/slides", json!({"query": huge}), 413, "limit"),
        // search/reports
        (
            "/v1/search/reports",
            json!({"slide_id": "NO-SUCH-SLIDE"}),
            404,
            "unknown slide `NO-SUCH-SLIDE`",
        ),
        (
            "/v1/search/reports",
            json!({"slide_id": "x", "query": "y"}),
            400,
            "not both",
        ),
        (
            "/v1/search/reports",
            json!({"query": ""}),
            400,
            "query is empty",
        ),
        (
            "/v1/search/reports",
            json!({"slide_id": id, "k": 0}),
            400,
            "k = 0",
        ),
        (
            "/v1/search/reports",
            json!({"slide_id": id, "k": 1000}),
            400,
            "k = 1000",
        ),
        // zero-shot/subtype
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "prompt_set": "no-such-set"}),
            404,
            "no-such-set",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "prompt_set": "luad-mutations"}),
            404,
            "luad-mutations",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids}),
            400,
            "give `prompt_set` or `classes`",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "prompt_set": "rcc", "classes": {}}),
            400,
            "not both",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": [], "prompt_set": "rcc"}),
            400,
            "`slide_ids` is empty",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"prompt_set": "rcc"}),
            400,
            "missing field `slide_ids`",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": id, "prompt_set": "rcc"}),
            400,
            "invalid type",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": [id, "NOPE-1", "NOPE-2"], "prompt_set": "rcc"}),
            404,
            "unknown slide ids: NOPE-1, NOPE-2",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": vec![id.clone(); 21], "prompt_set": "rcc"}),
            400,
            "the limit is 20",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": ["a"]}}),
            400,
            "2 to 10 classes, not 1",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": ["a"], "B": [" "]}}),
            400,
            "must be non-blank",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": ["a"], "B": []}}),
            400,
            "class `B` has 0 names",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": [{"label": "A", "names": ["a"]}, {"label": "B", "names": ["b"]}]}),
            400,
            "invalid type: sequence, expected a map",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": ["a"], "B": ["b"]}, "templates": []}),
            400,
            "template",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": ["a"], "B": ["b"]}, "templates": ["no placeholder"]}),
            400,
            "CLASSNAME",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": [1], "B": ["b"]}}),
            400,
            "invalid type",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": [long], "B": ["b"]}}),
            400,
            "at most 2000",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "prompt_set": "rcc", "no_temperature": "yes"}),
            400,
            "invalid type",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "prompt_set": "rcc", "templates": ["an image of CLASSNAME"]}),
            400,
            "`templates` go with inline `classes`",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": ["a"], " ": ["b"]}}),
            400,
            "must be non-blank",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": (0..11).map(|i| (format!("C{i}"), json!(["x"]))).collect::<serde_json::Map<_, _>>()}),
            400,
            "2 to 10 classes, not 11",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": vec!["a"; 9], "B": ["b"]}}),
            400,
            "class `A` has 9 names",
        ),
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "classes": {"A": ["a"], "B": ["b"]}, "templates": vec!["CLASSNAME"; 25]}),
            400,
            "25 templates; the limit is 24",
        ),
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": ids, "genes": vec!["EGFR"; 65]}),
            400,
            "65 genes; the limit is 64",
        ),
        // zero-shot/mutation
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": ids, "genes": ["BRAF"]}),
            404,
            "gene `BRAF`",
        ),
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": ids, "genes": []}),
            400,
            "`genes` is empty",
        ),
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": ids, "prompt_set": "rcc"}),
            404,
            "rcc",
        ),
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": ids, "prompt_set": "nope"}),
            404,
            "nope",
        ),
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": ["NOPE"]}),
            404,
            "unknown slide ids: NOPE",
        ),
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": []}),
            400,
            "`slide_ids` is empty",
        ),
        (
            "/v1/zero-shot/mutation",
            json!({"slide_ids": ids, "genes": "EGFR"}),
            400,
            "invalid type",
        ),
        // heatmap
        (
            "/v1/slides/NO-SUCH-SLIDE/heatmap",
            json!({"query": "x"}),
            404,
            "NO-SUCH-SLIDE",
        ),
        (
            "/v1/slides/..%2Fetc/heatmap",
            json!({"query": "x"}),
            400,
            "invalid slide id",
        ),
        (
            "/v1/slides/ID/heatmap",
            json!({"query": "x"}),
            404,
            "-missing",
        ),
        (
            "/v1/slides/ID/heatmap",
            json!({}),
            400,
            "missing field `query`",
        ),
    ];
    for (path, body, status, needle) in cases {
        let path = path.replace("/ID/", &format!("/{id}-missing/"));
        let r = post(addr, &path, &body, None);
        let shown: String = body.to_string().chars().take(120).collect();
        assert_error(&r, status, needle, &format!("POST {path} {shown}"));
    }
    let heat = format!("/v1/slides/{id}/heatmap");
    assert_error(
        &post(addr, &heat, &json!({"query": " "}), None),
        400,
        "query is empty",
        "heatmap empty",
    );
    // Malformed JSON, wrong content type, empty body, on every POST endpoint.
    for path in [
        "/v1/search/slides",
        "/v1/search/reports",
        "/v1/zero-shot/subtype",
        "/v1/zero-shot/mutation",
        heat.as_str(),
    ] {
        assert_error(
            &post_raw(addr, path, b"{\"query\": "),
            400,
            "invalid JSON",
            path,
        );
        assert_error(
            &post_raw(addr, path, b"\xff\xfe"),
            400,
            "invalid JSON",
            path,
        );
        assert_error(&post_raw(addr, path, b""), 400, "", path);
        let r = http(
            addr,
            "POST",
            path,
            &[("Content-Type", "text/plain")],
            Some(b"{}"),
        );
        assert_error(&r, 400, "Content-Type", path);
        // Over the body limit, and a declared length over it with no body sent at all.
        let big = format!("{{\"slide_ids\": [\"{}\"]}}", "x".repeat(300_000));
        assert_error(&post_raw(addr, path, big.as_bytes()), 413, "limit", path);
    }
    // Known paths asked with another method: 405 with `Allow`; unknown paths 404.
    for (method, path, allow) in [
        ("GET", "/v1/zero-shot/subtype", "POST"),
        ("TRACE", "/v1/search/slides", "POST"),
        ("PUT", format!("/v1/slides/{id}").as_str(), "DELETE, GET"),
        ("GET", format!("/v1/slides/{id}/heatmap").as_str(), ""),
        (
            "DELETE",
            format!("/v1/slides/{id}/heatmap").as_str(),
            "POST",
        ),
    ] {
        let r = http(addr, method, path, &[], None);
        if allow.is_empty() {
            // GET .../heatmap is the picture route: no picture of that name.
            assert_error(&r, 404, "no picture `heatmap`", path);
            continue;
        }
        assert_error(
            &r,
            405,
            &format!("allowed: {allow}"),
            &format!("{method} {path}"),
        );
        assert_eq!(r.header("allow").as_deref(), Some(allow), "{method} {path}");
        assert_eq!(r.error_code(), "method_not_allowed");
    }
    assert_error(
        &http(addr, "PUT", "/v1/nowhere", &[], None),
        404,
        "no route",
        "PUT nowhere",
    );
}

/// The same store served with other weights: an earlier checkpoint of the same run, then none.
fn fingerprint_guard(fx: &Fixture) {
    let mut cfg = fx.cfg.clone();
    cfg.models.alignment = Some(fx.early_checkpoint.clone());
    let service = Service::start(cfg).unwrap();
    let addr = service.addr;
    let ids = json!([fx.reports[0].slide_id]);
    let r0 = &fx.reports[0];
    for (path, body) in [
        (
            "/v1/search/slides",
            json!({"query": "clear cell renal cell carcinoma"}),
        ),
        ("/v1/search/slides", json!({"report_id": r0.report_id})),
        (
            "/v1/search/reports",
            json!({"query": "clear cell renal cell carcinoma"}),
        ),
        ("/v1/search/reports", json!({"slide_id": r0.slide_id})),
    ] {
        let r = post(addr, path, &body, None);
        assert_error(&r, 409, "other weights", &format!("{path} {body}"));
        assert_error(&r, 409, "gigapath reembed", &format!("{path} {body}"));
        assert_eq!(r.error_code(), "conflict");
    }
    for (path, body) in [
        (
            "/v1/zero-shot/subtype",
            json!({"slide_ids": ids, "prompt_set": "rcc"}),
        ),
        ("/v1/zero-shot/mutation", json!({"slide_ids": ids})),
    ] {
        let r = post(addr, path, &body, None);
        assert_error(&r, 409, "other weights", &format!("{path} {body}"));
        assert_error(&r, 409, "re-embed", &format!("{path} {body}"));
    }
    // Unknown ids are still 404, bad input still 400: the guard does not hide them.
    assert_eq!(
        post(
            addr,
            "/v1/search/slides",
            &json!({"report_id": "NOPE"}),
            None
        )
        .status,
        404
    );
    assert_eq!(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": "x", "k": 0}),
            None
        )
        .status,
        400
    );
    assert_eq!(get(addr, "/readyz").status, 200);
    service.stop();

    // No alignment at all: aligned requests say what is missing; report text search meets
    // report points embedded under the alignment's fingerprint: 409 as well.
    let mut cfg = fx.cfg.clone();
    cfg.models.alignment = None;
    cfg.serve.require_key_for_reads = true;
    let service = Service::start(cfg).unwrap();
    let addr = service.addr;
    let r = post(
        addr,
        "/v1/zero-shot/subtype",
        &json!({"slide_ids": ids, "prompt_set": "rcc"}),
        None,
    );
    assert_eq!(r.status, 401, "reads need the key here: {}", text(&r));
    let r = post(
        addr,
        "/v1/zero-shot/subtype",
        &json!({"slide_ids": ids, "prompt_set": "rcc"}),
        Some(KEY),
    );
    assert_error(&r, 409, "", "zero-shot without alignment");
    let r = post(
        addr,
        "/v1/search/slides",
        &json!({"query": "renal"}),
        Some(KEY),
    );
    assert_error(&r, 409, "alignment checkpoint", "search without alignment");
    let r = post(
        addr,
        "/v1/search/reports",
        &json!({"query": "renal"}),
        Some(KEY),
    );
    assert_error(&r, 409, "other weights", "report search without alignment");
    let r = post(
        addr,
        &format!("/v1/slides/{}/heatmap", r0.slide_id),
        &json!({"query": "renal"}),
        Some(KEY),
    );
    assert_error(&r, 409, "alignment checkpoint", "heatmap without alignment");
    assert_eq!(get(addr, "/v1/prompt-sets").status, 401);
    assert_eq!(get(addr, "/healthz").status, 200);
    service.stop();
}
