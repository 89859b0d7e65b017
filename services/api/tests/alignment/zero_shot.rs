//! Zero-shot subtyping (prompt sets and inline classes), mutation prompts and prompt heatmaps.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::common::{get, post, text};
use crate::fixture::*;

#[test]
fn subtypes_and_mutations() {
    let s = shared();
    zero_shot(s.addr, &s.fx);
    let m = text(&get(s.addr, "/metrics"));
    assert!(
        m.contains("gigapath_http_requests_total{route=\"/v1/zero-shot/subtype\",status=\"200\"}"),
        "{m}"
    );
}

#[test]
fn prompt_heatmaps() {
    let s = shared();
    heatmap(s.addr, &s.fx);
}

fn zero_shot(addr: SocketAddr, fx: &Fixture) {
    let ids: Vec<String> = fx.slide_ids().into_iter().collect();
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "prompt_set": "rcc"}),
            None,
        ),
        "subtype with rcc",
    );
    let lib_rcc = fx.prompts.subtype("rcc").unwrap();
    let ens = &v["ensemble"];
    assert_eq!(ens["prompt_set"], "rcc");
    assert_eq!(ens["labels"], json!(SUBTYPES));
    assert_eq!(ens["templates"], lib_rcc.templates.len());
    assert_eq!(ens["names_per_class"], json!([4, 4, 4]));
    let scale = f(&ens["logit_scale"]);
    assert!(scale > 1.0 && scale <= 100.0, "logit scale {scale}");
    let res = results(&v);
    assert_eq!(res.len(), ids.len());
    let mut by_slide = BTreeMap::new();
    for (r, id) in res.iter().zip(&ids) {
        assert_eq!(r["slide_id"], id.as_str(), "answers in the order asked");
        assert_eq!(r["known_label"], fx.subtype_of(id));
        let probs: Vec<f64> = SUBTYPES.iter().map(|l| f(&r["probabilities"][l])).collect();
        let cos: Vec<f64> = SUBTYPES.iter().map(|l| f(&r["cosines"][l])).collect();
        assert_eq!(r["probabilities"].as_object().unwrap().len(), 3);
        assert!(close(probs.iter().sum::<f64>(), 1.0, 1e-4), "{r}");
        assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
        assert!(cos.iter().all(|c| (-1.0001..=1.0001).contains(c)));
        // probabilities = softmax(logit_scale x cosines); predicted = argmax.
        for (p, q) in probs.iter().zip(softmax(&cos, scale)) {
            assert!(close(*p, q, 1e-4), "{r}: softmax of the cosines x {scale}");
        }
        let best = (0..3)
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .unwrap();
        assert_eq!(r["predicted"], SUBTYPES[best], "{r}");
        by_slide.insert(id.clone(), cos);
    }

    // TITAN's no temperature: softmax over raw cosines, same cosines, same predictions.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "prompt_set": "rcc", "no_temperature": true}),
            None,
        ),
        "no temperature",
    );
    assert_eq!(f(&v["ensemble"]["logit_scale"]), 1.0);
    for r in results(&v) {
        let cos = &by_slide[r["slide_id"].as_str().unwrap()];
        let probs: Vec<f64> = SUBTYPES.iter().map(|l| f(&r["probabilities"][l])).collect();
        for (p, q) in probs.iter().zip(softmax(cos, 1.0)) {
            assert!(close(*p, q, 1e-4), "{r}");
        }
    }

    // Inline classes with the set's own names and templates: the same answer as the set.
    let classes: serde_json::Map<String, Value> = lib_rcc
        .classes
        .iter()
        .map(|c| (c.label.clone(), json!(c.names)))
        .collect();
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "classes": classes, "templates": lib_rcc.templates}),
            None,
        ),
        "inline = rcc",
    );
    assert_eq!(v["ensemble"]["prompt_set"], "inline");
    assert_eq!(
        v["ensemble"]["labels"],
        json!(["CCRCC", "CHRCC", "PRCC"]),
        "sorted"
    );
    assert_eq!(v["ensemble"]["templates"], lib_rcc.templates.len());
    for r in results(&v) {
        let cos = &by_slide[r["slide_id"].as_str().unwrap()];
        for (l, c) in SUBTYPES.iter().zip(cos) {
            assert!(close(f(&r["cosines"][l]), *c, 1e-4), "{r}");
        }
    }

    // Inline classes of one name and the template "CLASSNAME": a class embedding is then the
    // text's joint embedding, so its cosine is the slide's score in text -> slide search.
    let (a, b) = (
        "papillary renal cell carcinoma",
        "oncocytoma with central scar",
    );
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": ids, "templates": ["CLASSNAME"], "classes": {"A": [a], "B": [b]}}),
            None,
        ),
        "inline, one prompt per class",
    );
    assert_eq!(v["ensemble"]["templates"], 1);
    assert_eq!(v["ensemble"]["names_per_class"], json!([1, 1]));
    for (label, query) in [("A", a), ("B", b)] {
        let search = scores(&ok(
            post(
                addr,
                "/v1/search/slides",
                &json!({"query": query, "k": 100}),
                None,
            ),
            "search",
        ));
        for r in results(&v) {
            let id = r["slide_id"].as_str().unwrap();
            assert!(
                close(f(&r["cosines"][label]), search[id], 1e-4),
                "{id}: zero-shot cosine {} vs search score {}",
                r["cosines"][label],
                search[id]
            );
        }
    }
    // Labels are any distinct strings, also when they differ only in case.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": [ids[0]], "classes": {"prcc": [a], "PRCC": [b]}}),
            None,
        ),
        "inline, labels differing in case",
    );
    assert_eq!(v["ensemble"]["labels"], json!(["PRCC", "prcc"]));
    let r = &results(&v)[0];
    let (p_upper, p_lower) = (
        f(&r["probabilities"]["PRCC"]),
        f(&r["probabilities"]["prcc"]),
    );
    assert!(close(p_upper + p_lower, 1.0, 1e-4), "{r}");
    let expected = if p_upper > p_lower { "PRCC" } else { "prcc" };
    assert_eq!(r["predicted"], expected);
    // A template repeating CLASSNAME with long names: each filled prompt is cut at the text
    // limit (2000 characters) when embedded; the request is answered.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": [ids[0]], "templates": ["CLASSNAME ".repeat(150)], "classes": {"A": ["a".repeat(100)], "B": ["b".repeat(100)]}}),
            None,
        ),
        "inline, long filled prompts",
    );
    assert_eq!(results(&v).len(), 1);
    // Default templates for inline classes (the MI-Zero 16).
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/subtype",
            &json!({"slide_ids": [ids[0]], "classes": {"A": [a], "B": [b]}}),
            None,
        ),
        "inline, default templates",
    );
    assert_eq!(v["ensemble"]["templates"], 16);

    // Mutations: P(mutated vs wild type) per gene, in [0, 1]; a subset gives the same values.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/mutation",
            &json!({"slide_ids": ids[..3]}),
            None,
        ),
        "mutation, all genes",
    );
    assert_eq!(v["prompt_set"], "luad-mutations");
    assert!(v["templates"].as_u64().unwrap() >= 16);
    let scale = f(&v["logit_scale"]);
    assert!(scale > 1.0);
    let full = results(&v);
    assert_eq!(full.len(), 3);
    for r in full {
        let p = r["probability_mutated"].as_object().unwrap();
        let genes: BTreeSet<&str> = p.keys().map(String::as_str).collect();
        assert_eq!(
            genes,
            BTreeSet::from(["EGFR", "FAT1", "KRAS", "LRP1B", "TP53"])
        );
        assert!(p.values().all(|x| (0.0..=1.0).contains(&f(x))), "{r}");
    }
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/mutation",
            &json!({"slide_ids": ids[..3], "genes": ["egfr", "TP53"], "prompt_set": "luad-mutations"}),
            None,
        ),
        "mutation, two genes",
    );
    for (r, whole) in results(&v).iter().zip(full) {
        let p = r["probability_mutated"].as_object().unwrap();
        assert_eq!(p.len(), 2, "{r}");
        for g in ["EGFR", "TP53"] {
            assert!(close(f(&p[g]), f(&whole["probability_mutated"][g]), 1e-5));
        }
    }
    // Without temperature the probabilities move towards 0.5 but stay on the same side.
    let v = ok(
        post(
            addr,
            "/v1/zero-shot/mutation",
            &json!({"slide_ids": ids[..3], "no_temperature": true}),
            None,
        ),
        "mutation, no temperature",
    );
    assert_eq!(f(&v["logit_scale"]), 1.0);
    for (r, whole) in results(&v).iter().zip(full) {
        for (g, p) in r["probability_mutated"].as_object().unwrap() {
            let (p, q) = (f(p), f(&whole["probability_mutated"][g]));
            assert!((p - 0.5).abs() <= (q - 0.5).abs() + 1e-6, "{g}: {p} vs {q}");
            assert!((p - 0.5) * (q - 0.5) >= 0.0, "{g}: {p} vs {q}");
        }
    }
}

