//! `gigapath status`: counts per state of slides, jobs, reports and stored points.

use std::collections::BTreeMap;

use gigapath_store::catalog::JobCounts;
use gigapath_store::vector::{PayloadFilter, REPORTS, SLIDES};
use gigapath_store::Store;
use serde::Serialize;

use crate::error::Result;
use crate::pipeline::Pipeline;

/// What `gigapath status` (and `GET /v1/status`) shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The data dir, as configured.
    pub data_dir: String,
    /// `embedded` or `qdrant`.
    pub vector_backend: &'static str,
    /// `sqlite` or `postgres`.
    pub catalog_backend: &'static str,
    /// Slides per state (`registered`, `embedded`, `failed`).
    pub slides: BTreeMap<String, u64>,
    /// Jobs per state.
    pub jobs: JobCounts,
    /// Reports registered.
    pub reports: u64,
    /// Points per collection.
    pub points: BTreeMap<String, u64>,
    /// Stored embeddings per fingerprint, per collection (more than one: searches refuse).
    pub fingerprints: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Status {
    /// The human-readable form, one line per kind.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "data dir: {} (vectors: {}, catalog: {})\n",
            self.data_dir, self.vector_backend, self.catalog_backend
        );
        let slides: Vec<String> = self
            .slides
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        s += &format!("slides:   {}\n", slides.join(", "));
        let j = &self.jobs;
        s += &format!(
            "jobs:     {} queued, {} running ({} with an expired lease), {} done, {} failed, \
             {} cancelled\n",
            j.queued, j.running, j.stale, j.done, j.failed, j.cancelled
        );
        s += &format!("reports:  {}\n", self.reports);
        for (c, n) in &self.points {
            let fps: Vec<String> = self
                .fingerprints
                .get(c)
                .into_iter()
                .flatten()
                .map(|(f, n)| format!("{f} x{n}"))
                .collect();
            s += &format!(
                "points:   {c} {n} (fingerprints: {})\n",
                if fps.is_empty() {
                    "-".into()
                } else {
                    fps.join(", ")
                }
            );
        }
        s.trim_end().to_string()
    }
}

impl Pipeline {
    /// The counts of this pipeline's store ([`status`]).
    pub fn status(&self) -> Result<Status> {
        self.block_on(status(&self.store))
    }
}

/// Counts of `store`, as an async function (the HTTP service awaits it).
pub async fn status(store: &Store) -> Result<Status> {
    let catalog = &store.catalog;
    let slides = catalog
        .slide_counts()
        .await?
        .into_iter()
        .map(|(k, v)| (k.as_str().to_string(), v))
        .collect();
    let mut points = BTreeMap::new();
    let mut fingerprints = BTreeMap::new();
    for c in [SLIDES, REPORTS] {
        points.insert(
            c.to_string(),
            store.vectors.count(c, &PayloadFilter::none()).await?,
        );
        fingerprints.insert(c.to_string(), catalog.embedding_fingerprints(c).await?);
    }
    Ok(Status {
        data_dir: store.config.data_dir.display().to_string(),
        vector_backend: store.vectors.backend_name(),
        catalog_backend: catalog.backend_name(),
        slides,
        jobs: catalog.job_counts().await?,
        reports: catalog.list_reports(None).await?.len() as u64,
        points,
        fingerprints,
    })
}
