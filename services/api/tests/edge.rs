//! The service's edge against the real server on a loopback port (issue 13, item 8): slow
//! bodies and heads are cut off at `serve.read_timeout_seconds`, requests over
//! `serve.max_in_flight` get 503 with `Retry-After` while the probes still answer, every answer
//! carries the security headers, and every id field of every operation in the OpenAPI document
//! is refused with 400 when the document calls it invalid (not 404 "unknown").
//!
//! The service runs over an empty data dir without models: everything tested here is answered
//! before any model or stored point is needed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use gigapath_api::Service;
use gigapath_pipeline::Config;
use serde_json::{json, Value};

use common::{get, http, text, Reply};

const KEY: &str = "edge-test-admin-key-0123456789";

fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Service {
    let mut cfg = Config::load(Some(&dir.join("data")), None).unwrap();
    cfg.serve.bind = "127.0.0.1:0".into();
    cfg.serve.run_worker = false;
    cfg.serve.api_keys = vec![KEY.into()];
    cfg.serve.prompts_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts");
    tweak(&mut cfg);
    cfg.validate().unwrap();
    Service::start(cfg).unwrap()
}

fn auth() -> String {
    format!("Bearer {KEY}")
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Reply {
    let a = auth();
    let mut headers = vec![("Authorization", a.as_str())];
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let body = body.map(|b| b.to_string());
    http(
        addr,
        method,
        path,
        &headers,
        body.as_deref().map(str::as_bytes),
    )
}

/// What a slow client saw: the status line of the answer (None: the connection was closed
/// without one, or nothing came within the bound), and when.
struct Slow {
    status: Option<u16>,
    after: Duration,
}

/// Sends `head`, then one byte every 200 ms, until the server answers or closes, or `bound`
/// passes.
fn trickle(addr: SocketAddr, head: String, bound: Duration) -> Slow {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < bound {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if s.write_all(b" ").is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let after = t0.elapsed();
    let status = String::from_utf8_lossy(&got)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok());
    Slow { status, after }
}

/// Like [`trickle`], but goes on until the server closes the connection (or `bound`): the
/// status is the first answer's.
fn trickle_to_close(addr: SocketAddr, head: String, bound: Duration) -> Slow {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < bound {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if s.write_all(b"y").is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let status = String::from_utf8_lossy(&got)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok());
    Slow {
        status,
        after: t0.elapsed(),
    }
}

/// The value of an unlabelled metric.
fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "/metrics: {}", text(&r));
    text(&r)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls until `f` holds (at most `bound`).
