//! The scaled deployment end to end, through the real binary: a Postgres catalog, a Qdrant server,
//! `gigapath serve` without its own worker, and two `gigapath worker` processes. Slides are
//! queued over HTTP, one worker is `kill -9`ed while the catalog shows it holding a job, the
//! other finishes the queue (the dead worker's lease expires), every slide ends embedded exactly
//! once, and the service answers a search and the slide resources from the server-side stores.
//!
//! The test starts its own Qdrant (`../shared/qdrant/start.sh`) and PostgreSQL
//! (`scripts/start-test-postgres.sh`); without them it says SKIPPED and passes.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::servers::{free_base, http, wait_for, Postgres, PrintLogs, Procs, Qdrant};
use common::{gigapath, run, small_cohort};
use serde_json::{json, Value};

const KEY: &str = "server-path-admin-key-0123456789";
const SLIDES: u64 = 9;

fn status(root: &Path) -> Value {
    let data = root.join("data").display().to_string();
    let config = root.join("server.toml").display().to_string();
    let out = run(&["status", "--json", "--data-dir", &data, "--config", &config]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn signal(sig: &str, pid: &str) {
    let ok = Command::new("kill").args([sig, pid]).status().unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

#[test]
fn two_workers_on_postgres_and_qdrant_survive_a_kill_and_serve_search() {
    let Some(qdrant) = Qdrant::start(1) else {
        eprintln!("SKIPPED server path: no Qdrant server (../shared/qdrant/start.sh)");
        return;
    };
    let Some(postgres) = Postgres::start() else {
        eprintln!("SKIPPED server path: no PostgreSQL server binaries");
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let port = free_base(1);
    let base = format!("http://127.0.0.1:{port}");
    small_cohort(
        root,
        3,
        1600,
        "server.toml",
        &format!(
            "[store]\ncatalog_url = \"{}\"\n[store.vectors]\nbackend = \"qdrant\"\n\
             url = \"{}\"\n[ingest]\nbatch_size = 4\nlease_seconds = 10\n[serve]\n\
             bind = \"127.0.0.1:{port}\"\napi_keys = [\"{KEY}\"]\nslide_roots = [\"{}\"]\n\
             run_worker = false\n",
            postgres.url,
            qdrant.grpc(0),
            root.join("cohort").display()
        ),
    );
    let data = root.join("data");
    let config = root.join("server.toml");
    // Each process logs to its own file; a failed test prints them.
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let _print_logs = PrintLogs(logs.clone());
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

    let mut procs = Procs(vec![spawn(&["serve"])]);
    wait_for("the service", Duration::from_secs(60), || {
        http(&base, "GET", "/readyz", None, None).0 == 200
    });

    // Queue the cohort over HTTP; the service has no worker of its own.
    let (code, queued) = http(
        &base,
        "POST",
        "/v1/ingest",
        Some(&json!({"slides": [root.join("cohort/slides").display().to_string()]})),
        Some(KEY),
    );
    assert_eq!(code, 202, "{queued}");
    assert_eq!(
        queued["queued"].as_array().map(Vec::len),
        Some(SLIDES as usize),
        "{queued}"
    );
    assert_eq!(status(root)["jobs"]["queued"], SLIDES);

    // Worker A claims a job and dies with it (SIGKILL: no cleanup, the lease stays taken). It is
    // stopped first and killed only while the catalog shows it holding a job.
    procs.0.push(spawn(&["worker"]));
    let a_pid = procs.0[1].id().to_string();
    let running = || postgres.number("SELECT count(*) FROM jobs WHERE state = 'running'");
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
        after_kill["slides"]["embedded"].as_u64().unwrap_or(0) < SLIDES,
        "worker A finished everything before it was killed: {after_kill}"
    );

    // Worker B drains the queue, including A's job once its lease has expired.
    procs.0.push(spawn(&["worker"]));
    wait_for("every slide embedded", Duration::from_secs(300), || {
        status(root)["slides"]["embedded"] == SLIDES
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
    assert_eq!(s["jobs"]["done"], SLIDES, "{s}");
    assert_eq!(s["jobs"]["failed"], 0, "{s}");
    assert_eq!(s["jobs"]["queued"], 0, "{s}");
    assert_eq!(s["jobs"]["running"], 0, "{s}");
    // The killed worker's claim counts as one attempt of that job, the rest took one each.
    assert_eq!(
        postgres.number("SELECT sum(attempts) FROM jobs"),
        SLIDES + 1,
        "{s}"
    );
    // Exactly once: one point per slide and per report on the server, one weights fingerprint.
    assert_eq!(s["points"]["slides"], SLIDES, "{s}");
    assert_eq!(s["points"]["reports"], SLIDES, "{s}");
    assert_eq!(s["fingerprints"]["slides"].as_object().unwrap().len(), 1);
    assert_eq!(qdrant.count(0, "slides"), Some(SLIDES));

    // The service answers from the server-side stores: a report search by the text encoder ...
    let reports = std::fs::read_to_string(root.join("cohort/reports.jsonl")).unwrap();
    let first: Value = serde_json::from_str(reports.lines().next().unwrap()).unwrap();
    let text = first["report_text"].as_str().unwrap().to_string();
    let (code, hits) = http(
        &base,
        "POST",
        "/v1/search/reports",
        Some(&json!({"query": text, "k": 3})),
        Some(KEY),
    );
    assert_eq!(code, 200, "{hits}");
    let top = &hits["results"][0];
    assert_eq!(top["payload"]["slide_id"], first["slide_id"], "{hits}");
    assert!(top["score"].as_f64().unwrap() > 0.99, "{hits}");
    // ... and every slide's record from the Postgres catalog.
    for id in queued["queued"].as_array().unwrap() {
        let id = id.as_str().unwrap();
        let (code, slide) = http(&base, "GET", &format!("/v1/slides/{id}"), None, Some(KEY));
        assert_eq!(code, 200, "{id}: {slide}");
        assert_eq!(slide["state"], "embedded", "{slide}");
    }
}
