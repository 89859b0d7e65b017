//! The questions gigapath answers, without HTTP: one home for the query logic that the CLI (and,
//! later, the HTTP routes) call.
//!
//! - [`similar_slides`]: slide -> the k most similar stored slides, by slide-encoder or joint
//!   vector, with payload filters, excluding the query slide (and optionally its patient).
//! - [`similar_regions`]: a level-0 box on a stored slide -> the mean of the tile vectors it
//!   covers, searched in the `tiles` collection, hits grouped by slide (each with its boxes and
//!   scores), excluding the query slide.
//!
//! Everything goes through an opened [`Store`] whose `dims.tile` is the tile encoder's width
//! (the pipeline sets it from the model folders).

use std::collections::BTreeMap;

use gigapath_store::vector::CollectionSpec;
use gigapath_store::vector::{
    PayloadFilter, SearchRequest, VectorStore, JOINT, MAX_K, SLIDE, SLIDES, TILE, TILES,
};
use gigapath_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a question can fail with. Bad input names the problem; store failures pass through.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query slide has no point in the `slides` collection.
    #[error("slide `{0}` is not stored (ingest it first)")]
    UnknownSlide(String),
    /// The query slide's point lacks the vector asked for.
    #[error("slide `{slide}` has no `{space}` vector{hint}")]
    NoVector {
        /// The query slide.
        slide: String,
        /// The space asked for.
        space: Space,
        /// What to do about it, with a leading space; empty when there is no advice.
        hint: &'static str,
    },
    /// The query slide has no points in the `tiles` collection.
    #[error(
        "slide `{0}` has no tile points (ingest with [ingest] index_tiles = true, or run \
         `gigapath index tiles --slide {0}`)"
    )]
    NoTiles(String),
    /// A query box (as given) that is malformed or out of range, and why.
    #[error("box {0}: {1}")]
    BadBox(String, String),
    /// The query box covers no tile point of the slide.
    #[error("no tissue tile of slide `{slide}` inside box {region}")]
    EmptyBox {
        /// The query slide.
        slide: String,
        /// The box, as `x,y,w,h`.
        region: String,
    },
    /// Another bad argument (`k` out of range, an unknown space).
    #[error("{0}")]
    Invalid(String),
    /// The vector store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result with the crate's [`QueryError`].
pub type Result<T> = std::result::Result<T, QueryError>;

/// Which slide vector a slide question compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// The slide encoder's output (always there).
    #[default]
    Slide,
    /// The aligned slide / text space (after an alignment checkpoint).
    Joint,
}

impl Space {
    fn vector(self) -> &'static str {
        match self {
            Space::Slide => SLIDE,
            Space::Joint => JOINT,
        }
    }
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.vector())
    }
}

impl std::str::FromStr for Space {
    type Err = QueryError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "slide" => Ok(Space::Slide),
            "joint" => Ok(Space::Joint),
            other => Err(QueryError::Invalid(format!(
                "space `{other}`: expected slide or joint"
            ))),
        }
    }
}

/// Largest number of results a question returns.
pub const MAX_RESULTS: usize = 1000;

/// Slide -> slides.
#[derive(Clone, Debug, PartialEq)]
pub struct SimilarSlidesRequest {
    /// The query slide (stored).
    pub slide_id: String,
    /// Which of its vectors to compare.
    pub space: Space,
    /// Slides to return, 1 to [`MAX_RESULTS`].
    pub k: usize,
    /// Only slides matching this; [`PayloadFilter::none`] for all.
    pub filter: PayloadFilter,
    /// Also leave out slides of the query slide's patient (`labels.patient_id`, else
    /// `labels.patient`).
    pub exclude_patient: bool,
}

/// One similar slide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimilarSlide {
    /// The slide.
    pub slide_id: String,
    /// Cosine similarity to the query slide.
    pub score: f32,
    /// Its labels; empty when it has none.
    pub labels: BTreeMap<String, String>,
    /// Its cohort, if any.
    pub cohort: Option<String>,
}

