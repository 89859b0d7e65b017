//! Embedded backend: one qdrant-edge shard per collection under `<root>/<collection>`.
//!
//! Every qdrant-edge type stays inside this file, so that an upgrade touches one place.
//!
//! Version: `qdrant-edge = "=0.7.2"`. 0.8.0 and 0.9.0 do not compile on rustc 1.95: they use
//! `std::debug_assert_matches` (stable from 1.96; E0658 in `src/shard/optimize.rs`). 0.7.2 builds
//! unpatched. When the toolchain reaches 1.96, re-check the pitfalls below (0.9 returns a `Result`
//! from `flush` and renamed several aliases).
//!
//! Pitfalls of 0.7.2 this wrapper works around (measured; the notes are in the repository at
//! `docs/qdrant-edge-0.7.2.md`):
//! - `EdgeShard::flush` `expect`s a `try_lock` on the WAL and a `try_read` on the segment holder,
//!   so it panics if another thread is inside `update` or an optimizer is swapping segments.
//!   All writes, flushes and `optimize` of a shard run under that shard's `write_lock`; reads
//!   (query, count, retrieve, scroll) are lock-free.
//! - `EdgeShard::load` does not replay the WAL: an update that was not flushed is lost on a crash.
//!   Hence every write is flushed before `upsert`/`delete` return (the pipeline marks a slide done in
//!   the catalog only after that), and a `kill -9` never leaves a "done" slide without its point.
//! - Everything is blocking: every call runs on tokio's blocking pool (`spawn_blocking`).
//! - `optimize` (HNSW build) is slow and runs its threads at low priority: it never runs on a request
//!   path, only through [`VectorStore::optimize`] or in a background thread.
//! - `PointStruct::new` panics on a non-object payload: we only ever pass objects.
//! - The shard has no inter-process lock: we hold an exclusive `flock` on `<root>/.lock` for the
//!   lifetime of the store, so a second process gets a clear error instead of corrupting segments.
//!   (Several processes sharing vectors need the Qdrant server backend.)
//! - The WAL is never truncated by 0.7.2 (no `ack`); it grows by roughly the size of the
//!   written points. Acceptable at cohort scale; noted for the upgrade.
//! - On a full disk `flush` panics (`segments flushed: No space left on device`), `Drop` flushes
//!   too, and a page of a sparse memory-mapped segment file written on a full disk is a SIGBUS.
//!   So a write first checks that the disk keeps the configured reserve free after it
//!   ([`crate::disk::ensure_free`]; refused with a "disk full" error naming the folder, nothing
//!   written), and as a backstop every call that flushes (`flush`, `Drop`, `load`, `new`) runs
//!   inside `catch_unwind`, its panic becoming an error (and its message kept off stderr). A
//!   refused or failed write was not acknowledged; everything acknowledged before it is on disk,
//!   and the store works again (and reopens) once space is freed.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};

use async_trait::async_trait;
use qdrant_edge::{
    CountRequest, CreateIndex, Distance, EdgeConfig, EdgeShard, EdgeVectorParams, FieldCondition,
    FieldIndexOperations, Filter, HasIdCondition, JsonPath, Match, NamedQuery, PayloadFieldSchema,
    PayloadSchemaType, PointId, PointInsertOperations, PointOperations, PointStruct,
    QuantizationSearchParams, QueryEnum, QueryRequest, ScalarQuantizationConfig, ScalarType,
    ScoringQuery, ScrollRequest, SearchParams, UpdateOperation, VectorInternal,
    VectorStructInternal, Vectors, WithPayloadInterface, WithVector,
};
use serde_json::{Map, Value};

use super::{
    group_hits, identity_from_payload, point_uuid, stored_payload, validate_groups,
    validate_points, validate_search, CollectionSpec, CollectionStats, PayloadFilter, Point,
    SearchGroup, SearchHit, SearchRequest, VectorStore, FINGERPRINT_KEY, MAX_K,
};
use crate::config::Quantization;
use crate::disk;
use crate::error::{Result, StoreError};

/// Vectors in qdrant-edge shards on local disk. Cheap to clone (shared state).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    collections: RwLock<HashMap<String, Arc<Shard>>>,
    optimizing: AtomicBool,
    /// A write must leave at least this many bytes free on the store's file system.
    min_free_bytes: u64,
    /// Held (flock) while the store is open; released when the file closes.
    _lock: File,
}

