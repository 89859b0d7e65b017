//! `gigapath worker --exit-when-idle` with a job still leased by a dead process (issue 15): it
//! must not exit while that job is running on paper; it waits until the lease expires, runs the
//! job itself, and exits with every slide embedded. Through the real binary, on a SQLite
//! catalog and a Qdrant server of its own (`../shared/qdrant/start.sh`): with the embedded
//! vector store the data dir has one process and a run expires stale leases at start.
//! Skipped (with a message) where `../shared/qdrant` is absent.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::servers::{Procs, Qdrant};
use common::{gigapath, run, small_cohort};
use serde_json::Value;

/// The shortest lease the config allows.
const LEASE_SECONDS: u64 = 10;

fn status(root: &std::path::Path) -> Value {
    let data = root.join("data").display().to_string();
    let config = root.join("cfg.toml").display().to_string();
    let out = run(&["status", "--json", "--data-dir", &data, "--config", &config]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn signal(sig: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

#[test]
fn exit_when_idle_waits_for_a_dead_workers_leased_job() {
    let Some(qdrant) = Qdrant::start(1) else {
        eprintln!("SKIPPED worker --exit-when-idle: no Qdrant server (../shared/qdrant/start.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    small_cohort(
        root,
        2,
        1600,
        "cfg.toml",
        &format!(
            "[store.vectors]\nbackend = \"qdrant\"\nurl = \"{}\"\n[ingest]\nbatch_size = 4\n\
             lease_seconds = {LEASE_SECONDS}\n",
            qdrant.grpc(0)
        ),
    );
    let slides = 6u64;
    let data = root.join("data");
    let config = root.join("cfg.toml");
    let catalog = data.join("catalog.sqlite");
    let running = || -> u64 {
        let out = std::process::Command::new("sqlite3")
            .arg(&catalog)
            .arg("SELECT count(*) FROM jobs WHERE state = 'running'")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };

    // An ingest queues the cohort and works it; it is killed while it holds a job.
    let mut procs = Procs::default();
    procs.0.push(
        gigapath()
            .arg("ingest")
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .arg(root.join("cohort/slides"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("ingest.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = procs.0[0].id();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the ingest never held a job: {}",
            std::fs::read_to_string(root.join("ingest.log")).unwrap_or_default()
        );
        if catalog.is_file() && running() >= 1 {
            signal("-STOP", pid);
            if running() >= 1 {
                signal("-KILL", pid);
                break;
            }
            signal("-CONT", pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_at = Instant::now();
    procs.0[0].wait().unwrap();
    let after_kill = status(root);
    assert_eq!(after_kill["jobs"]["running"], 1, "{after_kill}");
    assert!(
        after_kill["slides"]["embedded"].as_u64().unwrap_or(0) < slides,
        "{after_kill}"
    );

    // A worker that exits when idle: it works the queue, then waits for the leased job.
    let out = gigapath()
        .args(["worker", "--exit-when-idle", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        killed_at.elapsed() >= Duration::from_secs(LEASE_SECONDS - 1),
        "the worker exited before the dead process's lease expired"
    );
    let s = status(root);
    assert_eq!(s["slides"]["embedded"], slides, "{s}");
    assert_eq!(s["jobs"]["done"], slides, "{s}");
    assert_eq!(s["jobs"]["running"], 0, "{s}");
    assert_eq!(s["jobs"]["failed"], 0, "{s}");
    assert_eq!(s["points"]["slides"], slides, "{s}");
    assert_eq!(qdrant.count(0, "slides"), Some(slides));
}
