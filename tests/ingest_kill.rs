//! `kill -9` of a real `gigapath ingest` process at several moments, then a re-run: every slide
//! ends embedded exactly once, no duplicate points, no orphan or partial files, and a catalog
//! whose counts agree with the vector store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;

use common::{gigapath, run, small_cohort};

/// Completed feature files (temporary ones start with a dot).
fn feature_files(data: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(data.join("features")) else {
        return out;
    };
    for d in dirs.flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            out.push(f.path());
        }
    }
    out
}

fn ingest_cmd(root: &Path) -> Command {
    let mut c = gigapath();
    c.args(["ingest", "--data-dir"]).arg(root.join("data"));
    c.arg("--config").arg(root.join("run.toml"));
    c.arg("--reports").arg(root.join("cohort/reports.jsonl"));
    c.arg(root.join("cohort/slides"));
    c
}

/// Starts an ingest and SIGKILLs it once `ready` holds (or after `timeout`).
fn kill_when(root: &Path, ready: impl Fn() -> bool, timeout: Duration) {
    let mut child: Child = ingest_cmd(root).spawn().unwrap();
    let start = Instant::now();
    while !ready() && start.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ingest ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn kill_minus_nine_at_any_moment_then_rerun_embeds_each_slide_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let r = |p: &str| root.join(p).display().to_string();
    small_cohort(
        root,
        4,
        700,
        "run.toml",
        "[ingest]\nbatch_size = 4\nmax_attempts = 10\n",
    );
    let data = root.join("data");
    let n = 12;

    // While starting up, in the middle of the slides, and late in the run.
    kill_when(root, || false, Duration::from_millis(400));
    kill_when(
        root,
        || feature_files(&data).len() >= 3,
        Duration::from_secs(120),
    );
    kill_when(
        root,
        || feature_files(&data).len() >= 8,
        Duration::from_secs(120),
    );

    let out = ingest_cmd(root).arg("--json").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let redone = summary["run"]["slides_ok"].as_u64().unwrap();
    let skipped = summary["already_done"].as_u64().unwrap();
    assert!(
        redone < n,
        "the earlier runs did some of the work ({redone} redone)"
    );
    assert_eq!(redone + skipped, n, "{summary}");
    assert_eq!(summary["run"]["slides_failed"], 0);

    let status: serde_json::Value =
        serde_json::from_slice(&run(&["status", "--json", "--data-dir", &r("data")]).stdout)
            .unwrap();
    assert_eq!(status["slides"]["embedded"], n, "{status}");
    assert_eq!(status["jobs"]["done"], n, "{status}");
    assert_eq!(status["jobs"]["queued"], 0);
    assert_eq!(status["jobs"]["running"], 0);
    // One point per slide and per report: a redo overwrote, never added.
    assert_eq!(status["points"]["slides"], n, "{status}");
    assert_eq!(status["points"]["reports"], n, "{status}");
    assert_eq!(status["reports"], n);
    assert_eq!(
        status["fingerprints"]["slides"].as_object().unwrap().len(),
        1
    );

    // Exactly one complete feature file per slide, nothing half-written anywhere.
    let files = feature_files(&data);
    assert_eq!(files.len(), n as usize, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.extension().is_some_and(|e| e == "safetensors")),
        "{files:?}"
    );
    for slide in std::fs::read_dir(data.join("tiles")).unwrap().flatten() {
        let names: Vec<String> = std::fs::read_dir(slide.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with('.')),
            "staging left in {:?}: {names:?}",
            slide.path()
        );
        // Exactly the outputs of one complete tiling (`gigapath tile`'s set), nothing more.
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "mask.geojson",
                "mask.png",
                "overlay.png",
                "summary.json",
                "thumbnail.png",
                "tiles.csv",
                "tiles.safetensors"
            ],
            "{names:?}"
        );
    }
}

#[test]
fn an_unusable_data_dir_is_a_clear_error_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A data dir that is a regular file, and one below a regular file: no catalog can go there.
    let file = root.join("not-a-dir");
    std::fs::write(&file, b"keep me").unwrap();
    let slide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/default.svs");
    for data in [file.clone(), file.join("data")] {
        let out = gigapath()
            .args(["ingest", "--data-dir"])
            .arg(&data)
            .arg(&slide)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "ingest into {} succeeded",
            data.display()
        );
        assert!(
            stderr.contains("not-a-dir"),
            "the error names the data dir: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read_dir(root).unwrap().count(),
        1,
        "nothing else written"
    );
}
