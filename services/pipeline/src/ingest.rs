//! Ingest runs and the worker loop.
//!
//! `ingest` registers slides (and reports), queues one `embed_slide` job per slide and weights
//! (a slide already embedded with the same weights is skipped; a failed one is retried only when
//! asked), then works the queue like any worker until it is empty, then embeds the reports.
//! `work` is the loop of `gigapath worker`: claim a job with a lease, renew the lease while
//! embedding, record the result, repeat.
//!
//! Exactly once, whatever is killed when: a point is upserted under an id derived from the slide
//! id (a redo overwrites), the catalog marks job and slide done in one transaction after the
//! upsert, feature files appear only complete, and a dead worker's lease expires so its job is
//! claimed again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gigapath_store::catalog::kinds::EMBED_SLIDE;
use gigapath_store::catalog::{ClaimOptions, JobState, NewReport};
use gigapath_store::vector::{combined_fingerprint, ReportPoint, REPORTS};
use gigapath_store::StoreError;
use serde::Serialize;

use crate::discover::find_slides;
use crate::encoders::{slide_fingerprints, text_fingerprints};
use crate::error::{PipelineError, Result};
use crate::identity::{bind_sources, replace_sources};
use crate::pipeline::{Pipeline, Progress};
use crate::queue::{queue_jobs, register_slide};
use crate::reports::{read_reports, ReportRow, RowError};
use crate::slide_job::Timings;

/// What to ingest.
#[derive(Debug, Clone, Default)]
pub struct IngestRequest {
    /// Slide files and folders (searched recursively).
    pub inputs: Vec<PathBuf>,
    /// A reports file (CSV or JSONL), see [`crate::reports`].
    pub reports: Option<PathBuf>,
    /// Queue slides that failed before again.
    pub retry_failed: bool,
    /// Level-0 um/px for slides that record none.
    pub mpp: Option<f64>,
    /// Re-embed an id already known from a different file (other content) from the new file;
    /// without it such a file is refused (see [`crate::identity`]).
    pub replace: bool,
}

/// What a stretch of work did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Slides embedded.
    pub slides_ok: u64,
    /// Slides that failed (see `failures`).
    pub slides_failed: u64,
    /// Tiles embedded, over all slides.
    pub tiles: u64,
    /// Wall-clock seconds of the stretch.
    pub seconds: f64,
    /// Where the time went, summed over the slides.
    pub timings: Timings,
    /// (slide id, reason) of every failure.
    pub failures: Vec<(String, String)>,
}

/// Reports ingested and rejected.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReportsSummary {
    /// Reports registered.
    pub ok: u64,
    /// Rows rejected, with their line and reason.
    pub errors: Vec<RowError>,
}

/// What `ingest` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestSummary {
    /// Slide files found under the inputs.
    pub slides_found: u64,
    /// Slides queued for embedding.
    pub queued: u64,
    /// Already embedded with these weights: skipped.
    pub already_done: u64,
    /// Failed earlier and not retried (use `--retry-failed`).
    pub previously_failed: u64,
    /// Ids re-embedded from a different file (`replace`).
    pub replaced: Vec<String>,
    /// What embedding the queued slides did.
    pub run: RunSummary,
    /// What reading the reports file did.
    pub reports: ReportsSummary,
}

