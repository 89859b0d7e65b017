//! The scaled deployment end to end, through the real binary: a Postgres catalog, a Qdrant server,
//! `gigapath serve` without its own worker, and two `gigapath worker` processes. Slides are
//! queued over HTTP, one worker is `kill -9`ed while it holds a job, the other finishes the queue
//! (the dead worker's lease expires), every slide ends embedded exactly once, and the service
//! answers a search and the slide resources from the server-side stores.
//!
//! Runs when both servers are given (`.ci/run` starts them): `QDRANT_URL` (gRPC) and
//! `QDRANT_REST_URL` from `../shared/qdrant/start.sh`, `GIGAPATH_TEST_POSTGRES_URL` from
//! `scripts/start-test-postgres.sh`. Otherwise it says so and passes. It uses the server's
//! standard `slides` / `reports` collections, so the server must not hold them already (a test
//! server: the test refuses to touch a server that does).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{gigapath, run, small_cohort};
use serde_json::{json, Value};

const KEY: &str = "server-path-admin-key-0123456789";

/// One HTTP/1.1 exchange on loopback (`Connection: close`): status and body.
fn http(base: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nX-Api-Key: {KEY}\r\n\
         Content-Length: {}\r\n",
        payload.len()
    );
    if body.is_some() {
        req += "Content-Type: application/json\r\n";
    }
    req += "\r\n";
    req += &payload;
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

