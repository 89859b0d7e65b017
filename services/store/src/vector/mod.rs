//! The vector store: one trait ([`VectorStore`]) with two real backends.
//!
//! - [`EmbeddedStore`]: qdrant-edge shards in this process, on disk (the default; one machine).
//! - [`QdrantServerStore`]: a Qdrant server or cluster over gRPC (several machines).
//!
//! What this module owns: collection layout ([`CollectionSpec`]), deterministic point ids, the
//! fingerprint guard and request validation. What it does not: computing embeddings or deciding
//! which fingerprint a model bundle has (the caller passes strings).
//!
//! The trait is async (`async_trait`, so it stays dyn-compatible: `Arc<dyn VectorStore>`) because
//! both consumers already run tokio (actix-web for the API, sqlx for the catalog in the pipeline),
//! and the server backend is natively async. The embedded backend is blocking underneath and moves
//! every call onto tokio's blocking pool. Pipeline threads call it through `Handle::block_on`.

mod edge;
mod server;

#[cfg(test)]
mod conformance;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::{Dims, Quantization, StoreConfig, VectorBackendConfig};
use crate::error::{Result, StoreError};

pub use edge::EmbeddedStore;
pub use server::QdrantServerStore;

/// Collection of slide embeddings.
pub const SLIDES: &str = "slides";
/// Collection of report-text embeddings.
pub const REPORTS: &str = "reports";
/// Aligned (joint slide / text space) vector name.
pub const JOINT: &str = "joint";
/// Raw slide-encoder output vector name.
pub const SLIDE: &str = "slide";
/// Raw text-encoder output of a report (`reports`), so report search works before alignment.
pub const TEXT: &str = "text";
/// Collection of tile embeddings (one point per tile, for region search).
pub const TILES: &str = "tiles";
/// Tile-encoder output vector name (`tiles`).
pub const TILE: &str = "tile";
/// Payload key of the model fingerprint every point carries.
pub const FINGERPRINT_KEY: &str = "fingerprint";

/// Layout of one collection: named vectors (cosine distance) and keyword-indexed payload keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionSpec {
    /// The collection's name (`slides`, `reports`, `tiles`).
    pub name: String,
    /// Payload key holding the caller's string id (`slide_id`, `report_id`).
    pub id_key: String,
    /// Its named vectors; a point carries any non-empty subset of them.
    pub vectors: Vec<VectorSpec>,
    /// Payload keys with a keyword index (what users filter on). Dotted paths reach into maps.
    pub keyword_indexes: Vec<String>,
    /// Vector compression: [`Quantization::Int8`] keeps int8 vectors in RAM and the originals
    /// on disk (searches rescore with them); [`Quantization::None`] keeps float32 in RAM.
    pub quantization: Quantization,
}

/// One named vector of a collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VectorSpec {
    /// The vector's name ([`JOINT`], [`SLIDE`], [`TEXT`], [`TILE`]).
    pub name: String,
    /// Its dimensions.
    pub dim: usize,
}

impl CollectionSpec {
    /// `slides`: `joint` + `slide` vectors; payload slide_id, cohort, site, labels, mpp,
    /// tile_count, fingerprints, fingerprint.
    pub fn slides(dims: &Dims) -> Self {
        CollectionSpec {
            name: SLIDES.into(),
            id_key: "slide_id".into(),
            vectors: vec![
                VectorSpec {
                    name: JOINT.into(),
                    dim: dims.joint,
                },
                VectorSpec {
                    name: SLIDE.into(),
                    dim: dims.slide,
                },
            ],
            keyword_indexes: [
                "slide_id",
                "cohort",
                "site",
                "labels.subtype",
                FINGERPRINT_KEY,
            ]
            .map(String::from)
            .to_vec(),
            quantization: Quantization::None,
        }
    }

