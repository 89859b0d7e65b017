//! Text -> slides over joint vectors, report search, slide -> reports and report -> slides.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::json;

use crate::common::{get, post};
use crate::fixture::*;

#[test]
fn text_to_slides_ranks_filters_and_agrees_with_the_slide_record() {
    let s = shared();
    slide_search(s.addr, &s.fx);
}

#[test]
fn reports_by_text_and_across_modalities() {
    let s = shared();
    let top = ok(
        post(
            s.addr,
            "/v1/search/slides",
            &json!({"query": "renal", "k": 1}),
            None,
        ),
        "slide fingerprint",
    );
    let slide_fp = top["fingerprint"].as_str().unwrap().to_string();
    report_search(s.addr, &s.fx, &slide_fp);
}

/// Text -> slides over `joint` vectors, with filters. Returns the slides' guard fingerprint.
fn slide_search(addr: SocketAddr, fx: &Fixture) -> String {
    let n = fx.reports.len();
    let query = "clear cell renal cell carcinoma";
    let top5 = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 5}),
            None,
        ),
        "text -> slides",
    );
    assert_eq!(top5["vector"], "joint");
    let hits = results(&top5);
    assert_eq!(hits.len(), 5);
    assert_ranked(hits);
    let slide_fp = top5["fingerprint"].as_str().unwrap().to_string();
    assert!(
        !slide_fp.is_empty() && slide_fp.chars().all(|c| c.is_ascii_hexdigit()),
        "{slide_fp}"
    );
    for h in hits {
        let id = h["id"].as_str().unwrap();
        assert!(fx.slide_ids().contains(id), "{id}");
        let p = &h["payload"];
        assert_eq!(p["slide_id"], id);
        assert_eq!(p["fingerprint"], slide_fp.as_str());
        assert_eq!(p["labels"]["subtype"], fx.subtype_of(id), "{p}");
        assert_eq!(p["site"], "kidney", "{p}");
        assert_eq!(p["cohort"], "synthetic-rcc", "{p}");
        assert!(p["tile_count"].as_u64().unwrap() > 0);
    }
    // The slide record agrees: joint vector stored, same guard fingerprint, alignment role.
    let id0 = hits[0]["id"].as_str().unwrap();
    let detail = ok(get(addr, &format!("/v1/slides/{id0}")), "slide");
    assert_eq!(detail["vectors"], json!(["joint", "slide"]));
    assert_eq!(detail["fingerprint"], slide_fp.as_str());
    assert!(detail["fingerprints"]["alignment"].is_string(), "{detail}");

    // k larger than the collection: every slide once; the top 5 are the same with the same scores.
    let all = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100}),
            None,
        ),
        "k = 100",
    );
    let all_hits = results(&all);
    assert_eq!(all_hits.len(), n);
    assert_ranked(all_hits);
    let all_scores = scores(&all);
    for (id, s) in scores(&top5) {
        assert!(
            close(s, all_scores[&id], 1e-5),
            "{id}: {s} vs {}",
            all_scores[&id]
        );
    }
    // JSON Schema counts 10.0 as an integer: a whole float is a valid k.
    let v = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 3.0}),
            None,
        ),
        "k = 3.0",
    );
    assert_eq!(results(&v).len(), 3);
    // The same query twice: the same answer (cached nothing wrong, deterministic encoder).
    let again = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100}),
            None,
        ),
        "again",
    );
    assert_eq!(scores(&again), all_scores);
    // Another query ranks differently.
    let other = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": "chromophobe renal cell carcinoma with perinuclear halos", "k": 100}),
            None,
        ),
        "other query",
    );
    assert_ne!(scores(&other), all_scores);

    // Filters: a label, lists, cohort / site, slide ids, and their intersection.
    for subtype in SUBTYPES {
        let v = ok(
            post(
                addr,
                "/v1/search/slides",
                &json!({"query": query, "k": 100, "filter": {"labels": {"subtype": subtype}}}),
                None,
            ),
            "subtype filter",
        );
        let hits = results(&v);
        assert_eq!(hits.len(), SLIDES_PER_SUBTYPE, "{subtype}: {v}");
        assert_ranked(hits);
        for h in hits {
            assert_eq!(h["payload"]["labels"]["subtype"], subtype);
            let id = h["id"].as_str().unwrap();
            assert!(
                close(f(&h["score"]), all_scores[id], 1e-5),
                "filtered score differs"
            );
        }
    }
    let two = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100, "filter": {"labels": {"subtype": ["PRCC", "CHRCC"]}}}),
            None,
        ),
        "subtype list",
    );
    assert_eq!(results(&two).len(), 2 * SLIDES_PER_SUBTYPE);
    assert!(results(&two)
        .iter()
        .all(|h| h["payload"]["labels"]["subtype"] != "CCRCC"));
    for (filter, expected) in [
        (json!({"cohort": "synthetic-rcc"}), n),
        (json!({"cohort": ["elsewhere", "synthetic-rcc"]}), n),
        (json!({"cohort": "elsewhere"}), 0),
        (json!({"site": "kidney"}), n),
        (json!({"site": "lung"}), 0),
        (json!({"labels": {"subtype": "LUAD"}}), 0),
        (
            json!({"site": "kidney", "labels": {"subtype": "PRCC"}}),
            SLIDES_PER_SUBTYPE,
        ),
    ] {
        let v = ok(
            post(
                addr,
                "/v1/search/slides",
                &json!({"query": query, "k": 100, "filter": filter}),
                None,
            ),
            "filter",
        );
        assert_eq!(results(&v).len(), expected, "{filter}: {v}");
    }
    let some: Vec<String> = fx.slide_ids().into_iter().take(3).collect();
    let prcc: BTreeSet<String> = fx
        .reports
        .iter()
        .filter(|r| r.subtype == "PRCC")
        .map(|r| r.slide_id.clone())
        .collect();
    let v = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"query": query, "k": 100, "filter": {"slide_id": some, "labels": {"subtype": "PRCC"}}}),
            None,
        ),
        "slide ids and subtype",
    );
    let got: BTreeSet<String> = scores(&v).into_keys().collect();
    let want: BTreeSet<String> = some.iter().filter(|s| prcc.contains(*s)).cloned().collect();
    assert_eq!(got, want);
    slide_fp
}