fn json_of(base: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let (status, bytes) = http(base, method, path, body);
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

/// The Postgres URL of a fresh database made for this test (`psql` from the server's package).
fn fresh_database(admin_url: &str) -> (String, String) {
    let name = format!(
        "gp_server_path_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let out = Command::new("psql")
        .args([admin_url, "-v", "ON_ERROR_STOP=1", "-qc"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("psql (postgresql-client) is installed with the test server");
    assert!(
        out.status.success(),
        "CREATE DATABASE: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("a postgres URL ending in /DATABASE");
    (format!("{base}/{name}"), name)
}

fn drop_database(admin_url: &str, name: &str) {
    let _ = Command::new("psql")
        .args([admin_url, "-qc"])
        .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .output();
}

/// One number from a SQL query on the test database.
fn sql(url: &str, query: &str) -> u64 {
    let out = Command::new("psql")
        .args([url, "-tAc", query])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn signal(sig: &str, pid: &str) {
    let ok = Command::new("kill").args([sig, pid]).status().unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Children are killed when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn status(root: &Path) -> Value {
    let data = root.join("data").display().to_string();
    let config = root.join("server.toml").display().to_string();
    let out = run(&["status", "--json", "--data-dir", &data, "--config", &config]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_workers_on_postgres_and_qdrant_survive_a_kill_and_serve_search() {
    let (Ok(qdrant), Ok(qdrant_rest), Ok(postgres)) = (
        std::env::var("QDRANT_URL"),
        std::env::var("QDRANT_REST_URL"),
        std::env::var("GIGAPATH_TEST_POSTGRES_URL"),
    ) else {
        eprintln!(
            "SKIPPED server path: set QDRANT_URL + QDRANT_REST_URL (../shared/qdrant/start.sh) \
             and GIGAPATH_TEST_POSTGRES_URL (scripts/start-test-postgres.sh)"
        );
        return;
    };
    for collection in ["slides", "reports"] {
        let (code, _) = http(
            &qdrant_rest,
            "GET",
            &format!("/collections/{collection}"),
            None,
        );
        assert_eq!(
            code, 404,
            "the Qdrant server at {qdrant_rest} already holds `{collection}`: \
             this test needs a throwaway server"
        );
    }
    let (catalog_url, db_name) = fresh_database(&postgres);
    let cleanup = Cleanup {
        qdrant_rest: qdrant_rest.clone(),
        postgres: postgres.clone(),
        db_name,
    };

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    small_cohort(
        root,
        3,
        1600,
        "server.toml",
        &format!(
            "[store]\ncatalog_url = \"{catalog_url}\"\n[store.vectors]\nbackend = \"qdrant\"\n\
             url = \"{qdrant}\"\n[ingest]\nbatch_size = 4\nlease_seconds = 10\n[serve]\n\
             bind = \"127.0.0.1:{port}\"\napi_keys = [\"{KEY}\"]\nslide_roots = [\"{}\"]\n\
             run_worker = false\n",
            root.join("cohort").display()
        ),
    );
    let slides = 9u64;
    let data = root.join("data");
    let config = root.join("server.toml");
    // Each process logs to its own file; a failed wait prints them.
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut spawned = 0;
    let mut spawn = |args: &[&str]| -> Child {
        spawned += 1;
        let log = std::fs::File::create(logs.join(format!("{spawned}-{}.log", args[0]))).unwrap();
        gigapath()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let _print_logs_on_failure = PrintLogs(logs.clone());

    let mut procs = Procs(vec![spawn(&["serve"])]);
    wait_for("the service", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http(&base, "GET", "/readyz", None).0 == 200
    });

    // Queue the cohort over HTTP; the service has no worker of its own.
    let (code, queued) = json_of(
        &base,
        "POST",
        "/v1/ingest",
        Some(&json!({"slides": [root.join("cohort/slides").display().to_string()]})),
    );
    assert_eq!(code, 202, "{queued}");
    assert_eq!(
        queued["queued"].as_array().map(Vec::len),
        Some(slides as usize),
        "{queued}"
    );
    assert_eq!(status(root)["jobs"]["queued"], slides);

    // Worker A claims a job and dies with it (SIGKILL: no cleanup, the lease stays taken). It is
    // stopped first and killed only while the catalog shows it holding a job.
    procs.0.push(spawn(&["worker"]));
    let a_pid = procs.0[1].id().to_string();
    let running = || {
        sql(
            &catalog_url,
            "SELECT count(*) FROM jobs WHERE state = 'running'",
        )
    };
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "worker A never held a job"
        );
        if running() >= 1 {
            signal("-STOP", &a_pid);
            if running() >= 1 {
                signal("-KILL", &a_pid);
                break;
            }
            signal("-CONT", &a_pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = procs.0.remove(1);
    a.wait().unwrap();
    assert_eq!(running(), 1, "the dead worker's job is still leased");
    let after_kill = status(root);
    assert!(
        after_kill["slides"]["embedded"].as_u64().unwrap_or(0) < slides,
        "worker A finished everything before it was killed: {after_kill}"
    );

    // Worker B drains the queue, including A's job once its lease has expired.
    procs.0.push(spawn(&["worker"]));
    wait_for("every slide embedded", Duration::from_secs(300), || {
        status(root)["slides"]["embedded"] == slides
    });
    // The reports of the embedded slides (after the workers: `ingest` also works the queue).
    let out = gigapath()
        .args(["ingest", "--json", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--reports")
        .arg(root.join("cohort/reports.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let s = status(root);
    assert_eq!(s["catalog_backend"], "postgres", "{s}");
    assert_eq!(s["vector_backend"], "qdrant", "{s}");
    assert_eq!(s["jobs"]["done"], slides, "{s}");
    assert_eq!(s["jobs"]["failed"], 0, "{s}");
    assert_eq!(s["jobs"]["queued"], 0, "{s}");
    assert_eq!(s["jobs"]["running"], 0, "{s}");
    // Exactly once: one point per slide and per report on the server, one weights fingerprint.
    assert_eq!(s["points"]["slides"], slides, "{s}");
    assert_eq!(s["points"]["reports"], slides, "{s}");
    assert_eq!(s["fingerprints"]["slides"].as_object().unwrap().len(), 1);
    let (_, count) = json_of(
        &qdrant_rest,
        "POST",
        "/collections/slides/points/count",
        Some(&json!({"exact": true})),
    );
    assert_eq!(count["result"]["count"], slides, "{count}");

    // The service answers from the server-side stores: a report search by the text encoder ...
    let reports = std::fs::read_to_string(root.join("cohort/reports.jsonl")).unwrap();
    let first: Value = serde_json::from_str(reports.lines().next().unwrap()).unwrap();
    let text = first["report_text"]
        .as_str()
        .or(first["text"].as_str())
        .unwrap()
        .to_string();
    let (code, hits) = json_of(
        &base,
        "POST",
        "/v1/search/reports",
        Some(&json!({"query": text, "k": 3})),
    );
    assert_eq!(code, 200, "{hits}");
    let top = &hits["results"][0];
    assert_eq!(top["payload"]["slide_id"], first["slide_id"], "{hits}");
    assert!(top["score"].as_f64().unwrap() > 0.99, "{hits}");
    // ... and every slide's record, with its tile count, from the Postgres catalog.
    let queued_ids: Vec<String> = queued["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for id in &queued_ids {
        let (code, slide) = json_of(&base, "GET", &format!("/v1/slides/{id}"), None);
        assert_eq!(code, 200, "{id}: {slide}");
        assert_eq!(slide["state"], "embedded", "{slide}");
    }
    drop(procs);
    drop(cleanup);
}

/// The processes' logs, printed when the test fails (the harness shows them).
struct PrintLogs(std::path::PathBuf);

impl Drop for PrintLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!("--- {}:", entry.path().display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Drops what the test made on the shared servers.
struct Cleanup {
    qdrant_rest: String,
    postgres: String,
    db_name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for collection in ["slides", "reports"] {
            let _ = std::panic::catch_unwind(|| {
                http(
                    &self.qdrant_rest,
                    "DELETE",
                    &format!("/collections/{collection}"),
                    None,
                )
            });
        }
        drop_database(&self.postgres, &self.db_name);
    }
}
