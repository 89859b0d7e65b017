//! `/v1/ingest` (queue slides for the workers) and `/v1/status`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use actix_web::{get, post, web, HttpResponse};
use gigapath_pipeline::discover::find_slides;
use gigapath_pipeline::queue::{queue_slides, QueueSummary};
use gigapath_pipeline::Status;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{AdminKey, ReadAccess};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Slides to embed: files or folders on the server, under the configured slide roots.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestRequest {
    /// Paths of slide files or folders (searched recursively).
    pub slides: Vec<String>,
    /// Level-0 um/px for slides that record none.
    pub mpp: Option<f64>,
    /// Queue slides that failed before again.
    #[serde(default)]
    pub retry_failed: bool,
    /// Labels per slide id (e.g. `{"S1": {"subtype": "LUAD", "site": "lung"}}`).
    #[serde(default)]
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IngestResponse {
    pub queued: Vec<String>,
    pub already_done: Vec<String>,
    /// `[slide id, reason]` of slides that failed before and were not retried.
    #[schema(value_type = Vec<Vec<String>>)]
    pub previously_failed: Vec<(String, String)>,
}

impl From<QueueSummary> for IngestResponse {
    fn from(q: QueueSummary) -> Self {
        IngestResponse {
            queued: q.queued,
            already_done: q.already_done,
            previously_failed: q.previously_failed,
        }
    }
}

/// A requested path, resolved with symlinks followed, must lie under a slide root.
pub fn confine(requested: &str, roots: &[PathBuf]) -> ApiResult<PathBuf> {
    if roots.is_empty() {
        return Err(ApiError::Forbidden(
            "ingest over HTTP is disabled: no slide roots are configured (serve.slide_roots)"
                .into(),
        ));
    }
    if requested.is_empty() || requested.contains('\0') {
        return Err(ApiError::BadRequest("empty or invalid slide path".into()));
    }
    // A path that does not resolve is an unknown resource (404); one we may not read, 403.
    let resolved = std::fs::canonicalize(requested).map_err(|e| {
        let msg = format!("slide path `{requested}`: {e}");
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => ApiError::Forbidden(msg),
            _ => ApiError::NotFound(msg),
        }
    })?;
    let inside = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|root| resolved.starts_with(&root));
    if inside {
        Ok(resolved)
    } else {
        Err(ApiError::Forbidden(format!(
            "slide path `{requested}` is outside the configured slide roots"
        )))
    }
}

/// Registers slides and queues their embedding for the workers (admin key needed). Returns at
/// once; `GET /v1/status` shows progress.
#[utoipa::path(
    request_body = IngestRequest,
    responses((status = 202, body = IngestResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody, description = "A path does not exist, or holds no slide files")),
    security(("api_key" = []))
)]
#[post("/v1/ingest")]
pub async fn ingest(
    _k: AdminKey,
    state: web::Data<AppState>,
    req: super::Body<IngestRequest>,
) -> ApiResult<HttpResponse> {
    let req = req.into_inner();
    if req.slides.is_empty() {
        return Err(ApiError::BadRequest("`slides` is empty".into()));
    }
    if req.slides.len() > state.config.serve.max_slide_ids {
        return Err(ApiError::BadRequest(format!(
            "{} paths; the limit is {}",
            req.slides.len(),
            state.config.serve.max_slide_ids
        )));
    }
    if let Some(mpp) = req.mpp {
        gigapath_wsi::mpp::validate(mpp).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    let roots = state.config.serve.slide_roots.clone();
    let paths = req.slides.clone();
    let models = state.config.models.clone();
    let (slides, fingerprint) = state
        .compute(move |_| {
            let confined = paths
                .iter()
                .map(|p| confine(p, &roots))
                .collect::<ApiResult<Vec<_>>>()?;
            let slides = find_slides(&confined)?;
            if slides.is_empty() {
                return Err(ApiError::NotFound(
                    "no slide files found at the given paths".into(),
                ));
            }
            let fps = gigapath_pipeline::encoders::slide_fingerprints(&models)?;
            Ok((slides, gigapath_store::vector::combined_fingerprint(&fps)))
        })
        .await?;
    let store = state.pipeline.store.clone();
    let config = state.config.clone();
    let summary = state
        .pipeline
        .spawn(async move {
            queue_slides(
                &store,
                &config,
                &slides,
                &req.labels,
                &fingerprint,
                req.mpp,
                req.retry_failed,
            )
            .await
        })
        .await??;
    Ok(HttpResponse::Accepted().json(IngestResponse::from(summary)))
}

/// Counts of slides, jobs, reports and points.
#[utoipa::path(responses((status = 200, body = Object)))]
#[get("/v1/status")]
pub async fn status(_r: ReadAccess, state: web::Data<AppState>) -> ApiResult<web::Json<Status>> {
    let store = state.pipeline.store.clone();
    let status = state
        .pipeline
        .spawn(async move { gigapath_pipeline::status::status(&store).await })
        .await??;
    Ok(web::Json(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_a_root_even_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("slides");
        let outside = d.path().join("secret");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("a.svs"), b"x").unwrap();
        std::fs::write(outside.join("b.svs"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.join("b.svs"), root.join("link.svs")).unwrap();
        let roots = vec![root.clone()];
        assert!(confine(root.join("a.svs").to_str().unwrap(), &roots).is_ok());
        let dotdot = format!("{}/../secret/b.svs", root.display());
        assert!(matches!(
            confine(&dotdot, &roots),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            confine(root.join("link.svs").to_str().unwrap(), &roots),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            confine(root.join("nope.svs").to_str().unwrap(), &roots),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(confine("x", &[]), Err(ApiError::Forbidden(_))));
    }
}