    /// `reports`: `joint` and `text` vectors; payload report_id, slide_id, text, labels,
    /// fingerprint.
    pub fn reports(dims: &Dims) -> Self {
        CollectionSpec {
            name: REPORTS.into(),
            id_key: "report_id".into(),
            vectors: vec![
                VectorSpec {
                    name: JOINT.into(),
                    dim: dims.joint,
                },
                VectorSpec {
                    name: TEXT.into(),
                    dim: dims.text,
                },
            ],
            keyword_indexes: ["report_id", "slide_id", FINGERPRINT_KEY]
                .map(String::from)
                .to_vec(),
            quantization: Quantization::None,
        }
    }

    /// `tiles`: one `tile` vector (`dims.tile`, the tile encoder's width); payload tile_id,
    /// slide_id, grid x / y, level-0 box, tissue fraction, labels, fingerprint (the tile
    /// encoder's). Point ids come from (slide id, grid x, grid y) ([`tile_id`]), so re-ingesting
    /// a slide overwrites its tiles.
    pub fn tiles(dims: &Dims, quantization: Quantization) -> Self {
        CollectionSpec {
            name: TILES.into(),
            id_key: "tile_id".into(),
            vectors: vec![VectorSpec {
                name: TILE.into(),
                dim: dims.tile,
            }],
            keyword_indexes: ["slide_id", FINGERPRINT_KEY].map(String::from).to_vec(),
            quantization,
        }
    }

    /// The collections of DESIGN.md.
    pub fn standard(dims: &Dims) -> Vec<Self> {
        vec![Self::slides(dims), Self::reports(dims)]
    }

    /// Dimensions of the vector `name`, `None` when the collection has no such vector.
    pub fn vector_dim(&self, name: &str) -> Option<usize> {
        self.vectors.iter().find(|v| v.name == name).map(|v| v.dim)
    }

    fn validate(&self) -> Result<()> {
        let bad = |detail: String| {
            Err(StoreError::SchemaMismatch {
                collection: self.name.clone(),
                detail,
            })
        };
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return bad("collection names are [A-Za-z0-9_-]+ (they become folder names)".into());
        }
        if self.vectors.is_empty() {
            return bad("no vectors".into());
        }
        for v in &self.vectors {
            if v.name.is_empty() || v.dim == 0 {
                return bad(format!("vector `{}` with dim {}", v.name, v.dim));
            }
        }
        Ok(())
    }
}

/// Deterministic point id for a string id: UUIDv5 in a fixed namespace, so re-ingesting the same
/// slide or report overwrites its point instead of adding a second one. Both backends accept
/// UUID ids; the string id is kept in the payload (`CollectionSpec::id_key`).
pub fn point_uuid(id: &str) -> Uuid {
    // Fixed forever: changing it would orphan every stored point.
    const NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_2b7e_4f0a_5e39_9a53_7c1e_0b8d_4a21);
    Uuid::new_v5(&NAMESPACE, id.as_bytes())
}

/// String id of the tile at grid cell (`gx`, `gy`) of `slide_id`: `<slide_id>@<gx>,<gy>`.
/// Slide ids never contain `@` (the pipeline's id rule), so the id is unambiguous.
pub fn tile_id(slide_id: &str, gx: u32, gy: u32) -> String {
    format!("{slide_id}@{gx},{gy}")
}

/// One stored object: string id, model fingerprint, named vectors and free payload.
///
/// On write, the backend adds `id_key = id` and `fingerprint = fingerprint` to the payload; on
/// read, `payload` contains them too. Vectors come back L2-normalised (cosine collections
/// normalise on insert).
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The caller's string id (slide, report or tile id); the backend derives the point id from it.
    pub id: String,
    /// Guard fingerprint of the weights that made the vectors.
    pub fingerprint: String,
    /// Named vectors, a non-empty subset of the collection's.
    pub vectors: BTreeMap<String, Vec<f32>>,
    /// Filterable and returned data; see the typed builders ([`SlidePoint`], ...).
    pub payload: Map<String, Value>,
}

/// All conditions must hold; each condition matches when the keyword field equals any of its
/// values (a field holding an array matches when any element does).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadFilter {
    /// Conditions that must all hold; empty matches every point.
    pub must: Vec<KeywordMatch>,
}

/// One filter condition: the keyword field `key` equals one of `any_of`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeywordMatch {
    /// Payload key; dotted paths reach into maps (`labels.subtype`).
    pub key: String,
    /// Accepted values; at least one.
    pub any_of: Vec<String>,
}

