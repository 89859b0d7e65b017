//! The trait test-suite, written once against `&dyn VectorStore` and run for every backend
//! (embedded always; Qdrant server when `QDRANT_URL` is set).
//!
//! Expected results are computed here by brute force (exact cosine over the points we wrote), so
//! a backend that ranks, filters, overwrites or guards fingerprints wrongly fails.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    CollectionSpec, PayloadFilter, Point, ReportPoint, SearchRequest, SlidePoint, TilePoint,
    VectorStore, JOINT, REPORTS, SLIDE, SLIDES, TEXT, TILE, TILES,
};
use crate::config::{Dims, Quantization};
use crate::error::StoreError;

/// Deterministic pseudo-random vector (splitmix64), values in [-1, 1).
pub(crate) fn vector(seed: u64, dim: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..dim)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let a = normalized(a);
    let b = normalized(b);
    a.iter().zip(&b).map(|(x, y)| x * y).sum()
}

// One value with a space: filters must match it exactly, not as full text.
const COHORTS: [&str; 3] = ["TCGA-LUAD", "TCGA-LUSC", "CPTAC lung"];
const SITES: [&str; 2] = ["lung", "kidney"];
const SUBTYPES: [&str; 4] = ["LUAD", "LUSC", "CCRCC", "PRCC"];

pub(crate) fn slide_point(id: &str, fingerprint: &str, dims: &Dims, seed: u64) -> Point {
    let i = seed as usize;
    SlidePoint {
        slide_id: id.into(),
        cohort: Some(COHORTS[i % 3].into()),
        site: Some(SITES[i % 2].into()),
        labels: BTreeMap::from([("subtype".into(), SUBTYPES[i % 4].into())]),
        mpp: Some(0.25 + (i % 3) as f64 * 0.25),
        tile_count: 1000 + seed,
        fingerprints: BTreeMap::from([
            ("tile".into(), "t-1".into()),
            ("slide".into(), "s-1".into()),
        ]),
        fingerprint: fingerprint.into(),
        joint: Some(vector(seed, dims.joint)),
        slide: vector(seed + 1_000_000, dims.slide),
    }
    .into_point()
}

/// Collection names under test (a server run uses a unique prefix and drops them after).
pub(crate) struct Names {
    pub slides: String,
    pub reports: String,
    pub tiles: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        Names {
            slides: format!("{prefix}{SLIDES}"),
            reports: format!("{prefix}{REPORTS}"),
            tiles: format!("{prefix}{TILES}"),
        }
    }
}

pub(crate) fn specs(prefix: &str, dims: &Dims) -> Vec<CollectionSpec> {
    let names = Names::new(prefix);
    let mut slides = CollectionSpec::slides(dims);
    slides.name = names.slides;
    let mut reports = CollectionSpec::reports(dims);
    reports.name = names.reports;
    let mut tiles = CollectionSpec::tiles(dims, Quantization::Int8);
    tiles.name = names.tiles;
    vec![slides, reports, tiles]
}

/// Every collection a run of [`run_all`] creates under `prefix` (those of [`specs`] and the scratch
/// ones it adds), so that a server run can drop them all afterwards, even after a failed assertion.
pub(crate) fn created_collections(prefix: &str, dims: &Dims) -> Vec<String> {
    let mut names: Vec<String> = specs(prefix, dims).into_iter().map(|s| s.name).collect();
    names.push(raw_reports_name(prefix));
    names
}

fn raw_reports_name(prefix: &str) -> String {
    format!("{prefix}raw_{REPORTS}")
}

pub(crate) async fn upsert_sample(store: &dyn VectorStore, prefix: &str, n: u64) -> Vec<Point> {
    let dims = Dims {
        joint: 8,
        slide: 12,
        text: 6,
        tile: 10,
    };
    let points: Vec<Point> = (0..n)
        .map(|i| slide_point(&format!("slide-{i:03}"), "fp-A", &dims, i))
        .collect();
    store
        .upsert(&Names::new(prefix).slides, points.clone())
        .await
        .unwrap();
    points
}