/// The `k` stored slides nearest to slide `slide_id` by its `space` vector, best first, never
/// the query slide itself (nor, with `exclude_patient`, slides of its patient).
pub async fn similar_slides(
    store: &Store,
    req: &SimilarSlidesRequest,
) -> Result<Vec<SimilarSlide>> {
    check_k(req.k)?;
    let store = &*store.vectors;
    let point = store
        .retrieve(SLIDES, std::slice::from_ref(&req.slide_id), true)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| QueryError::UnknownSlide(req.slide_id.clone()))?;
    let query = point
        .vectors
        .get(req.space.vector())
        .cloned()
        .ok_or(QueryError::NoVector {
            slide: req.slide_id.clone(),
            space: req.space,
            hint: match req.space {
                Space::Joint => {
                    " (no alignment checkpoint when it was embedded: use --space slide)"
                }
                Space::Slide => "",
            },
        })?;
    let labels = labels_of(&point.payload);
    let patient_of = |labels: &BTreeMap<String, String>| {
        labels
            .get("patient_id")
            .or_else(|| labels.get("patient"))
            .cloned()
    };
    let patient = patient_of(&labels).filter(|_| req.exclude_patient);
    // Over-fetch so that dropping the query slide (and its patient's) still leaves k; fetch
    // more while too few are left and more exist.
    let mut fetch = req.k + 1 + if patient.is_some() { 8 } else { 0 };
    loop {
        let hits = store
            .search(&SearchRequest {
                collection: SLIDES.into(),
                vector: req.space.vector().into(),
                query: query.clone(),
                k: fetch,
                filter: req.filter.clone(),
                fingerprint: point.fingerprint.clone(),
            })
            .await?;
        let exhausted = hits.len() < fetch;
        let kept: Vec<SimilarSlide> = hits
            .into_iter()
            .filter(|h| h.id != req.slide_id)
            .map(|h| SimilarSlide {
                slide_id: h.id,
                score: h.score,
                labels: labels_of(&h.payload),
                cohort: h
                    .payload
                    .get("cohort")
                    .and_then(Value::as_str)
                    .map(String::from),
            })
            .filter(|s| patient.is_none() || patient_of(&s.labels) != patient)
            .take(req.k)
            .collect();
        if kept.len() == req.k || exhausted || fetch >= MAX_K {
            return Ok(kept);
        }
        fetch = (fetch * 4).min(MAX_K);
    }
}

/// A level-0 rectangle in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level0Box {
    /// Left edge.
    pub x: i64,
    /// Top edge.
    pub y: i64,
    /// Width.
    pub w: i64,
    /// Height.
    pub h: i64,
}

impl std::fmt::Display for Level0Box {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{},{}", self.x, self.y, self.w, self.h)
    }
}

impl std::str::FromStr for Level0Box {
    type Err = QueryError;
    /// `x,y,w,h` in level-0 pixels.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| QueryError::BadBox(s.to_string(), why.to_string());
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [x, y, w, h] = parts.as_slice() else {
            return Err(bad("expected x,y,w,h (four integers, level-0 pixels)"));
        };
        let n = |v: &str| {
            v.parse::<i64>()
                .map_err(|_| bad(&format!("`{v}` is not an integer")))
        };
        let b = Level0Box {
            x: n(x)?,
            y: n(y)?,
            w: n(w)?,
            h: n(h)?,
        };
        b.check()?;
        Ok(b)
    }
}

impl Level0Box {
    fn check(&self) -> Result<()> {
        let bad = |why: &str| Err(QueryError::BadBox(self.to_string(), why.to_string()));
        if self.x < 0 || self.y < 0 {
            return bad("x and y must be >= 0");
        }
        if self.w <= 0 || self.h <= 0 {
            return bad("width and height must be > 0");
        }
        if self.w > 1 << 24 || self.h > 1 << 24 {
            return bad("wider than any slide");
        }
        Ok(())
    }
}

/// Region -> regions.
#[derive(Clone, Debug, PartialEq)]
pub struct SimilarRegionsRequest {
    /// The query slide (with tile points).
    pub slide_id: String,
    /// The query box on it.
    pub region: Level0Box,
    /// Slides to return.
    pub k_groups: usize,
    /// Regions per slide.
    pub per_group: usize,
}

/// One region hit: a tile of a stored slide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// The tile's level-0 box (`box` in JSON).
    #[serde(rename = "box")]
    pub region: Level0Box,
    /// Cosine similarity to the query's mean tile vector.
    pub score: f32,
    /// Tissue fraction of the tile, when its tiling recorded one.
    pub tissue: Option<f64>,
}

/// The regions of one slide, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionGroup {
    /// The slide.
    pub slide_id: String,
    /// The best region's score.
    pub score: f32,
    /// Its labels; empty when it has none.
    pub labels: BTreeMap<String, String>,
    /// Its best regions, best first.
    pub regions: Vec<Region>,
}

/// Most tiles a query box may cover (4096 tiles of 256 px: a 16k x 16k px region).
pub const MAX_BOX_TILES: usize = 4096;