struct Shard {
    spec: CollectionSpec,
    path: PathBuf,
    /// Dropped by hand, inside `catch_unwind` (its `Drop` flushes, which panics on a full disk).
    edge: ManuallyDrop<EdgeShard>,
    write_lock: Mutex<()>,
    min_free_bytes: u64,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store folder and takes its process lock, with the
    /// default free-space reserve ([`disk::DEFAULT_MIN_FREE_MB`]). Collections are opened by
    /// [`VectorStore::ensure_collection`].
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with_reserve(root, disk::DEFAULT_MIN_FREE_MB << 20)
    }

    /// [`EmbeddedStore::open`], refusing any write that would leave less than
    /// `min_free_bytes` free on the store's file system (0: no check).
    pub fn open_with_reserve(root: impl Into<PathBuf>, min_free_bytes: u64) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| StoreError::io("create vector dir", &root, e))?;
        let lock_path = root.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open lock file", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Embedded {
                    path: root,
                    message: "in use by another process: the embedded store serves one process \
                              at a time (configure a Qdrant server to share vectors)"
                        .into(),
                })
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(StoreError::io("lock", lock_path, e));
            }
        }
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                root,
                collections: RwLock::new(HashMap::new()),
                optimizing: AtomicBool::new(false),
                min_free_bytes,
                _lock: lock,
            }),
        })
    }

    /// The folder it was opened at (`<data dir>/vectors` when opened from a config).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Segments holding more than `kb` KiB of vectors get an HNSW index on the next optimisation
    /// (qdrant's default is about 10 MB; below it search is exhaustive, which is fast at that
    /// size). Applies to the collections open now and is persisted with them.
    pub fn set_indexing_threshold_kb(&self, kb: usize) -> Result<()> {
        if kb == 0 {
            return Err(StoreError::InvalidRequest(
                "indexing threshold must be positive (0 would disable indexing)".into(),
            ));
        }
        for shard in self.shards() {
            shard.set_indexing_threshold_kb(kb)?;
        }
        Ok(())
    }

    fn shard(&self, collection: &str) -> Result<Arc<Shard>> {
        let map = self
            .inner
            .collections
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(collection)
            .cloned()
            .ok_or_else(|| StoreError::UnknownCollection(collection.to_string()))
    }

    fn shards(&self) -> Vec<Arc<Shard>> {
        let map = self
            .inner
            .collections
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.values().cloned().collect()
    }

    /// Runs `f` with a shard on the blocking pool.
    async fn with_shard<T, F>(&self, collection: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shard) -> Result<T> + Send + 'static,
    {
        let shard = self.shard(collection)?;
        tokio::task::spawn_blocking(move || f(&shard)).await?
    }
}

impl Shard {
    fn open(root: &Path, spec: &CollectionSpec, min_free_bytes: u64) -> Result<Shard> {
        let path = root.join(&spec.name);
        let fresh = is_fresh_shard_dir(&path)?;
        let edge = if fresh {
            fs::create_dir_all(&path).map_err(|e| disk::io_error("create shard dir", &path, e))?;
            // A new shard allocates a 32 MB write-ahead-log segment at once.
            disk::ensure_free(&path, WAL_SEGMENT_BYTES, min_free_bytes)?;
            let mut config = EdgeConfig::builder().on_disk_payload(true);
            for v in &spec.vectors {
                let mut params = EdgeVectorParams::builder(v.dim, Distance::Cosine);
                if spec.quantization == Quantization::Int8 {
                    // int8 copies in RAM for the scan, originals on disk for the rescoring.
                    params = params.on_disk(true).quantization_config(
                        ScalarQuantizationConfig {
                            r#type: ScalarType::Int8,
                            quantile: Some(0.99),
                            always_ram: Some(true),
                        }
                        .into(),
                    );
                }
                config = config.vector(v.name.clone(), params.build());
            }
            let config = config.build();
            guarded(&path, "create", || EdgeShard::new(&path, config))?
                .map_err(|e| edge_err(&path, e))?
        } else {
            guarded(&path, "load", || EdgeShard::load(&path, None))?
                .map_err(|e| edge_err(&path, e))?
        };
        let shard = Shard {
            spec: spec.clone(),
            path,
            edge: ManuallyDrop::new(edge),
            write_lock: Mutex::new(()),
            min_free_bytes,
        };
        shard.check_layout()?;
        shard.ensure_indexes()?;
        Ok(shard)
    }

    fn check_layout(&self) -> Result<()> {
        let config = self.edge.config();
        let quantized: Vec<String> = config
            .vectors
            .iter()
            .filter(|(_, p)| p.quantization_config.is_some())
            .map(|(k, _)| k.to_string())
            .collect();
        super::warn_quantization(&self.spec, &quantized);
        for v in &self.spec.vectors {
            let Some(params) = config.vectors.get(&v.name) else {
                return Err(StoreError::SchemaMismatch {
                    collection: self.spec.name.clone(),
                    detail: format!("the stored collection has no vector `{}`", v.name),
                });
            };
            if params.size != v.dim {
                return Err(StoreError::DimensionMismatch {
                    collection: self.spec.name.clone(),
                    vector: v.name.clone(),
                    expected: v.dim,
                    found: params.size,
                });
            }
            if params.distance != Distance::Cosine {
                return Err(StoreError::SchemaMismatch {
                    collection: self.spec.name.clone(),
                    detail: format!(
                        "vector `{}` uses {:?} distance, expected Cosine",
                        v.name, params.distance
                    ),
                });
            }
        }
        if let Some(extra) = config
            .vectors
            .keys()
            .find(|k| self.spec.vector_dim(k).is_none())
        {
            return Err(StoreError::SchemaMismatch {
                collection: self.spec.name.clone(),
                detail: format!("the stored collection has an unexpected vector `{extra}`"),
            });
        }
        Ok(())
    }

