//! `gigapath ingest`'s exit status (issue 13, item 7) and its refusals, through the real binary:
//! 1 when nothing was found or everything failed, 0 for a partial success that lists what
//! failed, 2 for a usage error; a different file under a known id needs `--replace`.

use std::path::Path;
use std::process::Output;

mod common;

use common::{gigapath, small_cohort};

fn ingest(root: &Path, extra: &[&str]) -> Output {
    let mut c = gigapath();
    c.args(["ingest", "--data-dir"]).arg(root.join("data"));
    c.arg("--config").arg(root.join("run.toml"));
    c.args(extra);
    c.output().unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn ingest_exit_codes_follow_what_was_ingested() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    small_cohort(root, 1, 700, "run.toml", "[ingest]\nbatch_size = 8\n");
    let p = |s: &str| root.join(s).display().to_string();
    for d in ["empty", "bad", "mixed", "names", "other"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("bad/notes.svs"), "not a slide").unwrap();
    std::fs::write(root.join("mixed/scan.svs"), "not a slide either").unwrap();

    // Usage errors are clap's: 2.
    let o = ingest(root, &["--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));

    // Nothing found: 1 (was 0).
    let o = ingest(root, &[&p("empty")]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no slide files"),
        "{}",
        show(&o)
    );

    // Every slide failed: 1 (was 0), and the failure is named.
    let o = ingest(root, &[&p("bad")]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("failed notes"),
        "{}",
        show(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nothing was ingested"),
        "{}",
        show(&o)
    );

    // Partial success: 0, saying what failed.
    let o = ingest(root, &[&p("cohort/slides/SYN-0001.svs"), &p("mixed")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("1 embedded, 1 failed"), "{}", show(&o));
    assert!(out.contains("failed scan"), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("partly ingested"),
        "{}",
        show(&o)
    );

    // A file name that makes the id `..`: 1, naming the file; nothing registered.
    std::fs::copy(
        root.join("cohort/slides/SYN-0002.svs"),
        root.join("names/...svs"),
    )
    .unwrap();
    let o = ingest(root, &[&p("names")]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("names/...svs: the slide id `..`"),
        "{}",
        show(&o)
    );

    // Another file under a known id: 1, naming both paths; --replace: 0.
    let impostor = root.join("other/SYN-0001.svs");
    std::fs::copy(root.join("cohort/slides/SYN-0002.svs"), &impostor).unwrap();
    let o = ingest(root, &[&impostor.display().to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let known = root
        .join("cohort/slides/SYN-0001.svs")
        .canonicalize()
        .unwrap();
    assert!(err.contains(&known.display().to_string()), "{}", show(&o));
    assert!(
        err.contains(&impostor.canonicalize().unwrap().display().to_string()),
        "{}",
        show(&o)
    );
    let o = ingest(root, &["--replace", &impostor.display().to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 embedded"),
        "{}",
        show(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("replaced SYN-0001"),
        "{}",
        show(&o)
    );
}
