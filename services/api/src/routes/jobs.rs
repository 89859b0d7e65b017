//! `/v1/jobs`: the ingest job queue for operators (admin key): list jobs, retry failed (parked)
//! or cancelled ones, cancel queued or running ones. The same rules as `gigapath jobs`.

use actix_web::{get, post, web, HttpRequest};
use gigapath_pipeline::queue::{Job, JobState};
use gigapath_store::StoreError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::AdminKey;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Most jobs in one listing.
pub const MAX_LIST: u32 = 10_000;

/// One job of the queue.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    /// The job's id (what retry and cancel take).
    pub id: i64,
    /// `embed_slide` for slide jobs.
    pub kind: String,
    /// The slide id (what the job is about).
    pub slide_id: String,
    /// `queued`, `running`, `done`, `failed` or `cancelled`.
    pub state: String,
    /// Claims so far; an attempt whose process died counts. At `ingest.max_attempts` crashed
    /// attempts the job is parked (failed).
    pub attempts: u32,
    /// Attempts given back after an infrastructure error (not counted in `attempts`).
    pub deferrals: u32,
    /// Worker holding the job (running) or the last one that held it.
    pub worker: Option<String>,
    /// Epoch ms when the lease of a running job ends.
    pub lease_expires_at_ms: Option<i64>,
    /// Why the last attempt failed or ended without a result.
    pub error: Option<String>,
    /// Epoch ms when it was first queued.
    pub created_at_ms: i64,
    /// Epoch ms of its last change.
    pub updated_at_ms: i64,
    /// Epoch ms of its first claim; `null` before any.
    pub first_attempt_at_ms: Option<i64>,
    /// Epoch ms of its latest claim; `null` before any.
    pub last_attempt_at_ms: Option<i64>,
}

impl From<Job> for JobView {
    fn from(j: Job) -> Self {
        JobView {
            id: j.id,
            kind: j.kind,
            slide_id: j.subject,
            state: j.state.to_string(),
            attempts: j.attempts,
            deferrals: j.deferrals,
            worker: j.worker,
            lease_expires_at_ms: j.lease_expires_at_ms,
            error: j.error,
            created_at_ms: j.created_at_ms,
            updated_at_ms: j.updated_at_ms,
            first_attempt_at_ms: j.first_attempt_at_ms,
            last_attempt_at_ms: j.last_attempt_at_ms,
        }
    }
}

/// The answer of `GET /v1/jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// The jobs in id order (oldest first), at most the `limit` asked for.
    pub jobs: Vec<JobView>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
}

/// Unknown ids are 404; a state the action does not apply to is 409.
fn job_error(e: StoreError) -> ApiError {
    match e {
        StoreError::UnknownJob(_) => ApiError::NotFound(e.to_string()),
        StoreError::JobState { .. } => ApiError::Conflict(e.to_string()),
        other => other.into(),
    }
}

/// Jobs in id order (oldest first), optionally of one state (admin key needed).
#[utoipa::path(
    params(
        ("state" = Option<String>, Query, description = "Only jobs in this state: queued, running, done, failed or cancelled"),
        ("limit" = Option<u32>, Query, description = "At most this many jobs (1 to 10000, default 1000)"),
    ),
    responses((status = 200, body = JobList), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("api_key" = []))
)]
#[get("/v1/jobs")]
pub async fn list_jobs(
    _k: AdminKey,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> ApiResult<web::Json<JobList>> {
    let q = web::Query::<ListQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("query: {e}")))?
        .into_inner();
    let job_state = q
        .state
        .as_deref()
        .map(|s| {
            s.parse::<JobState>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "state `{s}`: expected queued, running, done, failed or cancelled"
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_LIST {
        return Err(ApiError::BadRequest(format!(
            "limit = {limit}: must be between 1 and {MAX_LIST}"
        )));
    }
    let catalog = state.pipeline.store.catalog.clone();
    let jobs = state
        .pipeline
        .spawn(async move { catalog.list_jobs(job_state, limit).await })
        .await?
        .map_err(job_error)?;
    Ok(web::Json(JobList {
        jobs: jobs.into_iter().map(JobView::from).collect(),
    }))
}

/// Queues a failed (parked) or cancelled job again with its attempts reset (admin key needed).
#[utoipa::path(
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody, description = "No such job"),
              (status = 409, body = crate::error::ErrorBody, description = "The job is not failed or cancelled")),
    security(("api_key" = []))
)]
#[post("/v1/jobs/{id}/retry")]
pub async fn retry_job(
    _k: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<i64>,
) -> ApiResult<web::Json<JobView>> {
    let (catalog, id) = (state.pipeline.store.catalog.clone(), id.into_inner());
    let job = state
        .pipeline
        .spawn(async move { catalog.retry_job(id).await })
        .await?
        .map_err(job_error)?;
    Ok(web::Json(job.into()))
}

/// Cancels a queued or running job (admin key needed). A worker running it stops at its next
/// lease renewal, or before it writes the slide's point, and records nothing.
#[utoipa::path(
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody, description = "No such job"),
              (status = 409, body = crate::error::ErrorBody, description = "The job is done, failed or already cancelled")),
    security(("api_key" = []))
)]
#[post("/v1/jobs/{id}/cancel")]
pub async fn cancel_job(
    _k: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<i64>,
) -> ApiResult<web::Json<JobView>> {
    let (catalog, id) = (state.pipeline.store.catalog.clone(), id.into_inner());
    let job = state
        .pipeline
        .spawn(async move { catalog.cancel_job(id).await })
        .await?
        .map_err(job_error)?;
    Ok(web::Json(job.into()))
}
