//! `/v1/slides/{id}`: what is known of a slide, its pictures, and deleting its embeddings.

use std::collections::BTreeMap;

use actix_web::{delete, get, post, web, HttpResponse};
use gigapath_pipeline::identity::{forget_slide, Forgotten};
use gigapath_store::vector::SLIDES;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{AdminKey, ReadAccess};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// A slide: catalog record, stored point, reports.
#[derive(Serialize, ToSchema)]
pub struct SlideDetail {
    /// The slide id.
    pub id: String,
    /// File name of the slide (the full path stays on the server).
    pub file_name: String,
    /// Its cohort, if known.
    pub cohort: Option<String>,
    /// Its site, if known.
    pub site: Option<String>,
    /// Its labels; empty when it has none.
    pub labels: BTreeMap<String, String>,
    /// Level-0 micrometres per pixel, when known.
    pub mpp: Option<f64>,
    /// Tiles in its embedding; `null` before the first.
    pub tile_count: Option<u64>,
    /// `registered`, `embedded` or `failed`.
    pub state: String,
    /// Why the last attempt failed, if it did; `null` once the slide is embedded.
    pub error: Option<String>,
    /// Guard fingerprint of its stored point.
    pub fingerprint: Option<String>,
    /// Per role: tile, slide (, alignment).
    pub fingerprints: BTreeMap<String, String>,
    /// Whether a point is stored, and which vectors it has (`slide`, `joint`).
    pub vectors: Vec<String>,
    /// Ids of the reports describing it.
    pub report_ids: Vec<String>,
    /// Pictures of its tiling, when available (`thumbnail.png`, `overlay.png`, `mask.png`).
    pub pictures: Vec<String>,
}

// One id rule for ids from HTTP paths and ids from file names (ingest).
const _: () = assert!(crate::openapi::MAX_ID_CHARS == gigapath_pipeline::discover::MAX_ID_CHARS);

/// Slide ids become folder names: refuse anything that could leave the tiles folder (the rules
/// of `gigapath_pipeline::discover::check_slide_id`, which ingest applies to file names too).
pub fn check_id(id: &str) -> ApiResult<&str> {
    gigapath_pipeline::discover::check_slide_id(id).map_err(|why| {
        ApiError::BadRequest(format!("invalid slide id `{}`: {why}", id.escape_debug()))
    })?;
    Ok(id)
}

/// The tiling pictures `GET /v1/slides/{id}/{picture}` serves, by file name.
pub const PICTURES: [&str; 3] = ["thumbnail.png", "overlay.png", "mask.png"];