fn heatmap(addr: SocketAddr, fx: &Fixture) {
    let id = fx.reports[0].slide_id.clone();
    let detail = ok(get(addr, &format!("/v1/slides/{id}")), "slide");
    let tiles = detail["tile_count"].as_u64().unwrap() as usize;
    let path = format!("/v1/slides/{id}/heatmap");
    let v = ok(
        post(
            addr,
            &path,
            &json!({"query": "papillary architecture"}),
            None,
        ),
        "heatmap",
    );
    assert_eq!(v["slide_id"], id.as_str());
    assert_eq!(v["approximate"], false, "no slide layers were fine-tuned");
    let (w, h, l) = (
        v["level0_width"].as_u64().unwrap(),
        v["level0_height"].as_u64().unwrap(),
        v["level0_tile_px"].as_u64().unwrap(),
    );
    assert!(l == 256 || l == 512, "tile side {l}");
    let cells = v["tiles"].as_array().unwrap();
    assert_eq!(cells.len(), tiles, "one value per kept tile");
    let mut seen = BTreeSet::new();
    for c in cells {
        let (gx, gy, cos) = (c[0].as_u64().unwrap(), c[1].as_u64().unwrap(), f(&c[2]));
        assert!(
            (gx + 1) * l <= w && (gy + 1) * l <= h,
            "{c} outside {w}x{h}"
        );
        assert!((-1.0001..=1.0001).contains(&cos));
        assert!(seen.insert((gx, gy)), "tile {c} twice");
    }
    // Deterministic, and prompt-dependent.
    let again = ok(
        post(
            addr,
            &path,
            &json!({"query": "papillary architecture"}),
            None,
        ),
        "heatmap again",
    );
    assert_eq!(again["tiles"], v["tiles"]);
    let other = ok(
        post(addr, &path, &json!({"query": "clear cytoplasm"}), None),
        "heatmap other",
    );
    assert_ne!(other["tiles"], v["tiles"]);
}
