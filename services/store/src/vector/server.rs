//! Server backend: a Qdrant server or cluster over gRPC through `qdrant-client`.
//!
//! Version: `qdrant-client` 1.20, the release whose gRPC stack (tonic 0.14, prost 0.14) is the
//! one qdrant-edge 0.7.2 already builds, so the workspace compiles a single tonic. Written against
//! the client's documented builders (`CreateCollectionBuilder`, `QueryPointsBuilder`, ...). Every
//! qdrant-client type stays in this file.
//!
//! Semantics match the embedded backend (the same conformance suite runs against both): writes
//! use `wait(true)` so they are applied when `upsert` returns, counts are exact, and searches are
//! pinned to the query fingerprint and refused when the collection holds another one. Sharding
//! and replication are set when a collection is created ([`Layout`], from `[store.vectors]`);
//! moving shards and building indexes are the server's business; `optimize` is a no-op here.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::qdrant::point_id::PointIdOptions;
use qdrant_client::qdrant::r#match::MatchValue;
use qdrant_client::qdrant::vector_output::Vector as VectorOutputKind;
use qdrant_client::qdrant::vectors_config::Config as VectorsConfigKind;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    DeletePointsBuilder, Distance, FieldType, Filter, GetPointsBuilder, PointId, PointStruct,
    PointsIdsList, QuantizationSearchParamsBuilder, QuantizationType, Query,
    QueryPointGroupsBuilder, QueryPointsBuilder, RepeatedStrings, ScalarQuantizationBuilder,
    ScrollPointsBuilder, SearchParamsBuilder, UpsertPointsBuilder, VectorParamsBuilder,
    VectorsConfigBuilder, VectorsOutput,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use serde_json::{Map, Value};

use super::{
    group_hits, identity_from_payload, point_uuid, stored_payload, validate_groups,
    validate_points, validate_search, CollectionSpec, CollectionStats, PayloadFilter, Point,
    SearchGroup, SearchHit, SearchRequest, VectorStore, FINGERPRINT_KEY,
};
use crate::config::redact_url;
use crate::config::Quantization;
use crate::error::{Result, StoreError};

/// Vectors in a Qdrant server (or cluster). Cheap to share behind an `Arc`.
pub struct QdrantServerStore {
    client: Qdrant,
    url: String,
    specs: RwLock<HashMap<String, CollectionSpec>>,
    layout: Layout,
}

/// How the collections this creates are spread over a cluster (`[store.vectors]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub shard_number: u32,
    pub replication_factor: u32,
    pub write_consistency_factor: u32,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            shard_number: 1,
            replication_factor: 1,
            write_consistency_factor: 1,
        }
    }
}

impl QdrantServerStore {
    /// Builds a client for `url` (the gRPC port, 6334 by default). Connects lazily: the first
    /// call (usually [`VectorStore::ensure_collection`] or [`VectorStore::health`]) reports an
    /// unreachable server.
    pub fn connect(url: &str, api_key: Option<&str>) -> Result<Self> {
        let client = Qdrant::from_url(url)
            .api_key(api_key.map(str::to_string))
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            // The built-in check blocks the calling thread on a private runtime; `health` does
            // the same check asynchronously.
            .skip_compatibility_check()
            .build()
            .map_err(|e| StoreError::Server(format!("{}: {e}", redact_url(url))))?;
        Ok(QdrantServerStore {
            client,
            url: redact_url(url),
            specs: RwLock::new(HashMap::new()),
            layout: Layout::default(),
        })
    }