impl PayloadFilter {
    /// The filter that matches every point.
    pub fn none() -> Self {
        PayloadFilter::default()
    }

    /// Adds `key == value` (builder style).
    pub fn eq(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.must.push(KeywordMatch {
            key: key.into(),
            any_of: vec![value.into()],
        });
        self
    }

    /// Adds `key in values` (builder style).
    pub fn any_of<S: Into<String>>(
        mut self,
        key: impl Into<String>,
        values: impl IntoIterator<Item = S>,
    ) -> Self {
        self.must.push(KeywordMatch {
            key: key.into(),
            any_of: values.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// No conditions: matches every point.
    pub fn is_empty(&self) -> bool {
        self.must.is_empty()
    }

    fn validate(&self) -> Result<()> {
        for m in &self.must {
            if m.key.is_empty() {
                return Err(StoreError::InvalidRequest(
                    "filter with an empty key".into(),
                ));
            }
            if m.any_of.is_empty() {
                return Err(StoreError::InvalidRequest(format!(
                    "filter on `{}` has no values (it would match nothing)",
                    m.key
                )));
            }
        }
        Ok(())
    }
}

/// Top-k nearest neighbours of `query` by the named `vector`, among points matching `filter`.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchRequest {
    /// Collection to search.
    pub collection: String,
    /// Named vector to compare `query` with.
    pub vector: String,
    /// The query embedding; its length must be the vector's dimensions.
    pub query: Vec<f32>,
    /// How many hits (or groups) to return, at most [`MAX_K`].
    pub k: usize,
    /// Only points matching this; [`PayloadFilter::none`] for all.
    pub filter: PayloadFilter,
    /// Fingerprint of the weights that embedded `query`; must equal the stored points'.
    pub fingerprint: String,
}

/// One search result.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHit {
    /// The point's string id ([`Point::id`]).
    pub id: String,
    /// Cosine similarity.
    pub score: f32,
    /// The point's payload, id key and fingerprint included.
    pub payload: Map<String, Value>,
}

/// Hits sharing one value of the grouping key, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchGroup {
    /// The grouping key's value (e.g. a slide id).
    pub key: String,
    /// Its best hits, best first.
    pub hits: Vec<SearchHit>,
}

/// Size and index state of a collection (for `gigapath status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionStats {
    /// Approximate number of points (exact: [`VectorStore::count`]).
    pub points: u64,
    /// Vectors covered by an HNSW index; the rest are searched exhaustively.
    pub indexed_vectors: u64,
    /// Storage segments the collection is split into.
    pub segments: u64,
}

/// Largest `k` a search accepts (the API applies its own, smaller limit).
pub const MAX_K: usize = 10_000;

/// The vector store. Call it from a tokio runtime (both backends need one: the embedded one moves
/// blocking work to tokio's blocking pool, the server one speaks tonic); plain threads use
/// `tokio::runtime::Handle::block_on(store.upsert(..))`.
#[async_trait]
pub trait VectorStore: Send + Sync {
    /// `"embedded"` or `"qdrant"`, for logs and status output.
    fn backend_name(&self) -> &'static str;

    /// Creates the collection if missing; otherwise checks that its vectors have the expected
    /// names and dims (`DimensionMismatch` naming both) and adds missing payload indexes.
    /// Idempotent.
    async fn ensure_collection(&self, spec: &CollectionSpec) -> Result<()>;

    /// Inserts or overwrites points (same string id, same point). Every point must carry every
    /// vector of the collection with the right dim, finite values and a non-empty fingerprint.
    /// When this returns, the points are durable (embedded: flushed to disk; server: `wait`).
    async fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<()>;

    /// Deletes by string id; unknown ids are ignored.
    async fn delete(&self, collection: &str, ids: &[String]) -> Result<()>;

    /// Points by string id, in the order asked, skipping ids that are not stored.
    async fn retrieve(
        &self,
        collection: &str,
        ids: &[String],
        with_vectors: bool,
    ) -> Result<Vec<Point>>;