/// Everything known about one slide.
#[utoipa::path(
    params(("id" = String, Path, description = "Slide id")),
    responses((status = 200, body = SlideDetail), (status = 404, body = crate::error::ErrorBody))
)]
#[get("/v1/slides/{id}")]
pub async fn get_slide(
    _r: ReadAccess,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<web::Json<SlideDetail>> {
    let id = check_id(&id)?.to_string();
    let store = state.pipeline.store.clone();
    let key = id.clone();
    let (record, points, reports) = state
        .store(async move {
            let record = store.catalog.slide(&key).await?;
            let points = store
                .vectors
                .retrieve(SLIDES, std::slice::from_ref(&key), true)
                .await?;
            let reports = store.catalog.list_reports(Some(&key)).await?;
            Ok((record, points, reports))
        })
        .await?;
    let Some(r) = record else {
        return Err(ApiError::NotFound(format!("unknown slide `{id}`")));
    };
    let tiles = state.pipeline.tiles_dir(&id);
    Ok(web::Json(SlideDetail {
        file_name: std::path::Path::new(&r.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        id: r.id,
        cohort: r.cohort,
        site: r.site,
        labels: r.labels,
        // The user's override from the catalog, else the mpp measured at ingest (point payload).
        mpp: r.mpp.or_else(|| {
            points
                .first()
                .and_then(|p| p.payload.get("mpp"))
                .and_then(|v| v.as_f64())
        }),
        tile_count: r.tile_count,
        state: r.state.as_str().to_string(),
        error: r.error,
        fingerprint: r.fingerprint,
        fingerprints: r.fingerprints,
        vectors: points
            .first()
            .map(|p| p.vectors.keys().cloned().collect())
            .unwrap_or_default(),
        report_ids: reports.into_iter().map(|r| r.id).collect(),
        pictures: PICTURES
            .iter()
            .filter(|p| tiles.join(p).is_file())
            .map(|p| p.to_string())
            .collect(),
    }))
}

/// A picture of the slide's tiling: `thumbnail.png`, `overlay.png` (tissue and kept tiles) or
/// `mask.png`.
#[utoipa::path(
    params(("id" = String, Path, description = "Slide id"), ("picture" = String, Path, description = "thumbnail.png, overlay.png or mask.png")),
    responses((status = 200, content_type = "image/png", body = Vec<u8>), (status = 404, body = crate::error::ErrorBody))
)]
#[get("/v1/slides/{id}/{picture}")]
pub async fn picture(
    _r: ReadAccess,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (id, name) = path.into_inner();
    let id = check_id(&id)?;
    let Some(name) = PICTURES.iter().find(|p| **p == name) else {
        return Err(ApiError::NotFound(format!(
            "no picture `{name}` (thumbnail.png, overlay.png, mask.png)"
        )));
    };
    let file = state.pipeline.tiles_dir(id).join(name);
    let bytes = web::block(move || std::fs::read(file))
        .await?
        .map_err(|_| ApiError::NotFound(format!("slide `{id}` has no {name} (not tiled yet)")))?;
    Ok(HttpResponse::Ok()
        .content_type("image/png")
        .insert_header(("Cache-Control", "max-age=300"))
        .body(bytes))
}

/// What `DELETE /v1/slides/{id}` removed.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    /// The slide.
    pub slide_id: String,
    /// Report points removed with it.
    pub reports: usize,
}

/// Removes a slide's embedding (admin key needed): its point and its reports' points, its
/// feature files and tiling pictures, and its jobs; the catalog keeps the record (path, labels,
/// reports) as `registered`, so `GET /v1/status` agrees with the store and ingesting the slide
/// again embeds it anew. 409 while a worker is embedding it.
#[utoipa::path(
    params(("id" = String, Path, description = "Slide id")),
    responses((status = 200, body = Deleted), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
              (status = 409, body = crate::error::ErrorBody, description = "A worker is embedding the slide now")),
    security(("api_key" = []))
)]
#[delete("/v1/slides/{id}")]
pub async fn delete_slide(
    _k: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<web::Json<Deleted>> {
    let id = check_id(&id)?.to_string();
    let store = state.pipeline.store.clone();
    let key = id.clone();
    let forgotten = state
        .pipeline
        .spawn(async move { forget_slide(&store, &key, true).await })
        .await??;
    match forgotten {
        Forgotten::Done { reports } => Ok(web::Json(Deleted {
            slide_id: id,
            reports,
        })),
        Forgotten::Busy { job_id } => Err(ApiError::Conflict(format!(
            "slide `{id}` is being embedded right now (job {job_id}); delete it once that is done"
        ))),
        Forgotten::Unknown => Err(ApiError::NotFound(format!("unknown slide `{id}`"))),
    }
}

/// The body of `POST /v1/slides/{id}/heatmap`.
#[derive(Debug, serde::Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeatmapRequest {
    /// The prompt, e.g. "papillary architecture".
    pub query: String,
}

impl HeatmapRequest {
    /// The check `POST /v1/slides/{id}/heatmap` runs on the body (after the path's id): the
    /// prompt is not blank and within `serve.max_text_chars`; returns it trimmed.
    pub fn check(&self, cfg: &gigapath_pipeline::config::ServeConfig) -> ApiResult<String> {
        super::check_text("query", &self.query, cfg)
    }
}

