//! `/v1/jobs` on the real service over a real store: listing with filters, retry and cancel
//! with their refusals (404 unknown, 409 wrong state, 400 bad input), and the admin key rule.

mod common;

use std::path::{Path, PathBuf};

use gigapath_api::Service;
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use serde_json::{json, Value};

use common::{get, http, post, text, tiny_service_config};

const KEY: &str = "jobs-admin-key-0123456789";

/// A fresh schema of the test Postgres as a catalog URL, or `None` (with a message) when
/// `GIGAPATH_TEST_POSTGRES_URL` is not set.
fn postgres_catalog(test: &str) -> Option<String> {
    let Ok(base) = std::env::var("GIGAPATH_TEST_POSTGRES_URL") else {
        eprintln!("SKIPPED postgres {test}: set GIGAPATH_TEST_POSTGRES_URL");
        return None;
    };
    let schema = format!("api_{test}_{}", std::process::id());
    let out = std::process::Command::new("psql")
        .args([
            base.as_str(),
            "-q",
            "-c",
            &format!("CREATE SCHEMA {schema}"),
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

fn setup(root: &Path, catalog_url: Option<String>) -> Config {
    let mut cfg = tiny_service_config(root, 1, KEY);
    // Jobs queued over HTTP stay queued: this test drives the queue by hand.
    cfg.serve.run_worker = false;
    cfg.store.catalog_url = catalog_url;
    cfg
}

fn with_key(addr: std::net::SocketAddr, method: &str, path: &str) -> common::Reply {
    let auth = format!("Bearer {KEY}");
    http(
        addr,
        method,
        path,
        &[("Authorization", auth.as_str())],
        None,
    )
}

fn jobs(addr: std::net::SocketAddr, query: &str) -> Vec<Value> {
    let r = with_key(addr, "GET", &format!("/v1/jobs{query}"));
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["jobs"].as_array().unwrap().clone()
}

#[test]
fn list_retry_and_cancel_jobs_over_http_sqlite() {
    list_retry_and_cancel_jobs_over_http(None);
}

#[test]
fn list_retry_and_cancel_jobs_over_http_postgres() {
    if let Some(url) = postgres_catalog("http") {
        list_retry_and_cancel_jobs_over_http(Some(url));
    }
}

fn list_retry_and_cancel_jobs_over_http(catalog_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = setup(root, catalog_url);
    let slides = root.join("slides-root/cohort/slides");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&slides)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "svs"))
        .collect();
    names.sort();
    // One slide embedded, one file that is no slide (its job fails), before the service runs.
    let bad = root.join("slides-root/BAD-0001.svs");
    std::fs::write(&bad, b"this is not a slide").unwrap();
    {
        let pipeline = Pipeline::open(cfg.clone()).unwrap();
        let s = pipeline
            .ingest(
                &IngestRequest {
                    inputs: vec![names[0].clone(), bad.clone()],
                    ..IngestRequest::default()
                },
                &Quiet,
            )
            .unwrap();
        assert_eq!((s.run.slides_ok, s.run.slides_failed), (1, 1), "{s:?}");
    }
    let service = Service::start(cfg).unwrap();
    let addr = service.addr;
    // Two more slides queued through the API (no worker runs them).
    let paths: Vec<String> = names[1..].iter().map(|p| p.display().to_string()).collect();
    let q = post(addr, "/v1/ingest", &json!({ "slides": paths }), Some(KEY));
    assert_eq!(q.status, 202, "{}", text(&q));

    // The admin key is needed, even to list (payloads name server paths).
    assert_eq!(get(addr, "/v1/jobs").status, 401);
    let wrong = http(
        addr,
        "GET",
        "/v1/jobs",
        &[("X-Api-Key", "not-the-key-0123456789")],
        None,
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(post(addr, "/v1/jobs/1/retry", &json!({}), None).status, 401);

    let all = jobs(addr, "");
    assert_eq!(all.len(), 4, "{all:?}");
    let by_state =
        |s: &str| -> Vec<Value> { all.iter().filter(|j| j["state"] == s).cloned().collect() };
    let (done, failed, queued) = (by_state("done"), by_state("failed"), by_state("queued"));
    assert_eq!((done.len(), failed.len(), queued.len()), (1, 1, 2));
    assert_eq!(failed[0]["slide_id"], "BAD-0001");
    assert_eq!(failed[0]["attempts"], 1);
    assert!(failed[0]["error"].as_str().unwrap().contains("BAD-0001"));
    assert!(failed[0]["first_attempt_at_ms"].is_i64());
    assert_eq!(queued[0]["attempts"], 0);
    assert!(queued[0]["first_attempt_at_ms"].is_null());
    let only_failed = jobs(addr, "?state=failed");
    assert_eq!(only_failed.len(), 1);
    assert_eq!(only_failed[0]["id"], failed[0]["id"]);
    assert_eq!(jobs(addr, "?state=queued&limit=1").len(), 1);

    // Bad queries and ids are 400, each naming the problem.
    for (query, needle) in [
        ("?state=stuck", "state `stuck`"),
        ("?limit=0", "limit = 0"),
        ("?limit=20000", "limit = 20000"),
        ("?colour=red", "colour"),
    ] {
        let r = with_key(addr, "GET", &format!("/v1/jobs{query}"));
        assert_eq!(r.status, 400, "{query}: {}", text(&r));
        assert!(text(&r).contains(needle), "{query}: {}", text(&r));
    }
    assert_eq!(with_key(addr, "POST", "/v1/jobs/abc/retry").status, 400);

    // Cancel a queued job; cancelling it again, or a done one, is a conflict; unknown is 404.
    let qid = queued[0]["id"].as_i64().unwrap();
    let r = with_key(addr, "POST", &format!("/v1/jobs/{qid}/cancel"));
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["state"], "cancelled");
    assert_eq!(r.json()["error"], "cancelled by an operator");
    let r = with_key(addr, "POST", &format!("/v1/jobs/{qid}/cancel"));
    assert_eq!((r.status, r.error_code().as_str()), (409, "conflict"));
    assert!(text(&r).contains("is cancelled"), "{}", text(&r));
    let did = done[0]["id"].as_i64().unwrap();
    let r = with_key(addr, "POST", &format!("/v1/jobs/{did}/cancel"));
    assert_eq!(r.status, 409, "{}", text(&r));
    let r = with_key(addr, "POST", &format!("/v1/jobs/{did}/retry"));
    assert_eq!(r.status, 409, "{}", text(&r));
    assert!(
        text(&r).contains("only failed or cancelled jobs can be retried"),
        "{}",
        text(&r)
    );
    let r = with_key(addr, "POST", "/v1/jobs/987654/retry");
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    assert!(text(&r).contains("unknown job 987654"));

    // Retry the failed and the cancelled job: queued, attempts reset.
    for id in [failed[0]["id"].as_i64().unwrap(), qid] {
        let r = with_key(addr, "POST", &format!("/v1/jobs/{id}/retry"));
        assert_eq!(r.status, 200, "{}", text(&r));
        let j = r.json();
        assert_eq!((&j["state"], &j["attempts"]), (&json!("queued"), &json!(0)));
        assert_eq!(j["error"], Value::Null);
    }
    assert_eq!(jobs(addr, "?state=queued").len(), 3);
    let status = get(addr, "/v1/status").json();
    assert_eq!(status["jobs"]["queued"], 3, "{status}");
    assert_eq!(status["jobs"]["cancelled"], 0, "{status}");

    // Documented, and other methods are 405.
    let doc = get(addr, "/v1/openapi.json").json();
    for p in ["/v1/jobs", "/v1/jobs/{id}/retry", "/v1/jobs/{id}/cancel"] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the document"
        );
    }
    assert_eq!(with_key(addr, "GET", "/v1/jobs/1/retry").status, 405);
    service.stop();
}
