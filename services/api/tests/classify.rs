//! `POST /v1/classify` and `GET /v1/probes` on the real service over an ingested synthetic
//! cohort, with heads trained by the probe crate on the same data dir (what
//! `gigapath probe train` runs): answers, provenance, attention, and every bad input.

mod common;

use gigapath_api::Service;
use gigapath_pipeline::{IngestRequest, Pipeline, Quiet};
use gigapath_probe::abmil::AbmilConfig;
use gigapath_probe::{CvConfig, HeadKind, LabelSource, TrainHeadRequest};
use gigapath_query::Space;
use serde_json::json;

use common::{get, post, text, tiny_service_config};

const KEY: &str = "test-admin-key-0123456789";

fn request(name: &str, kind: HeadKind, evaluate: bool) -> TrainHeadRequest {
    TrainHeadRequest {
        name: name.into(),
        kind,
        source: LabelSource {
            label: "subtype".into(),
            csv: None,
        },
        space: Space::Slide,
        cv: CvConfig {
            folds: 3,
            bootstrap: 50,
            ..CvConfig::default()
        },
        abmil: AbmilConfig {
            epochs: 5,
            ..AbmilConfig::default()
        },
        evaluate,
        replace: false,
    }
}

#[test]
fn classify_with_trained_heads_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cfg = tiny_service_config(&root, 4, KEY);
    let cohort = root.join("slides-root/cohort");
    {
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
        assert_eq!(summary.run.slides_ok, 12);
        let store = &pipeline.store;
        let proto = pipeline
            .block_on(gigapath_probe::train_head(
                store,
                &request("rcc-proto", HeadKind::Prototype, true),
            ))
            .unwrap();
        assert_eq!(proto.classes, ["CCRCC", "CHRCC", "PRCC"]);
        assert!(proto.metrics.is_some());
        pipeline
            .block_on(gigapath_probe::train_head(
                store,
                &request("rcc-abmil", HeadKind::Abmil, false),
            ))
            .unwrap();
        // A head whose manifest names other input weights: its answers would be meaningless.
        let probes = root.join("data/probes");
        let stale = probes.join("stale");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::copy(
            probes.join("rcc-proto/head.safetensors"),
            stale.join("head.safetensors"),
        )
        .unwrap();
        let manifest = std::fs::read_to_string(probes.join("rcc-proto/manifest.json")).unwrap();
        let manifest = manifest
            .replace("\"rcc-proto\"", "\"stale\"")
            .replace(&proto.input_fingerprint, "0000000000000000");
        std::fs::write(stale.join("manifest.json"), manifest).unwrap();
    }
    let service = Service::start(cfg).unwrap();
    let addr = service.addr;
    let ids: Vec<String> = (1..=12).map(|i| format!("SYN-{i:04}")).collect();

    let r = post(
        addr,
        "/v1/classify",
        &json!({"head": "rcc-proto", "slide_ids": ids}),
        None,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let body = r.json();
    let head = &body["head"];
    assert_eq!(head["name"], "rcc-proto");
    assert_eq!(head["kind"], "prototype");
    assert_eq!(head["label"], "subtype");
    assert_eq!(head["input"], "slide");
    assert_eq!(head["training_slides"], 12);
    assert_eq!(head["fingerprint"].as_str().unwrap().len(), 16);
    assert!(
        head["cv_balanced_accuracy"]["low"].as_f64().unwrap()
            <= head["cv_balanced_accuracy"]["value"].as_f64().unwrap()
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 12);
    let mut right = 0;
    for (res, id) in results.iter().zip(&ids) {
        assert_eq!(res["slide_id"], id.as_str());
        let p: f64 = res["probabilities"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-4, "{res}");
        assert!(res.get("attention").is_none());
        if res["predicted"] == res["known_label"] {
            right += 1;
        }
    }
    // Class means of the training slides themselves: the synthetic subtypes separate.
    assert!(right >= 11, "{right}/12 predicted as labelled");

    let r = post(
        addr,
        "/v1/classify",
        &json!({"head": "rcc-abmil", "slide_ids": ["SYN-0001"]}),
        None,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let res = &r.json()["results"][0];
    let attention = res["attention"].as_array().unwrap();
    assert!(!attention.is_empty());
    let total: f64 = attention.iter().map(|t| t[2].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-3, "attention sums to {total}");
    assert!(attention.iter().all(|t| t.as_array().unwrap().len() == 3));

    // The same attention through the prompt heatmap's format (what the page draws).
    let r = post(
        addr,
        "/v1/classify/heatmap",
        &json!({"head": "rcc-abmil", "slide_id": "SYN-0001"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let map = r.json();
    assert_eq!(map["slide_id"], "SYN-0001");
    assert!(map["level0_tile_px"].as_u64().unwrap() > 0);
    assert!(map["level0_width"].as_u64().unwrap() >= map["level0_tile_px"].as_u64().unwrap());
    assert_eq!(map["tiles"], res["attention"]);
    assert_eq!(map["approximate"], false);
    let r = post(
        addr,
        "/v1/classify/heatmap",
        &json!({"head": "rcc-proto", "slide_id": "SYN-0001"}),
        None,
    );
    assert_eq!(r.status, 400, "{}", text(&r));
    assert!(
        text(&r).contains("only attention-MIL (abmil) heads weigh tiles"),
        "{}",
        text(&r)
    );
    let r = post(
        addr,
        "/v1/classify/heatmap",
        &json!({"head": "rcc-abmil", "slide_id": "SYN-9999"}),
        None,
    );
    assert_eq!(r.status, 404, "{}", text(&r));

    let heads = get(addr, "/v1/probes").json();
    let names: Vec<&str> = heads["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rcc-abmil", "rcc-proto", "stale"]);

    // Bad input: 4xx naming the problem, never a panic.
    let cases = [
        (
            json!({"head": "nope", "slide_ids": ["SYN-0001"]}),
            404,
            "unknown head `nope`",
        ),
        (
            json!({"head": "rcc-proto", "slide_ids": ["SYN-9999"]}),
            404,
            "unknown slide `SYN-9999`",
        ),
        (
            json!({"head": "../etc", "slide_ids": ["SYN-0001"]}),
            400,
            "head name",
        ),
        (
            json!({"head": "rcc-proto", "slide_ids": []}),
            400,
            "`slide_ids` is empty",
        ),
        (
            json!({"head": "rcc-proto", "slide_ids": ["a/b"]}),
            400,
            "slide_ids",
        ),
        (
            json!({"head": "rcc-proto", "slide_ids": ["SYN-0001"], "k": 3}),
            400,
            "unknown field",
        ),
        (json!({"slide_ids": ["SYN-0001"]}), 400, "head"),
        (
            json!({"head": "stale", "slide_ids": ["SYN-0001"]}),
            409,
            "was trained on 0000000000000000",
        ),
    ];
    for (body, status, needle) in cases {
        let r = post(addr, "/v1/classify", &body, None);
        assert_eq!(r.status, status, "{body}: {}", text(&r));
        assert!(text(&r).contains(needle), "{body}: {}", text(&r));
    }

    let doc = get(addr, "/v1/openapi.json").json();
    let op = &doc["paths"]["/v1/classify"]["post"];
    for status in ["200", "400", "404", "409"] {
        assert!(op["responses"].get(status).is_some(), "{status}");
    }
    let schema = &doc["components"]["schemas"]["ClassifyRequest"]["properties"];
    assert_eq!(schema["head"]["maxLength"], 64);
    assert!(schema["slide_ids"]["maxItems"].as_u64().unwrap() >= 1);
    assert!(doc["paths"]["/v1/probes"]["get"].is_object());
}
