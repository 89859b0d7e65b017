//! Helpers shared by the end-to-end tests that drive the real `gigapath` binary.
#![allow(dead_code)] // each test file uses its own subset

pub mod servers;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `gigapath` binary under test, logging warnings only.
pub fn gigapath() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gigapath"));
    c.env("GIGAPATH_LOG", "warn");
    c
}

/// Runs `gigapath ARGS` and fails the test with its stderr unless it succeeds.
pub fn run(args: &[&str]) -> Output {
    let o = gigapath().args(args).output().unwrap();
    assert!(
        o.status.success(),
        "gigapath {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A small labelled cohort with tiny random encoders, through the real binary: `root/models/`
/// (`models init --preset tiny`), `root/cohort/` (`synth cohort`, 3 subtypes x `per_subtype`
/// slides of about `slide_um` microns), and the config `root/<config>` naming those models and
/// the small BERT text fixture (fast; the demo test uses MiniLM), followed by `extra` TOML.
pub fn small_cohort(root: &Path, per_subtype: usize, slide_um: u32, config: &str, extra: &str) {
    let r = |p: &str| root.join(p).display().to_string();
    run(&["models", "init", "-o", &r("models"), "--preset", "tiny"]);
    run(&[
        "synth",
        "cohort",
        "-o",
        &r("cohort"),
        "--slides-per-subtype",
        &per_subtype.to_string(),
        "--slide-um",
        &slide_um.to_string(),
    ]);
    let text = repo().join("tests/fixtures/reference/text_bert_mlm");
    std::fs::write(
        root.join(config),
        format!(
            "[models]\ntile_encoder = \"{}\"\nslide_encoder = \"{}\"\ntext_encoder = \"{}\"\n\
             text_pool = \"cls\"\n{extra}",
            r("models/tile"),
            r("models/slide"),
            text.display()
        ),
    )
    .unwrap();
}

/// `gigapath ingest` of `root/cohort` (slides and reports) into `root/data` with `root/<config>`.
pub fn ingest_cohort(root: &Path, config: &str) {
    let r = |p: &str| root.join(p).display().to_string();
    run(&[
        "ingest",
        "--data-dir",
        &r("data"),
        "--config",
        &r(config),
        "--reports",
        &r("cohort/reports.jsonl"),
        &r("cohort/slides"),
    ]);
}
