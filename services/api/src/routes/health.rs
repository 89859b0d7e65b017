//! Liveness, readiness and metrics.

use actix_web::{get, web, HttpResponse};
use gigapath_store::vector::{PayloadFilter, REPORTS, SLIDES};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The answer of `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(responses((status = 200, body = Health)))]
#[get("/healthz")]
pub async fn healthz() -> web::Json<Health> {
    web::Json(Health { status: "ok" })
}

/// The answer of `GET /readyz` when the store answers.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    pub status: &'static str,
    /// `embedded` or `qdrant`.
    pub vector_backend: &'static str,
    /// `sqlite` or `postgres`.
    pub catalog_backend: &'static str,
}

/// The store answers (vectors and catalog): ready for traffic.
#[utoipa::path(responses((status = 200, body = Ready), (status = 503, body = crate::error::ErrorBody)))]
#[get("/readyz")]
pub async fn readyz(state: web::Data<AppState>) -> ApiResult<web::Json<Ready>> {
    let store = state.pipeline.store.clone();
    state
        .store(async move {
            store.vectors.health().await?;
            store.catalog.health().await
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("not ready: {e}")))?;
    Ok(web::Json(Ready {
        status: "ready",
        vector_backend: state.pipeline.store.vectors.backend_name(),
        catalog_backend: state.pipeline.store.catalog.backend_name(),
    }))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(responses((status = 200, content_type = "text/plain", body = String)))]
#[get("/metrics")]
pub async fn metrics(
    state: web::Data<AppState>,
    in_flight: Option<web::Data<crate::limits::InFlight>>,
) -> ApiResult<HttpResponse> {
    let store = state.pipeline.store.clone();
    let (slides, reports, jobs) = state
        .store(async move {
            let slides = store.vectors.count(SLIDES, &PayloadFilter::none()).await?;
            let reports = store.vectors.count(REPORTS, &PayloadFilter::none()).await?;
            Ok((slides, reports, store.catalog.job_counts().await?))
        })
        .await?;
    let m = &state.metrics;
    let text = m.render(&[
        (
            "gigapath_slide_points",
            "Points in the slides collection.",
            slides as f64,
        ),
        (
            "gigapath_report_points",
            "Points in the reports collection.",
            reports as f64,
        ),
        (
            "gigapath_jobs_queued",
            "Ingest jobs waiting.",
            jobs.queued as f64,
        ),
        (
            "gigapath_jobs_running",
            "Ingest jobs being worked on.",
            jobs.running as f64,
        ),
        (
            "gigapath_jobs_failed",
            "Ingest jobs that failed.",
            jobs.failed as f64,
        ),
        (
            "gigapath_worker_slides_embedded",
            "Slides this process's worker embedded.",
            m.slides_embedded_by_worker
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        (
            "gigapath_http_requests_in_flight",
            "Requests being received or worked on (capped at serve.max_in_flight; probes not counted).",
            in_flight.map_or(0.0, |f| f.current() as f64),
        ),
    ]);
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text))
}