/// Runs every check; `dims` must be `{ joint: 8, slide: 12, text: 6, tile: 10 }` (the sample points' dims) and
/// the collections of `specs(prefix, dims)` must already exist and be empty.
pub(crate) async fn run_all(store: &dyn VectorStore, dims: &Dims, prefix: &str) {
    ensure_is_idempotent_and_checks_dims(store, dims, prefix).await;
    let points = upsert_sample(store, prefix, 60).await;
    count_with_filters(store, prefix, &points).await;
    retrieve_returns_vectors_and_payload(store, prefix, &points).await;
    search_matches_brute_force(store, prefix, &points).await;
    reupsert_overwrites(store, prefix, dims).await;
    fingerprint_guard(store, prefix, dims).await;
    bad_input_is_rejected(store, prefix, dims).await;
    delete_removes(store, prefix).await;
    reports_collection(store, prefix, dims).await;
    points_without_joint(store, prefix, dims).await;
    tiles_collection(store, prefix, dims).await;
}

/// Tiles of `slides` slides, `per_slide` each: every slide's tiles scatter around a centre of
/// their own, so that grouping by slide means something.
pub(crate) fn tile_points(
    slides: u64,
    per_slide: u32,
    dim: usize,
    fingerprint: &str,
) -> Vec<Point> {
    let mut out = Vec::new();
    for s in 0..slides {
        let centre = vector(50_000 + s, dim);
        for i in 0..per_slide {
            let noise = vector(60_000 + s * 10_000 + u64::from(i), dim);
            let tile = centre
                .iter()
                .zip(&noise)
                .map(|(c, n)| c + 0.6 * n)
                .collect();
            out.push(
                TilePoint {
                    slide_id: format!("ts-{s}"),
                    gx: i % 8,
                    gy: i / 8,
                    x: i64::from(i % 8) * 256,
                    y: i64::from(i / 8) * 256,
                    w: 256,
                    h: 256,
                    tissue: Some(0.5 + (i % 5) as f32 * 0.1),
                    labels: BTreeMap::from([("subtype".into(), SUBTYPES[s as usize % 4].into())]),
                    fingerprint: fingerprint.into(),
                    tile,
                }
                .into_point(),
            );
        }
    }
    out
}

/// Top `k` tile ids and, grouped by slide, the first `groups` slides with up to `size` ids each,
/// by exact cosine.
pub(crate) fn brute_force_groups(
    points: &[Point],
    query: &[f32],
    groups: usize,
    size: usize,
) -> Vec<(String, Vec<String>)> {
    let ranked = brute_force(points, TILE, query, points.len(), |_| true);
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for id in ranked {
        let p = points.iter().find(|p| p.id == id).unwrap();
        let slide = p.payload["slide_id"].as_str().unwrap().to_string();
        match out.iter_mut().find(|(s, _)| *s == slide) {
            Some((_, ids)) if ids.len() < size => ids.push(id),
            Some(_) => {}
            None => out.push((slide, vec![id])),
        }
    }
    out.truncate(groups);
    out
}

/// Checks search and group search of the tiles collection named `collection` against brute
/// force over `points`; returns the recall@10 over a few queries (1.0 when every top-10 is exact).
pub(crate) async fn tile_search_recall(
    store: &dyn VectorStore,
    collection: &str,
    points: &[Point],
) -> f64 {
    let dim = points[0].vectors[TILE].len();
    let mut found = 0usize;
    let mut asked = 0usize;
    for seed in [11u64, 22, 33, 44, 55] {
        let query = vector(seed, dim);
        let request = SearchRequest {
            collection: collection.into(),
            vector: TILE.into(),
            query: query.clone(),
            k: 10,
            filter: PayloadFilter::none(),
            fingerprint: "fp-T".into(),
        };
        let hits = store.search(&request).await.unwrap();
        let exact = brute_force(points, TILE, &query, 10, |_| true);
        asked += exact.len();
        found += hits.iter().filter(|h| exact.contains(&h.id)).count();

        // Best tiles per slide: 3 slides, 2 tiles each, as a brute-force grouping finds them.
        let groups = store
            .search_groups(&SearchRequest { k: 3, ..request }, "slide_id", 2)
            .await
            .unwrap();
        let got: Vec<(String, Vec<String>)> = groups
            .iter()
            .map(|g| (g.key.clone(), g.hits.iter().map(|h| h.id.clone()).collect()))
            .collect();
        assert_eq!(
            got,
            brute_force_groups(points, &query, 3, 2),
            "groups, query {seed}"
        );
        for g in &groups {
            assert!(g.hits.windows(2).all(|w| w[0].score >= w[1].score));
            assert!(g.hits.iter().all(|h| h.payload["slide_id"] == json!(g.key)));
        }
    }
    found as f64 / asked as f64
}

