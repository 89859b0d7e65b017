//! Registering slides and queueing their embedding jobs, as an async function over the store, so
//! that the HTTP service's ingest endpoint queues work for the workers without running it; and
//! [`JobQueue`], the operators' view of the queue (`gigapath jobs list|retry|cancel`).

use std::collections::BTreeMap;
use std::path::Path;

use gigapath_store::catalog::kinds::EMBED_SLIDE;
use gigapath_store::catalog::{Catalog, NewJob, NewSlide, QueueOutcome};
pub use gigapath_store::catalog::{Job, JobState};
use gigapath_store::config::CATALOG_FILE;
use gigapath_store::Store;
use serde::Serialize;

use crate::config::Config;
use crate::error::{PipelineError, Result};
use crate::slide_job::SlideJob;

/// What queueing did, slide by slide.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueSummary {
    /// New, re-queued or already pending jobs.
    pub queued: Vec<String>,
    /// Already embedded with these weights.
    pub already_done: Vec<String>,
    /// Failed before and not retried, with the reason.
    pub previously_failed: Vec<(String, String)>,
}

/// Registers `slides` (id -> path) in the catalog, merging `labels` into what it knows, and
/// queues one `embed_slide` job per slide for the weights `fingerprint`.
pub async fn queue_slides(
    store: &Store,
    config: &Config,
    slides: &BTreeMap<String, std::path::PathBuf>,
    labels: &BTreeMap<String, BTreeMap<String, String>>,
    fingerprint: &str,
    mpp: Option<f64>,
    retry_failed: bool,
) -> Result<QueueSummary> {
    for (id, path) in slides {
        register_slide(store, config, id, path, mpp, labels.get(id)).await?;
    }
    queue_jobs(store, slides, fingerprint, mpp, retry_failed).await
}

/// Queues one `embed_slide` job per registered slide of `slides` (id -> path) for the weights
/// `fingerprint`: a slide already embedded with them is left alone, one that failed before is
/// re-queued only with `retry_failed`.
pub async fn queue_jobs(
    store: &Store,
    slides: &BTreeMap<String, std::path::PathBuf>,
    fingerprint: &str,
    mpp: Option<f64>,
    retry_failed: bool,
) -> Result<QueueSummary> {
    let mut summary = QueueSummary::default();
    for (id, path) in slides {
        let job = SlideJob {
            slide_id: id.clone(),
            path: path.clone(),
            mpp,
        };
        let outcome = store
            .catalog
            .queue_job(&NewJob {
                kind: EMBED_SLIDE.into(),
                subject: id.clone(),
                fingerprint: fingerprint.to_string(),
                payload: serde_json::to_value(&job).map_err(|e| {
                    PipelineError::Input(format!(
                        "slide `{id}`: path {} cannot be queued: {e}",
                        path.display()
                    ))
                })?,
                retry_failed,
            })
            .await?;
        match outcome {
            QueueOutcome::Queued { .. }
            | QueueOutcome::Requeued { .. }
            | QueueOutcome::Pending { .. } => summary.queued.push(id.clone()),
            QueueOutcome::AlreadyDone { .. } => summary.already_done.push(id.clone()),
            QueueOutcome::PreviouslyFailed { error, .. } => summary.previously_failed.push((
                id.clone(),
                error.unwrap_or_else(|| "no reason recorded".into()),
            )),
        }
    }
    Ok(summary)
}

/// Inserts or updates a slide, merging `labels` (`cohort` and `site` are columns of their own)
/// with what the catalog already knows, so that re-registering never drops labels.
pub async fn register_slide(
    store: &Store,
    config: &Config,
    id: &str,
    path: &Path,
    mpp: Option<f64>,
    labels: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let old = store.catalog.slide(id).await?;
    let mut merged = old.as_ref().map(|r| r.labels.clone()).unwrap_or_default();
    let mut cohort = old.as_ref().and_then(|r| r.cohort.clone());
    let mut site = old.as_ref().and_then(|r| r.site.clone());
    for (k, v) in labels.into_iter().flatten() {
        match k.as_str() {
            "cohort" => cohort = Some(v.clone()),
            "site" => site = Some(v.clone()),
            _ => {
                merged.insert(k.clone(), v.clone());
            }
        }
    }
    store
        .catalog
        .upsert_slide(&NewSlide {
            id: id.to_string(),
            path: path.display().to_string(),
            cohort: cohort.or_else(|| config.ingest.cohort.clone()),
            site,
            labels: merged,
            mpp: mpp.or(old.and_then(|r| r.mpp)),
        })
        .await?;
    Ok(())
}

/// The job queue alone, for operators (`gigapath jobs`): opens only the catalog, never the vector
/// store, so it works beside a running `ingest`, `worker` or `serve` (the embedded vector store
/// admits one process; the catalog admits many).
pub struct JobQueue {
    rt: tokio::runtime::Runtime,
    /// The catalog holding the jobs.
    pub catalog: Catalog,
}

impl JobQueue {
    /// Opens the catalog of `config` (SQLite in the data dir, or `store.catalog_url`). A data
    /// dir without a catalog is an error, not a new empty catalog.
    pub fn open(config: &Config) -> Result<JobQueue> {
        let store = &config.store;
        if store.catalog_url.is_none() {
            let file = store.data_dir.join(CATALOG_FILE);
            if !file.is_file() {
                return Err(PipelineError::Input(format!(
                    "no catalog at {}: nothing was ingested into this data dir (check --data-dir)",
                    file.display()
                )));
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PipelineError::Input(format!("cannot start the async runtime: {e}")))?;
        let catalog = rt.block_on(Catalog::open(store))?;
        Ok(JobQueue { rt, catalog })
    }

    /// Jobs in id order, only those in `state` when given, at most `limit`.
    pub fn list(&self, state: Option<JobState>, limit: u32) -> Result<Vec<Job>> {
        Ok(self.rt.block_on(self.catalog.list_jobs(state, limit))?)
    }

    /// Failed (parked) or cancelled -> queued, attempts reset.
    pub fn retry(&self, id: i64) -> Result<Job> {
        Ok(self.rt.block_on(self.catalog.retry_job(id))?)
    }

    /// Queued or running -> cancelled.
    pub fn cancel(&self, id: i64) -> Result<Job> {
        Ok(self.rt.block_on(self.catalog.cancel_job(id))?)
    }
}