impl Pipeline {
    /// Registers and embeds `req`'s slides and reports; see the module docs.
    pub fn ingest(&self, req: &IngestRequest, progress: &dyn Progress) -> Result<IngestSummary> {
        let slides = find_slides(&req.inputs)?;
        if !req.inputs.is_empty() && slides.is_empty() {
            return Err(PipelineError::Input(format!(
                "no slide files ({}) found in the given paths",
                crate::discover::SLIDE_EXTENSIONS.join(", ")
            )));
        }
        if let Some(mpp) = req.mpp {
            gigapath_wsi::mpp::validate(mpp)?;
        }
        // Read the reports first: a missing or unreadable file stops the run before any work.
        let (rows, mut row_errors) = match &req.reports {
            Some(path) => read_reports(path)?,
            None => (Vec::new(), Vec::new()),
        };
        let fingerprint = if slides.is_empty() {
            None
        } else {
            Some(combined_fingerprint(&slide_fingerprints(
                &self.config.models,
            )?))
        };
        // Which file each id stands for: a different file under a known id is refused (or,
        // asked to replace, the old embedding is forgotten) before anything is registered.
        let sources = self.check_sources(&slides)?;
        if req.replace && self.store.vectors.backend_name() == "embedded" {
            // This process holds the data dir alone: a job still marked running died with its
            // process and must not block replacing its slide (`work` would expire it anyway).
            self.block_on(self.store.catalog.expire_running_leases(Some(EMBED_SLIDE)))?;
        }
        let replaced = self.block_on(replace_sources(&self.store, &sources, req.replace))?;
        self.config.save_to_data_dir_if_absent()?;
        let mut summary = IngestSummary {
            slides_found: slides.len() as u64,
            replaced,
            ..IngestSummary::default()
        };
        let labels = labels_by_slide(&rows);
        for (id, path) in &slides {
            self.register_slide(id, path, req.mpp, labels.get(id.as_str()))?;
        }
        self.block_on(bind_sources(&self.store, &sources))?;
        // Reports of slides registered earlier get their labels onto the slide too.
        for (id, l) in &labels {
            if !slides.contains_key(*id) {
                if let Some(rec) = self.block_on(self.store.catalog.slide(id))? {
                    self.register_slide(id, &PathBuf::from(&rec.path), rec.mpp, Some(l))?;
                }
            }
        }
        if let Some(fp) = &fingerprint {
            let queued = self.block_on(queue_jobs(
                &self.store,
                &slides,
                fp,
                req.mpp,
                req.retry_failed,
            ))?;
            summary.queued = queued.queued.len() as u64;
            summary.already_done = queued.already_done.len() as u64;
            summary.previously_failed = queued.previously_failed.len() as u64;
            for (id, error) in &queued.previously_failed {
                tracing::warn!("{id}: failed before ({error}); not retried (pass --retry-failed)");
            }
        }
        let registered = self.register_reports(rows, &mut row_errors)?;
        summary.run = self.work(progress, &AtomicBool::new(false), true)?;
        summary.reports = ReportsSummary {
            ok: self.embed_reports(&registered)?,
            errors: row_errors,
        };
        Ok(summary)
    }

