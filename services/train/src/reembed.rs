//! Re-embedding a data dir with an alignment checkpoint: every stored slide gets its `joint`
//! vector (and its `slide` vector again, changed when the checkpoint fine-tuned slide layers)
//! from its feature file, every report its `joint` (and `text`) vector, all under the combined
//! fingerprint that includes the checkpoint's.
//!
//! Never a mixed collection: the checkpoint's base fingerprints are checked against the
//! configured encoders and every slide's features before anything is written, the whole
//! collection is rewritten, and the store is asked afterwards whether any point still carries
//! another fingerprint. The data dir's config then names the checkpoint (`models.alignment`), so
//! later ingests and the service use it too. Re-running after a kill redoes the whole job.

use std::path::PathBuf;
use std::time::Instant;

use gigapath_models::{Precision, SlideEncoder};
use gigapath_pipeline::config::set_data_dir_alignment;
use gigapath_pipeline::encoders::{slide_fingerprints, text_fingerprints};
use gigapath_pipeline::Pipeline;
use gigapath_store::catalog::{EmbeddedSlide, ModelRecord, SlideState};
use gigapath_store::vector::{combined_fingerprint, ReportPoint, SlidePoint, REPORTS, SLIDES};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::trainer::{read_features, TrainProgress};

/// Points per upsert.
const BATCH: usize = 32;

