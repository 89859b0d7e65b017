//! `/v1/ingest` (queue slides for the workers) and `/v1/status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use actix_web::{get, post, web, HttpResponse};
use gigapath_pipeline::config::ServeConfig;
use gigapath_pipeline::discover::{find_slides_within, resolve_or_predict, DiscoverError, Limits};
use gigapath_pipeline::identity::{bind_sources, conflicts, forget_slide, Forgotten, Known};
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
    /// Re-embed a slide id already known from a different file (other size or content) from
    /// the file given now; without it such a file is refused with 409, naming both paths.
    #[serde(default)]
    pub replace: bool,
    /// Labels per slide id (e.g. `{"S1": {"subtype": "LUAD", "site": "lung"}}`).
    #[serde(default)]
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// What `POST /v1/ingest` queued (202): slides are embedded in the background.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestResponse {
    /// Slide ids queued for embedding.
    pub queued: Vec<String>,
    /// Slide ids already embedded with the current weights: skipped.
    pub already_done: Vec<String>,
    /// `[slide id, reason]` of slides that failed before and were not retried.
    #[schema(value_type = Vec<Vec<String>>)]
    pub previously_failed: Vec<(String, String)>,
    /// Ids whose earlier embedding (from another file) was removed (`replace`); also queued.
    pub replaced: Vec<String>,
}

impl From<QueueSummary> for IngestResponse {
    fn from(q: QueueSummary) -> Self {
        IngestResponse {
            queued: q.queued,
            already_done: q.already_done,
            previously_failed: q.previously_failed,
            replaced: Vec::new(),
        }
    }
}

impl IngestRequest {
    /// The checks `POST /v1/ingest` runs on the body before any path is resolved: 1 to
    /// `serve.max_slide_ids` paths, a valid `mpp`, valid slide ids as the keys of `labels`.
    /// (Each path is then checked by [`confine`].)
    pub fn check(&self, cfg: &ServeConfig) -> ApiResult<()> {
        if self.slides.is_empty() {
            return Err(ApiError::BadRequest("`slides` is empty".into()));
        }
        if self.slides.len() > cfg.max_slide_ids {
            return Err(ApiError::BadRequest(format!(
                "{} paths; the limit is {}",
                self.slides.len(),
                cfg.max_slide_ids
            )));
        }
        if let Some(mpp) = self.mpp {
            gigapath_wsi::mpp::validate(mpp).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        }
        // The keys of `labels` are slide ids: the one id rule, like every other id field.
        super::ids::check_all(super::ids::IdKind::Slide, "labels", self.labels.keys())
    }
}

/// A requested path, resolved with symlinks followed, must lie under a slide root. Outside the
/// roots the answer is one 403 whether the path exists or not (no existence oracle); a missing
/// path is 404 only when it would lie under a root.
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
    let roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let inside = |p: &Path| roots.iter().any(|root| p.starts_with(root));
    let outside = || {
        ApiError::Forbidden(format!(
            "slide path `{requested}` is outside the configured slide roots"
        ))
    };
    match std::fs::canonicalize(requested) {
        Ok(resolved) if inside(&resolved) => Ok(resolved),
        Ok(_) => Err(outside()),
        Err(e) => match resolve_or_predict(Path::new(requested)) {
            Some(p) if inside(&p) => Err(match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    ApiError::Forbidden(format!("slide path `{requested}`: {e}"))
                }
                _ => ApiError::NotFound(format!("slide path `{requested}` does not exist")),
            }),
            _ => Err(outside()),
        },
    }
}

