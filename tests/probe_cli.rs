//! `gigapath probe` through the real binary on a small ingested synthetic cohort (tiny random
//! encoders): the comparison, training, listing and applying named heads, labels from a CSV
//! (a binary "mutation" label), and the errors a user meets (one class, a class missing from a
//! fold, an unknown head or slide).

mod common;

use std::path::Path;

use common::{gigapath, ingest_cohort, run, small_cohort};
use serde_json::Value;

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn json(args: &[&str]) -> Value {
    let o = run(args);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "gigapath {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// `gigapath ARGS` must fail with exit code 1; returns its stderr.
fn fails(args: &[&str]) -> String {
    let o = gigapath().args(args).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "gigapath {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Slide id -> subtype, from the cohort's labels.
fn subtypes(root: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(root.join("cohort/labels.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

#[test]
fn probe_commands_on_a_synthetic_cohort() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    small_cohort(root, 8, 600, "run.toml", "");
    ingest_cohort(root, "run.toml");
    let r = |p: &str| root.join(p).display().to_string();
    let (data, config) = (r("data"), r("run.toml"));
    let base = ["--data-dir", data.as_str(), "--config", config.as_str()];
    let with = |extra: &[&str]| -> Vec<String> {
        extra
            .iter()
            .chain(base.iter())
            .map(|s| s.to_string())
            .collect()
    };

    // The comparison: few-shot curve and cross-validated heads (no alignment: zero-shot n/a).
    let cmp = json(&args(&with(&[
        "probe",
        "compare",
        "--folds",
        "3",
        "--draws",
        "12",
        "--bootstrap",
        "100",
        "--json",
    ])));
    assert_eq!(cmp["slides"], 24);
    assert_eq!(
        cmp["classes"],
        serde_json::json!(["CCRCC", "CHRCC", "PRCC"])
    );
    assert!(cmp["zero_shot"].is_null());
    assert!(
        cmp["zero_shot_note"]
            .as_str()
            .unwrap()
            .contains("no alignment checkpoint"),
        "{}",
        cmp["zero_shot_note"]
    );
    let supervised = cmp["supervised"].as_array().unwrap();
    assert_eq!(supervised.len(), 3);
    for s in supervised {
        let ba = &s["scores"]["balanced_accuracy"];
        // The synthetic subtypes separate even through random encoders (search eval: 99.8%).
        assert!(ba["value"].as_f64().unwrap() >= 0.85, "{}: {ba}", s["kind"]);
        assert!(ba["low"].as_f64().unwrap() <= ba["value"].as_f64().unwrap());
        assert!(ba["high"].as_f64().unwrap() >= ba["value"].as_f64().unwrap());
    }
    let few = cmp["few_shot"].as_array().unwrap();
    let proto: Vec<&Value> = few.iter().filter(|p| p["kind"] == "prototype").collect();
    assert_eq!(proto.len(), 5);
    assert_eq!(proto[0]["draws"], 12);
    assert!(
        proto[2]["mean"].as_f64().unwrap() >= 0.8,
        "k=4: {}",
        proto[2]
    );
    // 8 slides per class, a third held out: 16 per class cannot be drawn.
    assert!(proto[4]["skipped"]
        .as_str()
        .unwrap()
        .contains("too few slides per class for k = 16"));
    let text = String::from_utf8(
        run(&args(&with(&[
            "probe",
            "compare",
            "--folds",
            "3",
            "--draws",
            "5",
            "--bootstrap",
            "50",
            "--shots",
            "1,4",
        ])))
        .stdout,
    )
    .unwrap();
    for needle in [
        "zero-shot",
        "few-shot prototype k=1 (5 draws)",
        "linear probe (logistic, L2 swept) 3-fold",
        "chance balanced accuracy 0.333",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    // Train, list and apply a named head.
    let m = json(&args(&with(&[
        "probe",
        "train",
        "--name",
        "rcc-linear",
        "--folds",
        "3",
        "--bootstrap",
        "50",
        "--json",
    ])));
    assert_eq!(m["kind"], "linear");
    assert_eq!(m["training_set"]["slides"], 24);
    assert!(root
        .join("data/probes/rcc-linear/head.safetensors")
        .is_file());
    assert!(
        m["metrics"]["scores"]["balanced_accuracy"]["value"]
            .as_f64()
            .unwrap()
            >= 0.85
    );
    let err = fails(&args(&with(&[
        "probe",
        "train",
        "--name",
        "rcc-linear",
        "--folds",
        "3",
    ])));
    assert!(err.contains("a head named `rcc-linear` exists"), "{err}");
    let list = json(&args(&with(&["probe", "list", "--json"])));
    assert_eq!(list[0]["name"], "rcc-linear");
    let labels = subtypes(root);
    let ids: Vec<&str> = labels.iter().map(|l| l.0.as_str()).collect();
    let mut cl = vec!["probe", "classify", "--head", "rcc-linear", "--json"];
    cl.extend(&ids);
    let out = json(&args(&with(&cl)));
    let right = out["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&labels)
        .filter(|(res, l)| res["predicted"] == l.2.as_str() && res["known_label"] == l.2.as_str())
        .count();
    assert!(right >= 22, "{right}/24");
    let human = String::from_utf8(
        run(&args(&with(&[
            "probe",
            "classify",
            "--head",
            "rcc-linear",
            ids[0],
        ])))
        .stdout,
    )
    .unwrap();
    assert!(
        human.contains(&format!("(known: {})", labels[0].2)),
        "{human}"
    );

    // A binary "mutation" label from a CSV, tied to the subtype (a known answer). Its wild type
    // spans two subtypes: heads that can draw a boundary around one cluster (linear, kNN)
    // learn it; a single prototype per class would not.
    let csv = root.join("kras.csv");
    let mut body = String::from("slide_id,patient_id,KRAS\n");
    for (id, patient, subtype) in &labels {
        body += &format!(
            "{id},{patient},{}\n",
            if subtype == "PRCC" {
                "mutant"
            } else {
                "wildtype"
            }
        );
    }
    std::fs::write(&csv, body).unwrap();
    let csv_s = csv.display().to_string();
    let ev = json(&args(&with(&[
        "probe",
        "eval",
        "--label",
        "KRAS",
        "--labels-csv",
        &csv_s,
        "--kinds",
        "linear,knn",
        "--folds",
        "3",
        "--bootstrap",
        "50",
        "--json",
    ])));
    assert_eq!(ev["classes"], serde_json::json!(["mutant", "wildtype"]));
    for s in ev["supervised"].as_array().unwrap() {
        assert!(
            s["scores"]["balanced_accuracy"]["value"].as_f64().unwrap() >= 0.85,
            "{s}"
        );
    }

    // Errors name the problem.
    let err = fails(&args(&with(&[
        "probe", "train", "--name", "site", "--label", "site",
    ])));
    assert!(err.contains("label `site` has a single class"), "{err}");
    let one = root.join("one.csv");
    let mut body = String::from("slide_id,label\n");
    for (i, (id, _, subtype)) in labels.iter().enumerate() {
        // One slide of a rare class: it is missing from the training side of its fold.
        let v = if i == 0 { "rare" } else { subtype.as_str() };
        body += &format!("{id},{v}\n");
    }
    std::fs::write(&one, body).unwrap();
    let one_s = one.display().to_string();
    let err = fails(&args(&with(&[
        "probe",
        "eval",
        "--labels-csv",
        &one_s,
        "--folds",
        "3",
    ])));
    assert!(
        err.contains("class `rare` is missing from the training slides of fold"),
        "{err}"
    );
    let err = fails(&args(&with(&[
        "probe", "classify", "--head", "nope", "SYN-0001",
    ])));
    assert!(err.contains("no probe head named `nope`"), "{err}");
    let err = fails(&args(&with(&[
        "probe",
        "classify",
        "--head",
        "rcc-linear",
        "SYN-9999",
    ])));
    assert!(err.contains("slide `SYN-9999` is not stored"), "{err}");
    let err = fails(&args(&with(&[
        "probe",
        "eval",
        "--head",
        "rcc-linear",
        "--label",
        "KRAS",
        "--labels-csv",
        &csv_s,
    ])));
    assert!(
        err.contains("unknown label value `") && err.contains("the classes are CCRCC, CHRCC, PRCC"),
        "{err}"
    );
}