    fn ensure_indexes(&self) -> Result<()> {
        let existing = self.edge.info().payload_schema;
        let missing: Vec<&String> = self
            .spec
            .keyword_indexes
            .iter()
            .filter(|key| !existing.keys().any(|k| k.to_string() == **key))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.write(1 << 20, |edge| {
            for key in &missing {
                let field_name = json_path(key)?;
                edge.update(UpdateOperation::FieldIndexOperation(
                    FieldIndexOperations::CreateIndex(CreateIndex {
                        field_name,
                        field_schema: Some(PayloadFieldSchema::FieldType(
                            PayloadSchemaType::Keyword,
                        )),
                    }),
                ))
                .map_err(|e| edge_err(&self.path, e))?;
            }
            Ok(())
        })
    }

    /// Runs a write of about `bytes` under the shard lock, after checking the disk keeps its
    /// reserve, and flushes before releasing the lock (see module docs).
    fn write<T>(&self, bytes: u64, f: impl FnOnce(&EdgeShard) -> Result<T>) -> Result<T> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        disk::ensure_free(&self.path, bytes, self.min_free_bytes)?;
        let out = f(&self.edge)?;
        guarded(&self.path, "flush", || self.edge.flush())?;
        Ok(out)
    }

    fn upsert(&self, points: Vec<Point>) -> Result<()> {
        validate_points(&self.spec, &points)?;
        if points.is_empty() {
            return Ok(());
        }
        let bytes = upsert_bytes(&points);
        let structs = points
            .iter()
            .map(|p| {
                let vectors = Vectors::new_named(
                    p.vectors
                        .iter()
                        .map(|(name, values)| (name.clone(), values.clone())),
                );
                let payload = Value::Object(stored_payload(&self.spec, p));
                PointStruct::new(PointId::Uuid(point_uuid(&p.id)), vectors, payload).into()
            })
            .collect();
        self.write(bytes, |edge| {
            edge.update(UpdateOperation::PointOperation(
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(structs)),
            ))
            .map_err(|e| edge_err(&self.path, e))
        })
    }

    fn delete(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let bytes = 1 << 20;
        let ids = ids.iter().map(|id| PointId::Uuid(point_uuid(id))).collect();
        self.write(bytes, |edge| {
            edge.update(UpdateOperation::PointOperation(
                PointOperations::DeletePoints { ids },
            ))
            .map_err(|e| edge_err(&self.path, e))
        })
    }

    fn retrieve(&self, ids: &[String], with_vectors: bool) -> Result<Vec<Point>> {
        let point_ids: Vec<PointId> = ids.iter().map(|id| PointId::Uuid(point_uuid(id))).collect();
        let records = self
            .edge
            .retrieve(
                &point_ids,
                Some(WithPayloadInterface::Bool(true)),
                Some(WithVector::Bool(with_vectors)),
            )
            .map_err(|e| edge_err(&self.path, e))?;
        records
            .into_iter()
            .map(|r| {
                let payload = r.payload.map(|p| p.0).unwrap_or_default();
                self.to_point(payload, r.vector)
            })
            .collect()
    }

    fn to_point(
        &self,
        payload: Map<String, Value>,
        vector: Option<VectorStructInternal>,
    ) -> Result<Point> {
        let (id, fingerprint) = identity_from_payload(&self.spec, &payload)?;
        let mut vectors = BTreeMap::new();
        match vector {
            None => {}
            Some(VectorStructInternal::Named(named)) => {
                for (name, v) in named {
                    if let VectorInternal::Dense(values) = v {
                        vectors.insert(name, values);
                    }
                }
            }
            Some(other) => {
                return Err(StoreError::SchemaMismatch {
                    collection: self.spec.name.clone(),
                    detail: format!("point `{id}` has unnamed vectors: {other:?}"),
                })
            }
        }
        Ok(Point {
            id,
            fingerprint,
            vectors,
            payload,
        })
    }

    fn count(&self, filter: Option<Filter>) -> Result<u64> {
        let n = self
            .edge
            .count(CountRequest {
                filter,
                exact: true,
            })
            .map_err(|e| edge_err(&self.path, e))?;
        Ok(n as u64)
    }

    fn other_fingerprint(&self, fingerprint: &str) -> Result<(u64, Option<String>)> {
        let others =
            Filter::new_must_not(keyword_condition(FINGERPRINT_KEY, &[fingerprint.into()])?);
        let n = self.count(Some(others.clone()))?;
        if n == 0 {
            return Ok((0, None));
        }
        let (records, _) = self
            .edge
            .scroll(ScrollRequest {
                limit: Some(1),
                filter: Some(others),
                with_payload: Some(WithPayloadInterface::Bool(true)),
                with_vector: WithVector::Bool(false),
                ..ScrollRequest::default()
            })
            .map_err(|e| edge_err(&self.path, e))?;
        let example = records.into_iter().filter_map(|r| r.payload).find_map(|p| {
            match p.0.get(FINGERPRINT_KEY) {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            }
        });
        Ok((n, example))
    }

    fn delete_by_filter(&self, filter: Filter) -> Result<()> {
        self.write(1 << 20, |edge| {
            edge.update(UpdateOperation::PointOperation(
                PointOperations::DeletePointsByFilter(filter),
            ))
            .map_err(|e| edge_err(&self.path, e))
        })
    }

    fn search(&self, req: &SearchRequest) -> Result<Vec<SearchHit>> {
        validate_search(&self.spec, req)?;
        self.check_fingerprint(req)?;
        self.query_hits(req, req.k, Vec::new(), Vec::new())
    }

    /// Qdrant's group-by, emulated: each round searches the points not seen yet, outside the
    /// groups already full (and, once `k` groups are known, inside those groups only), so
    /// every round adds hits and scores never go up from one round to the next.
    fn search_groups(
        &self,
        req: &SearchRequest,
        group_by: &str,
        group_size: usize,
    ) -> Result<Vec<SearchGroup>> {
        validate_groups(&self.spec, req, group_by, group_size)?;
        self.check_fingerprint(req)?;
        let mut groups: Vec<SearchGroup> = Vec::new();
        let mut seen: Vec<PointId> = Vec::new();
        let limit = (req.k * group_size).clamp(16, MAX_K);
        loop {
            let mut must = Vec::new();
            let mut must_not = Vec::new();
            let full: Vec<String> = groups
                .iter()
                .filter(|g| g.hits.len() >= group_size)
                .map(|g| g.key.clone())
                .collect();
            if groups.len() >= req.k {
                let open: Vec<String> = groups[..req.k]
                    .iter()
                    .filter(|g| g.hits.len() < group_size)
                    .map(|g| g.key.clone())
                    .collect();
                if open.is_empty() {
                    break;
                }
                must.push(keyword_condition(group_by, &open)?);
            } else if !full.is_empty() {
                must_not.push(keyword_condition(group_by, &full)?);
            }
            if !seen.is_empty() {
                must_not.push(qdrant_edge::Condition::HasId(
                    seen.iter().cloned().collect::<HasIdCondition>(),
                ));
            }
            let hits = self.query_hits(req, limit, must, must_not)?;
            let exhausted = hits.len() < limit;
            seen.extend(hits.iter().map(|h| PointId::Uuid(point_uuid(&h.id))));
            group_hits(hits, group_by, &mut groups, group_size);
            if exhausted {
                break;
            }
        }
        groups.truncate(req.k);
        Ok(groups)
    }

    /// `FingerprintMismatch` when the collection holds points of other weights.
    fn check_fingerprint(&self, req: &SearchRequest) -> Result<()> {
        let (other_points, example) = self.other_fingerprint(&req.fingerprint)?;
        if other_points > 0 {
            return Err(StoreError::FingerprintMismatch {
                collection: self.spec.name.clone(),
                query: req.fingerprint.clone(),
                other_points,
                example: example.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// The top `limit` points by `req`'s query and filter plus `must` / `must_not`.
    fn query_hits(
        &self,
        req: &SearchRequest,
        limit: usize,
        must: Vec<qdrant_edge::Condition>,
        must_not: Vec<qdrant_edge::Condition>,
    ) -> Result<Vec<SearchHit>> {
        // The filter also pins the fingerprint, so a point written between the fingerprint
        // check and this query cannot slip into the results.
        let mut filter = to_edge_filter(&req.filter)?;
        let all_must = filter.must.get_or_insert_with(Vec::new);
        all_must.push(keyword_condition(
            FINGERPRINT_KEY,
            std::slice::from_ref(&req.fingerprint),
        )?);
        all_must.extend(must);
        if !must_not.is_empty() {
            filter.must_not = Some(must_not);
        }
        let params = (self.spec.quantization == Quantization::Int8).then(|| SearchParams {
            quantization: Some(QuantizationSearchParams {
                ignore: false,
                rescore: Some(true),
                oversampling: Some(2.0),
            }),
            ..SearchParams::default()
        });
        let scored = self
            .edge
            .query(QueryRequest {
                prefetches: vec![],
                query: Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery::new(
                    VectorInternal::Dense(req.query.clone()),
                    req.vector.clone(),
                )))),
                filter: Some(filter),
                score_threshold: None,
                limit,
                offset: 0,
                params,
                with_vector: WithVector::Bool(false),
                with_payload: WithPayloadInterface::Bool(true),
            })
            .map_err(|e| edge_err(&self.path, e))?;
        scored
            .into_iter()
            .map(|sp| {
                let payload = sp.payload.map(|p| p.0).unwrap_or_default();
                let (id, _) = identity_from_payload(&self.spec, &payload)?;
                Ok(SearchHit {
                    id,
                    score: sp.score,
                    payload,
                })
            })
            .collect()
    }

    fn stats(&self) -> CollectionStats {
        let info = self.edge.info();
        CollectionStats {
            points: info.points_count as u64,
            indexed_vectors: info.indexed_vectors_count as u64,
            segments: info.segments_count as u64,
        }
    }

    fn set_indexing_threshold_kb(&self, kb: usize) -> Result<()> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut optimizers = self.edge.config().optimizers.clone();
        optimizers.indexing_threshold = Some(kb);
        self.edge
            .set_optimizers_config(optimizers)
            .map_err(|e| edge_err(&self.path, e))
    }

    fn optimize(&self) -> Result<bool> {
        // An optimisation rewrites segments: it may need as much again as the shard holds.
        let bytes = dir_bytes(&self.path);
        self.write(bytes, |edge| {
            guarded(&self.path, "optimize", || edge.optimize())?
                .map_err(|e| edge_err(&self.path, e))
        })
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let path = self.path.clone();
        // SAFETY: `edge` is never used again: this is the shard's own drop.
        let edge = unsafe { ManuallyDrop::take(&mut self.edge) };
        if let Err(err) = guarded(&path, "close (flush)", move || drop(edge)) {
            tracing::error!("{err}");
        }
    }
}