async fn tiles_collection(store: &dyn VectorStore, prefix: &str, dims: &Dims) {
    let tiles = Names::new(prefix).tiles;
    let none = PayloadFilter::none();
    let points = tile_points(6, 40, dims.tile, "fp-T");
    for batch in points.chunks(64) {
        store.upsert(&tiles, batch.to_vec()).await.unwrap();
    }
    assert_eq!(store.count(&tiles, &none).await.unwrap(), 240);
    let of = |slide: &str| PayloadFilter::none().eq("slide_id", slide);
    assert_eq!(store.count(&tiles, &of("ts-2")).await.unwrap(), 40);

    // The payload a region search shows: slide, cell, level-0 box, tissue, labels.
    let got = store
        .retrieve(&tiles, &[points[42].id.clone()], true)
        .await
        .unwrap();
    assert_eq!(got[0].id, "ts-1@2,0");
    assert_eq!(
        got[0].payload["box"],
        json!({"x": 512, "y": 0, "w": 256, "h": 256})
    );
    assert_eq!(got[0].payload["gx"], json!(2));
    assert_eq!(got[0].payload["labels"]["subtype"], json!("LUSC"));
    assert!((got[0].payload["tissue"].as_f64().unwrap() - 0.7).abs() < 1e-6);

    // Re-ingesting a slide overwrites its tiles (ids from slide and grid cell).
    store.upsert(&tiles, points[..40].to_vec()).await.unwrap();
    assert_eq!(store.count(&tiles, &none).await.unwrap(), 240);

    let recall = tile_search_recall(store, &tiles, &points).await;
    assert_eq!(recall, 1.0, "tile search recall@10 with int8 + rescoring");

    // Grouping needs an indexed key; bad sizes are refused.
    let request = SearchRequest {
        collection: tiles.clone(),
        vector: TILE.into(),
        query: vector(1, dims.tile),
        k: 3,
        filter: PayloadFilter::none(),
        fingerprint: "fp-T".into(),
    };
    let err = store.search_groups(&request, "gx", 2).await.unwrap_err();
    assert!(err.to_string().contains("`gx`"), "{err}");
    let err = store
        .search_groups(&request, "slide_id", 0)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err}");
    // More groups asked than slides stored: every slide once.
    let all = store
        .search_groups(
            &SearchRequest {
                k: 50,
                ..request.clone()
            },
            "slide_id",
            1,
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 6);

    // Deleting a slide deletes its tiles, and only them.
    store.delete_by_filter(&tiles, &of("ts-2")).await.unwrap();
    assert_eq!(store.count(&tiles, &of("ts-2")).await.unwrap(), 0);
    assert_eq!(store.count(&tiles, &none).await.unwrap(), 200);
    let err = store.delete_by_filter(&tiles, &none).await.unwrap_err();
    assert!(err.to_string().contains("empty filter"), "{err}");
    assert_eq!(store.count(&tiles, &none).await.unwrap(), 200);
    let groups = store
        .search_groups(&SearchRequest { k: 50, ..request }, "slide_id", 3)
        .await
        .unwrap();
    assert_eq!(groups.len(), 5);
    assert!(groups.iter().all(|g| g.key != "ts-2" && g.hits.len() == 3));
}

