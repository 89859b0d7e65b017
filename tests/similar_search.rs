//! Image questions through the real binary (issue 14): tile points written at ingest or by the
//! `gigapath index tiles` backfill, `gigapath search similar` (slide -> slides) and
//! `gigapath search regions` (box -> regions, grouped by slide), on a small synthetic cohort
//! with the tiny random encoders.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{gigapath, run, small_cohort};
use serde_json::Value;

const PER_SUBTYPE: usize = 5;

fn json(args: &[&str]) -> Value {
    let o = run(args);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "gigapath {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// `gigapath ARGS` must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let o = gigapath().args(args).output().unwrap();
    assert!(!o.status.success(), "gigapath {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ingest(root: &Path, data: &str, config: &str) {
    let r = |p: &str| root.join(p).display().to_string();
    run(&[
        "ingest",
        "--data-dir",
        &r(data),
        "--config",
        &r(config),
        "--reports",
        &r("cohort/reports.jsonl"),
        &r("cohort/slides"),
    ]);
}

/// Slide id -> subtype, from the cohort's reports.
fn subtypes(root: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(root.join("cohort/reports.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["slide_id"].as_str().unwrap().to_string(),
                v["subtype"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A 2 x 2 tile box around the slide's tile with the most tissue (from its tiling).
fn tissue_box(data: &Path, slide: &str) -> String {
    let csv = std::fs::read_to_string(data.join("tiles").join(slide).join("tiles.csv")).unwrap();
    let (x, y) = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let t: f64 = f[4].parse().unwrap();
            (
                t,
                f[2].parse::<i64>().unwrap(),
                f[3].parse::<i64>().unwrap(),
            )
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, x, y)| (x, y))
        .unwrap();
    format!("{x},{y},512,512")
}

#[test]
fn similar_slides_and_regions_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    small_cohort(root, PER_SUBTYPE, 600, "run.toml", "");
    std::fs::write(
        root.join("notiles.toml"),
        std::fs::read_to_string(root.join("run.toml")).unwrap() + "[ingest]\nindex_tiles = false\n",
    )
    .unwrap();
    let subtype = subtypes(root);
    let slides: Vec<String> = subtype.keys().cloned().collect();
    assert_eq!(slides.len(), 3 * PER_SUBTYPE);

    // Ingested without tile points: region search says how to get them.
    ingest(root, "old", "notiles.toml");
    let old = root.join("old").display().to_string();
    let err = fails(&[
        "search",
        "regions",
        "--data-dir",
        &old,
        "--slide",
        &slides[0],
        "--box",
        "0,0,512,512",
    ]);
    assert!(
        err.contains("no tile points") && err.contains("index tiles"),
        "{err}"
    );

    // The backfill: one slide, then the rest (resumes), then nothing left to do.
    let one = json(&[
        "index",
        "tiles",
        "--data-dir",
        &old,
        "--slide",
        &slides[0],
        "--json",
    ]);
    assert_eq!(one["slides_written"], 1, "{one}");
    let rest = json(&["index", "tiles", "--data-dir", &old, "--json"]);
    assert_eq!(rest["slides_written"], slides.len() as u64 - 1, "{rest}");
    assert_eq!(rest["slides_already_indexed"], 1, "{rest}");
    let again = json(&["index", "tiles", "--data-dir", &old, "--json"]);
    assert_eq!(again["slides_written"], 0, "{again}");
    assert_eq!(
        again["slides_already_indexed"],
        slides.len() as u64,
        "{again}"
    );
    let backfilled = one["tile_points_written"].as_u64().unwrap()
        + rest["tile_points_written"].as_u64().unwrap();
    let err = fails(&["index", "tiles", "--data-dir", &old, "--slide", "NOPE"]);
    assert!(err.contains("`NOPE`"), "{err}");

    // Written at ingest (the default): the same regions as the backfill gives.
    ingest(root, "data", "run.toml");
    let data_dir = root.join("data");
    let data = data_dir.display().to_string();
    let q = &slides[3];
    let qbox = tissue_box(&data_dir, q);
    let region_args = |d: &str| {
        json(&[
            "search",
            "regions",
            "--data-dir",
            d,
            "--slide",
            q,
            "--box",
            &qbox,
            "-k",
            "4",
            "--json",
        ])
    };
    // Tissue fractions differ in the last digits (the backfill reads them from tiles.csv).
    let without_tissue = |mut v: Value| {
        for g in v.as_array_mut().unwrap() {
            for r in g["regions"].as_array_mut().unwrap() {
                assert!(r["tissue"].as_f64().unwrap() > 0.0, "{r}");
                r.as_object_mut().unwrap().remove("tissue");
            }
        }
        v
    };
    let at_ingest = region_args(&data);
    assert_eq!(
        without_tissue(at_ingest.clone()),
        without_tissue(region_args(&old)),
        "ingest and backfill disagree"
    );
    let written: u64 = slides
        .iter()
        .map(|s| {
            std::fs::read_to_string(data_dir.join("tiles").join(s).join("tiles.csv"))
                .unwrap()
                .lines()
                .count() as u64
                - 1
        })
        .sum();
    assert_eq!(backfilled, written, "one tile point per kept tile");

    // A region answer: slides (never the query), each with level-0 boxes and scores.
    let groups = at_ingest.as_array().unwrap();
    assert_eq!(groups.len(), 4);
    for g in groups {
        assert_ne!(g["slide_id"], q.as_str());
        let regions = g["regions"].as_array().unwrap();
        assert!(!regions.is_empty() && regions.len() <= 3);
        assert_eq!(g["score"], regions[0]["score"]);
        for r in regions {
            assert_eq!(r["box"]["w"], 256, "{r}");
            assert!(r["box"]["x"].as_i64().unwrap() % 256 == 0, "{r}");
        }
    }

    // Slide -> slides and region -> regions for every slide: same-subtype fractions.
    let (mut same_slides, mut all_slides, mut same_regions, mut all_regions) = (0, 0, 0, 0);
    for s in &slides {
        let hits = json(&[
            "search",
            "similar",
            "--data-dir",
            &data,
            "--slide",
            s,
            "-k",
            "4",
            "--json",
        ]);
        let hits = hits.as_array().unwrap();
        assert_eq!(hits.len(), 4);
        assert!(
            hits.iter().all(|h| h["slide_id"] != s.as_str()),
            "the query came back"
        );
        assert!(hits
            .windows(2)
            .all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()));
        all_slides += hits.len();
        same_slides += hits
            .iter()
            .filter(|h| h["labels"]["subtype"] == subtype[s].as_str())
            .count();

        let groups = json(&[
            "search",
            "regions",
            "--data-dir",
            &data,
            "--slide",
            s,
            "--box",
            &tissue_box(&data_dir, s),
            "-k",
            "4",
            "--per-slide",
            "1",
            "--json",
        ]);
        let groups = groups.as_array().unwrap();
        all_regions += groups.len();
        same_regions += groups
            .iter()
            .filter(|g| g["labels"]["subtype"] == subtype[s].as_str())
            .count();
    }
    let slide_frac = same_slides as f64 / all_slides as f64;
    let region_frac = same_regions as f64 / all_regions as f64;
    // Chance: 4 of the 14 other slides share a query's subtype (0.29).
    let chance = (PER_SUBTYPE - 1) as f64 / (3 * PER_SUBTYPE - 1) as f64;
    eprintln!(
        "same subtype: slide->slides top 4 {slide_frac:.3}, region->regions top 4 slides \
         {region_frac:.3} (chance {chance:.3})"
    );
    assert!(
        slide_frac >= 0.75,
        "slide->slides {slide_frac:.3} (chance {chance:.3})"
    );
    assert!(
        region_frac >= 0.6,
        "region->regions {region_frac:.3} (chance {chance:.3})"
    );

    // The same numbers from a command.
    let eval = json(&[
        "search",
        "eval",
        "--data-dir",
        &data,
        "-k",
        "4",
        "--regions",
        "4",
        "--json",
    ]);
    assert_eq!(eval["queries"], slides.len() as u64, "{eval}");
    assert_eq!(eval["region_queries"], slides.len() as u64, "{eval}");
    assert!(
        (eval["slides_same_label"].as_f64().unwrap() - slide_frac).abs() < 1e-9,
        "{eval}"
    );
    assert!(
        (eval["chance"].as_f64().unwrap() - chance).abs() < 1e-9,
        "{eval}"
    );
    assert!(
        eval["regions_same_label"].as_f64().unwrap() >= 0.6,
        "{eval}"
    );

    // Filters and the joint space; bad input names the problem.
    let filtered = json(&[
        "search",
        "similar",
        "--data-dir",
        &data,
        "--slide",
        q,
        "-k",
        "3",
        "--filter",
        "labels.subtype=CCRCC",
        "--json",
    ]);
    assert!(filtered
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["labels"]["subtype"] == "CCRCC"));
    let err = fails(&[
        "search",
        "similar",
        "--data-dir",
        &data,
        "--slide",
        q,
        "--space",
        "joint",
    ]);
    assert!(err.contains("no `joint` vector"), "{err}");
    let err = fails(&["search", "similar", "--data-dir", &data, "--slide", "NOPE"]);
    assert!(err.contains("`NOPE` is not stored"), "{err}");
    for (bad, why) in [
        ("1,2,3", "x,y,w,h"),
        ("0,0,0,10", "width and height"),
        ("0,0,a,10", "`a` is not an integer"),
        ("0,0,100000,100000", "at most 4096"),
    ] {
        let err = fails(&[
            "search",
            "regions",
            "--data-dir",
            &data,
            "--slide",
            q,
            "--box",
            bad,
        ]);
        assert!(err.contains(why), "{bad}: {err}");
    }
    let err = fails(&[
        "search",
        "regions",
        "--data-dir",
        &data,
        "--slide",
        q,
        "--box",
        "5000000,0,256,256",
    ]);
    assert!(err.contains("no tissue tile"), "{err}");
}