/// What a re-embedding did.
#[derive(Debug, Clone, Serialize)]
pub struct ReembedSummary {
    /// The alignment checkpoint folder used.
    pub alignment: PathBuf,
    /// Its weights' fingerprint.
    pub alignment_fingerprint: String,
    /// Guard fingerprint of the `slides` points now.
    pub slide_fingerprint: String,
    /// Guard fingerprint of the `reports` points now.
    pub report_fingerprint: String,
    /// Slide points re-embedded.
    pub slides: u64,
    /// Report points re-embedded.
    pub reports: u64,
    /// Whether slide-encoder layers were fine-tuned (the `slide` vectors changed).
    pub slide_vectors_changed: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Re-embeds the data dir of `pipeline` with its configured `models.alignment`.
pub fn reembed(pipeline: &Pipeline, progress: &dyn TrainProgress) -> Result<ReembedSummary> {
    let start = Instant::now();
    let models = &pipeline.config.models;
    let aligned = pipeline.alignment()?.ok_or_else(|| {
        TrainError::Data("no alignment checkpoint given (models.alignment / --alignment)".into())
    })?;
    let slide_fps = slide_fingerprints(models)?;
    let text_fps = text_fingerprints(models)?;
    aligned.check_base(&slide_fps, &["tile", "slide"])?;
    aligned.check_base(&text_fps, &["text"])?;
    let slide_fp = combined_fingerprint(&slide_fps);
    let report_fp = combined_fingerprint(&text_fps);
    let tile_fp = slide_fps["tile"].clone();
    let catalog = &pipeline.store.catalog;
    let vectors = &pipeline.store.vectors;

    // Every embedded slide needs features from the tile weights the checkpoint was trained on:
    // checked for all of them before the first write.
    let slides: Vec<_> = pipeline
        .block_on(catalog.list_slides(Some(SlideState::Embedded)))?
        .into_iter()
        .collect();
    let mut work = Vec::with_capacity(slides.len());
    for s in slides {
        match pipeline.block_on(pipeline.store.feature_file(&s.id, &tile_fp))? {
            Some(f) => work.push((s, f.path)),
            None => {
                return Err(TrainError::Mismatch(format!(
                    "slide `{}` has no tile features from tile weights {tile_fp}, which alignment {} \
                     was trained on (its stored embedding has fingerprint {}): ingest it with those \
                     weights first",
                    s.id,
                    aligned.dir.display(),
                    s.fingerprint.as_deref().unwrap_or("none")
                )))
            }
        }
    }

    let precision = Precision::parse(&models.device, &models.dtype)?;
    let slide_dir = models
        .slide_dir()
        .ok_or_else(|| TrainError::Data("models.slide_encoder is not configured".into()))?;
    let slide_encoder = SlideEncoder::load(slide_dir, &precision)?;
    progress.phase("re-embedding slides", work.len() as u64, 0);
    for chunk in work.chunks(BATCH) {
        let mut points = Vec::with_capacity(chunk.len());
        for (s, path) in chunk {
            // `mpp`: the one the slide was tiled at (measured at ingest, kept in its feature
            // file); the catalog holds only a user's `--mpp` override.
            let (x, cells, mpp) = read_features(path, &precision.device)?;
            let (slide, joint) = aligned.alignment.slide_joint(&slide_encoder, &x, &cells)?;
            points.push(
                SlidePoint {
                    slide_id: s.id.clone(),
                    cohort: s.cohort.clone(),
                    site: s.site.clone(),
                    labels: s.labels.clone(),
                    mpp: Some(mpp),
                    tile_count: cells.len() as u64,
                    fingerprints: slide_fps.clone(),
                    fingerprint: slide_fp.clone(),
                    joint: Some(joint),
                    slide,
                }
                .into_point(),
            );
        }
        pipeline.block_on(vectors.upsert(SLIDES, points))?;
        for (s, _) in chunk {
            pipeline.block_on(catalog.mark_slide_embedded(&EmbeddedSlide {
                slide_id: s.id.clone(),
                tile_count: s.tile_count.unwrap_or(0),
                fingerprint: slide_fp.clone(),
                fingerprints: slide_fps.clone(),
                collection: SLIDES.into(),
            }))?;
        }
        progress.advance(chunk.len() as u64);
    }

    let reports = pipeline.block_on(catalog.list_reports(None))?;
    let text = pipeline.text_model()?;
    progress.phase("re-embedding reports", reports.len() as u64, 0);
    for chunk in reports.chunks(BATCH) {
        let texts: Vec<&str> = chunk.iter().map(|r| r.text.as_str()).collect();
        let raw = text.encode(&texts)?;
        let joint = aligned
            .alignment
            .text_joint(&text.encoder, &texts)?
            .to_vec2::<f32>()?;
        let points = chunk
            .iter()
            .zip(raw)
            .zip(joint)
            .map(|((r, raw), joint)| {
                ReportPoint {
                    report_id: r.id.clone(),
                    slide_id: r.slide_id.clone(),
                    text: r.text.clone(),
                    labels: r.labels.clone(),
                    fingerprint: report_fp.clone(),
                    joint: Some(joint),
                    text_embedding: raw,
                }
                .into_point()
            })
            .collect();
        pipeline.block_on(vectors.upsert(REPORTS, points))?;
        for r in chunk {
            pipeline.block_on(catalog.mark_report_embedded(&r.id, REPORTS, &report_fp))?;
        }
        progress.advance(chunk.len() as u64);
    }

    for (collection, fp) in [(SLIDES, &slide_fp), (REPORTS, &report_fp)] {
        let (n, other) = pipeline.block_on(vectors.other_fingerprint(collection, fp))?;
        if n > 0 {
            return Err(TrainError::Mismatch(format!(
                "{n} point(s) in `{collection}` still carry another fingerprint ({}) after \
                 re-embedding: they have no catalog record to re-embed from; delete them or \
                 re-ingest their slides",
                other.unwrap_or_default()
            )));
        }
    }
    let details = serde_json::to_value(aligned.alignment.config()).unwrap_or_default();
    pipeline.block_on(catalog.record_model(&ModelRecord {
        fingerprint: aligned.fingerprint.clone(),
        role: "alignment".into(),
        source: aligned.dir.display().to_string(),
        details,
    }))?;
    set_data_dir_alignment(&pipeline.config.store.data_dir, &aligned.dir)?;
    Ok(ReembedSummary {
        alignment: aligned.dir.clone(),
        alignment_fingerprint: aligned.fingerprint.clone(),
        slide_fingerprint: slide_fp,
        report_fingerprint: report_fp,
        slides: work.len() as u64,
        reports: reports.len() as u64,
        slide_vectors_changed: aligned.alignment.fine_tunes_slide(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
