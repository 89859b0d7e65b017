//! Server faults in the middle of a multi-worker ingest (issue 15): a Postgres catalog and a
//! Qdrant server of this test's own, `gigapath serve` queueing the cohort and two
//! `gigapath worker` processes embedding it. While they work, Qdrant is killed (`kill -9`) and
//! started again on its storage, then Postgres is stopped at once (`pg_ctl -m immediate`: every
//! connection cut) and started again. Every slide must end embedded exactly once: one job done
//! per slide, none failed, one point per slide on the server, no slide failed, and the workers
//! still running (the outages were retried, not fatal).
//!
//! Skipped (with a message) without `../shared/qdrant` or the PostgreSQL server binaries.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::servers::{free_base, http, wait_for, Postgres, PrintLogs, Procs, Qdrant};
use common::{gigapath, small_cohort};
use serde_json::json;

const KEY: &str = "faults-admin-key-0123456789";
const SLIDES: u64 = 9;

fn spawn(root: &Path, args: &[&str], log: &str) -> Child {
    gigapath()
        .args(args)
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--config")
        .arg(root.join("faults.toml"))
        .env("GIGAPATH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("logs").join(log)).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn qdrant_and_postgres_restarts_mid_ingest_leave_every_slide_embedded_once() {
    let Some(mut qdrant) = Qdrant::start(1) else {
        eprintln!("SKIPPED faults test: no Qdrant server (../shared/qdrant/start.sh)");
        return;
    };
    let Some(pg) = Postgres::start() else {
        eprintln!("SKIPPED faults test: no PostgreSQL (scripts/start-test-postgres.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("logs")).unwrap();
    let _logs = PrintLogs(root.join("logs"));
    let port = free_base(1);
    let base = format!("http://127.0.0.1:{port}");
    small_cohort(
        root,
        3,
        1600,
        "faults.toml",
        &format!(
            "[store]\ncatalog_url = \"{}\"\n[store.vectors]\nbackend = \"qdrant\"\nurl = \"{}\"\n\
             [ingest]\nbatch_size = 4\nlease_seconds = 10\nstore_retry_seconds = 90\n\
             [serve]\nbind = \"127.0.0.1:{port}\"\napi_keys = [\"{KEY}\"]\nslide_roots = [\"{}\"]\n\
             run_worker = false\n",
            pg.url,
            qdrant.grpc(0),
            root.join("cohort").display()
        ),
    );

    let mut procs = Procs::default();
    procs.0.push(spawn(root, &["serve"], "serve.log"));
    wait_for("the service", Duration::from_secs(60), || {
        http(&base, "GET", "/readyz", None, None).0 == 200
    });
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
        Some(SLIDES as usize)
    );
    procs.0.push(spawn(root, &["worker"], "worker-a.log"));
    procs.0.push(spawn(root, &["worker"], "worker-b.log"));

    let done = || pg.number("SELECT count(*) FROM jobs WHERE state = 'done'");
    let progress = |at_least: u64, what: &str| {
        let start = Instant::now();
        loop {
            let n = done();
            if n >= at_least {
                assert!(
                    n < SLIDES,
                    "the ingest finished before {what}: the fault would hit nothing"
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no progress before {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Qdrant dies while the workers write, and comes back on its storage a little later.
    progress(1, "the Qdrant restart");
    qdrant.kill(0);
    std::thread::sleep(Duration::from_secs(3));
    qdrant.restart(0);

    // Postgres is cut off (every connection dropped) and started again.
    progress(done() + 1, "the Postgres restart");
    pg.stop_server();
    std::thread::sleep(Duration::from_secs(3));
    pg.start_server();

    wait_for("every job done", Duration::from_secs(120), || {
        done() == SLIDES
    });
    // The workers lived through both outages.
    for (i, child) in procs.0.iter_mut().enumerate() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "process {i} exited during the outages"
        );
    }
    // The outages were met (and retried) by the workers, not slept through.
    let logs: String = ["worker-a.log", "worker-b.log"]
        .iter()
        .map(|f| std::fs::read_to_string(root.join("logs").join(f)).unwrap_or_default())
        .collect();
    let retries: Vec<&str> = logs.lines().filter(|l| l.contains("retrying in")).collect();
    let qdrant_retries = retries.iter().filter(|l| l.contains("Qdrant")).count();
    let catalog_retries = retries.len() - qdrant_retries;
    eprintln!("retried calls: {qdrant_retries} on Qdrant, {catalog_retries} on the catalog");
    assert!(qdrant_retries > 0, "no worker met the Qdrant outage");
    // Postgres tells each open connection it is cut; the pool reconnects (or a call retries).
    assert!(
        logs.contains("immediate shutdown") || catalog_retries > 0,
        "no worker met the Postgres outage"
    );
    // Exactly once: one done job per slide, nothing failed or left, one point per slide.
    assert_eq!(pg.number("SELECT count(*) FROM jobs"), SLIDES);
    assert_eq!(
        pg.number("SELECT count(*) FROM jobs WHERE state <> 'done'"),
        0
    );
    assert_eq!(
        pg.number("SELECT count(*) FROM slides WHERE state = 'embedded'"),
        SLIDES
    );
    assert_eq!(qdrant.count(0, "slides"), Some(SLIDES));
    let (code, hits) = http(
        &base,
        "POST",
        "/v1/search/reports",
        Some(&json!({"query": "renal cell carcinoma", "k": 1})),
        Some(KEY),
    );
    // No report was ingested: the service answers (200, nothing to find) from both servers.
    assert_eq!(code, 200, "{hits}");
    drop(procs);
}
