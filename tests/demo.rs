//! The README's main job, `gigapath demo --no-serve`, end to end on the embedded defaults: the
//! synthetic cohort (3 subtypes x 40 slides), small encoders, the offline all-MiniLM-L6-v2, an
//! alignment trained on CPU, evaluated on the held-out slides, then served and queried over HTTP.
//! The acceptance bar of issues #5 and #8: zero-shot balanced accuracy >= 0.9 on held-out slides,
//! report -> slide recall@5 well above chance, and the service answers every question.

use std::process::Command;

/// The number after `label` on the first line of `text` that contains it.
fn number_after(text: &str, label: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no `{label}` line in the demo report:\n{text}"));
    line[line.find(label).unwrap() + label.len()..]
        .split_whitespace()
        .next()
        .and_then(|w| w.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("no number after `{label}` in {line:?}"))
}

#[test]
fn the_demo_trains_an_alignment_that_classifies_held_out_slides() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_gigapath"))
        .args(["demo", "--no-serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("GIGAPATH_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    println!("{stdout}");

    // Zero-shot subtyping of the held-out slides, with prompts never seen in training.
    let bacc = number_after(&stdout, "balanced accuracy ");
    assert!(bacc >= 0.9, "zero-shot balanced accuracy {bacc} < 0.9");
    // Report -> slide recall@5 on held-out pairs against chance.
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("report -> slide  "))
        .expect("retrieval table");
    let r5: f64 = line
        .split_whitespace()
        .nth(4)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    let chance_line = stdout
        .lines()
        .find(|l| l.contains("report -> slide (chance)"))
        .unwrap();
    let chance: f64 = chance_line
        .split_whitespace()
        .nth(5)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(
        r5 >= 2.0 * chance,
        "report->slide R@5 {r5}% vs chance {chance}%"
    );

    // The service answered: three searches whose top 5 are mostly the queried subtype.
    let searches: Vec<(usize, usize)> = stdout
        .lines()
        .filter_map(|l| {
            let inner = l.split_once("  (")?.1;
            let (hits, rest) = inner.split_once('/')?;
            let total = rest.split_whitespace().next()?;
            Some((hits.parse().ok()?, total.parse().ok()?))
        })
        .collect();
    assert_eq!(searches.len(), 3, "three text-to-slide searches:\n{stdout}");
    for (hits, total) in searches {
        assert_eq!(total, 5);
        assert!(
            hits >= 3,
            "only {hits}/5 of a search's top results match its subtype"
        );
    }
    assert!(stdout.contains("Report search"));
    let p = number_after(&stdout, "P(TP53 mutated) = ");
    assert!((0.0..=1.0).contains(&p));
    assert!(
        stdout.contains("synthetic slides"),
        "the demo says what it ran on"
    );
}
