//! `POST /v1/ingest` and `DELETE /v1/slides/{id}` against the real service (issue 13, items 1,
//! 4, 5, 6 and the 404/403 part of 8): folders that link out of the slide roots, link loops,
//! one answer for paths outside the roots whether they exist or not, bad file names, a
//! different file under a known id (409, then `replace`), and a delete that leaves status and
//! store agreeing and the slide ingestible again.

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gigapath_api::Service;
use gigapath_pipeline::Config;
use serde_json::{json, Value};

use common::{get, http, post, text, tiny_service_config};

const KEY: &str = "test-admin-key-0123456789";

fn config(root: &Path) -> Config {
    tiny_service_config(root, 1, KEY)
}

fn ingest(addr: SocketAddr, body: Value) -> common::Reply {
    post(addr, "/v1/ingest", &body, Some(KEY))
}

fn message(r: &common::Reply) -> String {
    r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until the worker has embedded `n` slides and the store holds `n` points.
fn wait_embedded(addr: SocketAddr, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = get(addr, "/v1/status").json();
        if st["slides"]["embedded"] == n && st["points"]["slides"] == n && st["jobs"]["queued"] == 0
        {
            return st;
        }
        assert!(Instant::now() < deadline, "not {n} embedded: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn slides_known(addr: SocketAddr) -> u64 {
    let st = get(addr, "/v1/status").json();
    st["slides"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

#[test]
fn ingest_inputs_identity_and_delete_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let cfg = config(&root);
    let slides_root = root.join("slides-root");
    let cohort = slides_root.join("cohort/slides");
    let outside = root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(cohort.join("SYN-0003.svs"), outside.join("secret.svs")).unwrap();
    let service = Service::start(cfg).unwrap();
    let addr = service.addr;

    // 1. A folder inside the roots with a linked sub-folder, or a linked file, pointing out.
    let cases = slides_root.join("cases/deeper");
    std::fs::create_dir_all(&cases).unwrap();
    symlink(&outside, cases.join("elsewhere")).unwrap();
    let r = ingest(addr, json!({"slides": [slides_root.join("cases")]}));
    assert_eq!(r.status, 403, "{}", text(&r));
    assert!(
        message(&r).contains("outside the configured slide roots"),
        "{}",
        text(&r)
    );
    let files = slides_root.join("files");
    std::fs::create_dir_all(&files).unwrap();
    symlink(outside.join("secret.svs"), files.join("innocent.svs")).unwrap();
    let r = ingest(addr, json!({"slides": [files]}));
    assert_eq!(r.status, 403, "{}", text(&r));
    assert_eq!(get(addr, "/v1/slides/secret").status, 404);
    assert_eq!(get(addr, "/v1/slides/innocent").status, 404);
    assert_eq!(slides_known(addr), 0, "nothing registered");

    // 4. A folder with link loops (a -> ., b -> .) is walked once, quickly.
    let looped = slides_root.join("loop");
    std::fs::create_dir_all(&looped).unwrap();
    std::fs::copy(cohort.join("SYN-0001.svs"), looped.join("loopy.svs")).unwrap();
    symlink(".", looped.join("a")).unwrap();
    symlink(".", looped.join("b")).unwrap();
    let t = Instant::now();
    let r = ingest(addr, json!({"slides": [looped]}));
    assert_eq!(r.status, 202, "{}", text(&r));
    assert_eq!(r.json()["queued"], json!(["loopy"]));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    // 8. Outside the roots: the same 403 whether the path exists or not; 404 only inside.
    let answers: Vec<(u16, String)> = [
        outside.join("secret.svs"),
        outside.join("no-such.svs"),
        PathBuf::from("/definitely/not/here.svs"),
    ]
    .iter()
    .map(|p| {
        let r = ingest(addr, json!({"slides": [p]}));
        (
            r.status,
            message(&r).replace(&p.display().to_string(), "PATH"),
        )
    })
    .collect();
    for a in &answers {
        assert_eq!(
            a,
            &(
                403,
                "slide path `PATH` is outside the configured slide roots".to_string()
            ),
            "{answers:?}"
        );
    }
    let r = ingest(addr, json!({"slides": [slides_root.join("no-such.svs")]}));
    assert_eq!(r.status, 404, "{}", text(&r));

    // 5c, 5d, 6. Ids `.` / `..` and non-UTF-8 names: 400 naming each file, nothing registered.
    let bad = slides_root.join("badnames");
    std::fs::create_dir_all(&bad).unwrap();
    for name in [&b"..svs"[..], b"caf\xe9.svs", b"caf\xe8.svs"] {
        std::fs::copy(
            cohort.join("SYN-0002.svs"),
            bad.join(OsStr::from_bytes(name)),
        )
        .unwrap();
    }
    let before = slides_known(addr);
    let r = ingest(addr, json!({"slides": [bad]}));
    assert_eq!(r.status, 400, "{}", text(&r));
    let m = message(&r);
    assert!(m.contains("..svs: the slide id `.`"), "{m}");
    assert_eq!(m.matches("not valid UTF-8").count(), 2, "{m}");
    assert_eq!(slides_known(addr), before, "nothing half-registered");
    // Ids given as `labels` keys follow the same rule as ids from file names.
    for key in ["..", "a/b", ""] {
        let r = ingest(
            addr,
            json!({"slides": [cohort], "labels": {key: {"subtype": "X"}}}),
        );
        assert_eq!(r.status, 400, "{key:?}: {}", text(&r));
        assert!(message(&r).contains("`labels[0]`"), "{}", message(&r));
    }
    assert_eq!(
        slides_known(addr),
        before,
        "nothing registered by a refused request"
    );

    // The cohort, embedded by the service's worker.
    let r = ingest(addr, json!({"slides": [cohort]}));
    assert_eq!(r.status, 202, "{}", text(&r));
    wait_embedded(addr, 4);

    // 5a. A different file under a known id: 409 naming both paths; `replace` re-embeds.
    let other = slides_root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(cohort.join("SYN-0002.svs"), other.join("SYN-0001.svs")).unwrap();
    let r = ingest(addr, json!({"slides": [other.join("SYN-0001.svs")]}));
    assert_eq!(r.status, 409, "{}", text(&r));
    let m = message(&r);
    assert!(
        m.contains(&cohort.join("SYN-0001.svs").display().to_string()),
        "{m}"
    );
    assert!(
        m.contains(&other.join("SYN-0001.svs").display().to_string()),
        "{m}"
    );
    let detail = get(addr, "/v1/slides/SYN-0001").json();
    assert_eq!(detail["state"], "embedded", "untouched: {detail}");
    let r = ingest(
        addr,
        json!({"slides": [other.join("SYN-0001.svs")], "replace": true}),
    );
    assert_eq!(r.status, 202, "{}", text(&r));
    assert_eq!(r.json()["replaced"], json!(["SYN-0001"]));
    assert_eq!(r.json()["queued"], json!(["SYN-0001"]));
    wait_embedded(addr, 4);

    // 5b. Delete: status agrees with the store at once, and the slide can be ingested again.
    let d = http(
        addr,
        "DELETE",
        "/v1/slides/SYN-0002",
        &[("X-Api-Key", KEY)],
        None,
    );
    assert_eq!(d.status, 200, "{}", text(&d));
    let st = get(addr, "/v1/status").json();
    assert_eq!(st["slides"]["embedded"], 3, "{st}");
    assert_eq!(st["points"]["slides"], 3, "{st}");
    assert_eq!(st["jobs"]["done"], 3, "{st}");
    let detail = get(addr, "/v1/slides/SYN-0002").json();
    assert_eq!(detail["state"], "registered", "{detail}");
    assert_eq!(detail["pictures"], json!([]), "{detail}");
    assert_eq!(detail["vectors"], json!([]), "{detail}");
    let r = ingest(addr, json!({"slides": [cohort.join("SYN-0002.svs")]}));
    assert_eq!(r.status, 202, "{}", text(&r));
    assert_eq!(r.json()["queued"], json!(["SYN-0002"]), "{}", text(&r));
    wait_embedded(addr, 4);
    let detail = get(addr, "/v1/slides/SYN-0002").json();
    assert_eq!(detail["vectors"], json!(["slide"]), "{detail}");
    service.stop();
}
