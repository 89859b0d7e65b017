//! One slide, end to end: tissue and tiles, tile features streamed into a feature file while the
//! next batches are being read, the slide embedding, and its point in the vector store.
//!
//! Reader threads decode tiles ahead of the encoder (a bounded window of batches, see
//! `gigapath_wsi::TileStream`), so decoding overlaps inference; the time the encoder waits for
//! tiles is measured (`read_wait_s`) to show it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gigapath_store::catalog::{ClaimOptions, EmbeddedSlide, Job, JobState};
use gigapath_store::vector::{SlidePoint, SLIDES};
use gigapath_store::StoreError;
use gigapath_store::{FeatureFile, FeatureFileWriter, FeatureMetadata};
use gigapath_wsi::{
    outputs, tile_slide, BatchData, BatchFormat, Slide, StreamConfig, TileStream, TilingOptions,
};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};
use crate::ingest::RunSummary;
use crate::pipeline::{Pipeline, Progress};

/// First wait before retrying an infrastructure error; it doubles up to [`RETRY_MAX_WAIT`].
pub const RETRY_FIRST_WAIT: Duration = Duration::from_millis(500);
/// Longest wait between two tries.
pub const RETRY_MAX_WAIT: Duration = Duration::from_secs(30);

/// Aborts a background task when dropped (also when unwinding from a panic).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What an `embed_slide` job carries (its payload in the catalog).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideJob {
    /// The slide id.
    pub slide_id: String,
    /// The slide file.
    pub path: PathBuf,
    /// Level-0 um/px for a slide that records none.
    #[serde(default)]
    pub mpp: Option<f64>,
}

/// Where the time of a slide (or a run) went, seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Opening, segmentation, grid, preview pictures.
    pub tiling_s: f64,
    /// The encoder waiting for decoded tiles (0 when decoding keeps ahead).
    pub read_wait_s: f64,
    /// Tile encoder.
    pub encode_s: f64,
    /// Feature file writes.
    pub write_s: f64,
    /// Slide encoder.
    pub slide_encode_s: f64,
    /// Vector store and catalog.
    pub store_s: f64,
}

impl Timings {
    /// Adds `o` to these, field by field.
    pub fn add(&mut self, o: &Timings) {
        self.tiling_s += o.tiling_s;
        self.read_wait_s += o.read_wait_s;
        self.encode_s += o.encode_s;
        self.write_s += o.write_s;
        self.slide_encode_s += o.slide_encode_s;
        self.store_s += o.store_s;
    }
}

/// What embedding a slide produced.
#[derive(Debug, Clone)]
pub struct SlideResult {
    /// Tiles embedded.
    pub tile_count: u64,
    /// Guard fingerprint of the stored point.
    pub fingerprint: String,
    /// Per-role weights (`tile`, `slide`, `alignment`).
    pub fingerprints: BTreeMap<String, String>,
    /// Where the time went.
    pub timings: Timings,
    /// Whether the feature file was reused from an earlier, interrupted run.
    pub reused_features: bool,
}