/// Size of one write-ahead-log segment of qdrant-edge 0.7.2 (`WalOptions::default`).
const WAL_SEGMENT_BYTES: u64 = 32 << 20;

/// Disk an upsert may take: the WAL entry, the vectors and the payload, each about the size of
/// the points, plus a WAL segment in case this write opens a new one.
fn upsert_bytes(points: &[Point]) -> u64 {
    let one = |p: &Point| {
        let floats: usize = p.vectors.values().map(Vec::len).sum();
        let payload = serde_json::to_string(&p.payload).map_or(0, |s| s.len());
        (floats * 4 + payload + p.id.len() + 64) as u64
    };
    3 * points.iter().map(one).sum::<u64>() + WAL_SEGMENT_BYTES
}

/// Bytes of the files under `dir` (allocated size is not needed: an estimate).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

thread_local! {
    /// Set while this thread runs a [`guarded`] call: its panic is reported as an error, so
    /// the panic hook keeps quiet.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, a qdrant-edge call that may panic (see module docs), turning a panic into an error
/// on the shard at `path` ("disk full" when the message says so).
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let out = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    out.map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let full = ["No space left", "ENOSPC", "os error 28", "Disk quota"]
            .iter()
            .any(|m| msg.contains(m));
        if full {
            disk::full_disk(
                path,
                std::io::Error::other(format!("qdrant-edge {what}: {msg}")),
            )
        } else {
            edge_err(path, format!("{what} failed inside qdrant-edge: {msg}"))
        }
    })
}

