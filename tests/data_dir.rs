//! The data dir through the real binary: its own `gigapath.toml` holds no secret (issue 15) and
//! its paths survive moving the data dir (issue 13 item 9).

mod common;

use std::path::Path;

use common::{gigapath, run, small_cohort};

const API_KEY: &str = "service-secret-key-0123456789";

/// `gigapath ARGS` from `cwd`; fails the test with stderr unless it succeeds.
fn run_in(cwd: &Path, args: &[&str]) -> std::process::Output {
    let o = gigapath().current_dir(cwd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "gigapath {args:?} in {}: {}",
        cwd.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The first ingest is given a service key in `--config`; the data dir (models inside it, as the
/// demo lays it out) is then renamed, and later commands run from another directory without
/// `--config`: status works (it failed on a saved `<redacted>` key), and a new slide is embedded
/// with the models found inside the moved data dir (they were saved as absolute paths into the
/// old location, or relative to the first command's working directory).
#[test]
fn moved_data_dir_works_from_another_cwd_and_holds_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    std::fs::create_dir_all(&first).unwrap();
    small_cohort(
        &first,
        3,
        600,
        "run.toml",
        &format!("[serve]\napi_keys = [\"{API_KEY}\"]\n"),
    );
    let f = |p: &str| first.join(p).display().to_string();
    run(&[
        "ingest",
        "--data-dir",
        &f(""),
        "--config",
        &f("run.toml"),
        "--reports",
        &f("cohort/reports.jsonl"),
        &f("cohort/slides"),
    ]);
    let saved = std::fs::read_to_string(first.join("gigapath.toml")).unwrap();
    for bad in [API_KEY, "<redacted>", "***"] {
        assert!(!saved.contains(bad), "`{bad}` in gigapath.toml:\n{saved}");
    }
    assert!(
        saved.contains("tile_encoder = \"models/tile\""),
        "model paths inside the data dir are saved relative to it:\n{saved}"
    );

    let moved = tmp.path().join("moved");
    std::fs::rename(&first, &moved).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let m = |p: &str| moved.join(p).display().to_string();

    let status = run_in(&elsewhere, &["status", "--data-dir", &m(""), "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["slides"]["embedded"], 9, "{status}");
    assert_eq!(status["points"]["slides"], 9, "{status}");

    run_in(
        &elsewhere,
        &[
            "synth", "slide", "-o", "new.svs", "--width", "2048", "--height", "1536", "--levels",
            "1,4",
        ],
    );
    let o = run_in(
        &elsewhere,
        &["ingest", "--data-dir", "../moved", "--json", "new.svs"],
    );
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["run"]["slides_ok"], 1, "{summary}");

    // Training, evaluation and re-embedding read the feature files the catalog recorded at
    // their old place; they are found in the moved data dir.
    std::fs::write(
        elsewhere.join("short.toml"),
        "[optim]\nsteps = 4\nbatch_size = 4\nwarmup_steps = 1\n",
    )
    .unwrap();
    let dd = ["--data-dir", "../moved"];
    run_in(
        &elsewhere,
        &[
            &["train"][..],
            &dd,
            &["--config", "short.toml", "--run-id", "t"],
        ]
        .concat(),
    );
    let alignment = ["--alignment", "../moved/alignment/t"];
    let o = run_in(
        &elsewhere,
        &[
            &["eval"][..],
            &dd,
            &alignment,
            &["--split", "all", "--json"],
        ]
        .concat(),
    );
    let eval: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(eval["step"], 4, "{eval}");
    run_in(&elsewhere, &[&["reembed"][..], &dd, &alignment].concat());
    let saved = std::fs::read_to_string(moved.join("gigapath.toml")).unwrap();
    assert!(
        saved.contains("alignment = \"alignment/t/"),
        "saved relative: {saved}"
    );

    // The key still works when given again, through the environment.
    let o = gigapath()
        .current_dir(&elsewhere)
        .env("GIGAPATH_API_KEYS", API_KEY)
        .args(["config", "--show", "--data-dir", "../moved"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        shown.contains("<redacted>"),
        "the key from the environment: {shown}"
    );
}
