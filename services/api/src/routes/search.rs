//! `/v1/search/slides` and `/v1/search/reports`.

use actix_web::{post, web};
use gigapath_pipeline::config::ServeConfig;
use gigapath_store::vector::{PayloadFilter, SearchRequest, JOINT, REPORTS, SLIDES, TEXT};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ids::{self, IdKind};
use super::{check_k, check_text, default_k, Filter, FilterTarget, Hit};
use crate::auth::ReadAccess;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Text to slides, or a report's slides (cross-modal). Both need an alignment checkpoint.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlideSearch {
    /// Free text, e.g. "poorly differentiated squamous cell carcinoma".
    pub query: Option<String>,
    /// Or: the slides nearest to this report's aligned embedding.
    pub report_id: Option<String>,
    /// Results wanted, 1 to `serve.max_k` (default 10).
    #[serde(default = "default_k", deserialize_with = "super::whole_number")]
    pub k: usize,
    /// Only slides matching this (default: all).
    #[serde(default)]
    pub filter: Filter,
}

/// Text to reports (by the text encoder's embedding, no alignment needed), or a slide's
/// reports (cross-modal, needs an alignment checkpoint).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportSearch {
    /// Free text, e.g. "clear cell renal cell carcinoma".
    pub query: Option<String>,
    /// Or: the reports nearest to this slide's aligned embedding.
    pub slide_id: Option<String>,
    /// Results wanted, 1 to `serve.max_k` (default 10).
    #[serde(default = "default_k", deserialize_with = "super::whole_number")]
    pub k: usize,
    /// Only reports matching this (default: all).
    #[serde(default)]
    pub filter: Filter,
}

/// The answer of a search: hits, best first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    /// The hits, best first, at most `k`.
    pub results: Vec<Hit>,
    /// Which stored vector was searched (`joint` or `text`).
    pub vector: String,
    /// Fingerprint of the weights behind the query and the results.
    pub fingerprint: String,
}

/// A search request that passed the checks its handler runs before any lookup.
#[derive(Debug)]
pub struct CheckedSearch {
    /// The query text, trimmed, when the request gives one.
    pub query: Option<String>,
    /// Results wanted, within `serve.max_k`.
    pub k: usize,
    /// The request's filter as a store filter.
    pub filter: PayloadFilter,
}

impl SlideSearch {
    /// The checks `POST /v1/search/slides` runs before touching the store or an encoder, in
    /// its order (400 on the first that fails).
    pub fn check(&self, cfg: &ServeConfig) -> ApiResult<CheckedSearch> {
        let by_id = ("report_id", self.report_id.as_deref(), IdKind::Report);
        check_search(
            self.query.as_deref(),
            by_id,
            self.k,
            &self.filter,
            FilterTarget::Slides,
            cfg,
        )
    }
}

impl ReportSearch {
    /// The checks `POST /v1/search/reports` runs before touching the store or an encoder, in
    /// its order (400 on the first that fails).
    pub fn check(&self, cfg: &ServeConfig) -> ApiResult<CheckedSearch> {
        let by_id = ("slide_id", self.slide_id.as_deref(), IdKind::Slide);
        check_search(
            self.query.as_deref(),
            by_id,
            self.k,
            &self.filter,
            FilterTarget::Reports,
            cfg,
        )
    }
}

/// The one check of both searches: exactly one of a text `query` and an id (`field`, of
/// `kind`), then `k`, the filter for `target` and the query's length.
fn check_search(
    query: Option<&str>,
    (field, id, kind): (&str, Option<&str>, IdKind),
    k: usize,
    filter: &Filter,
    target: FilterTarget,
    cfg: &ServeConfig,
) -> ApiResult<CheckedSearch> {
    exactly_one(("query", &query), (field, &id))?;
    if let Some(id) = id {
        ids::check(kind, field, id)?;
    }
    let k = check_k(k, cfg)?;
    let filter = filter.to_payload_filter(target)?;
    let query = query.map(|q| check_text("query", q, cfg)).transpose()?;
    Ok(CheckedSearch { query, k, filter })
}