impl Pipeline {
    /// Embeds `job`'s slide and upserts its point. `cancelled` aborts between batches (a lost
    /// lease, a cancelled job); `still_held` is asked right before the first store write and
    /// aborts with [`PipelineError::LeaseLost`] when the job is no longer this worker's. An
    /// aborted or failed slide leaves no feature file and no point behind. Store and catalog
    /// calls retry their infrastructure errors with back-off ([`Pipeline::retrying`]).
    pub fn embed_slide(
        &self,
        job: &SlideJob,
        cancelled: &AtomicBool,
        still_held: &dyn Fn() -> Result<()>,
        progress: &dyn Progress,
    ) -> Result<SlideResult> {
        let mut t = Timings::default();
        let start = Instant::now();
        let slide = Slide::open(&job.path, job.mpp.or(self.config.tiling.mpp))?;
        let opts = TilingOptions {
            method: self
                .config
                .tiling
                .method
                .parse()
                .map_err(PipelineError::Config)?,
            tissue_threshold: self.config.tiling.tissue_threshold,
            max_tiles: self.config.tiling.max_tiles,
            artifacts: self.config.tiling.artifact_options(),
            mask_geojson: self.config.tiling.mask_for(&job.slide_id, &job.path),
        };
        let tiling = tile_slide(&slide, &opts)?;
        if tiling.tiles.is_empty() {
            return Err(PipelineError::NoTissue(job.path.display().to_string()));
        }
        outputs::write_tiling(&self.tiles_dir(&job.slide_id), &slide, &tiling)?;
        t.tiling_s = start.elapsed().as_secs_f64();

        let models = self.slide_models()?;
        let tile_fp = models.fingerprints["tile"].clone();
        let n = tiling.tiles.len();
        progress.slide_started(&job.slide_id, n);
        let cells: Vec<[u32; 2]> = tiling.tiles.iter().map(|t| [t.gx, t.gy]).collect();
        let feature_path = self.store.feature_path(&job.slide_id, &tile_fp);

        // A feature file from an interrupted run with the same weights and tiles is reused.
        let existing = FeatureFile::read(&feature_path)
            .ok()
            .filter(|f| f.metadata.fingerprints.get("tile") == Some(&tile_fp) && f.len() == n);
        let reused = existing.is_some();
        let (features, info, cells) = match existing {
            Some(f) => {
                progress.tiles_done(n);
                let info = gigapath_store::FeatureFileInfo {
                    path: feature_path.clone(),
                    size_bytes: std::fs::metadata(&feature_path).map_or(0, |m| m.len()),
                    sha256: crate::fingerprint::file_sha256(&feature_path)?,
                    tile_count: n as u64,
                };
                (f.features_f16().to_vec(), info, cells)
            }
            None => self.encode_tiles(
                job,
                &slide,
                &tiling,
                &feature_path,
                cancelled,
                progress,
                &mut t,
            )?,
        };
        // Unreadable tiles were skipped: the slide is what was read.
        let n = cells.len();

        let s = Instant::now();
        let (embedding, joint) = match self.alignment()? {
            None => (models.encode_slide(&features, &cells)?, None),
            Some(a) => {
                a.check_base(&models.fingerprints, &["tile", "slide"])?;
                let (slide, joint) = models.encode_slide_joint(&a.alignment, &features, &cells)?;
                (slide, Some(joint))
            }
        };
        t.slide_encode_s = s.elapsed().as_secs_f64();

        let s = Instant::now();
        let record = self.retrying(
            "reading the slide's catalog record",
            Some(cancelled),
            || self.store.catalog.slide(&job.slide_id),
        )?;
        let (cohort, site, labels) = record
            .map(|r| (r.cohort, r.site, r.labels))
            .unwrap_or_default();
        let point = SlidePoint {
            slide_id: job.slide_id.clone(),
            cohort: cohort.or_else(|| self.config.ingest.cohort.clone()),
            site,
            labels,
            mpp: Some(tiling.plan.mpp),
            tile_count: n as u64,
            fingerprints: models.fingerprints.clone(),
            fingerprint: models.fingerprint(),
            joint,
            slide: embedding,
        };
        // A cancelled job (or one another worker took over) writes nothing.
        still_held()?;
        let point = point.into_point();
        self.retrying("storing the slide's point", Some(cancelled), || {
            self.store.vectors.upsert(SLIDES, vec![point.clone()])
        })?;
        crate::tile_points::write_at_ingest(
            self, &point, &tile_fp, &features, &cells, &tiling, cancelled,
        )?;
        let file = info.record(&job.slide_id, &tile_fp);
        self.retrying("recording the feature file", Some(cancelled), || {
            self.store.catalog.record_feature_file(&file)
        })?;
        t.store_s = s.elapsed().as_secs_f64();
        Ok(SlideResult {
            tile_count: n as u64,
            fingerprint: models.fingerprint(),
            fingerprints: models.fingerprints.clone(),
            timings: t,
            reused_features: reused,
        })
    }

