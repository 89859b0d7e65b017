//! Heads trained on labelled slides (`gigapath probe train`, crate `gigapath-probe`) applied to
//! stored slides: `POST /v1/classify`, the heads in the data dir: `GET /v1/probes`, and an
//! attention-MIL head's per-tile attention as a heatmap: `POST /v1/classify/heatmap` (the
//! prompt heatmap's response, drawn by the same page code).
//!
//! A head reads the slide vectors (or, attention MIL, the tile features) its manifest names and
//! refuses inputs made by other weights (409), so an answer never mixes a head with embeddings
//! it was not trained on. Heads are read from `DATA_DIR/probes/<name>/` on each request: a head
//! trained while the service runs is served at once.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::{get, post, web};
use gigapath_probe::{artefact, Manifest, ProbeError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::ReadAccess;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Which head, which slides.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// A head of `/v1/probes` (`gigapath probe list`), e.g. `rcc-linear`.
    pub head: String,
    /// Stored slides to classify.
    pub slide_ids: Vec<String>,
}

/// A head's answer for one slide.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyResult {
    /// The slide.
    pub slide_id: String,
    /// Probability per class of the head.
    pub probabilities: BTreeMap<String, f32>,
    /// The most probable class.
    pub predicted: String,
    /// The slide's stored value of the head's label, if any.
    pub known_label: Option<String>,
    /// Attention MIL heads only: `[gx, gy, weight]` per tile (weights sum to 1), in the grid
    /// units of the prompt heatmap.
    #[schema(value_type = Option<Vec<Vec<f64>>>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<Vec<(u32, u32, f32)>>,
}

/// A value with its 95% bootstrap interval.
#[derive(Debug, Serialize, ToSchema)]
pub struct Interval {
    /// On all slides.
    pub value: f64,
    /// 2.5th percentile.
    pub low: f64,
    /// 97.5th percentile.
    pub high: f64,
}

/// Where a head comes from: what it predicts, from which inputs, trained on what, when.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeadInfo {
    /// Its name.
    pub name: String,
    /// `linear`, `knn`, `prototype` or `abmil`.
    pub kind: String,
    /// The label it predicts.
    pub label: String,
    /// Its classes, in output order.
    pub classes: Vec<String>,
    /// `slide`, `joint` (slide vectors) or `tiles` (tile features).
    pub input: String,
    /// Input width.
    pub dim: usize,
    /// The weights its inputs must come from.
    pub input_fingerprint: String,
    /// SHA-256 (16 hex) of its weights file.
    pub fingerprint: String,
    /// Fingerprint of the labelled slides it learned from.
    pub training_set_fingerprint: String,
    /// Slides it learned from.
    pub training_slides: usize,
    /// Their patients.
    pub training_patients: usize,
    /// `catalog` or the labels CSV.
    pub labels_from: String,
    /// Cross-validated balanced accuracy (grouped by patient), when it was evaluated.
    pub cv_balanced_accuracy: Option<Interval>,
    /// When it was trained (UTC).
    pub created_at: String,
    /// The gigapath version that trained it.
    pub gigapath_version: String,
}

impl From<&Manifest> for HeadInfo {
    fn from(m: &Manifest) -> Self {
        HeadInfo {
            name: m.name.clone(),
            kind: m.kind.to_string(),
            label: m.label.clone(),
            classes: m.classes.clone(),
            input: m.input.to_string(),
            dim: m.dim,
            input_fingerprint: m.input_fingerprint.clone(),
            fingerprint: m.fingerprint.clone(),
            training_set_fingerprint: m.training_set.fingerprint.clone(),
            training_slides: m.training_set.slides,
            training_patients: m.training_set.patients,
            labels_from: m.training_set.labels_from.clone(),
            cv_balanced_accuracy: m.metrics.as_ref().map(|r| {
                let b = r.scores.balanced_accuracy;
                Interval {
                    value: b.value,
                    low: b.low,
                    high: b.high,
                }
            }),
            created_at: m.created_at.clone(),
            gigapath_version: m.gigapath_version.clone(),
        }
    }
}

/// A head's answers with its provenance.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyResponse {
    /// The head that answered.
    pub head: HeadInfo,
    /// One per slide, in the order asked.
    pub results: Vec<ClassifyResult>,
}

/// The heads of the data dir.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProbeHeads {
    /// By name.
    pub heads: Vec<HeadInfo>,
}

/// Maps a probe error once: unknown head or slide 404, inputs from other weights 409, other
/// bad input 400, the rest 500.
fn probe_error(e: ProbeError) -> ApiError {
    match e {
        ProbeError::UnknownHead { name, .. } => {
            ApiError::NotFound(format!("unknown head `{name}` (see /v1/probes)"))
        }
        ProbeError::UnknownSlide(id) => ApiError::NotFound(format!("unknown slide `{id}`")),
        ProbeError::Fingerprint(m) => ApiError::Conflict(m),
        ProbeError::Store(s) => s.into(),
        e if e.is_input() => ApiError::BadRequest(e.to_string()),
        e => ApiError::Internal(e.to_string()),
    }
}