/// Per-tile similarity of a prompt with the slide's contextualised tile embeddings.
#[derive(Debug, Serialize, ToSchema)]
pub struct Heatmap {
    /// The slide.
    pub slide_id: String,
    /// Level-0 width W0 in pixels. Tile (gx, gy) covers level-0 pixels
    /// [gx L, (gx+1) L) x [gy L, (gy+1) L) of a W0 x H0 slide.
    pub level0_width: u64,
    /// Level-0 height H0 in pixels.
    pub level0_height: u64,
    /// Tile side L in level-0 pixels.
    pub level0_tile_px: u32,
    /// `[gx, gy, cosine]` per kept tile.
    #[schema(value_type = Vec<Vec<f64>>)]
    pub tiles: Vec<(u32, u32, f32)>,
    /// True when the alignment fine-tuned slide-encoder layers: the tile tokens then come from
    /// the base encoder and the map is an approximation.
    pub approximate: bool,
}

/// A prompt heatmap: the slide encoder's token output of every tile (each after attending over
/// the whole slide) through the alignment's slide head, compared with the prompt's joint
/// embedding. Recomputed from the slide's feature file.
#[utoipa::path(
    params(("id" = String, Path, description = "Slide id")),
    request_body = HeatmapRequest,
    responses((status = 200, body = Heatmap), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody))
)]
#[post("/v1/slides/{id}/heatmap")]
pub async fn heatmap(
    _r: ReadAccess,
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: super::Body<HeatmapRequest>,
) -> ApiResult<web::Json<Heatmap>> {
    let id = check_id(&id)?.to_string();
    let query = req.check(&state.config.serve)?;
    let fps = state.fingerprints().await?;
    let grid_file = state.pipeline.tiles_dir(&id).join("tiles.safetensors");
    let feature_file = state.pipeline.store.feature_path(&id, &fps.tile);
    let slide_id = id.clone();
    state
        .compute(move |p| {
            let a = crate::state::alignment(p, "a prompt heatmap")?;
            let grid = gigapath_wsi::gridfile::read_grid(&grid_file).map_err(|_| {
                ApiError::NotFound(format!(
                    "slide `{slide_id}` has not been tiled (no grid file)"
                ))
            })?;
            let features = gigapath_store::FeatureFile::read(&feature_file).map_err(|_| {
                ApiError::NotFound(format!(
                    "slide `{slide_id}` has no feature file for the configured tile encoder"
                ))
            })?;
            let models = p.slide_models()?;
            let cells: Vec<[u32; 2]> = features
                .grid_xy
                .iter()
                .map(|g| [g[0] as u32, g[1] as u32])
                .collect();
            let internal = |e: &dyn std::fmt::Display| {
                ApiError::Internal(format!("heatmap of {slide_id}: {e}"))
            };
            let x = candle_core::Tensor::from_vec(
                features.features_f32(),
                (features.len(), features.dim),
                &candle_core::Device::Cpu,
            )
            .map_err(|e| internal(&e))?;
            let tokens = models
                .slide
                .tile_tokens(&x, &cells)
                .map_err(|e| internal(&e))?;
            let joint = a
                .alignment
                .project_slides(&tokens)
                .map_err(|e| internal(&e))?;
            let joint: Vec<Vec<f32>> = joint.to_vec2().map_err(|e| internal(&e))?;
            let q = crate::state::joint_texts(p, &[query], "a prompt heatmap")?.remove(0);
            Ok(Heatmap {
                slide_id: slide_id.clone(),
                level0_width: grid.plan.level0_width,
                level0_height: grid.plan.level0_height,
                level0_tile_px: grid.plan.level0_tile_px,
                tiles: cells
                    .iter()
                    .zip(&joint)
                    .map(|(c, j)| (c[0], c[1], gigapath_zeroshot::cosine(j, &q)))
                    .collect(),
                approximate: a.alignment.fine_tunes_slide(),
            })
        })
        .await
        .map(web::Json)
}