/// Registers slides and queues their embedding for the workers (admin key needed). Returns at
/// once; `GET /v1/status` shows progress.
#[utoipa::path(
    request_body = IngestRequest,
    responses((status = 202, body = IngestResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody, description = "A path (or anything a folder links to) is outside the slide roots, whether it exists or not"),
              (status = 404, body = crate::error::ErrorBody, description = "A path under the slide roots does not exist, or holds no slide files"),
              (status = 409, body = crate::error::ErrorBody, description = "A slide id already stands for a different file (pass `replace`)")),
    security(("api_key" = []))
)]
#[post("/v1/ingest")]
pub async fn ingest(
    _k: AdminKey,
    state: web::Data<AppState>,
    req: super::Body<IngestRequest>,
) -> ApiResult<HttpResponse> {
    let req = req.into_inner();
    req.check(&state.config.serve)?;
    let roots = state.config.serve.slide_roots.clone();
    let paths = req.slides.clone();
    let replace = req.replace;
    // Reads only (paths, files, catalog), bounded: a folder walk stops at `Limits` and visits
    // each folder once, so a link loop cannot keep a blocking thread busy.
    let (slides, sources, fingerprint) = state
        .compute(move |p| {
            let confined = paths
                .iter()
                .map(|p| confine(p, &roots))
                .collect::<ApiResult<Vec<_>>>()?;
            let slides = find_slides_within(&confined, Some(roots.as_slice()), &Limits::default())
                .map_err(|e| match e {
                    DiscoverError::OutsideRoots { .. } => ApiError::Forbidden(e.to_string()),
                    DiscoverError::Other(e) => e.into(),
                })?;
            if slides.is_empty() {
                return Err(ApiError::NotFound(
                    "no slide files found at the given paths".into(),
                ));
            }
            let sources = p.check_sources(&slides)?;
            if !replace {
                if let Some(msg) = conflicts(&sources) {
                    return Err(ApiError::Conflict(msg));
                }
            }
            // The models of this request's heads (a reloaded alignment included).
            let fps = gigapath_pipeline::encoders::slide_fingerprints(&p.config.models)?;
            Ok((
                slides,
                sources,
                gigapath_store::vector::combined_fingerprint(&fps),
            ))
        })
        .await?;
    let store = state.pipeline.store.clone();
    let config = state.config.clone();
    let summary = state
        .pipeline
        .spawn(async move {
            // Replacing: the earlier file's embedding goes before the new file is registered.
            let mut replaced = Vec::new();
            for s in sources
                .iter()
                .filter(|s| matches!(s.known, Known::Different { .. }))
            {
                if let Forgotten::Busy { job_id } = forget_slide(&store, &s.id, false).await? {
                    return Err(ApiError::Conflict(format!(
                        "slide `{}` is being embedded right now (job {job_id}); replace it once \
                         that is done",
                        s.id
                    )));
                }
                replaced.push(s.id.clone());
            }
            let queued = queue_slides(
                &store,
                &config,
                &slides,
                &req.labels,
                &fingerprint,
                req.mpp,
                req.retry_failed,
            )
            .await?;
            bind_sources(&store, &sources).await?;
            Ok(IngestResponse {
                replaced,
                ..IngestResponse::from(queued)
            })
        })
        .await??;
    Ok(HttpResponse::Accepted().json(summary))
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
        assert!(matches!(
            confine(root.join("no/such/dir/x.svs").to_str().unwrap(), &roots),
            Err(ApiError::NotFound(_))
        ));
        // Outside the roots: one answer whether the path exists or not (no existence oracle).
        let exists = confine(outside.join("b.svs").to_str().unwrap(), &roots);
        let missing = confine(outside.join("nope.svs").to_str().unwrap(), &roots);
        let dotdot_missing = format!("{}/nope/../../secret/b.svs", root.display());
        for (r, p) in [
            (exists, outside.join("b.svs").display().to_string()),
            (missing, outside.join("nope.svs").display().to_string()),
            (confine(&dotdot_missing, &roots), dotdot_missing.clone()),
        ] {
            match r {
                Err(ApiError::Forbidden(m)) => assert_eq!(
                    m,
                    format!("slide path `{p}` is outside the configured slide roots")
                ),
                other => panic!("{p}: {other:?}"),
            }
        }
        assert!(matches!(confine("x", &[]), Err(ApiError::Forbidden(_))));
        // Through a dangling link: where it points decides, not whether the target exists.
        std::os::unix::fs::symlink(outside.join("gone"), root.join("out")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("in")).unwrap();
        assert!(matches!(
            confine(root.join("out/x.svs").to_str().unwrap(), &roots),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            confine(root.join("in/x.svs").to_str().unwrap(), &roots),
            Err(ApiError::NotFound(_))
        ));
    }
}
