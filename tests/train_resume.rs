//! Alignment training end to end through the real binary: a small synthetic cohort is ingested,
//! one run trains without interruption, a second run with the same config is `kill -9`ed after
//! its first checkpoint and started again. The resumed run must continue the same loss curve
//! (same seed, same batches: the logged losses are identical, step for step), and its final
//! checkpoint must hold the same parameters. Then `eval` and `reembed` run on the result.

mod common;

use std::path::Path;

use common::{gigapath, ingest_cohort, run, small_cohort};
use std::time::{Duration, Instant};

/// (step, loss, lr, logit scale, grad norm) of every training step in a run's metrics.jsonl.
fn curve(run_dir: &Path) -> Vec<(u64, String, String, String, String)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some() && v.get("step").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].to_string(),
                v["lr"].to_string(),
                v["logit_scale"].to_string(),
                v["grad_norm"].to_string(),
            )
        })
        .collect()
}

fn last_step(run_dir: &Path) -> u64 {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_killed_run_resumes_on_the_same_curve_then_eval_and_reembed_work() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let r = |p: &str| root.join(p).display().to_string();
    small_cohort(root, 5, 600, "gigapath.toml", "");
    ingest_cohort(root, "gigapath.toml");
    // Many small steps so that the kill lands mid-run; a checkpoint every 20.
    std::fs::write(
        root.join("run.toml"),
        "[optim]\nsteps = 400\nbatch_size = 4\nwarmup_steps = 10\n[checkpoint]\nevery_steps = 20\n[eval]\nevery_steps = 50\n",
    )
    .unwrap();
    let train = |id: &str| {
        let mut c = gigapath();
        c.args([
            "train",
            "--data-dir",
            &r("data"),
            "--config",
            &r("run.toml"),
        ]);
        c.args(["--run-id", id, "--json"]);
        c
    };

    // A joint width the store's collections cannot hold is refused before any training.
    std::fs::write(root.join("narrow.toml"), "[model]\njoint_dim = 64\n").unwrap();
    let out = gigapath()
        .args([
            "train",
            "--data-dir",
            &r("data"),
            "--config",
            &r("narrow.toml"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("model.joint_dim") && stderr.contains("512"),
        "{stderr}"
    );
    assert!(
        !root.join("data/alignment").exists()
            || std::fs::read_dir(root.join("data/alignment"))
                .unwrap()
                .all(|e| e.unwrap().file_name() == "cache")
    );

    let out = train("whole").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(whole["step"], 400, "{whole}");

    // The same run, killed once past its second checkpoint.
    let killed_dir = root.join("data/alignment/killed");
    let mut child = train("killed").spawn().unwrap();
    let start = Instant::now();
    while last_step(&killed_dir) < 45 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("train ended ({status}) before it could be killed");
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = last_step(&killed_dir);
    assert!(
        at_kill < 400,
        "killed at {at_kill}, too late to test a resume"
    );

    let out = train("killed").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let from = resumed["resumed_from"].as_u64().expect("the rerun resumed");
    assert!(
        from >= 40 && from.is_multiple_of(20) && from <= at_kill,
        "{resumed}"
    );

    // Same curve, step for step (the log was cut back to the checkpoint, then continued).
    let (a, b) = (
        curve(&root.join("data/alignment/whole")),
        curve(&killed_dir),
    );
    assert_eq!(a.len(), 400);
    assert_eq!(
        a, b,
        "the resumed run drew other batches or lost optimizer state"
    );
    // And the same final parameters, byte for byte.
    let weights = |id: &str| {
        std::fs::read(root.join(format!(
            "data/alignment/{id}/step-400/alignment.safetensors"
        )))
        .unwrap()
    };
    assert!(weights("whole") == weights("killed"));

    // Evaluation reports retrieval and zero-shot numbers on the held-out slides.
    let out = run(&[
        "eval",
        "--data-dir",
        &r("data"),
        "--alignment",
        &r("data/alignment/killed"),
        "--robustness-sets",
        "5",
        "--json",
    ]);
    let eval: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(eval["step"], 400);
    let bacc = eval["zero_shot"]["report"]["balanced_accuracy"]
        .as_f64()
        .unwrap_or_else(|| panic!("no balanced accuracy in {eval}"));
    assert!((0.0..=1.0).contains(&bacc));
    let r5 = eval["retrieval"]["report_to_slide"]["r5"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r5), "{eval}");
    assert_eq!(eval["robustness"]["sets"], 5);

    // Re-embedding with the checkpoint: joint vectors for every slide, one fingerprint.
    run(&[
        "reembed",
        "--data-dir",
        &r("data"),
        "--alignment",
        &r("data/alignment/killed"),
    ]);
    let status: serde_json::Value =
        serde_json::from_slice(&run(&["status", "--json", "--data-dir", &r("data")]).stdout)
            .unwrap();
    assert_eq!(status["slides"]["embedded"], 15, "{status}");
    assert_eq!(
        status["fingerprints"]["slides"].as_object().unwrap().len(),
        1,
        "re-embedding left mixed fingerprints: {status}"
    );
}
