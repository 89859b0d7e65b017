//! The bad inputs of issue #6 on every endpoint: a clear 4xx, never a 500, the server still up.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::common::{get, http, post, text};
use crate::fixture::*;

#[test]
fn bad_requests_get_a_clear_4xx_and_the_server_serves_on() {
    let s = shared();
    bad_inputs(s.addr, &s.fx);
    // Nothing was a 500 (in this test or any that ran before it), and the server still serves.
    let m = text(&get(s.addr, "/metrics"));
    assert!(!m.contains("status=\"500\""), "a 500 was served:\n{m}");
    assert_eq!(get(s.addr, "/healthz").status, 200);
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
