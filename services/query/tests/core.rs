//! The query core without HTTP or the CLI: a real embedded store (qdrant-edge) and SQLite
//! catalog in a temp dir, points written directly, questions asked through `gigapath-query`.

use std::collections::BTreeMap;

use gigapath_query::{
    similar_regions, similar_slides, Level0Box, QueryError, SimilarRegionsRequest,
    SimilarSlidesRequest, Space,
};
use gigapath_store::vector::{PayloadFilter, SlidePoint, TilePoint, TILES};
use gigapath_store::{Dims, Store, StoreConfig};

const DIMS: Dims = Dims {
    joint: 4,
    slide: 6,
    text: 3,
    tile: 5,
};

/// Slide `i` of cluster `c`: a direction per cluster plus a small per-slide offset.
fn slide_vector(c: usize, i: usize) -> Vec<f32> {
    let mut v = vec![0.1f32; DIMS.slide];
    v[c] = 1.0;
    v[3 + (i % 3)] += 0.05 * (i as f32 + 1.0);
    v
}

fn tile_vector(c: usize, i: u32) -> Vec<f32> {
    let mut v = vec![0.05f32; DIMS.tile];
    v[c] = 1.0;
    v[4] += 0.01 * i as f32;
    v
}

const SUBTYPES: [&str; 3] = ["A", "B", "C"];

/// 3 clusters x 3 slides (`s<c><i>`), each with 4 x 4 tiles of 256 px; slides `s00` and `s01`
/// share a patient.
async fn store(dir: &std::path::Path) -> Store {
    let mut config = StoreConfig::with_data_dir(dir.join("data"));
    config.dims = DIMS;
    let store = Store::open(config).await.unwrap();
    gigapath_query::ensure_tiles(&store).await.unwrap();
    for (c, subtype) in SUBTYPES.iter().enumerate() {
        for i in 0..3 {
            let id = format!("s{c}{i}");
            let patient = if c == 0 && i < 2 {
                "P0".into()
            } else {
                id.clone()
            };
            let labels = BTreeMap::from([
                ("subtype".to_string(), subtype.to_string()),
                ("patient_id".to_string(), patient),
            ]);
            let point = SlidePoint {
                slide_id: id.clone(),
                labels: labels.clone(),
                fingerprints: BTreeMap::from([("tile".to_string(), "tile-fp".to_string())]),
                fingerprint: "slide-fp".into(),
                slide: slide_vector(c, i),
                ..SlidePoint::default()
            };
            store
                .vectors
                .upsert("slides", vec![point.into_point()])
                .await
                .unwrap();
            let tiles = (0..16u32)
                .map(|t| {
                    TilePoint {
                        slide_id: id.clone(),
                        gx: t % 4,
                        gy: t / 4,
                        x: i64::from(t % 4) * 256,
                        y: i64::from(t / 4) * 256,
                        w: 256,
                        h: 256,
                        tissue: Some(0.9),
                        labels: labels.clone(),
                        fingerprint: "tile-fp".into(),
                        tile: tile_vector(c, t),
                    }
                    .into_point()
                })
                .collect();
            store.vectors.upsert(TILES, tiles).await.unwrap();
        }
    }
    store
}

fn slides_req(id: &str, k: usize) -> SimilarSlidesRequest {
    SimilarSlidesRequest {
        slide_id: id.into(),
        space: Space::Slide,
        k,
        filter: PayloadFilter::none(),
        exclude_patient: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_slides_excludes_the_query_and_ranks_its_cluster_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;

    let hits = similar_slides(&store, &slides_req("s10", 4)).await.unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.slide_id.as_str()).collect();
    assert_eq!(hits.len(), 4);
    assert!(!ids.contains(&"s10"), "{ids:?}");
    let mut first_two = ids[..2].to_vec();
    first_two.sort();
    assert_eq!(first_two, ["s11", "s12"]);
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    assert_eq!(hits[0].labels["subtype"], "B");

    // Every stored slide but the query, at most.
    assert_eq!(
        similar_slides(&store, &slides_req("s10", 50))
            .await
            .unwrap()
            .len(),
        8
    );

    // Its patient left out: s01 shares P0 with s00.
    let mut req = slides_req("s00", 2);
    let with = similar_slides(&store, &req).await.unwrap();
    assert!(with.iter().any(|h| h.slide_id == "s01"));
    req.exclude_patient = true;
    let without = similar_slides(&store, &req).await.unwrap();
    assert_eq!(without.len(), 2);
    assert!(without
        .iter()
        .all(|h| h.slide_id != "s01" && h.slide_id != "s00"));

    // Filters hold.
    let mut req = slides_req("s00", 3);
    req.filter = PayloadFilter::none().eq("labels.subtype", "C");
    let hits = similar_slides(&store, &req).await.unwrap();
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|h| h.labels["subtype"] == "C"));

    // Bad questions.
    let err = similar_slides(&store, &slides_req("nope", 3))
        .await
        .unwrap_err();
    assert!(matches!(err, QueryError::UnknownSlide(_)), "{err}");
    let err = similar_slides(&store, &slides_req("s00", 0))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("k = 0"), "{err}");
    let mut req = slides_req("s00", 3);
    req.space = Space::Joint;
    let err = similar_slides(&store, &req).await.unwrap_err();
    assert!(err.to_string().contains("no `joint` vector"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_regions_groups_other_slides_with_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let req = |region: &str, k: usize, per: usize| SimilarRegionsRequest {
        slide_id: "s21".into(),
        region: region.parse().unwrap(),
        k_groups: k,
        per_group: per,
    };

    // A box over 2 x 2 tiles of s21 (cluster C): the other C slides first, never s21.
    let groups = similar_regions(&store, &req("300,300,400,400", 4, 2))
        .await
        .unwrap();
    assert_eq!(groups.len(), 4);
    assert!(groups.iter().all(|g| g.slide_id != "s21"));
    let mut top: Vec<&str> = groups[..2].iter().map(|g| g.slide_id.as_str()).collect();
    top.sort();
    assert_eq!(top, ["s20", "s22"]);
    for g in &groups {
        assert_eq!(g.regions.len(), 2);
        assert_eq!(g.score, g.regions[0].score);
        assert!(g.regions[0].score >= g.regions[1].score);
        for r in &g.regions {
            assert_eq!((r.region.w, r.region.h), (256, 256));
            assert_eq!(r.region.x % 256, 0);
            assert_eq!(r.tissue, Some(0.8999999761581421));
        }
    }
    assert_eq!(groups[0].labels["subtype"], "C");

    // A box off the tissue, a slide without tiles, bad boxes.
    let err = similar_regions(&store, &req("5000,5000,10,10", 3, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, QueryError::EmptyBox { .. }), "{err}");
    store
        .vectors
        .delete_by_filter(TILES, &PayloadFilter::none().eq("slide_id", "s21"))
        .await
        .unwrap();
    let err = similar_regions(&store, &req("0,0,256,256", 3, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, QueryError::NoTiles(_)), "{err}");
    for (bad, why) in [
        ("1,2,3", "x,y,w,h"),
        ("-1,0,5,5", ">= 0"),
        ("0,0,0,5", "> 0"),
        ("0,0,x,5", "`x` is not an integer"),
    ] {
        let err = bad.parse::<Level0Box>().unwrap_err().to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
}