fn wait_for(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < bound {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn assert_security_headers(r: &Reply, what: &str) {
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy\n{}", r.head));
    assert_eq!(csp, gigapath_api::limits::CONTENT_SECURITY_POLICY, "{what}");
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(
        r.header("x-frame-options").as_deref(),
        Some("DENY"),
        "{what}"
    );
    assert_eq!(
        r.header("referrer-policy").as_deref(),
        Some("no-referrer"),
        "{what}"
    );
}

#[test]
fn slow_clients_are_cut_off_and_overload_is_503_while_probes_answer() {
    const READ_S: u64 = 4;
    const CAP: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let service = start(dir.path(), |c| {
        c.serve.read_timeout_seconds = READ_S;
        c.serve.max_in_flight = CAP;
    });
    let addr = service.addr;
    let bound = Duration::from_secs(READ_S + 12);
    let deadline = Duration::from_secs(READ_S + 3);

    // CAP clients that send their head, then trickle a body that would take minutes: one with a
    // Content-Length, one chunked.
    let length = format!(
        "POST /v1/search/slides HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"query\": \""
    );
    let chunked = format!(
        "POST /v1/search/slides HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n400\r\n{{\"query\": \""
    );
    assert_eq!(CAP, 2);
    let slow: Vec<_> = [length, chunked]
        .into_iter()
        .map(|head| std::thread::spawn(move || trickle(addr, head, bound)))
        .collect();
    // And one that never finishes its head.
    let head_only = std::thread::spawn(move || {
        trickle(
            addr,
            format!("POST /v1/search/slides HTTP/1.1\r\nHost: {addr}\r\n"),
            bound,
        )
    });

    // Both body clients hold a request slot (the probes are not counted).
    assert!(
        wait_for(Duration::from_secs(READ_S - 1), || metric(
            addr,
            "gigapath_http_requests_in_flight"
        ) == Some(CAP as f64)),
        "the slow clients are not counted in flight: {:?}",
        metric(addr, "gigapath_http_requests_in_flight")
    );
    // The next request is refused at once, with Retry-After, before its body is read.
    let t = Instant::now();
    let r = request(
        addr,
        "POST",
        "/v1/search/reports",
        Some(&json!({"query": "x"})),
    );
    assert_eq!(r.status, 503, "{}", text(&r));
    assert_eq!(r.error_code(), "overloaded");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert!(text(&r).contains("serve.max_in_flight"), "{}", text(&r));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_security_headers(&r, "503 overloaded");
    let page = get(addr, "/");
    assert_eq!(page.status, 503, "the page counts too");
    // The probes still answer.
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let r = get(addr, probe);
        assert_eq!(r.status, 200, "{probe} while overloaded: {}", text(&r));
    }

    // The slow ones are answered 408 (or closed) at the read deadline, not held.
    for (i, h) in slow.into_iter().enumerate() {
        let s = h.join().unwrap();
        assert!(
            s.after < deadline,
            "slow body {i} held {:?} (read timeout {READ_S} s)",
            s.after
        );
        assert!(
            s.after >= Duration::from_millis(READ_S * 1000 - 500),
            "slow body {i} cut at {:?}, before the deadline",
            s.after
        );
        assert!(
            matches!(s.status, None | Some(408) | Some(400)),
            "slow body {i}: {:?}",
            s.status
        );
    }
    let s = head_only.join().unwrap();
    assert!(s.after < deadline, "slow head held {:?}", s.after);
    assert!(
        matches!(s.status, None | Some(408) | Some(400)),
        "slow head: {:?}",
        s.status
    );

    // A trickled body on an endpoint that does not read it: answered, and the connection does
    // not stay open to drain it.
    for head in [
        format!("GET /v1/prompt-sets HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1000\r\n\r\nx"),
        format!(
            "GET /v1/prompt-sets HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n\r\n400\r\nx"
        ),
    ] {
        let s = trickle_to_close(addr, head, bound);
        assert!(s.after < deadline, "an unread slow body held {:?}", s.after);
        assert_eq!(s.status, Some(200));
    }

    // Their slots are free again: requests are served.
    assert!(
        wait_for(Duration::from_secs(3), || metric(
            addr,
            "gigapath_http_requests_in_flight"
        ) == Some(0.0)),
        "slots not released"
    );
    let r = request(
        addr,
        "POST",
        "/v1/search/slides",
        Some(&json!({"report_id": ""})),
    );
    assert_eq!(r.status, 400, "{}", text(&r));
    let m = text(&get(addr, "/metrics"));
    assert!(
        m.contains(r#"route="/v1/search/reports",status="503""#),
        "refusals are counted: {m}"
    );
    service.stop();
}

#[test]
fn every_answer_carries_the_security_headers_and_the_page_runs_under_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let service = start(dir.path(), |_| {});
    let addr = service.addr;

    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert_security_headers(&page, "GET /");
    let csp = page.header("content-security-policy").unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing: {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    // Nothing inline that the policy would block: the script and style are files of their own.
    let html = text(&page);
    assert!(
        html.contains(r#"<script src="/app.js"></script>"#),
        "{html}"
    );
    assert!(html.contains(r#"<link rel="stylesheet" href="/app.css">"#));
    assert!(
        !html.contains("<style") && !html.contains("style="),
        "{html}"
    );
    assert_eq!(html.matches("<script").count(), 1, "one script, external");
    for (path, ty) in [("/app.js", "text/javascript"), ("/app.css", "text/css")] {
        let r = get(addr, path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.content_type.starts_with(ty), "{path}: {}", r.content_type);
        assert_security_headers(&r, path);
    }
    // The script builds no inline style attributes (widths go through the CSSOM).
    assert!(!text(&get(addr, "/app.js")).contains("style=\""));

    // Every kind of answer: JSON, probes, errors of the router and of the handlers.
    let cases: Vec<(Reply, u16, &str)> = vec![
        (get(addr, "/healthz"), 200, "healthz"),
        (get(addr, "/v1/openapi.json"), 200, "openapi"),
        (get(addr, "/no/such/route"), 404, "unknown route"),
        (
            http(addr, "PUT", "/v1/search/slides", &[], None),
            405,
            "wrong method",
        ),
        (
            request(addr, "POST", "/v1/search/slides", Some(&json!({}))),
            400,
            "bad body",
        ),
        (
            http(addr, "POST", "/v1/ingest", &[], Some(b"{}")),
            401,
            "no key",
        ),
    ];
    for (r, status, what) in &cases {
        assert_eq!(r.status, *status, "{what}: {}", text(r));
        assert_security_headers(r, what);
    }
    service.stop();
}

/// Minimal valid bodies per operation, so that the id field under test is the only fault.
fn base_body(op: &str, field: &str) -> Option<Value> {
    Some(match (op, field) {
        ("POST /v1/search/slides", "/report_id") => json!({}),
        ("POST /v1/search/reports", "/slide_id") => json!({}),
        ("POST /v1/search/slides" | "POST /v1/search/reports", "/filter/slide_id") => {
            json!({"query": "x", "filter": {}})
        }
        ("POST /v1/zero-shot/subtype", "/slide_ids") => json!({"prompt_set": "nsclc"}),
        ("POST /v1/zero-shot/mutation", "/slide_ids") => json!({}),
        ("POST /v1/slides/{id}/heatmap", "") => json!({"query": "x"}),
        ("POST /v1/classify" | "POST /v1/classify/heatmap", "/slide_ids" | "/slide_id") => {
            json!({"head": "a-head"})
        }
        _ => return None,
    })
}

/// The schema behind a `$ref`, or the schema itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling {r}")),
        None => schema,
    }
}

/// Id fields of a body schema, as JSON pointers with their schema (`*_id`: one id, or a
/// `oneOf` of one / a list; `*_ids`: a list), nested objects followed.
fn id_fields(doc: &Value, schema: &Value, at: &str, out: &mut Vec<(String, Value)>) {
    let schema = resolve(doc, schema);
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    for (name, p) in props {
        let pointer = format!("{at}/{name}");
        if name == "id" || name.ends_with("_id") || name.ends_with("_ids") {
            out.push((pointer, p.clone()));
            continue;
        }
        let inner = resolve(doc, p);
        if inner["properties"].is_object() {
            id_fields(doc, inner, &pointer, out);
        }
        for alt in inner["oneOf"].as_array().into_iter().flatten() {
            if resolve(doc, alt)["properties"].is_object() {
                id_fields(doc, alt, &pointer, out);
            }
        }
    }
}

/// The single-id schema in an id field's schema (itself, the items of a list, or a branch).
fn single_id_schema(doc: &Value, s: &Value) -> Value {
    let s = resolve(doc, s);
    if s["type"] == "string" {
        return s.clone();
    }
    if s["type"] == "array" {
        return single_id_schema(doc, &s["items"]);
    }
    for alt in s["oneOf"].as_array().into_iter().flatten() {
        let a = resolve(doc, alt);
        if a["type"] == "string" {
            return a.clone();
        }
    }
    panic!("no string id schema in {s}")
}

fn set(body: &mut Value, pointer: &str, v: Value) {
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() {
        body
    } else {
        body.pointer_mut(parent).unwrap()
    };
    target[last] = v;
}

#[test]
fn every_id_field_of_every_operation_is_refused_as_the_document_says() {
    use gigapath_api::routes::ids::{MAX_ID_CHARS, REPORT_ID_PATTERN, SLIDE_ID_PATTERN};
    let dir = tempfile::tempdir().unwrap();
    let service = start(dir.path(), |_| {});
    let addr = service.addr;
    let doc = get(addr, "/v1/openapi.json").json();
    let huge = "x".repeat(100_000);
    let mut checked = Vec::new();

    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = format!("{} {path}", method.to_uppercase());
            let responses = &op["responses"];
            // Path ids.
            let path_ids: Vec<&Value> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .filter(|p| {
                    let n = p["name"].as_str().unwrap_or_default();
                    n == "id" || n.ends_with("_id")
                })
                .collect();
            for p in path_ids {
                let s = &p["schema"];
                if s["type"] != "string" {
                    continue;
                }
                assert_eq!(s["minLength"], 1, "{name}: {s}");
                assert_eq!(s["maxLength"], MAX_ID_CHARS, "{name}: {s}");
                assert!(responses.get("400").is_some(), "{name}: 400 not documented");
                let slide = s["pattern"] == SLIDE_ID_PATTERN;
                let param = format!("{{{}}}", p["name"].as_str().unwrap());
                let body = base_body(&name, "");
                let over = "x".repeat(MAX_ID_CHARS + 1);
                let mut bad = vec![over.as_str(), huge.as_str(), "a%00b"];
                if slide {
                    bad.extend(["a%2Fb", "a%5Cb"]);
                }
                for v in bad {
                    let url = path
                        .replace(&param, v)
                        .replace("{picture}", "thumbnail.png");
                    let r = request(addr, &method.to_uppercase(), &url, body.as_ref());
                    assert_eq!(
                        r.status,
                        400,
                        "{name} with {} id: {}",
                        &v[..v.len().min(12)],
                        text(&r)
                    );
                    // A URI over 64 KiB is refused by the HTTP layer itself (400, no body).
                    if v.len() < 65_000 {
                        assert_eq!(r.error_code(), "bad_request");
                    }
                }
                // An empty segment is no instance of the template: an unknown route.
                let url = path
                    .replace(&param, "")
                    .replace("{picture}", "thumbnail.png");
                let r = request(addr, &method.to_uppercase(), &url, body.as_ref());
                assert_eq!(r.status, 404, "{name} with an empty id: {}", text(&r));
                checked.push(format!("{name} {param}"));
            }
            // Body ids.
            let Some(schema) = op
                .pointer("/requestBody/content/application~1json/schema")
                .cloned()
            else {
                continue;
            };
            let mut fields = Vec::new();
            id_fields(&doc, &schema, "", &mut fields);
            for (pointer, field_schema) in fields {
                let id = single_id_schema(&doc, &field_schema);
                assert_eq!(id["minLength"], 1, "{name} {pointer}: {id}");
                assert_eq!(id["maxLength"], MAX_ID_CHARS, "{name} {pointer}: {id}");
                let slide = id["pattern"] == SLIDE_ID_PATTERN;
                assert!(
                    slide || id["pattern"] == REPORT_ID_PATTERN,
                    "{name} {pointer}: {id}"
                );
                let list = pointer.ends_with("_ids");
                let mut base = base_body(&name, &pointer)
                    .unwrap_or_else(|| panic!("add a base body for {name} {pointer} to this test"));
                let mut bad = vec![String::new(), huge.clone(), "a\0b".to_string()];
                if slide {
                    bad.extend(["a/b".to_string(), "..".to_string()]);
                }
                for v in bad {
                    let value = if list { json!([v]) } else { json!(v) };
                    set(&mut base, &pointer, value);
                    let r = request(addr, &method.to_uppercase(), path, Some(&base));
                    assert_eq!(
                        r.status,
                        400,
                        "{name} {pointer} = {:?}: {}",
                        &v[..v.len().min(12)],
                        text(&r)
                    );
                    let msg = r.json()["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let field = pointer.rsplit('/').next().unwrap();
                    assert!(
                        msg.contains(field),
                        "{name}: the message names `{field}`: {msg}"
                    );
                }
                checked.push(format!("{name} {pointer}"));
            }
        }
    }
    checked.sort();
    for must in [
        "DELETE /v1/slides/{id} {id}",
        "GET /v1/slides/{id} {id}",
        "GET /v1/slides/{id}/{picture} {id}",
        "POST /v1/slides/{id}/heatmap {id}",
        "POST /v1/search/slides /report_id",
        "POST /v1/search/slides /filter/slide_id",
        "POST /v1/search/reports /slide_id",
        "POST /v1/search/reports /filter/slide_id",
        "POST /v1/zero-shot/subtype /slide_ids",
        "POST /v1/zero-shot/mutation /slide_ids",
        "POST /v1/classify /slide_ids",
        "POST /v1/classify/heatmap /slide_id",
    ] {
        assert!(
            checked.iter().any(|c| c == must),
            "{must} not walked: {checked:?}"
        );
    }
    service.stop();
}
