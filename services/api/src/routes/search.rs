//! `/v1/search/slides` and `/v1/search/reports`.

use std::collections::BTreeMap;

use actix_web::{post, web};
use gigapath_store::vector::{combined_fingerprint, SearchRequest, JOINT, REPORTS, SLIDES, TEXT};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{check_k, check_text, default_k, Filter, Hit};
use crate::auth::ReadAccess;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Text to slides (needs an alignment checkpoint), or a report's slides (cross-modal).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlideSearch {
    /// Free text, e.g. "poorly differentiated squamous cell carcinoma".
    pub query: Option<String>,
    /// Or: the slides nearest to this report's aligned embedding.
    pub report_id: Option<String>,
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default)]
    pub filter: Filter,
}

/// Text to reports (by text embedding), or a slide's reports (cross-modal, needs alignment).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportSearch {
    pub query: Option<String>,
    /// Or: the reports nearest to this slide's aligned embedding.
    pub slide_id: Option<String>,
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default)]
    pub filter: Filter,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    pub results: Vec<Hit>,
    /// Which stored vector was searched (`joint`, `text`).
    pub vector: String,
    /// Fingerprint of the weights behind the query and the results.
    pub fingerprint: String,
}

fn exactly_one<'a>(a: (&str, &'a Option<String>), b: (&str, &'a Option<String>)) -> ApiResult<()> {
    match (a.1, b.1) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(format!(
            "give `{}` or `{}`, not both",
            a.0, b.0
        ))),
        (None, None) => Err(ApiError::BadRequest(format!("give `{}` or `{}`", a.0, b.0))),
        _ => Ok(()),
    }
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
    req: web::Json<SlideSearch>,
) -> ApiResult<web::Json<SearchResponse>> {
    let cfg = &state.config.serve;
    exactly_one(("query", &req.query), ("report_id", &req.report_id))?;
    let k = check_k(req.k, cfg)?;
    let filter = req.filter.to_payload_filter()?;
    if let Some(q) = &req.query {
        check_text("query", q, cfg)?;
    }
    let _ = (k, filter);
    Err(no_alignment("text-to-slide search"))
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
    req: web::Json<ReportSearch>,
) -> ApiResult<web::Json<SearchResponse>> {
    let cfg = &state.config.serve;
    exactly_one(("query", &req.query), ("slide_id", &req.slide_id))?;
    let k = check_k(req.k, cfg)?;
    let filter = req.filter.to_payload_filter()?;
    if req.slide_id.is_some() {
        return Err(no_alignment("slide-to-report search"));
    }
    let query = check_text("query", req.query.as_deref().unwrap_or_default(), cfg)?;
    let text_fp = state
        .compute(|p| Ok(p.text_model()?.fingerprint.clone()))
        .await?;
    let fingerprint = combined_fingerprint(&BTreeMap::from([("text".to_string(), text_fp)]));
    let vector = state.embed_texts(vec![query]).await?.remove(0);
    let store = state.pipeline.store.clone();
    let request = SearchRequest {
        collection: REPORTS.into(),
        vector: TEXT.into(),
        query: vector,
        k,
        filter,
        fingerprint: fingerprint.clone(),
    };
    let hits = state
        .store(async move { store.vectors.search(&request).await })
        .await?;
    Ok(web::Json(SearchResponse {
        results: hits.into_iter().map(Hit::from).collect(),
        vector: TEXT.into(),
        fingerprint,
    }))
}

fn no_alignment(what: &str) -> ApiError {
    let _ = (JOINT, SLIDES);
    ApiError::Conflict(format!(
        "{what} needs an alignment checkpoint: train one (gigapath train) and serve with models.alignment set"
    ))
}