/// A shard folder that holds neither a config nor segments (absent, empty, or left by a crash
/// inside `EdgeShard::new` before anything was written) is created anew.
fn is_fresh_shard_dir(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(true);
    }
    if path.join("edge_config.json").exists() {
        return Ok(false);
    }
    let segments = path.join("segments");
    let has_segments = match fs::read_dir(&segments) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(StoreError::io("read", segments, e)),
    };
    Ok(!has_segments)
}

/// `opened` was checked against the disk; `wanted` is what a caller now asks for.
fn compare_specs(opened: &CollectionSpec, wanted: &CollectionSpec) -> Result<()> {
    for v in &wanted.vectors {
        match opened.vector_dim(&v.name) {
            Some(found) if found == v.dim => {}
            Some(found) => {
                return Err(StoreError::DimensionMismatch {
                    collection: wanted.name.clone(),
                    vector: v.name.clone(),
                    expected: v.dim,
                    found,
                })
            }
            None => {
                return Err(StoreError::SchemaMismatch {
                    collection: wanted.name.clone(),
                    detail: format!("the stored collection has no vector `{}`", v.name),
                })
            }
        }
    }
    if opened != wanted {
        return Err(StoreError::SchemaMismatch {
            collection: wanted.name.clone(),
            detail: format!("already open with another layout: {opened:?}"),
        });
    }
    Ok(())
}

fn json_path(key: &str) -> Result<JsonPath> {
    key.parse::<JsonPath>()
        .map_err(|_| StoreError::InvalidRequest(format!("`{key}` is not a valid payload key path")))
}

fn keyword_condition(key: &str, values: &[String]) -> Result<qdrant_edge::Condition> {
    let r#match = match values {
        [one] => Match::from(one.clone()),
        many => Match::from(many.to_vec()),
    };
    Ok(qdrant_edge::Condition::Field(FieldCondition::new_match(
        json_path(key)?,
        r#match,
    )))
}

fn to_edge_filter(filter: &PayloadFilter) -> Result<Filter> {
    let mut out = Filter::new();
    if !filter.must.is_empty() {
        out.must = Some(
            filter
                .must
                .iter()
                .map(|m| keyword_condition(&m.key, &m.any_of))
                .collect::<Result<_>>()?,
        );
    }
    Ok(out)
}

fn edge_err(path: &Path, err: impl std::fmt::Display) -> StoreError {
    StoreError::Embedded {
        path: path.to_path_buf(),
        message: err.to_string(),
    }
}