async fn ensure_is_idempotent_and_checks_dims(store: &dyn VectorStore, dims: &Dims, prefix: &str) {
    for spec in specs(prefix, dims) {
        store.ensure_collection(&spec).await.unwrap();
    }
    let wrong = Dims {
        joint: dims.joint * 2,
        ..*dims
    };
    let err = store
        .ensure_collection(&specs(prefix, &wrong)[0])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::DimensionMismatch { ref vector, expected, found, .. }
            if vector == JOINT && expected == wrong.joint && found == dims.joint),
        "{err}"
    );
}

async fn count_with_filters(store: &dyn VectorStore, prefix: &str, points: &[Point]) {
    let slides = Names::new(prefix).slides;
    let total = store.count(&slides, &PayloadFilter::none()).await.unwrap();
    assert_eq!(total, points.len() as u64);
    let stats = store.stats(&slides).await.unwrap();
    // Approximate by contract (qdrant counts per segment), so only its order of magnitude.
    assert!(stats.points > 0 && stats.points <= 2 * total, "{stats:?}");
    assert!(stats.segments >= 1, "{stats:?}");

    let expected = |pred: &dyn Fn(&Point) -> bool| points.iter().filter(|p| pred(p)).count() as u64;
    let field = |p: &Point, k: &str| p.payload[k].as_str().unwrap().to_string();
    let subtype = |p: &Point| p.payload["labels"]["subtype"].as_str().unwrap().to_string();

    let f = PayloadFilter::none().eq("cohort", "CPTAC lung");
    let n = store.count(&slides, &f).await.unwrap();
    assert_eq!(n, expected(&|p| field(p, "cohort") == "CPTAC lung"));
    assert!(n > 0);
    let f = PayloadFilter::none().eq("cohort", "lung");
    assert_eq!(
        store.count(&slides, &f).await.unwrap(),
        0,
        "exact, not full-text"
    );
    let f = PayloadFilter::none()
        .any_of("cohort", ["TCGA-LUAD", "TCGA-LUSC"])
        .eq("site", "lung");
    let n = store.count(&slides, &f).await.unwrap();
    assert_eq!(
        n,
        expected(&|p| field(p, "cohort").starts_with("TCGA") && field(p, "site") == "lung")
    );
    assert!(n > 0 && n < points.len() as u64);
    let f = PayloadFilter::none().eq("labels.subtype", "LUSC");
    assert_eq!(
        store.count(&slides, &f).await.unwrap(),
        expected(&|p| subtype(p) == "LUSC")
    );
    let f = PayloadFilter::none().eq("cohort", "no-such-cohort");
    assert_eq!(store.count(&slides, &f).await.unwrap(), 0);
}

async fn retrieve_returns_vectors_and_payload(
    store: &dyn VectorStore,
    prefix: &str,
    points: &[Point],
) {
    let slides = Names::new(prefix).slides;
    let ids = vec![
        points[7].id.clone(),
        "never-stored".to_string(),
        points[3].id.clone(),
    ];
    let got = store.retrieve(&slides, &ids, true).await.unwrap();
    assert_eq!(got.len(), 2, "unknown ids are skipped");
    for (got, want) in got.iter().zip([&points[7], &points[3]]) {
        assert_eq!(got.id, want.id, "order follows the request");
        assert_eq!(got.fingerprint, "fp-A");
        for name in [JOINT, SLIDE] {
            let stored = &got.vectors[name];
            let expected = normalized(&want.vectors[name]);
            assert_eq!(stored.len(), expected.len());
            for (a, b) in stored.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "{name}: {stored:?} vs {expected:?}");
            }
        }
        for key in ["cohort", "site", "labels", "tile_count", "fingerprints"] {
            assert_eq!(got.payload[key], want.payload[key], "payload `{key}`");
        }
        let mpp = got.payload["mpp"].as_f64().unwrap();
        assert!((mpp - want.payload["mpp"].as_f64().unwrap()).abs() < 1e-12);
        assert_eq!(got.payload["slide_id"], json!(want.id));
    }
    let without = store.retrieve(&slides, &ids[..1], false).await.unwrap();
    assert!(without[0].vectors.is_empty());
}