    /// Deletes every point matching `filter` (e.g. a slide's tiles); an empty filter is
    /// refused (it would delete everything).
    async fn delete_by_filter(&self, collection: &str, filter: &PayloadFilter) -> Result<()>;

    /// Exact number of points matching `filter`.
    async fn count(&self, collection: &str, filter: &PayloadFilter) -> Result<u64>;

    /// Nearest neighbours, only among points with the query's fingerprint, and an error
    /// (`FingerprintMismatch`) if the collection holds points with any other fingerprint.
    async fn search(&self, request: &SearchRequest) -> Result<Vec<SearchHit>>;

    /// Nearest neighbours grouped by the keyword payload key `group_by`: up to `request.k`
    /// groups, each with up to `group_size` hits, best first (groups by their best hit). Same
    /// fingerprint rules as [`VectorStore::search`]. The server uses Qdrant's group query; the
    /// embedded backend (qdrant-edge has no group API) repeats searches that exclude the points
    /// already seen and the groups already full.
    async fn search_groups(
        &self,
        request: &SearchRequest,
        group_by: &str,
        group_size: usize,
    ) -> Result<Vec<SearchGroup>>;

    /// Some fingerprint other than `fingerprint` stored in the collection, with how many points
    /// carry a different one (0 and `None` when all match or the collection is empty).
    async fn other_fingerprint(
        &self,
        collection: &str,
        fingerprint: &str,
    ) -> Result<(u64, Option<String>)>;

    /// Points, indexed vectors and segments of a collection.
    async fn stats(&self, collection: &str) -> Result<CollectionStats>;

    /// Builds search indexes (HNSW) now and waits. Slow: not for request paths.
    async fn optimize(&self) -> Result<()>;

    /// Starts index building in the background and returns at once (at most one run at a time;
    /// a no-op for a server, which optimises by itself). Call it after an ingest batch.
    fn optimize_in_background(&self);

    /// Whether the backend answers (for readiness probes).
    async fn health(&self) -> Result<()>;
}

/// Opens the configured backend and ensures the standard collections exist with the
/// configured dims.
pub async fn open_vector_store(config: &StoreConfig) -> Result<Arc<dyn VectorStore>> {
    config.validate()?;
    let store: Arc<dyn VectorStore> = match &config.vectors {
        VectorBackendConfig::Embedded => Arc::new(EmbeddedStore::open_with_reserve(
            config.vectors_dir(),
            config.min_free_mb.saturating_mul(1 << 20),
        )?),
        VectorBackendConfig::Qdrant { .. } => {
            Arc::new(QdrantServerStore::from_config(&config.vectors)?)
        }
    };
    for spec in CollectionSpec::standard(&config.dims) {
        store.ensure_collection(&spec).await?;
    }
    Ok(store)
}

/// Quantization is fixed when a collection is created: a stored collection whose vectors
/// (`quantized`: the names that have a quantization config) disagree with the configured
/// quantization keeps working as stored, with a warning saying so.
pub(crate) fn warn_quantization(spec: &CollectionSpec, quantized: &[String]) {
    let stored_int8 = spec.vectors.iter().all(|v| quantized.contains(&v.name));
    let stored_none = quantized.is_empty();
    let mismatch = match spec.quantization {
        Quantization::Int8 => !stored_int8,
        Quantization::None => !stored_none,
    };
    if mismatch {
        tracing::warn!(
            "collection `{}` was created with {} quantization; the configured {:?} applies only \
             to a new collection (drop it and re-index to change it)",
            spec.name,
            if stored_none { "no" } else { "int8" },
            spec.quantization
        );
    }
}

