//! `gigapath jobs list|retry|cancel` and poison jobs, through the real binary: a slide whose
//! ingest process dies (SIGKILL, as the kernel's OOM killer does) `max_attempts` times is parked
//! as failed with its attempts on record, is not picked up by the next start, and operators
//! list, retry and cancel jobs. On SQLite always; on Postgres too when
//! `GIGAPATH_TEST_POSTGRES_URL` is set (`scripts/start-test-postgres.sh`).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{gigapath, small_cohort};

/// The catalog of one test run: SQLite in the data dir, or a fresh Postgres schema.
struct Catalog {
    /// `GIGAPATH_CATALOG_URL` for every command, when Postgres.
    url: Option<String>,
}

impl Catalog {
    fn postgres(test: &str) -> Option<Catalog> {
        let Ok(base) = std::env::var("GIGAPATH_TEST_POSTGRES_URL") else {
            eprintln!(
                "SKIPPED postgres {test}: set GIGAPATH_TEST_POSTGRES_URL \
                 (scripts/start-test-postgres.sh prints it)"
            );
            return None;
        };
        let schema = format!("cli_{test}_{}", std::process::id());
        let out = Command::new("psql")
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
        Some(Catalog {
            url: Some(format!("{base}{sep}options=-c%20search_path%3D{schema}")),
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = gigapath();
        c.args(args);
        if let Some(url) = &self.url {
            c.env("GIGAPATH_CATALOG_URL", url);
        }
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and fails the test with stderr unless it succeeds.
    fn ok(&self, args: &[&str]) -> Output {
        let o = self.output(args);
        assert!(
            o.status.success(),
            "gigapath {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_slice(&self.ok(args).stdout).unwrap()
    }

    fn jobs(&self, data: &str, state: Option<&str>) -> Vec<Value> {
        let mut args = vec!["jobs", "list", "--json", "--data-dir", data];
        if let Some(s) = state {
            args.extend(["--state", s]);
        }
        self.json(&args).as_array().unwrap().clone()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn poison_job_parked_then_operators_list_retry_and_cancel_sqlite() {
    poison_job_parked_then_operators_list_retry_and_cancel(Catalog { url: None });
}

#[test]
fn poison_job_parked_then_operators_list_retry_and_cancel_postgres() {
    if let Some(c) = Catalog::postgres("poison") {
        poison_job_parked_then_operators_list_retry_and_cancel(c);
    }
}

fn poison_job_parked_then_operators_list_retry_and_cancel(cat: Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let r = |p: &str| root.join(p).display().to_string();
    small_cohort(
        root,
        1,
        1600,
        "run.toml",
        "[ingest]\nbatch_size = 2\nmax_attempts = 2\n",
    );
    let (data, config, slides) = (r("data"), r("run.toml"), r("cohort/slides"));
    let ingest = ["ingest", "--data-dir", &data, "--config", &config, &slides];

    // Jobs of a data dir that has none: a clear error, not an empty new catalog.
    if cat.url.is_none() {
        let o = cat.output(&["jobs", "list", "--data-dir", &r("nothing-here")]);
        assert!(!o.status.success());
        assert!(text(&o).contains("no catalog at"), "{}", text(&o));
        assert!(!root.join("nothing-here").exists());
    }

    // The process working on a slide dies twice in the middle of it (SIGKILL).
    let mut victim: Option<(i64, String)> = None;
    for attempt in 1..=2u64 {
        let mut child = cat.cmd(&ingest).spawn().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("ingest ended ({status}) before it could be killed");
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no job started");
            let mut args = vec!["jobs", "list", "--json", "--state", "running"];
            args.extend(["--data-dir", &data]);
            let o = cat.output(&args);
            let running: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
            if let Some(j) = running.iter().find(|j| j["attempts"] == attempt) {
                let id = j["id"].as_i64().unwrap();
                let subject = j["subject"].as_str().unwrap().to_string();
                // The attempt is on record while the job runs, before any result.
                assert!(j["first_attempt_at_ms"].is_i64() && j["last_attempt_at_ms"].is_i64());
                if let Some((v, _)) = &victim {
                    assert_eq!(*v, id, "a restart redoes the interrupted job first");
                }
                victim = Some((id, subject));
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (victim, subject) = victim.unwrap();

    // The next start parks it (2 attempts used) instead of redoing it, and says so.
    let o = cat.output(&[&ingest[..], &["--json"]].concat());
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", text(&o));
    });
    let failures = summary["run"]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{summary}");
    assert_eq!(failures[0][0], subject.as_str());
    let reason = failures[0][1].as_str().unwrap();
    assert!(
        reason.contains("gave up after 2 attempts") && reason.contains("ended without a result"),
        "{reason}"
    );
    let status: Value = cat.json(&["status", "--json", "--data-dir", &data]);
    assert_eq!(status["slides"]["failed"], 1, "{status}");
    assert_eq!(status["slides"]["embedded"], 2, "{status}");
    assert_eq!(status["jobs"]["failed"], 1, "{status}");

    // The record: attempts, last error, first and last attempt times.
    let failed = cat.jobs(&data, Some("failed"));
    assert_eq!(failed.len(), 1);
    let parked = &failed[0];
    assert_eq!(parked["id"], victim);
    assert_eq!(parked["attempts"], 2);
    assert!(parked["error"]
        .as_str()
        .unwrap()
        .contains("gave up after 2 attempts"));
    let (first, last) = (
        parked["first_attempt_at_ms"].as_i64().unwrap(),
        parked["last_attempt_at_ms"].as_i64().unwrap(),
    );
    assert!(first < last, "{parked}");

    // Another start does not pick it up.
    let o = cat.output(&[&ingest[..], &["--json"]].concat());
    let again: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["previously_failed"], 1, "{again}");
    assert_eq!(again["run"]["slides_ok"], 0, "{again}");
    let still = &cat.jobs(&data, Some("failed"))[0];
    assert_eq!(
        (&still["attempts"], &still["state"]),
        (&Value::from(2), &Value::from("failed"))
    );
    cat.ok(&[
        "worker",
        "--exit-when-idle",
        "--data-dir",
        &data,
        "--config",
        &config,
    ]);
    assert_eq!(cat.jobs(&data, Some("failed"))[0]["attempts"], 2);

    // The listing for people: one line per job, with the header.
    let listing = String::from_utf8(cat.ok(&["jobs", "list", "--data-dir", &data]).stdout).unwrap();
    assert!(listing.starts_with("    id  state"), "{listing}");
    assert_eq!(listing.lines().count(), 4, "{listing}");
    assert!(listing.contains("gave up after 2 attempts"), "{listing}");

    // Retry: attempts reset. A job that is not failed or cancelled, or unknown, is refused.
    let vs = victim.to_string();
    let retried = cat.json(&["jobs", "retry", "--json", "--data-dir", &data, &vs]);
    assert_eq!(retried[0]["ok"], true, "{retried}");
    assert_eq!(retried[0]["job"]["state"], "queued");
    assert_eq!(retried[0]["job"]["attempts"], 0);
    let o = cat.output(&["jobs", "retry", "--data-dir", &data, &vs, "999999"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains(&format!(
            "job {victim} is queued: only failed or cancelled jobs can be retried"
        )),
        "{t}"
    );
    assert!(t.contains("unknown job 999999"), "{t}");
    assert!(t.contains("2 of 2 job(s) not retried"), "{t}");

    // Cancel: a queued job is cancelled and not claimed; a done one is refused.
    let done = cat.jobs(&data, Some("done"));
    assert_eq!(done.len(), 2);
    let done_id = done[0]["id"].to_string();
    let o = cat.output(&["jobs", "cancel", "--data-dir", &data, &done_id]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is done: only queued or running jobs can be cancelled"),
        "{}",
        text(&o)
    );
    let o = cat.ok(&["jobs", "cancel", "--data-dir", &data, &vs]);
    assert!(
        text(&o).contains("cancelled, now cancelled"),
        "{}",
        text(&o)
    );
    cat.ok(&[
        "worker",
        "--exit-when-idle",
        "--data-dir",
        &data,
        "--config",
        &config,
    ]);
    let cancelled = cat.jobs(&data, Some("cancelled"));
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0]["id"], victim);
    assert_eq!(cancelled[0]["attempts"], 0, "not claimed after the cancel");
    let status: Value = cat.json(&["status", "--json", "--data-dir", &data]);
    assert_eq!(status["jobs"]["cancelled"], 1, "{status}");

    // Retried after the cancel, a worker embeds it.
    cat.ok(&["jobs", "retry", "--data-dir", &data, &vs]);
    cat.ok(&[
        "worker",
        "--exit-when-idle",
        "--data-dir",
        &data,
        "--config",
        &config,
    ]);
    let status: Value = cat.json(&["status", "--json", "--data-dir", &data]);
    assert_eq!(status["slides"]["embedded"], 3, "{status}");
    assert_eq!(status["jobs"]["done"], 3, "{status}");
    assert_eq!(status["points"]["slides"], 3, "{status}");
    let job = &cat
        .jobs(&data, Some("done"))
        .into_iter()
        .find(|j| j["id"] == victim)
        .unwrap();
    assert_eq!(
        (&job["attempts"], &job["error"]),
        (&Value::from(1), &Value::Null)
    );

    // Bad arguments are refused by name.
    let o = cat.output(&["jobs", "list", "--data-dir", &data, "--state", "stuck"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("possible values"), "{}", text(&o));
}

#[test]
fn cancelling_a_running_job_stops_its_worker_and_nothing_is_written_sqlite() {
    cancelling_a_running_job_stops_its_worker_and_nothing_is_written(Catalog { url: None });
}

#[test]
fn cancelling_a_running_job_stops_its_worker_and_nothing_is_written_postgres() {
    if let Some(c) = Catalog::postgres("cancel") {
        cancelling_a_running_job_stops_its_worker_and_nothing_is_written(c);
    }
}

/// `gigapath jobs cancel` while `gigapath ingest` embeds that very slide: the worker stops (at
/// its next lease renewal, or at the latest before it writes the point), writes no point and
/// records nothing; the other slides are embedded; the job stays cancelled until retried.
fn cancelling_a_running_job_stops_its_worker_and_nothing_is_written(cat: Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let r = |p: &str| root.join(p).display().to_string();
    small_cohort(
        root,
        1,
        1600,
        "run.toml",
        "[ingest]\nbatch_size = 2\nlease_seconds = 10\n",
    );
    let (data, config, slides) = (r("data"), r("run.toml"), r("cohort/slides"));
    let ingest = [
        "ingest",
        "--json",
        "--data-dir",
        &data,
        "--config",
        &config,
        &slides,
    ];
    let mut child = cat
        .cmd(&ingest)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let (victim, subject) = loop {
        assert!(start.elapsed() < Duration::from_secs(120), "no job started");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ingest ended ({status}) before a job could be cancelled");
        }
        let o = cat.output(&[
            "jobs",
            "list",
            "--json",
            "--state",
            "running",
            "--data-dir",
            &data,
        ]);
        let running: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if let Some(j) = running.first() {
            let id = j["id"].as_i64().unwrap().to_string();
            let cancelled = cat.json(&["jobs", "cancel", "--json", "--data-dir", &data, &id]);
            assert_eq!(cancelled[0]["job"]["state"], "cancelled", "{cancelled}");
            let error = cancelled[0]["job"]["error"].as_str().unwrap();
            assert!(error.contains("while worker"), "{error}");
            break (
                j["id"].as_i64().unwrap(),
                j["subject"].as_str().unwrap().to_string(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["run"]["slides_ok"], 2, "{summary}");
    assert_eq!(summary["run"]["slides_failed"], 0, "{summary}");

    let status: Value = cat.json(&["status", "--json", "--data-dir", &data]);
    assert_eq!(status["slides"]["embedded"], 2, "{status}");
    assert_eq!(status["slides"]["registered"], 1, "{status}");
    assert_eq!(
        status["points"]["slides"], 2,
        "no point for the cancelled slide: {status}"
    );
    assert_eq!(status["jobs"]["cancelled"], 1, "{status}");
    let job = &cat.jobs(&data, Some("cancelled"))[0];
    assert_eq!(
        (job["id"].as_i64(), job["subject"].as_str()),
        (Some(victim), Some(subject.as_str()))
    );

    // A plain re-run leaves it cancelled; a retry embeds it.
    let again: Value = cat.json(&ingest);
    assert_eq!(again["run"]["slides_ok"], 0, "{again}");
    assert_eq!(cat.jobs(&data, Some("cancelled")).len(), 1);
    cat.ok(&["jobs", "retry", "--data-dir", &data, &victim.to_string()]);
    cat.ok(&[
        "worker",
        "--exit-when-idle",
        "--data-dir",
        &data,
        "--config",
        &config,
    ]);
    let status: Value = cat.json(&["status", "--json", "--data-dir", &data]);
    assert_eq!(status["slides"]["embedded"], 3, "{status}");
    assert_eq!(status["points"]["slides"], 3, "{status}");
}