fn brute_force(
    points: &[Point],
    vector: &str,
    query: &[f32],
    k: usize,
    keep: impl Fn(&Point) -> bool,
) -> Vec<String> {
    let mut scored: Vec<(f32, &str)> = points
        .iter()
        .filter(|p| keep(p))
        .map(|p| (cosine(&p.vectors[vector], query), p.id.as_str()))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored
        .into_iter()
        .take(k)
        .map(|(_, id)| id.to_string())
        .collect()
}

async fn search_matches_brute_force(store: &dyn VectorStore, prefix: &str, points: &[Point]) {
    let slides = Names::new(prefix).slides;
    let request = |vector: &str, query: Vec<f32>, k: usize, filter: PayloadFilter| SearchRequest {
        collection: slides.clone(),
        vector: vector.into(),
        query,
        k,
        filter,
        fingerprint: "fp-A".into(),
    };

    // A stored vector finds itself first with cosine 1.
    let hits = store
        .search(&request(
            JOINT,
            points[11].vectors[JOINT].clone(),
            3,
            PayloadFilter::none(),
        ))
        .await
        .unwrap();
    assert_eq!(hits[0].id, points[11].id);
    assert!((hits[0].score - 1.0).abs() < 1e-4, "{}", hits[0].score);
    assert_eq!(hits[0].payload["cohort"], points[11].payload["cohort"]);

    for (vector, seed) in [(JOINT, 4242u64), (SLIDE, 777)] {
        let dim = points[0].vectors[vector].len();
        let query = vector_for(seed, dim);
        let hits = store
            .search(&request(vector, query.clone(), 7, PayloadFilter::none()))
            .await
            .unwrap();
        let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
        assert_eq!(
            ids,
            brute_force(points, vector, &query, 7, |_| true),
            "{vector}"
        );
        for h in &hits {
            let p = points.iter().find(|p| p.id == h.id).unwrap();
            assert!((h.score - cosine(&p.vectors[vector], &query)).abs() < 1e-4);
        }

        let filter = PayloadFilter::none()
            .any_of("labels.subtype", ["LUAD", "CCRCC"])
            .eq("site", "lung");
        let hits = store
            .search(&request(vector, query.clone(), 5, filter))
            .await
            .unwrap();
        let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
        let expected = brute_force(points, vector, &query, 5, |p| {
            let st = p.payload["labels"]["subtype"].as_str().unwrap();
            (st == "LUAD" || st == "CCRCC") && p.payload["site"] == json!("lung")
        });
        assert!(!expected.is_empty());
        assert_eq!(ids, expected, "filtered {vector}");
    }
}

fn vector_for(seed: u64, dim: usize) -> Vec<f32> {
    vector(seed, dim)
}

async fn reupsert_overwrites(store: &dyn VectorStore, prefix: &str, dims: &Dims) {
    let slides = Names::new(prefix).slides;
    let before = store.count(&slides, &PayloadFilter::none()).await.unwrap();
    let mut p = slide_point("slide-005", "fp-A", dims, 5);
    p.payload.insert("cohort".into(), json!("RE-INGESTED"));
    p.vectors.insert(JOINT.into(), vector(99_999, dims.joint));
    store.upsert(&slides, vec![p.clone()]).await.unwrap();
    assert_eq!(
        store.count(&slides, &PayloadFilter::none()).await.unwrap(),
        before
    );
    let got = store
        .retrieve(&slides, &["slide-005".to_string()], true)
        .await
        .unwrap();
    assert_eq!(got[0].payload["cohort"], json!("RE-INGESTED"));
    assert!((cosine(&got[0].vectors[JOINT], &p.vectors[JOINT]) - 1.0).abs() < 1e-5);
    assert_eq!(
        store
            .count(&slides, &PayloadFilter::none().eq("cohort", "RE-INGESTED"))
            .await
            .unwrap(),
        1
    );
}