/// Runs a head's work (file reads, store calls, model math) on the pipeline's runtime within
/// the request timeout, its errors mapped once.
async fn run_head<T: Send + 'static>(
    state: &AppState,
    work: impl std::future::Future<Output = Result<T, ProbeError>> + Send + 'static,
) -> ApiResult<T> {
    let timeout = Duration::from_secs(state.config.serve.request_timeout_seconds);
    match tokio::time::timeout(timeout, state.pipeline.spawn(work)).await {
        Ok(joined) => joined?.map_err(probe_error),
        Err(_) => Err(ApiError::Unavailable(
            "the head did not answer within the request timeout".into(),
        )),
    }
}

/// Class probabilities of stored slides from a trained head, with the head's provenance.
#[utoipa::path(
    request_body = ClassifyRequest,
    responses(
        (status = 200, body = ClassifyResponse),
        (status = 400, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody)
    )
)]
#[post("/v1/classify")]
pub async fn classify(
    _r: ReadAccess,
    state: web::Data<AppState>,
    req: super::Body<ClassifyRequest>,
) -> ApiResult<web::Json<ClassifyResponse>> {
    let req = req.into_inner();
    artefact::check_name(&req.head).map_err(|e| ApiError::BadRequest(format!("head: {e}")))?;
    let cfg = &state.config.serve;
    if req.slide_ids.is_empty() {
        return Err(ApiError::BadRequest("`slide_ids` is empty".into()));
    }
    if req.slide_ids.len() > cfg.max_slide_ids {
        return Err(ApiError::BadRequest(format!(
            "{} slide ids; the limit is {}",
            req.slide_ids.len(),
            cfg.max_slide_ids
        )));
    }
    super::ids::check_all(super::ids::IdKind::Slide, "slide_ids", &req.slide_ids)?;
    let dir = gigapath_probe::probes_dir(&state.config.store.data_dir);
    let store = state.pipeline.store.clone();
    let work = async move {
        let head = artefact::load(&dir, &req.head)?;
        let results = gigapath_probe::classify(&store, &head, &req.slide_ids).await?;
        Ok::<_, ProbeError>((head.manifest, results))
    };
    let (manifest, results) = run_head(&state, work).await?;
    Ok(web::Json(ClassifyResponse {
        head: HeadInfo::from(&manifest),
        results: results
            .into_iter()
            .map(|c| ClassifyResult {
                slide_id: c.slide_id,
                probabilities: c.probabilities,
                predicted: c.predicted,
                known_label: c.known_label,
                attention: c.attention,
            })
            .collect(),
    }))
}

/// The head and slide an attention map is asked for.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttentionRequest {
    /// An attention-MIL (`abmil`) head of `/v1/probes`.
    pub head: String,
    /// A stored slide.
    pub slide_id: String,
}

/// An attention-MIL head's attention over a slide's tiles (weights sum to 1), in the prompt
/// heatmap's format: `tiles` holds `[gx, gy, weight]`.
#[utoipa::path(
    request_body = AttentionRequest,
    responses(
        (status = 200, body = crate::routes::slides::Heatmap),
        (status = 400, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody)
    )
)]
#[post("/v1/classify/heatmap")]
pub async fn attention(
    _r: ReadAccess,
    state: web::Data<AppState>,
    req: super::Body<AttentionRequest>,
) -> ApiResult<web::Json<crate::routes::slides::Heatmap>> {
    let AttentionRequest {
        head: name,
        slide_id: id,
    } = req.into_inner();
    super::ids::check(super::ids::IdKind::Slide, "slide_id", &id)?;
    artefact::check_name(&name).map_err(|e| ApiError::BadRequest(format!("head: {e}")))?;
    let dir = gigapath_probe::probes_dir(&state.config.store.data_dir);
    let store = state.pipeline.store.clone();
    let grid_file = state.pipeline.tiles_dir(&id).join("tiles.safetensors");
    let slide = id.clone();
    let work = async move {
        let head = artefact::load(&dir, &name)?;
        if head.manifest.kind != gigapath_probe::HeadKind::Abmil {
            return Err(ProbeError::Invalid(format!(
                "head `{name}` is a {} head on slide vectors: only attention-MIL (abmil) heads weigh tiles",
                head.manifest.kind
            )));
        }
        let mut answer =
            gigapath_probe::classify(&store, &head, std::slice::from_ref(&slide)).await?;
        Ok::<_, ProbeError>(answer.remove(0).attention.unwrap_or_default())
    };
    let tiles = run_head(&state, work).await?;
    let grid = web::block(move || gigapath_wsi::gridfile::read_grid(&grid_file))
        .await?
        .map_err(|_| {
            ApiError::NotFound(format!("slide `{id}` has not been tiled (no grid file)"))
        })?;
    Ok(web::Json(crate::routes::slides::Heatmap {
        slide_id: id,
        level0_width: grid.plan.level0_width,
        level0_height: grid.plan.level0_height,
        level0_tile_px: grid.plan.level0_tile_px,
        tiles,
        approximate: false,
    }))
}

/// The heads trained in the data dir (`gigapath probe train`), with their provenance.
#[utoipa::path(responses((status = 200, body = ProbeHeads)))]
#[get("/v1/probes")]
pub async fn probes(
    _r: ReadAccess,
    state: web::Data<AppState>,
) -> ApiResult<web::Json<ProbeHeads>> {
    let dir = gigapath_probe::probes_dir(&state.config.store.data_dir);
    let heads = web::block(move || artefact::list(&dir))
        .await?
        .map_err(probe_error)?;
    Ok(web::Json(ProbeHeads {
        heads: heads.iter().map(HeadInfo::from).collect(),
    }))
}