/// The same questions with the vectors on a Qdrant server (its own, from
/// `../shared/qdrant/start.sh`): tile points written at ingest, grouped by Qdrant's group-by.
#[test]
fn similar_search_on_a_qdrant_server() {
    let Some(qdrant) = common::servers::Qdrant::start(1) else {
        eprintln!("SKIPPED similar_search_on_a_qdrant_server: no Qdrant server here");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    small_cohort(
        root,
        3,
        600,
        "run.toml",
        &format!(
            "[store.vectors]\nbackend = \"qdrant\"\nurl = \"{}\"\n",
            qdrant.grpc(0)
        ),
    );
    ingest(root, "data", "run.toml");
    assert_eq!(qdrant.count(0, "tiles").map(|n| n > 0), Some(true));
    let data = root.join("data").display().to_string();
    let subtype = subtypes(root);
    let q = subtype.keys().nth(4).unwrap();

    let hits = json(&[
        "search",
        "similar",
        "--data-dir",
        &data,
        "--slide",
        q,
        "-k",
        "2",
        "--json",
    ]);
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| h["slide_id"] != q.as_str()));
    assert!(hits
        .iter()
        .all(|h| h["labels"]["subtype"] == subtype[q].as_str()));

    let groups = json(&[
        "search",
        "regions",
        "--data-dir",
        &data,
        "--slide",
        q,
        "--box",
        &tissue_box(&root.join("data"), q),
        "-k",
        "3",
        "--per-slide",
        "2",
        "--json",
    ]);
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 3);
    assert!(groups.iter().all(|g| g["slide_id"] != q.as_str()));
    assert!(groups
        .iter()
        .all(|g| g["regions"].as_array().unwrap().len() == 2));
    assert_eq!(groups[0]["labels"]["subtype"], subtype[q].as_str());

    // Everything is there already: the backfill has nothing to do.
    let again = json(&["index", "tiles", "--data-dir", &data, "--json"]);
    assert_eq!(again["slides_already_indexed"], 9, "{again}");
    assert_eq!(again["slides_written"], 0, "{again}");
}