async fn fingerprint_guard(store: &dyn VectorStore, prefix: &str, dims: &Dims) {
    let slides = Names::new(prefix).slides;
    let query = |fingerprint: &str| SearchRequest {
        collection: slides.clone(),
        vector: JOINT.into(),
        query: vector(1, dims.joint),
        k: 5,
        filter: PayloadFilter::none(),
        fingerprint: fingerprint.into(),
    };
    assert_eq!(
        store.other_fingerprint(&slides, "fp-A").await.unwrap(),
        (0, None)
    );

    // A query from other weights than the stored points is refused, not answered with nothing.
    let err = store.search(&query("fp-B")).await.unwrap_err();
    assert!(
        matches!(err, StoreError::FingerprintMismatch { ref query, ref example, other_points, .. }
            if query == "fp-B" && example == "fp-A" && other_points == 60),
        "{err}"
    );

    // One point from other weights makes the collection mixed: both fingerprints are refused.
    let stray = slide_point("stray", "fp-B", dims, 500);
    store.upsert(&slides, vec![stray]).await.unwrap();
    assert_eq!(
        store.other_fingerprint(&slides, "fp-A").await.unwrap(),
        (1, Some("fp-B".to_string()))
    );
    let err = store.search(&query("fp-A")).await.unwrap_err();
    assert!(
        matches!(err, StoreError::FingerprintMismatch { ref example, other_points: 1, .. } if example == "fp-B"),
        "{err}"
    );
    assert!(err.to_string().contains("fp-A"), "{err}");
    assert!(matches!(
        store.search(&query("fp-B")).await.unwrap_err(),
        StoreError::FingerprintMismatch { .. }
    ));

    store.delete(&slides, &["stray".to_string()]).await.unwrap();
    assert_eq!(store.search(&query("fp-A")).await.unwrap().len(), 5);
}

async fn bad_input_is_rejected(store: &dyn VectorStore, prefix: &str, dims: &Dims) {
    let slides = Names::new(prefix).slides;
    let good = || slide_point("bad-input", "fp-A", dims, 7);
    let reject = |p: Point, needle: &'static str| async move {
        let err = store
            .upsert(&Names::new(prefix).slides, vec![p])
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidPoint { .. }) && err.to_string().contains(needle),
            "expected InvalidPoint containing `{needle}`, got {err}"
        );
    };
    let mut p = good();
    p.vectors.insert(JOINT.into(), vec![0.5; dims.joint + 1]);
    reject(p, "expects").await;
    let mut p = good();
    p.vectors.get_mut(SLIDE).unwrap()[2] = f32::NAN;
    reject(p, "not finite").await;
    let mut p = good();
    p.vectors.clear();
    reject(p, "no vectors").await;
    let mut p = good();
    p.fingerprint = " ".into();
    reject(p, "fingerprint").await;
    let mut p = good();
    p.vectors.insert(JOINT.into(), vec![0.0; dims.joint]);
    reject(p, "all zeros").await;
    let mut p = good();
    p.payload
        .insert("slide_id".into(), Value::String("other-id".into()));
    reject(p, "disagrees").await;
    let err = store
        .upsert(&slides, vec![good(), good()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    assert_eq!(
        store
            .retrieve(&slides, &["bad-input".to_string()], false)
            .await
            .unwrap()
            .len(),
        0,
        "a rejected batch writes nothing"
    );

    let search = |vector: &str, query: Vec<f32>, k: usize| SearchRequest {
        collection: slides.clone(),
        vector: vector.into(),
        query,
        k,
        filter: PayloadFilter::none(),
        fingerprint: "fp-A".into(),
    };
    let err = store
        .search(&search(JOINT, vector(1, dims.joint), 0))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err}");
    let err = store
        .search(&search(JOINT, vector(1, 3), 5))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err}");
    let err = store
        .search(&search("nope", vector(1, 3), 5))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownVector { .. }), "{err}");
    let mut req = search(JOINT, vector(1, dims.joint), 5);
    req.collection = "no_such_collection".into();
    assert!(matches!(
        store.search(&req).await.unwrap_err(),
        StoreError::UnknownCollection(_)
    ));
    let mut req = search(JOINT, vector(1, dims.joint), 5);
    req.filter = PayloadFilter::none().any_of("cohort", Vec::<String>::new());
    assert!(matches!(
        store.search(&req).await.unwrap_err(),
        StoreError::InvalidRequest(_)
    ));
}