/// Checks run by both backends before a write, so that bad input is rejected the same way
/// whatever stores it.
pub(crate) fn validate_points(spec: &CollectionSpec, points: &[Point]) -> Result<()> {
    for p in points {
        let bad = |reason: String| {
            Err(StoreError::InvalidPoint {
                id: p.id.clone(),
                reason,
            })
        };
        if p.id.is_empty() {
            return bad("empty id".into());
        }
        if p.fingerprint.trim().is_empty() {
            return bad("empty model fingerprint".into());
        }
        // A point carries any non-empty subset of the collection's vectors: `joint` exists only
        // once an alignment checkpoint does; searches by a vector see the points that have it.
        if p.vectors.is_empty() {
            return bad(format!("no vectors (collection `{}`)", spec.name));
        }
        for v in &spec.vectors {
            let Some(values) = p.vectors.get(&v.name) else {
                continue;
            };
            if values.len() != v.dim {
                return bad(format!(
                    "vector `{}` has {} values, collection `{}` expects {}",
                    v.name,
                    values.len(),
                    spec.name,
                    v.dim
                ));
            }
            if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                return bad(format!("vector `{}` value {i} is not finite", v.name));
            }
            if values.iter().all(|&x| x == 0.0) {
                return bad(format!(
                    "vector `{}` is all zeros (no direction for cosine)",
                    v.name
                ));
            }
        }
        if let Some(extra) = p.vectors.keys().find(|k| spec.vector_dim(k).is_none()) {
            return bad(format!(
                "vector `{extra}` is not part of collection `{}`",
                spec.name
            ));
        }
        for (reserved, own) in [
            (spec.id_key.as_str(), &p.id),
            (FINGERPRINT_KEY, &p.fingerprint),
        ] {
            match p.payload.get(reserved) {
                None => {}
                Some(Value::String(s)) if s == own => {}
                Some(other) => {
                    return bad(format!(
                        "payload `{reserved}` = {other} disagrees with the point's own field"
                    ))
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = points.iter().find(|p| !seen.insert(p.id.as_str())) {
        return Err(StoreError::InvalidPoint {
            id: dup.id.clone(),
            reason: "appears twice in one batch".into(),
        });
    }
    Ok(())
}

pub(crate) fn validate_groups(
    spec: &CollectionSpec,
    req: &SearchRequest,
    group_by: &str,
    group_size: usize,
) -> Result<()> {
    validate_search(spec, req)?;
    if !spec.keyword_indexes.iter().any(|k| k == group_by) {
        return Err(StoreError::InvalidRequest(format!(
            "cannot group `{}` by `{group_by}`: not one of its keyword-indexed keys ({})",
            spec.name,
            spec.keyword_indexes.join(", ")
        )));
    }
    if group_size == 0 || req.k.saturating_mul(group_size) > MAX_K {
        return Err(StoreError::InvalidRequest(format!(
            "{} groups of {group_size}: group size must be at least 1 and groups x size at \
             most {MAX_K}",
            req.k
        )));
    }
    Ok(())
}

/// Groups hits (best first) by the string value of `key` in their payload, keeping the order
/// of each group's best hit; hits without the key are dropped.
pub(crate) fn group_hits(
    hits: impl IntoIterator<Item = SearchHit>,
    key: &str,
    groups: &mut Vec<SearchGroup>,
    group_size: usize,
) {
    for hit in hits {
        let value = match hit.payload.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => continue,
        };
        match groups.iter_mut().find(|g| g.key == value) {
            Some(g) if g.hits.len() < group_size && !g.hits.iter().any(|h| h.id == hit.id) => {
                g.hits.push(hit)
            }
            Some(_) => {}
            None => groups.push(SearchGroup {
                key: value,
                hits: vec![hit],
            }),
        }
    }
}

pub(crate) fn validate_search(spec: &CollectionSpec, req: &SearchRequest) -> Result<()> {
    let Some(dim) = spec.vector_dim(&req.vector) else {
        return Err(StoreError::UnknownVector {
            collection: spec.name.clone(),
            vector: req.vector.clone(),
        });
    };
    if req.query.len() != dim {
        return Err(StoreError::InvalidRequest(format!(
            "query for `{}.{}` has {} values, expected {dim}",
            spec.name,
            req.vector,
            req.query.len()
        )));
    }
    if req.query.iter().any(|x| !x.is_finite()) {
        return Err(StoreError::InvalidRequest(
            "query has non-finite values".into(),
        ));
    }
    if req.k == 0 || req.k > MAX_K {
        return Err(StoreError::InvalidRequest(format!(
            "k = {}: must be between 1 and {MAX_K}",
            req.k
        )));
    }
    if req.fingerprint.trim().is_empty() {
        return Err(StoreError::InvalidRequest(
            "query fingerprint is empty".into(),
        ));
    }
    req.filter.validate()
}

/// The payload as stored: the caller's payload plus the id and fingerprint keys.
pub(crate) fn stored_payload(spec: &CollectionSpec, point: &Point) -> Map<String, Value> {
    let mut payload = point.payload.clone();
    payload.insert(spec.id_key.clone(), Value::String(point.id.clone()));
    payload.insert(
        FINGERPRINT_KEY.into(),
        Value::String(point.fingerprint.clone()),
    );
    payload
}

/// Reads back the string id and fingerprint a stored payload carries.
pub(crate) fn identity_from_payload(
    spec: &CollectionSpec,
    payload: &Map<String, Value>,
) -> Result<(String, String)> {
    let get = |key: &str| match payload.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(StoreError::SchemaMismatch {
            collection: spec.name.clone(),
            detail: format!("a stored point has no string `{key}` in its payload"),
        }),
    };
    Ok((get(&spec.id_key)?, get(FINGERPRINT_KEY)?))
}

/// Typed builder for a `slides` point (the payload DESIGN.md fixes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlidePoint {
    /// The slide id (the point's id).
    pub slide_id: String,
    /// The slide's cohort, if any (filterable as `cohort`).
    pub cohort: Option<String>,
    /// The slide's site, if any (filterable as `site`).
    pub site: Option<String>,
    /// Known labels (e.g. `subtype`), filterable as `labels.<key>`.
    pub labels: BTreeMap<String, String>,
    /// Level-0 micrometres per pixel of the slide, when known.
    pub mpp: Option<f64>,
    /// Tiles that went into the embedding.
    pub tile_count: u64,
    /// Per-role weight fingerprints (`tile`, `slide`, `text`, `alignment`), informational.
    pub fingerprints: BTreeMap<String, String>,
    /// The guard fingerprint (see [`combined_fingerprint`]).
    pub fingerprint: String,
    /// Aligned embedding; `None` until an alignment checkpoint exists.
    pub joint: Option<Vec<f32>>,
    /// Raw slide-encoder output.
    pub slide: Vec<f32>,
}