    /// Runs a store or catalog call, retrying its infrastructure errors
    /// ([`StoreError::is_transient`]: server unreachable, connection lost, database busy, store
    /// I/O) with exponential back-off: 0.5 s, doubling up to 30 s between tries, for at most
    /// `ingest.store_retry_seconds` in all (then the error stands: a job is given back to the
    /// queue, uncounted, and the run stops with it), or until `cancelled` is set. Each retry is
    /// logged. Other errors return at once.
    pub fn retrying<T, F, Fut>(
        &self,
        what: &str,
        cancelled: Option<&AtomicBool>,
        mut op: F,
    ) -> std::result::Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, StoreError>>,
    {
        let start = Instant::now();
        let budget = Duration::from_secs(self.config.ingest.store_retry_seconds);
        let mut wait = RETRY_FIRST_WAIT;
        loop {
            match self.block_on(op()) {
                Err(e)
                    if e.is_transient()
                        && start.elapsed() + wait <= budget
                        && !cancelled.is_some_and(|c| c.load(Ordering::Relaxed)) =>
                {
                    tracing::warn!("{what}: {e}; retrying in {:.1} s", wait.as_secs_f64());
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX_WAIT);
                }
                other => return other,
            }
        }
    }

    /// Claims the next slide job for this worker, or `None` when there is nothing to do. Jobs
    /// that the claim parked (their attempts used up by crashes) are recorded as failures of
    /// their slides, with the reason.
    pub(crate) fn claim_next(
        &self,
        options: &ClaimOptions,
        summary: &mut RunSummary,
    ) -> Result<Option<Job>> {
        let claim = self.retrying("claiming a job", None, || {
            self.store.catalog.claim(&self.worker_id, options)
        })?;
        for job in claim.parked {
            let reason = job.error.unwrap_or_else(|| "attempts used up".into());
            tracing::error!("{} (job {}): {reason}", job.subject, job.id);
            match self.retrying("marking the slide failed", None, || {
                self.store.catalog.mark_slide_failed(&job.subject, &reason)
            }) {
                Ok(()) | Err(StoreError::UnknownSlide(_)) => {}
                Err(e) => return Err(e.into()),
            }
            summary.slides_failed += 1;
            summary.failures.push((job.subject, reason));
        }
        Ok(claim.job)
    }

    /// Runs one claimed job: embeds its slide while a background task renews the lease, then
    /// records the result if this worker still holds the job. The slide's own errors (unreadable
    /// file, bad mpp, no tissue, ...) fail the job and the slide. An infrastructure error that
    /// outlasts the retries gives the job back to the queue without counting the attempt, leaves
    /// the slide alone, and ends the run with that error. A panic ends the attempt (counted).
    pub(crate) fn run_job(
        &self,
        job: Job,
        lease: Duration,
        progress: &dyn Progress,
        summary: &mut RunSummary,
    ) -> Result<()> {
        let slide_job: SlideJob = match serde_json::from_value(job.payload.clone()) {
            Ok(j) => j,
            Err(e) => {
                let reason = format!("malformed job payload: {e}");
                self.retrying("failing the job", None, || {
                    self.store
                        .catalog
                        .fail_job(job.id, &self.worker_id, &reason)
                })?;
                return Ok(());
            }
        };
        let id = slide_job.slide_id.clone();
        let job_id = job.id;
        let cancelled = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (catalog, worker, cancelled) = (
                self.store.catalog.clone(),
                self.worker_id.clone(),
                cancelled.clone(),
            );
            AbortOnDrop(self.rt.spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match catalog.renew_lease(job_id, &worker, lease).await {
                        Ok(()) => {}
                        // The catalog is briefly unreachable: the lease still runs; try again.
                        Err(e) if e.is_transient() => {
                            tracing::warn!("job {job_id}: renewing its lease: {e}")
                        }
                        // Cancelled by an operator, or taken over after an expiry.
                        Err(_) => {
                            cancelled.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }))
        };
        let still_held = || -> Result<()> {
            match self.retrying("checking the job's lease", Some(cancelled.as_ref()), || {
                self.store
                    .catalog
                    .renew_lease(job.id, &self.worker_id, lease)
            }) {
                Ok(()) => Ok(()),
                Err(StoreError::LeaseLost { .. }) => {
                    cancelled.store(true, Ordering::Relaxed);
                    Err(PipelineError::LeaseLost)
                }
                Err(e) => Err(e.into()),
            }
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.embed_slide(&slide_job, &cancelled, &still_held, progress)
        }));
        drop(renewer);
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                let reason = format!(
                    "attempt {} (worker {}) panicked: {what}",
                    job.attempts, self.worker_id
                );
                tracing::error!("{id}: {reason}");
                progress.slide_finished(&id, Some(&reason));
                let state = self.retrying("ending the attempt", None, || {
                    self.store.catalog.abandon_job(
                        job.id,
                        &self.worker_id,
                        &reason,
                        self.config.ingest.max_attempts,
                    )
                });
                match state {
                    Ok(JobState::Failed) => {
                        self.retrying("marking the slide failed", None, || {
                            self.store.catalog.mark_slide_failed(&id, &reason)
                        })?;
                        summary.slides_failed += 1;
                        summary.failures.push((id, reason));
                    }
                    Ok(_) | Err(StoreError::LeaseLost { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(());
            }
        };
        match result {
            Ok(r) => {
                let embedded = EmbeddedSlide {
                    slide_id: id.clone(),
                    tile_count: r.tile_count,
                    fingerprint: r.fingerprint,
                    fingerprints: r.fingerprints,
                    collection: SLIDES.into(),
                };
                match self.retrying("recording the slide embedded", None, || {
                    self.store
                        .catalog
                        .complete_slide_job(job.id, &self.worker_id, &embedded)
                }) {
                    Ok(()) => {
                        summary.slides_ok += 1;
                        summary.tiles += r.tile_count;
                        summary.timings.add(&r.timings);
                        progress.slide_finished(&id, None);
                    }
                    Err(StoreError::LeaseLost { .. }) => self.log_lost(&id, job.id),
                    Err(e) if e.is_transient() => {
                        return Err(self.defer(&job, &id, PipelineError::Store(e), progress))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(PipelineError::LeaseLost) => self.log_lost(&id, job.id),
            Err(e) if e.is_transient() => return Err(self.defer(&job, &id, e, progress)),
            Err(e) => {
                let reason = e.to_string();
                tracing::error!("{id}: {reason}");
                progress.slide_finished(&id, Some(&reason));
                match self.retrying("failing the job", None, || {
                    self.store
                        .catalog
                        .fail_job(job.id, &self.worker_id, &reason)
                }) {
                    Ok(()) | Err(StoreError::LeaseLost { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.retrying("marking the slide failed", None, || {
                    self.store.catalog.mark_slide_failed(&id, &reason)
                })?;
                summary.slides_failed += 1;
                summary.failures.push((id, reason));
            }
        }
        Ok(())
    }

    /// Gives `job` back to the queue after an infrastructure error that outlasted the retries
    /// (the attempt is not counted; the slide keeps its state) and returns the error that ends
    /// the run.
    fn defer(
        &self,
        job: &Job,
        id: &str,
        error: PipelineError,
        progress: &dyn Progress,
    ) -> PipelineError {
        let reason = format!("infrastructure error (not counted as an attempt): {error}");
        tracing::error!("{id}: {reason}; job {} goes back to the queue", job.id);
        progress.slide_finished(id, Some(&reason));
        match self.retrying("giving the job back", None, || {
            self.store
                .catalog
                .defer_job(job.id, &self.worker_id, &reason)
        }) {
            Ok(()) | Err(StoreError::LeaseLost { .. }) => {}
            Err(e) => tracing::error!(
                "job {}: cannot give it back ({e}); it is redone once its lease expires",
                job.id
            ),
        }
        error
    }

    /// A job that stopped being ours: cancelled by an operator, or taken over by another worker
    /// after our lease expired. Nothing of it was recorded.
    fn log_lost(&self, id: &str, job_id: i64) {
        let state = self.block_on(self.store.catalog.job(job_id)).ok().flatten();
        match state.map(|j| j.state) {
            Some(JobState::Cancelled) => {
                tracing::warn!("{id}: job {job_id} was cancelled; its result was discarded")
            }
            _ => tracing::warn!("{id}: lease lost; another worker owns job {job_id} now"),
        }
    }

    /// Streams the kept tiles through the tile encoder into the feature file; returns the
    /// features (f16, N x D) and grid cells of the tiles read for the slide encoder. Unreadable
    /// tiles are skipped up to `tiling.max_bad_tile_fraction` and listed in the slide's tiles
    /// folder (`skipped_tiles.csv`).
    #[allow(clippy::too_many_arguments)]
    fn encode_tiles(
        &self,
        job: &SlideJob,
        slide: &Slide,
        tiling: &gigapath_wsi::Tiling,
        feature_path: &std::path::Path,
        cancelled: &AtomicBool,
        progress: &dyn Progress,
        t: &mut Timings,
    ) -> Result<(Vec<f16>, gigapath_store::FeatureFileInfo, Vec<[u32; 2]>)> {
        let models = self.slide_models()?;
        let d = models.tile_dim();
        let n = tiling.tiles.len();
        let metadata = FeatureMetadata {
            slide_id: job.slide_id.clone(),
            tile_mpp: tiling.plan.tile_mpp,
            level0_tile_px: tiling.plan.level0_tile_px,
            fingerprints: BTreeMap::from([(
                "tile".to_string(),
                models.fingerprints["tile"].clone(),
            )]),
        };
        let mut writer = FeatureFileWriter::create(feature_path, d, metadata)?;
        let mut features: Vec<f16> = Vec::with_capacity(n * d);
        let config = StreamConfig {
            batch_size: self.config.ingest.batch_size,
            threads: self.config.ingest.reader_threads,
            format: BatchFormat::Normalized,
            window: 0,
            max_bad_tile_fraction: self.config.tiling.max_bad_tile_fraction,
        };
        let mut cells = Vec::with_capacity(n);
        let tiles: Arc<[gigapath_wsi::TileRef]> = tiling.tiles.clone().into();
        let mut stream = TileStream::start(slide.path(), &tiling.plan, tiles.clone(), &config)?;
        loop {
            let wait = Instant::now();
            let Some(batch) = stream.next() else { break };
            t.read_wait_s += wait.elapsed().as_secs_f64();
            let batch = batch?;
            if cancelled.load(Ordering::Relaxed) {
                return Err(PipelineError::LeaseLost);
            }
            let rows: Vec<_> = batch.read_indices().map(|i| tiles[i]).collect();
            if rows.is_empty() {
                progress.tiles_done(batch.len);
                continue;
            }
            let BatchData::Normalized(px) = batch.data else {
                unreachable!("the stream was asked for normalized batches")
            };
            let s = Instant::now();
            let feats = models.encode_tiles(px, rows.len())?;
            t.encode_s += s.elapsed().as_secs_f64();
            let s = Instant::now();
            cells.extend(rows.iter().map(|r| [r.gx, r.gy]));
            let grid: Vec<[i32; 2]> = rows.iter().map(|r| [r.gx as i32, r.gy as i32]).collect();
            let origins: Vec<[i64; 2]> = rows.iter().map(|r| [r.x0 as i64, r.y0 as i64]).collect();
            writer.append(&feats, &grid, &origins)?;
            features.extend(feats.iter().map(|&x| f16::from_f32(x)));
            t.write_s += s.elapsed().as_secs_f64();
            progress.tiles_done(batch.len);
        }
        if !stream.skipped().is_empty() {
            tracing::warn!(
                "{}: {} of {n} tiles unreadable and skipped (first: {})",
                job.slide_id,
                stream.skipped().len(),
                stream.skipped()[0].error
            );
            outputs::write_skipped_tiles(&self.tiles_dir(&job.slide_id), &tiles, stream.skipped())?;
        }
        let s = Instant::now();
        let info = writer.finish()?;
        t.write_s += s.elapsed().as_secs_f64();
        Ok((features, info, cells))
    }
}