fn exactly_one(a: (&str, &Option<&str>), b: (&str, &Option<&str>)) -> ApiResult<()> {
    match (a.1, b.1) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(format!(
            "give `{}` or `{}`, not both",
            a.0, b.0
        ))),
        (None, None) => Err(ApiError::BadRequest(format!("give `{}` or `{}`", a.0, b.0))),
        _ => Ok(()),
    }
}

/// The stored `joint` vector of a point, or why there is none.
async fn stored_joint(state: &AppState, collection: &'static str, id: &str) -> ApiResult<Vec<f32>> {
    let store = state.pipeline.store.clone();
    let key = id.to_string();
    let mut points = state
        .store(async move { store.vectors.retrieve(collection, &[key], true).await })
        .await?;
    let what = if collection == SLIDES {
        "slide"
    } else {
        "report"
    };
    let Some(p) = points.pop() else {
        return Err(ApiError::NotFound(format!("unknown {what} `{id}`")));
    };
    p.vectors.get(JOINT).cloned().ok_or_else(|| {
        ApiError::Conflict(format!(
            "{what} `{id}` has no aligned embedding yet (re-embed with an alignment checkpoint: gigapath reembed)"
        ))
    })
}

async fn search(
    state: &AppState,
    collection: &'static str,
    vector: &'static str,
    query: Vec<f32>,
    k: usize,
    filter: PayloadFilter,
    fingerprint: String,
) -> ApiResult<web::Json<SearchResponse>> {
    let store = state.pipeline.store.clone();
    let request = SearchRequest {
        collection: collection.into(),
        vector: vector.into(),
        query,
        k,
        filter,
        fingerprint: fingerprint.clone(),
    };
    let hits = state
        .store(async move { store.vectors.search(&request).await })
        .await?;
    Ok(web::Json(SearchResponse {
        results: hits.into_iter().map(Hit::from).collect(),
        vector: vector.into(),
        fingerprint,
    }))
}

/// Top-k slides for a text query or a report.
#[utoipa::path(
    request_body = SlideSearch,
    responses((status = 200, body = SearchResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody))
)]
#[post("/v1/search/slides")]
pub async fn search_slides(
    _r: ReadAccess,
    state: web::Data<AppState>,
    req: super::Body<SlideSearch>,
) -> ApiResult<web::Json<SearchResponse>> {
    let CheckedSearch { query, k, filter } = req.check(&state.config.serve)?;
    let query = match (query, &req.report_id) {
        (Some(q), _) => state
            .joint_texts(vec![q], "text-to-slide search")
            .await?
            .remove(0),
        (None, Some(id)) => stored_joint(&state, REPORTS, id).await?,
        (None, None) => unreachable!("checked above"),
    };
    let fingerprint = state.fingerprints().await?.slides;
    search(&state, SLIDES, JOINT, query, k, filter, fingerprint).await
}

/// Top-k reports for a text query or a slide.
#[utoipa::path(
    request_body = ReportSearch,
    responses((status = 200, body = SearchResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody))
)]
#[post("/v1/search/reports")]
pub async fn search_reports(
    _r: ReadAccess,
    state: web::Data<AppState>,
    req: super::Body<ReportSearch>,
) -> ApiResult<web::Json<SearchResponse>> {
    let CheckedSearch { query, k, filter } = req.check(&state.config.serve)?;
    let fingerprint = state.fingerprints().await?.reports;
    match (query, &req.slide_id) {
        (Some(q), _) => {
            let query = state.embed_texts(vec![q]).await?.remove(0);
            search(&state, REPORTS, TEXT, query, k, filter, fingerprint).await
        }
        (None, Some(id)) => {
            let query = stored_joint(&state, SLIDES, id).await?;
            search(&state, REPORTS, JOINT, query, k, filter, fingerprint).await
        }
        (None, None) => unreachable!("checked above"),
    }
}