#[async_trait]
impl VectorStore for EmbeddedStore {
    fn backend_name(&self) -> &'static str {
        "embedded"
    }

    async fn ensure_collection(&self, spec: &CollectionSpec) -> Result<()> {
        spec.validate()?;
        if let Ok(existing) = self.shard(&spec.name) {
            // Already open in this process: compare with the layout it was opened (and checked)
            // with, never load the same shard folder twice.
            return compare_specs(&existing.spec, spec);
        }
        let root = self.inner.root.clone();
        let spec_owned = spec.clone();
        let min_free = self.inner.min_free_bytes;
        let shard = tokio::task::spawn_blocking(move || Shard::open(&root, &spec_owned, min_free))
            .await??;
        let mut map = self
            .inner
            .collections
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Two concurrent callers may both open it; keep the first, drop (and flush) the second.
        map.entry(spec.name.clone())
            .or_insert_with(|| Arc::new(shard));
        Ok(())
    }

    async fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<()> {
        self.with_shard(collection, move |s| s.upsert(points)).await
    }

    async fn delete(&self, collection: &str, ids: &[String]) -> Result<()> {
        let ids = ids.to_vec();
        self.with_shard(collection, move |s| s.delete(&ids)).await
    }

    async fn retrieve(
        &self,
        collection: &str,
        ids: &[String],
        with_vectors: bool,
    ) -> Result<Vec<Point>> {
        let ids = ids.to_vec();
        self.with_shard(collection, move |s| s.retrieve(&ids, with_vectors))
            .await
    }

    async fn count(&self, collection: &str, filter: &PayloadFilter) -> Result<u64> {
        filter.validate()?;
        let filter = if filter.is_empty() {
            None
        } else {
            Some(to_edge_filter(filter)?)
        };
        self.with_shard(collection, move |s| s.count(filter)).await
    }

    async fn delete_by_filter(&self, collection: &str, filter: &PayloadFilter) -> Result<()> {
        filter.validate()?;
        if filter.is_empty() {
            return Err(StoreError::InvalidRequest(
                "delete by filter with an empty filter (it would delete everything)".into(),
            ));
        }
        let filter = to_edge_filter(filter)?;
        self.with_shard(collection, move |s| s.delete_by_filter(filter))
            .await
    }

    async fn search(&self, request: &SearchRequest) -> Result<Vec<SearchHit>> {
        let request = request.clone();
        let collection = request.collection.clone();
        self.with_shard(&collection, move |s| s.search(&request))
            .await
    }

    async fn search_groups(
        &self,
        request: &SearchRequest,
        group_by: &str,
        group_size: usize,
    ) -> Result<Vec<SearchGroup>> {
        let request = request.clone();
        let group_by = group_by.to_string();
        let collection = request.collection.clone();
        self.with_shard(&collection, move |s| {
            s.search_groups(&request, &group_by, group_size)
        })
        .await
    }

    async fn other_fingerprint(
        &self,
        collection: &str,
        fingerprint: &str,
    ) -> Result<(u64, Option<String>)> {
        let fingerprint = fingerprint.to_string();
        self.with_shard(collection, move |s| s.other_fingerprint(&fingerprint))
            .await
    }

    async fn stats(&self, collection: &str) -> Result<CollectionStats> {
        self.with_shard(collection, |s| Ok(s.stats())).await
    }

    async fn optimize(&self) -> Result<()> {
        let shards = self.shards();
        tokio::task::spawn_blocking(move || {
            for shard in shards {
                shard.optimize()?;
            }
            Ok(())
        })
        .await?
    }

    fn optimize_in_background(&self) {
        if self.inner.optimizing.swap(true, Ordering::AcqRel) {
            return; // one run at a time; the running one will see the new points
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vector-optimize".into())
            .spawn(move || {
                for shard in store.shards() {
                    match shard.optimize() {
                        Ok(changed) => tracing::info!(
                            collection = %shard.spec.name,
                            changed,
                            "vector index optimisation finished"
                        ),
                        Err(err) => tracing::warn!(
                            collection = %shard.spec.name,
                            error = %err,
                            "vector index optimisation failed"
                        ),
                    }
                }
                store.inner.optimizing.store(false, Ordering::Release);
            });
        if let Err(err) = spawned {
            self.inner.optimizing.store(false, Ordering::Release);
            tracing::warn!(error = %err, "could not start the optimisation thread");
        }
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dims;
    use crate::vector::{conformance, JOINT, SLIDES};

    fn dims() -> Dims {
        Dims {
            joint: 8,
            slide: 12,
            text: 6,
            tile: 10,
        }
    }

    async fn open(dir: &Path) -> EmbeddedStore {
        let store = EmbeddedStore::open(dir).unwrap();
        for spec in CollectionSpec::standard(&dims()) {
            store.ensure_collection(&spec).await.unwrap();
        }
        store
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        conformance::run_all(&store, &dims(), "").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_points_and_checks_dims() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).await;
            conformance::upsert_sample(&store, "", 50).await;
        }
        let store = open(dir.path()).await;
        assert_eq!(
            store
                .count(super::super::SLIDES, &PayloadFilter::none())
                .await
                .unwrap(),
            50
        );
        drop(store);

        let wrong = EmbeddedStore::open(dir.path()).unwrap();
        let err = wrong
            .ensure_collection(&CollectionSpec::slides(&Dims {
                joint: 16,
                ..dims()
            }))
            .await
            .unwrap_err();
        match err {
            StoreError::DimensionMismatch {
                ref collection,
                ref vector,
                expected: 16,
                found: 8,
            } if collection == "slides" && vector == "joint" => {}
            other => panic!("expected a joint dim mismatch, got {other}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::open(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open in this process
        // conflicts exactly like another process would.
        let err = EmbeddedStore::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }

    /// Writers keep upserting (each write flushes) while HNSW is built in the background: with
    /// qdrant-edge 0.7.2 an unguarded flush during an update or a segment swap panics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_during_background_hnsw_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        // 800 points x 20 floats x 4 B = 62 KiB: well above 16 KiB, so optimize builds HNSW.
        store.set_indexing_threshold_kb(16).unwrap();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for batch in 0..10u64 {
                    let points = (0..20u64)
                        .map(|i| {
                            let seed = t * 1000 + batch * 20 + i;
                            conformance::slide_point(&format!("p{seed}"), "fp", &dims(), seed)
                        })
                        .collect();
                    store.upsert(SLIDES, points).await.unwrap();
                    if batch % 3 == 1 {
                        store.optimize_in_background();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        store.optimize().await.unwrap();
        let stats = store.stats(SLIDES).await.unwrap();
        assert_eq!(
            store.count(SLIDES, &PayloadFilter::none()).await.unwrap(),
            800
        );
        assert!(stats.indexed_vectors > 0, "HNSW was built: {stats:?}");

        // Every stored vector still finds itself through the index.
        for seed in [0u64, 1019, 2133, 3199] {
            let point = conformance::slide_point(&format!("p{seed}"), "fp", &dims(), seed);
            let hits = store
                .search(&SearchRequest {
                    collection: SLIDES.into(),
                    vector: JOINT.into(),
                    query: point.vectors[JOINT].clone(),
                    k: 1,
                    filter: PayloadFilter::none(),
                    fingerprint: "fp".into(),
                })
                .await
                .unwrap();
            assert_eq!(hits[0].id, point.id);
        }

        // And everything survives a reopen.
        drop(store);
        let store = open(dir.path()).await;
        assert_eq!(
            store.count(SLIDES, &PayloadFilter::none()).await.unwrap(),
            800
        );
    }

    /// The tiles collection stores int8 copies in RAM and the originals on disk; once its
    /// segments are optimised (HNSW over quantized vectors), searches rescored with the
    /// originals still find the exact top 10 and the exact best tiles per slide.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quantized_tiles_keep_exact_recall_after_indexing() {
        use crate::config::Quantization;
        use crate::vector::{TILE, TILES};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let dims = Dims { tile: 48, ..dims() };
        store
            .ensure_collection(&CollectionSpec::tiles(&dims, Quantization::Int8))
            .await
            .unwrap();
        let config = store.shard(TILES).unwrap().edge.config().vectors[TILE].clone();
        assert_eq!(config.on_disk, Some(true));
        assert!(
            matches!(
                config.quantization_config,
                Some(qdrant_edge::QuantizationConfig::Scalar(_))
            ),
            "{config:?}"
        );
        // 12 slides x 250 tiles x 48 floats x 4 B = 576 KiB: above 64 KiB, so optimize indexes.
        let points = conformance::tile_points(12, 250, dims.tile, "fp-T");
        for batch in points.chunks(500) {
            store.upsert(TILES, batch.to_vec()).await.unwrap();
        }
        store.set_indexing_threshold_kb(64).unwrap();
        store.optimize().await.unwrap();
        let stats = store.stats(TILES).await.unwrap();
        assert_eq!(stats.points, 3000);
        assert!(stats.indexed_vectors > 0, "HNSW was built: {stats:?}");
        let recall = conformance::tile_search_recall(&store, TILES, &points).await;
        assert_eq!(recall, 1.0);

        // Unquantized, the same layout otherwise.
        let plain = CollectionSpec::tiles(&dims, Quantization::None);
        let err = store.ensure_collection(&plain).await.unwrap_err();
        assert!(err.to_string().contains("another layout"), "{err}");
    }

    /// The ingest cost of tile points at full width: 20,000 tiles of 1536 floats upserted in
    /// batches of 256 (as the pipeline does), each batch flushed. Prints tiles/s and the disk
    /// taken. `cargo test --workspace --lib tile_upsert_cost -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement (README: ingest cost of tile points)"]
    async fn tile_upsert_cost() {
        use crate::config::Quantization;
        use crate::vector::TILES;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let dims = Dims {
            tile: 1536,
            ..dims()
        };
        store
            .ensure_collection(&CollectionSpec::tiles(&dims, Quantization::Int8))
            .await
            .unwrap();
        let points = conformance::tile_points(10, 2000, 1536, "fp-T");
        let start = std::time::Instant::now();
        for batch in points.chunks(256) {
            store.upsert(TILES, batch.to_vec()).await.unwrap();
        }
        let upsert = start.elapsed().as_secs_f64();
        let bytes = dir_bytes(dir.path());
        let start = std::time::Instant::now();
        store.optimize().await.unwrap();
        let optimize = start.elapsed().as_secs_f64();
        eprintln!(
            "tile points: {} upserted in {upsert:.2} s ({:.0} tiles/s), {:.0} MB on disk; \
             optimize (HNSW + int8) {optimize:.1} s, {:.0} MB after",
            points.len(),
            points.len() as f64 / upsert,
            bytes as f64 / 1e6,
            dir_bytes(dir.path()) as f64 / 1e6
        );
        assert_eq!(
            store.count(TILES, &PayloadFilter::none()).await.unwrap(),
            20_000
        );
    }

    /// Issue 13 item 6: on a full disk qdrant-edge panicked in its flush (exit 101) and the
    /// store could not reopen. Now a write that would eat into the reserve is refused with an
    /// error naming the disk, reads go on, nothing acknowledged is lost, and once space is
    /// freed writes work again and the store reopens with everything.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_disk_refuses_writes_cleanly_and_recovers() {
        let Some(small) = disk::LoopDisk::new(400) else {
            return;
        };
        let root = small.path().join("vectors");
        let reserve = 64 << 20;
        let open = |root: PathBuf| async move {
            let store = EmbeddedStore::open_with_reserve(root, reserve).unwrap();
            for spec in CollectionSpec::standard(&dims()) {
                store.ensure_collection(&spec).await.unwrap();
            }
            store
        };
        let store = open(root.clone()).await;
        conformance::upsert_sample(&store, "", 50).await;

        let filler = small.fill(reserve / 2);
        let late = conformance::slide_point("late", "fp", &dims(), 7);
        let err = store
            .upsert(SLIDES, vec![late.clone()])
            .await
            .expect_err("a write into the reserve was accepted");
        let msg = err.to_string();
        assert!(
            msg.contains("disk full")
                && msg.contains(&root.join(SLIDES).display().to_string())
                && msg.contains("store.min_free_mb"),
            "{msg}"
        );
        assert!(
            matches!(&err, StoreError::Io { err, .. } if err.kind() == std::io::ErrorKind::StorageFull)
        );
        let none = PayloadFilter::none();
        assert_eq!(store.count(SLIDES, &none).await.unwrap(), 50);
        assert!(store.delete(SLIDES, &["s0".into()]).await.is_err());

        std::fs::remove_file(filler).unwrap();
        store.upsert(SLIDES, vec![late]).await.unwrap();
        assert_eq!(store.count(SLIDES, &none).await.unwrap(), 51);
        drop(store);
        let store = open(root).await;
        assert_eq!(store.count(SLIDES, &none).await.unwrap(), 51);
        assert_eq!(
            store
                .retrieve(SLIDES, &["late".into()], true)
                .await
                .unwrap()[0]
                .vectors
                .len(),
            2
        );
    }

    /// The backstop: a panic inside a qdrant-edge call becomes an error naming the shard, "disk
    /// full" when its message says so.
    #[test]
    fn a_panic_inside_qdrant_edge_becomes_an_error() {
        let shard = Path::new("/data/vectors/slides");
        let err = guarded(shard, "flush", || -> u8 {
            panic!(
                "segments flushed: Service internal error: No space left on device (os error 28)"
            )
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("disk full") && err.contains("/data/vectors/slides"),
            "{err}"
        );
        let err = guarded(shard, "flush", || -> u8 { panic!("WAL lock acquired") })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("flush failed inside qdrant-edge: WAL lock acquired"),
            "{err}"
        );
        assert_eq!(guarded(shard, "flush", || 7).unwrap(), 7);
    }

    /// Child half of `acknowledged_writes_survive_kill_9` (does nothing unless run by it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run as a child process by acknowledged_writes_survive_kill_9"]
    async fn kill9_writer_child() {
        let Ok(dir) = std::env::var("GIGAPATH_KILL9_DIR") else {
            return;
        };
        let store = open(Path::new(&dir)).await;
        for batch in 0u64.. {
            let points = (0..10u64)
                .map(|i| {
                    let seed = batch * 10 + i;
                    conformance::slide_point(&format!("k{seed}"), "fp", &dims(), seed)
                })
                .collect();
            store.upsert(SLIDES, points).await.unwrap();
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "ACK {}", (batch + 1) * 10).unwrap();
            out.flush().unwrap();
        }
    }

    /// A writer process is killed with SIGKILL mid-stream: every point whose upsert returned is
    /// there after reopening (qdrant-edge 0.7.2 does not replay its WAL, so this holds only
    /// because each write is flushed before `upsert` returns).
    #[test]
    fn acknowledged_writes_survive_kill_9() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "vector::edge::tests::kill9_writer_child",
                "--ignored",
                "--nocapture",
            ])
            .env("GIGAPATH_KILL9_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked = 0u64;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("ACK ") {
                acked = n.parse().unwrap();
                if acked >= 200 {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(acked >= 200, "child stopped early after {acked} points");

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = open(dir.path()).await;
            let stored = store.count(SLIDES, &PayloadFilter::none()).await.unwrap();
            assert!(stored >= acked, "{stored} stored < {acked} acknowledged");
            let ids: Vec<String> = (0..acked).map(|i| format!("k{i}")).collect();
            let got = store.retrieve(SLIDES, &ids, true).await.unwrap();
            assert_eq!(got.len() as u64, acked);
            assert!(got.iter().all(|p| p.vectors.len() == 2));
        });
    }
}
