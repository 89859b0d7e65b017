//! The real service on a random loopback port over a real embedded store holding an ingested
//! synthetic cohort: every endpoint, the bad inputs of issue #6, and the auth rules.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gigapath_api::Service;
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use serde_json::json;

use common::{get, http, post, tiny_service_config};
const KEY: &str = "test-admin-key-0123456789";

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn setup() -> (Setup, Config) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cohort = root.join("slides-root/cohort");
    let cfg = tiny_service_config(&root, 2, KEY);
    // Ingest 4 of the 6 slides now; the other 2 come through the ingest endpoint.
    {
        let pipeline = Pipeline::open(cfg.clone()).unwrap();
        let slides = ["SYN-0001", "SYN-0002", "SYN-0003", "SYN-0004"]
            .map(|s| cohort.join(format!("slides/{s}.svs")));
        let summary = pipeline
            .ingest(
                &IngestRequest {
                    inputs: slides.to_vec(),
                    reports: Some(cohort.join("reports.jsonl")),
                    ..IngestRequest::default()
                },
                &Quiet,
            )
            .unwrap();
        assert_eq!(summary.run.slides_ok, 4);
    }
    (Setup { _dir: dir, root }, cfg)
}

#[test]
fn every_endpoint_bad_input_and_auth_rule() {
    let (setup, cfg) = setup();
    let service = Service::start(cfg.clone()).unwrap();
    let addr = service.addr;

    // Health, readiness, OpenAPI.
    assert_eq!(get(addr, "/healthz").json()["status"], "ok");
    let ready = get(addr, "/readyz");
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert_eq!(ready.json()["vector_backend"], "embedded");
    let doc = get(addr, "/v1/openapi.json").json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/search/slides",
        "/v1/search/reports",
        "/v1/slides/{id}",
        "/v1/ingest",
        "/healthz",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }

    // Slides: metadata, pictures, unknown and malicious ids.
    let s = get(addr, "/v1/slides/SYN-0001");
    assert_eq!(s.status, 200);
    let s = s.json();
    assert_eq!(s["state"], "embedded");
    assert_eq!(s["vectors"], json!(["slide"]));
    assert_eq!(s["report_ids"], json!(["R-SYN-0001"]));
    assert!(s["labels"]["subtype"].is_string());
    // The mpp measured at ingest (synthetic slides are 0.499 or 0.2527 um/px), not null.
    let mpp = s["mpp"].as_f64().expect("mpp");
    assert!(
        (mpp - 0.499).abs() < 1e-6 || (mpp - 0.2527).abs() < 1e-6,
        "{mpp}"
    );
    assert!(s["pictures"]
        .as_array()
        .unwrap()
        .contains(&json!("overlay.png")));
    let png = get(addr, "/v1/slides/SYN-0001/overlay.png");
    assert_eq!((png.status, png.content_type.as_str()), (200, "image/png"));
    assert_eq!(&png.body[1..4], b"PNG");
    assert_eq!(get(addr, "/v1/slides/SYN-0001/secret.txt").status, 404);
    let missing = get(addr, "/v1/slides/NOPE");
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "not_found")
    );
    assert_eq!(get(addr, "/v1/slides/..%2F..%2Fetc").status, 400);

    // Report search by text.
    let r = post(
        addr,
        "/v1/search/reports",
        &json!({"query": "chromophobe carcinoma of the kidney", "k": 3}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = r.json();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(results
        .iter()
        .all(|h| h["payload"]["slide_id"].is_string() && h["payload"]["text"].is_string()));
    assert!(results
        .windows(2)
        .all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()));
    let filtered = post(
        addr,
        "/v1/search/reports",
        &json!({"query": "renal tumour", "filter": {"slide_id": "SYN-0002"}}),
        None,
    )
    .json();
    assert_eq!(filtered["results"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["results"][0]["payload"]["slide_id"], "SYN-0002");

    // Bad input: 4xx with a clear message, never a 500.
    let bad: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/search/reports",
            b"{not json".to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "/v1/search/reports",
            br#"{"query": 5}"#.to_vec(),
            400,
            "invalid type",
        ),
        (
            "/v1/search/reports",
            br#"{"query": "x", "colour": 1}"#.to_vec(),
            400,
            "unknown field",
        ),
        (
            "/v1/search/reports",
            br#"{"query": "   "}"#.to_vec(),
            400,
            "query is empty",
        ),
        (
            "/v1/search/reports",
            br#"{"query": "x", "k": 0}"#.to_vec(),
            400,
            "k = 0",
        ),
        (
            "/v1/search/reports",
            br#"{"query": "x", "k": 100000}"#.to_vec(),
            400,
            "k = 100000",
        ),
        (
            "/v1/search/reports",
            br#"{"query": "x", "slide_id": "SYN-0001"}"#.to_vec(),
            400,
            "not both",
        ),
        (
            "/v1/search/reports",
            br#"{}"#.to_vec(),
            400,
            "give `query` or `slide_id`",
        ),
        (
            "/v1/search/reports",
            br#"{"query": "x", "filter": {"labels": {"sub type": "A"}}}"#.to_vec(),
            400,
            "label name",
        ),
        (
            "/v1/search/reports",
            br#"{"slide_id": "SYN-0001"}"#.to_vec(),
            409,
            "alignment",
        ),
        (
            "/v1/search/slides",
            br#"{"query": "clear cell carcinoma"}"#.to_vec(),
            409,
            "alignment",
        ),
        (
            "/v1/search/reports",
            format!(r#"{{"query": "{}"}}"#, "a".repeat(5000)).into_bytes(),
            400,
            "limit is 2000",
        ),
        (
            "/v1/search/reports",
            format!(r#"{{"query": "{}"}}"#, "a".repeat(300_000)).into_bytes(),
            413,
            "limit",
        ),
    ];
    for (path, body, status, needle) in bad {
        let r = http(
            addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(&body),
        );
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(
            r.status,
            status,
            "{path} {}: {text}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    let wrong_type = http(
        addr,
        "POST",
        "/v1/search/reports",
        &[("Content-Type", "text/plain")],
        Some(b"hello"),
    );
    assert_eq!(wrong_type.status, 400);
    assert_eq!(get(addr, "/v1/no/such/route").error_code(), "not_found");

    // Ingest: key required, paths confined to the slide roots, then the worker embeds.
    let cohort = setup.root.join("slides-root/cohort/slides");
    let body = json!({"slides": [cohort.join("SYN-0005.svs"), cohort.join("SYN-0006.svs")]});
    assert_eq!(post(addr, "/v1/ingest", &body, None).status, 401);
    assert_eq!(
        post(addr, "/v1/ingest", &body, Some("wrong-key-wrong-key")).status,
        401
    );
    let outside =
        json!({"slides": [format!("{}/../../../models/tile/config.json", cohort.display())]});
    let r = post(addr, "/v1/ingest", &outside, Some(KEY));
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let r = post(
        addr,
        "/v1/ingest",
        &json!({"slides": ["/definitely/not/here.svs"]}),
        Some(KEY),
    );
    assert_eq!(
        r.status, 403,
        "outside the roots, existing or not: one answer"
    );
    let r = post(
        addr,
        "/v1/ingest",
        &json!({"slides": [cohort.join("not-here.svs")]}),
        Some(KEY),
    );
    assert_eq!(r.status, 404, "a path under the roots that does not exist");
    let r = post(addr, "/v1/ingest", &body, Some(KEY));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["queued"].as_array().unwrap().len(), 2);
    let again = post(
        addr,
        "/v1/ingest",
        &json!({"slides": [cohort.join("SYN-0001.svs")]}),
        Some(KEY),
    )
    .json();
    assert_eq!(again["already_done"], json!(["SYN-0001"]));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = get(addr, "/v1/status").json();
        if st["slides"]["embedded"] == 6 {
            assert_eq!(st["points"]["slides"], 6);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not embed the queued slides: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Delete needs the key.
    assert_eq!(
        http(addr, "DELETE", "/v1/slides/SYN-0002", &[], None).status,
        401
    );
    let d = http(
        addr,
        "DELETE",
        "/v1/slides/SYN-0002",
        &[("X-Api-Key", KEY)],
        None,
    );
    assert_eq!(d.status, 200, "{}", String::from_utf8_lossy(&d.body));
    assert_eq!(d.json()["reports"], 1);
    assert_eq!(
        get(addr, "/v1/slides/SYN-0002").json()["vectors"],
        json!([])
    );

    // Metrics saw all of it, and the server still serves.
    let m = get(addr, "/metrics");
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("gigapath_http_requests_total{route=\"/v1/search/reports\",status=\"400\"}"),
        "{text}"
    );
    assert!(
        text.contains("gigapath_slide_points 5"),
        "one of 6 deleted: {text}"
    );
    assert_eq!(get(addr, "/healthz").status, 200);
    service.stop();

    // Reads can require a key too.
    let mut locked = cfg;
    locked.serve.require_key_for_reads = true;
    locked.serve.run_worker = false;
    let service = Service::start(locked).unwrap();
    let addr = service.addr;
    assert_eq!(get(addr, "/v1/slides/SYN-0001").status, 401);
    assert_eq!(
        http(
            addr,
            "GET",
            "/v1/slides/SYN-0001",
            &[("X-Api-Key", KEY)],
            None
        )
        .status,
        200
    );
    assert_eq!(get(addr, "/healthz").status, 200, "liveness needs no key");
    service.stop();
}