    /// The server of a `backend = "qdrant"` config, creating collections with its cluster
    /// layout (`shard_number`, `replication_factor`, `write_consistency_factor`).
    pub fn from_config(config: &crate::config::VectorBackendConfig) -> Result<Self> {
        let crate::config::VectorBackendConfig::Qdrant {
            url,
            api_key,
            shard_number,
            replication_factor,
            write_consistency_factor,
        } = config
        else {
            return Err(StoreError::Config(
                "not a Qdrant server configuration".into(),
            ));
        };
        let count = |key: &str, n: i64| {
            u32::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| {
                StoreError::Config(format!("vectors.{key} = {n}: must be 1 or more"))
            })
        };
        let layout = Layout {
            shard_number: count("shard_number", *shard_number)?,
            replication_factor: count("replication_factor", *replication_factor)?,
            write_consistency_factor: count("write_consistency_factor", *write_consistency_factor)?,
        };
        let mut store = Self::connect(url, api_key.as_deref())?;
        store.layout = layout;
        Ok(store)
    }

    /// Deletes a whole collection (tests, and dropping a superseded re-embedding).
    pub async fn drop_collection(&self, name: &str) -> Result<()> {
        self.client
            .delete_collection(name)
            .await
            .map_err(|e| self.err(e))?;
        self.specs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    fn err(&self, e: QdrantError) -> StoreError {
        // gRPC codes of a server or transport failure, as opposed to a refused request
        // (invalid argument, not found, failed precondition, permission, ...): cancelled (1),
        // unknown (2), deadline exceeded (4), resource exhausted (8), aborted (10), internal
        // (13: qdrant-client reports a refused connection as "internal: failed to connect"),
        // unavailable (14). Points are validated before they are sent, so a slide's data never
        // causes these.
        let transient = match &e {
            QdrantError::ResponseError { status } => {
                matches!(i32::from(status.code()), 1 | 2 | 4 | 8 | 10 | 13 | 14)
            }
            QdrantError::ResourceExhaustedError { .. } | QdrantError::Io(_) => true,
            _ => false,
        };
        if transient {
            return StoreError::Unavailable {
                backend: "Qdrant server",
                url: self.url.clone(),
                message: e.to_string(),
            };
        }
        StoreError::Server(format!("{}: {e}", self.url))
    }

    fn spec(&self, collection: &str) -> Result<CollectionSpec> {
        self.specs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(collection)
            .cloned()
            .ok_or_else(|| StoreError::UnknownCollection(collection.to_string()))
    }

    async fn create_collection(&self, spec: &CollectionSpec) -> Result<()> {
        let mut vectors = VectorsConfigBuilder::default();
        for v in &spec.vectors {
            let mut params = VectorParamsBuilder::new(v.dim as u64, Distance::Cosine);
            if spec.quantization == Quantization::Int8 {
                // int8 copies in RAM for the scan, originals on disk for the rescoring.
                params = params.on_disk(true).quantization_config(
                    ScalarQuantizationBuilder::default()
                        .r#type(QuantizationType::Int8.into())
                        .quantile(0.99)
                        .always_ram(true),
                );
            }
            vectors.add_named_vector_params(v.name.clone(), params);
        }
        let created = self
            .client
            .create_collection(
                CreateCollectionBuilder::new(spec.name.clone())
                    .vectors_config(vectors)
                    .on_disk_payload(true)
                    .shard_number(self.layout.shard_number)
                    .replication_factor(self.layout.replication_factor)
                    .write_consistency_factor(self.layout.write_consistency_factor),
            )
            .await;
        match created {
            Ok(_) => Ok(()),
            // Another worker created it between our exists-check and create: fine, it is
            // checked against the spec right after.
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Checks the stored vector layout; returns the payload keys that already have an index.
    async fn check_layout(&self, spec: &CollectionSpec) -> Result<Vec<String>> {
        let info = self
            .client
            .collection_info(spec.name.clone())
            .await
            .map_err(|e| self.err(e))?
            .result
            .ok_or_else(|| StoreError::Server(format!("no info for `{}`", spec.name)))?;
        let quantized: Vec<String> = match info
            .config
            .as_ref()
            .and_then(|c| c.params.as_ref())
            .and_then(|p| p.vectors_config.as_ref())
            .and_then(|v| v.config.as_ref())
        {
            Some(VectorsConfigKind::ParamsMap(map)) => map
                .map
                .iter()
                .filter(|(_, p)| p.quantization_config.is_some())
                .map(|(k, _)| k.clone())
                .collect(),
            _ => Vec::new(),
        };
        super::warn_quantization(spec, &quantized);
        let stored: HashMap<String, u64> = match info
            .config
            .and_then(|c| c.params)
            .and_then(|p| p.vectors_config)
            .and_then(|v| v.config)
        {
            Some(VectorsConfigKind::ParamsMap(map)) => {
                map.map.into_iter().map(|(k, p)| (k, p.size)).collect()
            }
            Some(VectorsConfigKind::Params(p)) => HashMap::from([(String::new(), p.size)]),
            None => HashMap::new(),
        };
        for v in &spec.vectors {
            match stored.get(&v.name) {
                Some(&found) if found as usize == v.dim => {}
                Some(&found) => {
                    return Err(StoreError::DimensionMismatch {
                        collection: spec.name.clone(),
                        vector: v.name.clone(),
                        expected: v.dim,
                        found: found as usize,
                    })
                }
                None => {
                    return Err(StoreError::SchemaMismatch {
                        collection: spec.name.clone(),
                        detail: format!("the server collection has no vector `{}`", v.name),
                    })
                }
            }
        }
        if let Some(extra) = stored.keys().find(|k| spec.vector_dim(k).is_none()) {
            return Err(StoreError::SchemaMismatch {
                collection: spec.name.clone(),
                detail: format!("the server collection has an unexpected vector `{extra}`"),
            });
        }
        Ok(info.payload_schema.into_keys().collect())
    }

    async fn count_filtered(&self, collection: &str, filter: Option<Filter>) -> Result<u64> {
        let mut request = CountPointsBuilder::new(collection).exact(true);
        if let Some(filter) = filter {
            request = request.filter(filter);
        }
        let response = self.client.count(request).await.map_err(|e| self.err(e))?;
        Ok(response.result.map(|r| r.count).unwrap_or(0))
    }

    /// `FingerprintMismatch` when the collection holds points of other weights; else the
    /// search's conditions, pinned to the query fingerprint.
    async fn guarded_conditions(&self, request: &SearchRequest) -> Result<Vec<Condition>> {
        let (other_points, example) = self
            .other_fingerprint(&request.collection, &request.fingerprint)
            .await?;
        if other_points > 0 {
            return Err(StoreError::FingerprintMismatch {
                collection: request.collection.clone(),
                query: request.fingerprint.clone(),
                other_points,
                example: example.unwrap_or_default(),
            });
        }
        let mut conditions = to_filter(&request.filter);
        conditions.push(keyword_condition(
            FINGERPRINT_KEY,
            std::slice::from_ref(&request.fingerprint),
        ));
        Ok(conditions)
    }

    fn scored_hit(
        spec: &CollectionSpec,
        scored: qdrant_client::qdrant::ScoredPoint,
    ) -> Result<SearchHit> {
        let payload = payload_to_json(scored.payload);
        let (id, _) = identity_from_payload(spec, &payload)?;
        Ok(SearchHit {
            id,
            score: scored.score,
            payload,
        })
    }
}

fn point_id(id: &str) -> PointId {
    PointId::from(point_uuid(id).to_string())
}

/// Exact keyword match. Built explicitly: qdrant-client's `From<String> for MatchValue` turns a
/// value containing whitespace into a full-text match, which would make `cohort = "CPTAC lung"`
/// behave differently here than in the embedded backend.
fn keyword_condition(key: &str, values: &[String]) -> Condition {
    let value = match values {
        [one] => MatchValue::Keyword(one.clone()),
        many => MatchValue::Keywords(RepeatedStrings {
            strings: many.to_vec(),
        }),
    };
    Condition::matches(key, value)
}

fn to_filter(filter: &PayloadFilter) -> Vec<Condition> {
    filter
        .must
        .iter()
        .map(|m| keyword_condition(&m.key, &m.any_of))
        .collect()
}

/// Rescoring with the original vectors on a quantized collection.
fn search_params(spec: &CollectionSpec) -> Option<SearchParamsBuilder> {
    (spec.quantization == Quantization::Int8).then(|| {
        SearchParamsBuilder::default().quantization(
            QuantizationSearchParamsBuilder::default()
                .rescore(true)
                .oversampling(2.0),
        )
    })
}

fn payload_to_json(payload: HashMap<String, qdrant_client::qdrant::Value>) -> Map<String, Value> {
    match Value::from(Payload::from(payload)) {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn vectors_from_output(
    output: Option<VectorsOutput>,
    spec: &CollectionSpec,
) -> BTreeMap<String, Vec<f32>> {
    let Some(output) = output else {
        return BTreeMap::new();
    };
    spec.vectors
        .iter()
        .filter_map(|v| match output.get_vector_by_name(&v.name) {
            Some(VectorOutputKind::Dense(dense)) => Some((v.name.clone(), dense.data)),
            _ => None,
        })
        .collect()
}

#[async_trait]
impl VectorStore for QdrantServerStore {
    fn backend_name(&self) -> &'static str {
        "qdrant"
    }

    async fn ensure_collection(&self, spec: &CollectionSpec) -> Result<()> {
        spec.validate()?;
        let exists = self
            .client
            .collection_exists(spec.name.clone())
            .await
            .map_err(|e| self.err(e))?;
        if !exists {
            self.create_collection(spec).await?;
        }
        let indexed = self.check_layout(spec).await?;
        for key in spec.keyword_indexes.iter().filter(|k| !indexed.contains(k)) {
            self.client
                .create_field_index(
                    CreateFieldIndexCollectionBuilder::new(
                        spec.name.clone(),
                        key.clone(),
                        FieldType::Keyword,
                    )
                    .wait(true),
                )
                .await
                .map_err(|e| self.err(e))?;
        }
        self.specs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.name.clone(), spec.clone());
        Ok(())
    }

    async fn upsert(&self, collection: &str, points: Vec<Point>) -> Result<()> {
        let spec = self.spec(collection)?;
        validate_points(&spec, &points)?;
        if points.is_empty() {
            return Ok(());
        }
        let structs =
            points
                .iter()
                .map(|p| {
                    let payload = Payload::try_from(Value::Object(stored_payload(&spec, p)))
                        .map_err(|e| StoreError::InvalidPoint {
                            id: p.id.clone(),
                            reason: e.to_string(),
                        })?;
                    let vectors: HashMap<String, Vec<f32>> = p
                        .vectors
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    Ok(PointStruct::new(point_id(&p.id), vectors, payload))
                })
                .collect::<Result<Vec<_>>>()?;
        self.client
            .upsert_points(UpsertPointsBuilder::new(collection, structs).wait(true))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn delete(&self, collection: &str, ids: &[String]) -> Result<()> {
        self.spec(collection)?;
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.iter().map(|id| point_id(id)).collect();
        self.client
            .delete_points(
                DeletePointsBuilder::new(collection)
                    .points(PointsIdsList { ids })
                    .wait(true),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn retrieve(
        &self,
        collection: &str,
        ids: &[String],
        with_vectors: bool,
    ) -> Result<Vec<Point>> {
        let spec = self.spec(collection)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let request_ids: Vec<PointId> = ids.iter().map(|id| point_id(id)).collect();
        let response = self
            .client
            .get_points(
                GetPointsBuilder::new(collection, request_ids)
                    .with_payload(true)
                    .with_vectors(with_vectors),
            )
            .await
            .map_err(|e| self.err(e))?;
        let mut by_uuid: HashMap<String, Point> = HashMap::new();
        for record in response.result {
            let uuid = match record.id.and_then(|id| id.point_id_options) {
                Some(PointIdOptions::Uuid(u)) => u,
                other => {
                    return Err(StoreError::Server(format!(
                        "`{collection}` returned a point id {other:?}, expected a UUID"
                    )))
                }
            };
            let payload = payload_to_json(record.payload);
            let (id, fingerprint) = identity_from_payload(&spec, &payload)?;
            let vectors = vectors_from_output(record.vectors, &spec);
            by_uuid.insert(
                uuid,
                Point {
                    id,
                    fingerprint,
                    vectors,
                    payload,
                },
            );
        }
        Ok(ids
            .iter()
            .filter_map(|id| by_uuid.remove(&point_uuid(id).to_string()))
            .collect())
    }

    async fn count(&self, collection: &str, filter: &PayloadFilter) -> Result<u64> {
        self.spec(collection)?;
        filter.validate()?;
        let filter = (!filter.is_empty()).then(|| Filter::must(to_filter(filter)));
        self.count_filtered(collection, filter).await
    }

    async fn search(&self, request: &SearchRequest) -> Result<Vec<SearchHit>> {
        let spec = self.spec(&request.collection)?;
        validate_search(&spec, request)?;
        let conditions = self.guarded_conditions(request).await?;
        let mut query = QueryPointsBuilder::new(request.collection.clone())
            .query(Query::new_nearest(request.query.clone()))
            .using(request.vector.clone())
            .filter(Filter::must(conditions))
            .limit(request.k as u64)
            .with_payload(true);
        if let Some(params) = search_params(&spec) {
            query = query.params(params);
        }
        let response = self.client.query(query).await.map_err(|e| self.err(e))?;
        response
            .result
            .into_iter()
            .map(|scored| Self::scored_hit(&spec, scored))
            .collect()
    }

    async fn search_groups(
        &self,
        request: &SearchRequest,
        group_by: &str,
        group_size: usize,
    ) -> Result<Vec<SearchGroup>> {
        let spec = self.spec(&request.collection)?;
        validate_groups(&spec, request, group_by, group_size)?;
        let conditions = self.guarded_conditions(request).await?;
        let mut query = QueryPointGroupsBuilder::new(request.collection.clone(), group_by)
            .query(Query::new_nearest(request.query.clone()))
            .using(request.vector.clone())
            .filter(Filter::must(conditions))
            .limit(request.k as u64)
            .group_size(group_size as u64)
            .with_payload(true);
        if let Some(params) = search_params(&spec) {
            query = query.params(params);
        }
        let response = self
            .client
            .query_groups(query)
            .await
            .map_err(|e| self.err(e))?;
        // Regrouped by the payload value, so the keys read the same on both backends.
        let mut groups = Vec::new();
        for group in response.result.map(|r| r.groups).unwrap_or_default() {
            let hits = group
                .hits
                .into_iter()
                .map(|scored| Self::scored_hit(&spec, scored))
                .collect::<Result<Vec<_>>>()?;
            group_hits(hits, group_by, &mut groups, group_size);
        }
        Ok(groups)
    }

    async fn delete_by_filter(&self, collection: &str, filter: &PayloadFilter) -> Result<()> {
        self.spec(collection)?;
        filter.validate()?;
        if filter.is_empty() {
            return Err(StoreError::InvalidRequest(
                "delete by filter with an empty filter (it would delete everything)".into(),
            ));
        }
        self.client
            .delete_points(
                DeletePointsBuilder::new(collection)
                    .points(Filter::must(to_filter(filter)))
                    .wait(true),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn other_fingerprint(
        &self,
        collection: &str,
        fingerprint: &str,
    ) -> Result<(u64, Option<String>)> {
        self.spec(collection)?;
        let others = Filter::must_not([keyword_condition(
            FINGERPRINT_KEY,
            &[fingerprint.to_string()],
        )]);
        let n = self
            .count_filtered(collection, Some(others.clone()))
            .await?;
        if n == 0 {
            return Ok((0, None));
        }
        let response = self
            .client
            .scroll(
                ScrollPointsBuilder::new(collection)
                    .filter(others)
                    .limit(1)
                    .with_payload(true),
            )
            .await
            .map_err(|e| self.err(e))?;
        let example = response.result.into_iter().find_map(|r| {
            match payload_to_json(r.payload).remove(FINGERPRINT_KEY) {
                Some(Value::String(s)) => Some(s),
                _ => None,
            }
        });
        Ok((n, example))
    }

    async fn stats(&self, collection: &str) -> Result<CollectionStats> {
        self.spec(collection)?;
        let info = self
            .client
            .collection_info(collection)
            .await
            .map_err(|e| self.err(e))?
            .result
            .ok_or_else(|| StoreError::Server(format!("no info for `{collection}`")))?;
        Ok(CollectionStats {
            points: info.points_count.unwrap_or(0),
            indexed_vectors: info.indexed_vectors_count.unwrap_or(0),
            segments: info.segments_count,
        })
    }

    async fn optimize(&self) -> Result<()> {
        Ok(())
    }

    fn optimize_in_background(&self) {}

    async fn health(&self) -> Result<()> {
        let reply = self.client.health_check().await.map_err(|e| self.err(e))?;
        tracing::debug!(url = %self.url, version = %reply.version, "Qdrant server is up");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dims;
    use crate::vector::conformance;

    /// Runs the trait suite against a real server when `QDRANT_URL` is set (e.g.
    /// `http://localhost:6334` from `docker compose up qdrant`); otherwise says so and passes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_suite_against_server() {
        let Ok(url) = std::env::var("QDRANT_URL") else {
            eprintln!(
                "SKIPPED conformance_suite_against_server: set QDRANT_URL (e.g. \
                 http://localhost:6334) to run the vector-store suite against a Qdrant server"
            );
            return;
        };
        let api_key = std::env::var("QDRANT_API_KEY").ok();
        let store = QdrantServerStore::connect(&url, api_key.as_deref()).unwrap();
        store
            .health()
            .await
            .expect("QDRANT_URL is set but the server does not answer");
        let dims = Dims {
            joint: 8,
            slide: 12,
            text: 6,
            tile: 10,
        };
        let prefix = format!(
            "gigapath_test_{}_{}_",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        let specs = conformance::specs(&prefix, &dims);
        for spec in &specs {
            store.ensure_collection(spec).await.unwrap();
        }
        // Run in a task so that a failed assertion (a panic) still lets us drop the collections.
        let store = std::sync::Arc::new(store);
        let outcome = {
            let store = store.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move { conformance::run_all(&*store, &dims, &prefix).await }).await
        };
        for name in conformance::created_collections(&prefix, &dims) {
            let _ = store.drop_collection(&name).await;
        }
        if let Err(err) = outcome {
            std::panic::resume_unwind(err.into_panic());
        }
        // A shared server must not collect test debris run after run.
        let left: Vec<String> = store
            .client
            .list_collections()
            .await
            .unwrap()
            .collections
            .into_iter()
            .map(|c| c.name)
            .filter(|name| name.starts_with(&prefix))
            .collect();
        assert!(
            left.is_empty(),
            "the suite left collections behind: {left:?}"
        );
    }

    #[test]
    fn bad_url_is_a_clear_error() {
        let err = QdrantServerStore::connect("not a url", None)
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("not a url"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_server_is_reported_with_its_url() {
        // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        let store = QdrantServerStore::connect("http://127.0.0.1:9", None).unwrap();
        let err = store.health().await.unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
        let err = store
            .ensure_collection(&CollectionSpec::slides(&Dims::default()))
            .await
            .unwrap_err();
        // Typed as an outage (retried with back-off by workers), not as a bad request.
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        assert!(err.is_transient());
    }
}