/// Reports by text (raw text vectors), slide -> reports and report -> slides (joint vectors).
fn report_search(addr: SocketAddr, fx: &Fixture, slide_fp: &str) {
    let n = fx.reports.len();
    // A report's own text finds it first, with cosine ~1.
    let r0 = &fx.reports[3];
    let v = ok(
        post(
            addr,
            "/v1/search/reports",
            &json!({"query": r0.report_text, "k": 3}),
            None,
        ),
        "text -> reports",
    );
    assert_eq!(v["vector"], "text");
    let report_fp = v["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(report_fp, slide_fp);
    let hits = results(&v);
    assert_eq!(hits.len(), 3);
    assert_ranked(hits);
    assert_eq!(hits[0]["id"], r0.report_id.as_str());
    assert!(f(&hits[0]["score"]) > 0.999, "{}", hits[0]);
    assert_eq!(hits[0]["payload"]["slide_id"], r0.slide_id.as_str());
    assert_eq!(hits[0]["payload"]["text"], r0.report_text.as_str());
    assert_eq!(hits[0]["payload"]["fingerprint"], report_fp.as_str());

    // Cross-modal, both ways: cosine is symmetric, so the score of (report R, slide S) is the
    // same whether R asks for slides or S asks for reports.
    let r_to_s = ok(
        post(
            addr,
            "/v1/search/slides",
            &json!({"report_id": r0.report_id, "k": 100}),
            None,
        ),
        "report -> slides",
    );
    assert_eq!(r_to_s["vector"], "joint");
    assert_eq!(r_to_s["fingerprint"], slide_fp);
    assert_eq!(results(&r_to_s).len(), n);
    assert_ranked(results(&r_to_s));
    let s_to_r = ok(
        post(
            addr,
            "/v1/search/reports",
            &json!({"slide_id": r0.slide_id, "k": 100}),
            None,
        ),
        "slide -> reports",
    );
    assert_eq!(s_to_r["vector"], "joint");
    assert_eq!(s_to_r["fingerprint"], report_fp.as_str());
    assert_eq!(results(&s_to_r).len(), n);
    assert_ranked(results(&s_to_r));
    let rs = scores(&r_to_s);
    let sr = scores(&s_to_r);
    assert!(
        close(rs[&r0.slide_id], sr[&r0.report_id], 1e-4),
        "cos(R, S) = {} one way, {} the other",
        rs[&r0.slide_id],
        sr[&r0.report_id]
    );
    // Every pair of the cohort: same check for another slide.
    let r1 = &fx.reports[7];
    assert!(close(
        rs[&r1.slide_id],
        {
            let v = ok(
                post(
                    addr,
                    "/v1/search/reports",
                    &json!({"slide_id": r1.slide_id, "k": 100}),
                    None,
                ),
                "slide -> reports",
            );
            scores(&v)[&r0.report_id]
        },
        1e-4
    ));
    // Filters on reports.
    let v = ok(
        post(
            addr,
            "/v1/search/reports",
            &json!({"slide_id": r0.slide_id, "k": 100, "filter": {"slide_id": [r1.slide_id, r0.slide_id]}}),
            None,
        ),
        "filtered slide -> reports",
    );
    let got: BTreeSet<String> = scores(&v).into_keys().collect();
    assert_eq!(
        got,
        BTreeSet::from([r0.report_id.clone(), r1.report_id.clone()])
    );
    // Reports keep cohort and site among their labels: the same filter fields work on them.
    for (filter, expected) in [
        (json!({"cohort": "synthetic-rcc"}), n),
        (json!({"site": ["kidney", "lung"]}), n),
        (json!({"site": "lung"}), 0),
        (json!({"labels": {"subtype": "PRCC"}}), SLIDES_PER_SUBTYPE),
        (
            json!({"cohort": "synthetic-rcc", "labels": {"patient_id": r0.patient_id}}),
            1,
        ),
    ] {
        let v = ok(
            post(
                addr,
                "/v1/search/reports",
                &json!({"query": "renal cell carcinoma", "k": 100, "filter": filter}),
                None,
            ),
            "filtered text -> reports",
        );
        assert_eq!(results(&v).len(), expected, "{filter}: {v}");
        assert_ranked(results(&v));
        if filter["labels"]["subtype"] == "PRCC" {
            assert!(results(&v)
                .iter()
                .all(|h| h["payload"]["labels"]["subtype"] == "PRCC"));
        }
    }
}
