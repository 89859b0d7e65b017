//! One process per embedded data dir, and the fingerprint guard: the same store served with
//! other weights answers 409 wherever embeddings of different weights would meet.

use gigapath_api::Service;
use serde_json::json;

use crate::common::{get, post, text};
use crate::fixture::*;

#[test]
fn a_second_service_on_the_same_data_dir_is_refused() {
    let s = shared();
    match Service::start(s.fx.cfg.clone()) {
        Ok(_) => panic!("a second service opened the same embedded data dir"),
        Err(e) => assert!(e.to_string().contains("cannot open the data dir"), "{e}"),
    }
    assert_eq!(get(s.addr, "/healthz").status, 200);
}

#[test]
fn other_weights_get_409_with_what_to_do() {
    // The shared service holds its data dir: this test serves a fixture of its own.
    fingerprint_guard(&fixture());
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