/// The slides (up to `k_groups`) whose tiles are nearest to the mean tile vector of `region` on
/// slide `slide_id`, each with up to `per_group` regions, best first; never the query slide.
pub async fn similar_regions(
    store: &Store,
    req: &SimilarRegionsRequest,
) -> Result<Vec<RegionGroup>> {
    check_k(req.k_groups)?;
    ensure_tiles(store).await?;
    let dims_tile = store.config.dims.tile;
    let store = &*store.vectors;
    if req.per_group == 0 || req.per_group > 100 {
        return Err(QueryError::Invalid(format!(
            "per_group = {}: must be between 1 and 100",
            req.per_group
        )));
    }
    req.region.check()?;
    let slide = store
        .retrieve(SLIDES, std::slice::from_ref(&req.slide_id), false)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| QueryError::UnknownSlide(req.slide_id.clone()))?;
    let tile_fp = slide
        .payload
        .get("fingerprints")
        .and_then(|f| f.get("tile"))
        .and_then(Value::as_str)
        .ok_or_else(|| QueryError::NoTiles(req.slide_id.clone()))?
        .to_string();
    let tile_px = tile_side(store, dims_tile, &req.slide_id, &tile_fp).await?;

    // The grid cells the box overlaps (cell g spans [g * px, (g + 1) * px)).
    let b = req.region;
    let cells = |start: i64, len: i64| (start / tile_px)..=((start + len - 1) / tile_px);
    let (xs, ys) = (cells(b.x, b.w), cells(b.y, b.h));
    let count = (xs.end() - xs.start() + 1) * (ys.end() - ys.start() + 1);
    if count as usize > MAX_BOX_TILES {
        return Err(QueryError::BadBox(
            b.to_string(),
            format!("covers {count} tiles of {tile_px} px; at most {MAX_BOX_TILES}"),
        ));
    }
    let ids: Vec<String> = ys
        .flat_map(|gy| xs.clone().map(move |gx| (gx, gy)))
        .map(|(gx, gy)| gigapath_store::vector::tile_id(&req.slide_id, gx as u32, gy as u32))
        .collect();
    let tiles = store.retrieve(TILES, &ids, true).await?;
    let vectors: Vec<&Vec<f32>> = tiles.iter().filter_map(|t| t.vectors.get(TILE)).collect();
    let Some(first) = vectors.first() else {
        return Err(QueryError::EmptyBox {
            slide: req.slide_id.clone(),
            region: b.to_string(),
        });
    };
    let mut mean = vec![0f32; first.len()];
    for v in &vectors {
        for (m, x) in mean.iter_mut().zip(v.iter()) {
            *m += x / vectors.len() as f32;
        }
    }
    if mean.iter().all(|&x| x == 0.0) {
        return Err(QueryError::EmptyBox {
            slide: req.slide_id.clone(),
            region: b.to_string(),
        });
    }

    let groups = store
        .search_groups(
            &SearchRequest {
                collection: TILES.into(),
                vector: TILE.into(),
                query: mean,
                k: req.k_groups + 1,
                filter: PayloadFilter::none(),
                fingerprint: tile_fp,
            },
            "slide_id",
            req.per_group,
        )
        .await?;
    Ok(groups
        .into_iter()
        .filter(|g| g.key != req.slide_id)
        .take(req.k_groups)
        .map(|g| RegionGroup {
            slide_id: g.key,
            score: g.hits.first().map_or(0.0, |h| h.score),
            labels: g
                .hits
                .first()
                .map(|h| labels_of(&h.payload))
                .unwrap_or_default(),
            regions: g
                .hits
                .iter()
                .filter_map(|h| {
                    Some(Region {
                        region: box_of(&h.payload)?,
                        score: h.score,
                        tissue: h.payload.get("tissue").and_then(Value::as_f64),
                    })
                })
                .collect(),
        })
        .collect())
}

/// The level-0 tile side of slide `slide_id`, read from one of its tile points.
async fn tile_side(
    store: &dyn VectorStore,
    dim: usize,
    slide_id: &str,
    tile_fp: &str,
) -> Result<i64> {
    let none = || QueryError::NoTiles(slide_id.to_string());
    let of_slide = PayloadFilter::none().eq("slide_id", slide_id);
    if store.count(TILES, &of_slide).await? == 0 {
        return Err(none());
    }
    // Any tile will do: search with an arbitrary direction inside the slide.
    let probe = store
        .search_groups(
            &SearchRequest {
                collection: TILES.into(),
                vector: TILE.into(),
                query: vec![1.0; dim],
                k: 1,
                filter: of_slide,
                fingerprint: tile_fp.to_string(),
            },
            "slide_id",
            1,
        )
        .await?;
    probe
        .first()
        .and_then(|g| g.hits.first())
        .and_then(|h| box_of(&h.payload))
        .map(|b| b.w)
        .filter(|&w| w > 0)
        .ok_or_else(none)
}

/// Opens the `tiles` collection of `store` (width `dims.tile`, the tile encoder's; created
/// empty when missing).
pub async fn ensure_tiles(store: &Store) -> Result<()> {
    let spec = CollectionSpec::tiles(&store.config.dims, store.config.tile_quantization);
    Ok(store.vectors.ensure_collection(&spec).await?)
}

fn box_of(payload: &Map<String, Value>) -> Option<Level0Box> {
    let b = payload.get("box")?;
    let n = |k: &str| b.get(k).and_then(Value::as_i64);
    Some(Level0Box {
        x: n("x")?,
        y: n("y")?,
        w: n("w")?,
        h: n("h")?,
    })
}

fn labels_of(payload: &Map<String, Value>) -> BTreeMap<String, String> {
    match payload.get("labels") {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn check_k(k: usize) -> Result<()> {
    if k == 0 || k > MAX_RESULTS {
        return Err(QueryError::Invalid(format!(
            "k = {k}: must be between 1 and {MAX_RESULTS}"
        )));
    }
    Ok(())
}