async fn delete_removes(store: &dyn VectorStore, prefix: &str) {
    let slides = Names::new(prefix).slides;
    let before = store.count(&slides, &PayloadFilter::none()).await.unwrap();
    let ids: Vec<String> = ["slide-001", "slide-002", "never-stored"]
        .map(String::from)
        .to_vec();
    store.delete(&slides, &ids).await.unwrap();
    assert_eq!(
        store.count(&slides, &PayloadFilter::none()).await.unwrap(),
        before - 2
    );
    assert!(store
        .retrieve(&slides, &ids, false)
        .await
        .unwrap()
        .is_empty());
}

async fn reports_collection(store: &dyn VectorStore, prefix: &str, dims: &Dims) {
    let reports = Names::new(prefix).reports;
    let points: Vec<Point> = (0..10u64)
        .map(|i| {
            ReportPoint {
                report_id: format!("report-{i}"),
                slide_id: format!("slide-{:03}", i % 4),
                text: format!("Invasive adenocarcinoma, case {i}."),
                labels: BTreeMap::from([("subtype".to_string(), "LUAD".to_string())]),
                fingerprint: "fp-A".into(),
                joint: Some(vector(10_000 + i, dims.joint)),
                text_embedding: vector(20_000 + i, dims.text),
            }
            .into_point()
        })
        .collect();
    store.upsert(&reports, points.clone()).await.unwrap();
    let f = PayloadFilter::none().eq("slide_id", "slide-002");
    assert_eq!(store.count(&reports, &f).await.unwrap(), 2); // reports 2 and 6
    let hits = store
        .search(&SearchRequest {
            collection: reports.clone(),
            vector: JOINT.into(),
            query: points[6].vectors[JOINT].clone(),
            k: 2,
            filter: f,
            fingerprint: "fp-A".into(),
        })
        .await
        .unwrap();
    assert_eq!(hits[0].id, "report-6");
    assert_eq!(
        hits[0].payload["text"],
        json!("Invasive adenocarcinoma, case 6.")
    );
    assert!(hits
        .iter()
        .all(|h| h.payload["slide_id"] == json!("slide-002")));
}

/// Before any alignment checkpoint, points carry only their raw vector: they are found by it,
/// and a search by `joint` simply does not see them.
async fn points_without_joint(store: &dyn VectorStore, prefix: &str, dims: &Dims) {
    let reports: Vec<Point> = (0..4u64)
        .map(|i| {
            ReportPoint {
                report_id: format!("raw-report-{i}"),
                slide_id: format!("slide-{i:03}"),
                text: format!("Raw report {i}."),
                labels: BTreeMap::new(),
                fingerprint: "fp-raw".into(),
                joint: None,
                text_embedding: vector(30_000 + i, dims.text),
            }
            .into_point()
        })
        .collect();
    assert!(reports.iter().all(|p| p.vectors.len() == 1));
    let raw = raw_reports_name(prefix);
    let mut spec = CollectionSpec::reports(dims);
    spec.name = raw.clone();
    store.ensure_collection(&spec).await.unwrap();
    store.upsert(&raw, reports.clone()).await.unwrap();
    let search = |vector: &str, query: Vec<f32>| SearchRequest {
        collection: raw.clone(),
        vector: vector.into(),
        query,
        k: 3,
        filter: PayloadFilter::none(),
        fingerprint: "fp-raw".into(),
    };
    let hits = store
        .search(&search(TEXT, reports[2].vectors[TEXT].clone()))
        .await
        .unwrap();
    assert_eq!(hits[0].id, "raw-report-2");
    assert!((hits[0].score - 1.0).abs() < 1e-4);
    let hits = store
        .search(&search(JOINT, vector(1, dims.joint)))
        .await
        .unwrap();
    assert!(
        hits.is_empty(),
        "points without `joint` matched a joint search: {hits:?}"
    );
    let back = store
        .retrieve(&raw, &["raw-report-1".to_string()], true)
        .await
        .unwrap();
    assert_eq!(back[0].vectors.keys().collect::<Vec<_>>(), vec![TEXT]);
}