impl SlidePoint {
    /// The point to upsert into `slides`: payload as DESIGN.md fixes it, `joint` only when present.
    pub fn into_point(self) -> Point {
        let mut payload = Map::new();
        let opt = |v: Option<String>| v.map(Value::String).unwrap_or(Value::Null);
        payload.insert("cohort".into(), opt(self.cohort));
        payload.insert("site".into(), opt(self.site));
        payload.insert("labels".into(), to_json_map(&self.labels));
        payload.insert(
            "mpp".into(),
            self.mpp
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .unwrap_or(Value::Null),
        );
        payload.insert("tile_count".into(), Value::from(self.tile_count));
        payload.insert("fingerprints".into(), to_json_map(&self.fingerprints));
        Point {
            id: self.slide_id,
            fingerprint: self.fingerprint,
            vectors: named([(JOINT, self.joint), (SLIDE, Some(self.slide))]),
            payload,
        }
    }
}

/// The named vectors that are present.
fn named<const N: usize>(vectors: [(&str, Option<Vec<f32>>); N]) -> BTreeMap<String, Vec<f32>> {
    vectors
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name.to_string(), v)))
        .collect()
}

/// Typed builder for a `reports` point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportPoint {
    /// The report id (the point's id).
    pub report_id: String,
    /// The slide the report describes.
    pub slide_id: String,
    /// The report text, returned with hits.
    pub text: String,
    /// Labels carried by the report row (e.g. `subtype`, `site`), filterable as `labels.<key>`.
    pub labels: BTreeMap<String, String>,
    /// The guard fingerprint (see [`combined_fingerprint`]).
    pub fingerprint: String,
    /// Aligned embedding; `None` until an alignment checkpoint exists.
    pub joint: Option<Vec<f32>>,
    /// Raw text-encoder output.
    pub text_embedding: Vec<f32>,
}