    fn register_slide(
        &self,
        id: &str,
        path: &std::path::Path,
        mpp: Option<f64>,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<()> {
        self.block_on(register_slide(
            &self.store,
            &self.config,
            id,
            path,
            mpp,
            labels,
        ))
    }

    /// Records valid report rows in the catalog; rows naming an unknown slide become row errors.
    fn register_reports(
        &self,
        rows: Vec<ReportRow>,
        errors: &mut Vec<RowError>,
    ) -> Result<Vec<ReportRow>> {
        let mut ok = Vec::with_capacity(rows.len());
        for row in rows {
            let report = NewReport {
                id: row.report_id.clone(),
                slide_id: row.slide_id.clone(),
                text: row.text.clone(),
                labels: row.labels.clone(),
            };
            match self.block_on(self.store.catalog.upsert_report(&report)) {
                Ok(()) => ok.push(row),
                Err(StoreError::UnknownSlide(id)) => errors.push(RowError {
                    line: row.line,
                    message: format!(
                        "unknown slide id `{id}` (ingest the slide first, or in the same run)"
                    ),
                }),
                Err(e) => return Err(e.into()),
            }
        }
        errors.sort_by_key(|e| e.line);
        Ok(ok)
    }

    /// Text-encodes `rows` and upserts their points; returns how many were stored.
    fn embed_reports(&self, rows: &[ReportRow]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let model = self.text_model()?;
        let fingerprints = text_fingerprints(&self.config.models)?;
        let fingerprint = combined_fingerprint(&fingerprints);
        let alignment = self.alignment()?;
        if let Some(a) = alignment {
            a.check_base(&fingerprints, &["text"])?;
        }
        let mut stored = 0;
        for chunk in rows.chunks(self.config.ingest.text_batch_size) {
            let texts: Vec<&str> = chunk.iter().map(|r| r.text.as_str()).collect();
            let embeddings = model.encode(&texts)?;
            let joints: Vec<Option<Vec<f32>>> = match alignment {
                None => vec![None; chunk.len()],
                Some(a) => a
                    .alignment
                    .text_joint(&model.encoder, &texts)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(Some)
                    .collect(),
            };
            let points = chunk
                .iter()
                .zip(embeddings)
                .zip(joints)
                .map(|((r, e), joint)| {
                    ReportPoint {
                        report_id: r.report_id.clone(),
                        slide_id: r.slide_id.clone(),
                        text: r.text.clone(),
                        labels: r.labels.clone(),
                        fingerprint: fingerprint.clone(),
                        joint,
                        text_embedding: e,
                    }
                    .into_point()
                })
                .collect();
            self.block_on(self.store.vectors.upsert(REPORTS, points))?;
            for r in chunk {
                self.block_on(self.store.catalog.mark_report_embedded(
                    &r.report_id,
                    REPORTS,
                    &fingerprint,
                ))?;
            }
            stored += chunk.len() as u64;
        }
        Ok(stored)
    }

    /// Claims and runs slide jobs until none is left (`until_idle`) or `stop` is set; with
    /// `until_idle` false it waits for new jobs instead. "None left" includes the jobs other
    /// workers hold: `until_idle` waits for them to finish, or for a dead worker's lease to
    /// expire and then runs its job.
    pub fn work(
        &self,
        progress: &dyn Progress,
        stop: &AtomicBool,
        until_idle: bool,
    ) -> Result<RunSummary> {
        let exclusive = self.store.vectors.backend_name() == "embedded";
        if exclusive {
            // This process holds the data dir alone: jobs still marked running died with their
            // process, and temporary files are nobody's.
            let n = self.block_on(self.store.catalog.expire_running_leases(Some(EMBED_SLIDE)))?;
            if n > 0 {
                tracing::info!("{n} job(s) of an interrupted run will be redone");
            }
        }
        self.clean_orphans(if exclusive {
            Duration::ZERO
        } else {
            Duration::from_secs(self.config.ingest.lease_seconds)
        });
        let start = Instant::now();
        let mut summary = RunSummary::default();
        let lease = Duration::from_secs(self.config.ingest.lease_seconds);
        let options = ClaimOptions {
            lease,
            kind: Some(EMBED_SLIDE.into()),
            max_attempts: self.config.ingest.max_attempts,
        };
        let counts = self.block_on(self.store.catalog.job_counts())?;
        progress.run_started((counts.queued + counts.stale) as usize);
        let mut waiting = false;
        while !stop.load(Ordering::Relaxed) {
            let Some(job) = self.claim_next(&options, &mut summary)? else {
                if until_idle {
                    // Jobs that other workers hold keep the queue busy: a live worker's ends,
                    // a dead one's lease expires and the job is claimed here.
                    let held = self.slide_jobs_held()?;
                    if held == 0 {
                        break;
                    }
                    if !waiting {
                        tracing::info!(
                            "queue empty; waiting for {held} job(s) held by other workers (a \
                             dead worker's job is taken over when its lease expires)"
                        );
                        waiting = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                std::thread::sleep(Duration::from_secs(2));
                continue;
            };
            self.run_job(job, lease, progress, &mut summary)?;
        }
        summary.seconds = start.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// Slide jobs running under a lease (this process holds none between its jobs).
    fn slide_jobs_held(&self) -> Result<usize> {
        let running = self.block_on(
            self.store
                .catalog
                .list_jobs(Some(JobState::Running), u32::MAX),
        )?;
        Ok(running.iter().filter(|j| j.kind == EMBED_SLIDE).count())
    }

    /// Removes temporary files that a killed process left (feature files being written, tiling
    /// outputs being staged) once they are `max_age` old: a lease when workers share the data,
    /// zero when this process holds it alone.
    fn clean_orphans(&self, max_age: Duration) {
        let data = &self.config.store.data_dir;
        for (dir, prefix) in [
            (data.join("features"), ".features-"),
            (data.join("tiles"), ".staging-"),
        ] {
            let Ok(subdirs) = std::fs::read_dir(&dir) else {
                continue;
            };
            for sub in subdirs
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
            {
                let Ok(entries) = std::fs::read_dir(&sub) else {
                    continue;
                };
                for p in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let old = std::fs::metadata(&p)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .is_some_and(|age| age >= max_age);
                    if name.starts_with(prefix) && old {
                        tracing::info!("removing {} left by an interrupted run", p.display());
                        let _ = if p.is_dir() {
                            std::fs::remove_dir_all(&p)
                        } else {
                            std::fs::remove_file(&p)
                        };
                    }
                }
            }
        }
    }
}

/// Labels of each slide from its report rows (later rows win).
fn labels_by_slide(rows: &[ReportRow]) -> BTreeMap<&str, BTreeMap<String, String>> {
    let mut out: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    for r in rows {
        out.entry(r.slide_id.as_str())
            .or_default()
            .extend(r.labels.clone());
    }
    out
}