impl ReportPoint {
    /// The point to upsert into `reports`: payload `slide_id`, `text`, `labels`; `joint` only when
    /// present.
    pub fn into_point(self) -> Point {
        let mut payload = Map::new();
        payload.insert("slide_id".into(), Value::String(self.slide_id));
        payload.insert("text".into(), Value::String(self.text));
        payload.insert("labels".into(), to_json_map(&self.labels));
        Point {
            id: self.report_id,
            fingerprint: self.fingerprint,
            vectors: named([(JOINT, self.joint), (TEXT, Some(self.text_embedding))]),
            payload,
        }
    }
}

/// Typed builder for a `tiles` point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TilePoint {
    /// The slide the tile was cut from.
    pub slide_id: String,
    /// Grid column of the tile (with `gy`, the cell).
    pub gx: u32,
    /// Grid row of the tile (with `gx`, the cell).
    pub gy: u32,
    /// Level-0 box of the tile: x, y, width, height in pixels.
    /// Left edge, level-0 pixels.
    pub x: i64,
    /// Top edge, level-0 pixels.
    pub y: i64,
    /// Width, level-0 pixels.
    pub w: u32,
    /// Height, level-0 pixels.
    pub h: u32,
    /// Tissue fraction of the tile (from the tiling), when known.
    pub tissue: Option<f32>,
    /// The slide's labels (`subtype`, ...).
    pub labels: BTreeMap<String, String>,
    /// The tile encoder's fingerprint.
    pub fingerprint: String,
    /// The tile encoder's output.
    pub tile: Vec<f32>,
}

impl TilePoint {
    /// The point to upsert into `tiles`, with id [`tile_id`] and payload `slide_id`, `gx`,
    /// `gy`, `box`, `tissue`, `labels`.
    pub fn into_point(self) -> Point {
        let mut payload = Map::new();
        payload.insert("slide_id".into(), Value::String(self.slide_id.clone()));
        payload.insert("gx".into(), Value::from(self.gx));
        payload.insert("gy".into(), Value::from(self.gy));
        payload.insert(
            "box".into(),
            serde_json::json!({"x": self.x, "y": self.y, "w": self.w, "h": self.h}),
        );
        payload.insert(
            "tissue".into(),
            self.tissue
                .and_then(|t| serde_json::Number::from_f64(f64::from(t)))
                .map(Value::Number)
                .unwrap_or(Value::Null),
        );
        payload.insert("labels".into(), to_json_map(&self.labels));
        Point {
            id: tile_id(&self.slide_id, self.gx, self.gy),
            fingerprint: self.fingerprint,
            vectors: named([(TILE, Some(self.tile))]),
            payload,
        }
    }
}

fn to_json_map(map: &BTreeMap<String, String>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// One guard fingerprint from per-role weight fingerprints: order-independent, 32 hex chars.
/// Slides and text queries embedded with the same bundle get the same string.
pub fn combined_fingerprint(parts: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (role, fp) in parts {
        h.update(role.as_bytes());
        h.update([0u8]);
        h.update(fp.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_are_deterministic_and_distinct() {
        assert_eq!(point_uuid("TCGA-01"), point_uuid("TCGA-01"));
        assert_ne!(point_uuid("TCGA-01"), point_uuid("TCGA-02"));
        assert_eq!(point_uuid("TCGA-01").get_version_num(), 5);
    }

    #[test]
    fn combined_fingerprint_ignores_insert_order_but_not_values() {
        let a = BTreeMap::from([
            ("tile".to_string(), "t1".to_string()),
            ("slide".into(), "s1".into()),
        ]);
        let mut b = BTreeMap::new();
        b.insert("slide".to_string(), "s1".to_string());
        b.insert("tile".to_string(), "t1".to_string());
        assert_eq!(combined_fingerprint(&a), combined_fingerprint(&b));
        b.insert("tile".into(), "t2".into());
        assert_ne!(combined_fingerprint(&a), combined_fingerprint(&b));
        assert_eq!(combined_fingerprint(&a).len(), 32);
    }
}
