//! A training run: pairs from the catalog, frozen parts computed once, AdamW steps over the
//! trainable parts, validation, checkpoints, metrics, and an exact resume after a kill.
//!
//! Speed on CPU comes from caching what does not change: with a frozen slide encoder each
//! slide's pooled embedding is computed once (with `k` fine-tuned layers, its hidden state
//! before them), with a frozen text encoder each report's pooled embedding (else its hidden
//! states before the fine-tuned layers). A step then runs only heads, loss and any fine-tuned
//! layers.
//!
//! Exact resume: the data order is a pure function of (seed, micro-batch index), a checkpoint
//! holds the parameters, AdamW's moments and the step, and the split is saved with the run; a
//! resumed run therefore draws the same batches and computes the same losses, bit for bit, as
//! one that was never interrupted. `metrics.jsonl` is cut back to the checkpoint's step first.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use gigapath_models::align::{self, Alignment, AlignmentConfig, SlidePrefix, TextPrefix};
use gigapath_models::{Precision, SlideEncoder, TextEncoder};
use gigapath_pipeline::fingerprint::model_fingerprint;
use gigapath_pipeline::Pipeline;
use gigapath_store::catalog::{RunStatus, TrainingPair};
use gigapath_store::FeatureFile;
use gigapath_zeroshot::recall_at_k;
use serde::Serialize;

use crate::cache::PrefixCache;
use crate::checkpoint::{self, CheckpointContents, TrainerState, RUN_CONFIG};
use crate::config::RunConfig;
use crate::data::{self, BatchOrder, Split};
use crate::error::{Result, TrainError};
use crate::optim::{clip_grad_norm, lr_factor, AdamW};
use crate::plot::write_curve;
use crate::runlog::{self, MetricsLog, Recall, StepRecord, ValMetrics, METRICS_FILE};

/// Folder of all runs inside the data dir.
pub const ALIGNMENT_DIR: &str = "alignment";
/// The loss curve in the run folder.
pub const CURVE_FILE: &str = "curve.png";
/// Frozen-part cache folder inside [`ALIGNMENT_DIR`] (see [`crate::cache`]).
pub const CACHE_DIR: &str = "cache";

/// What to run.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// The run config.
    pub config: RunConfig,
    /// Stop right after this step as a kill would (no final checkpoint, the run stays
    /// `running`): for resume tests.
    pub stop_after: Option<u64>,
}

/// Callbacks for long work; the CLI draws progress bars with them.
pub trait TrainProgress: Sync {
    /// A phase with `total` units starts (`caching slides`, `training`, ...).
    fn phase(&self, _name: &str, _total: u64, _done: u64) {}
    /// `n` more units of the current phase are done.
    fn advance(&self, _n: u64) {}
    /// A training step ended.
    fn step(&self, _record: &StepRecord) {}
}

/// Reports nothing.
pub struct Silent;
impl TrainProgress for Silent {}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    /// The run's id.
    pub run_id: String,
    /// Its folder (`<data dir>/alignment/<run id>`).
    pub run_dir: PathBuf,
    /// The newest checkpoint (`None` if stopped before the first).
    pub checkpoint: Option<PathBuf>,
    /// Its fingerprint (what re-embedded points will carry with the base fingerprints).
    pub checkpoint_fingerprint: Option<String>,
    /// Steps done.
    pub step: u64,
    /// Steps the run is configured for (`optim.steps`).
    pub total_steps: u64,
    /// The step a resumed run started from.
    pub resumed_from: Option<u64>,
    /// Whether the run reached `optim.steps`.
    pub completed: bool,
    /// Pairs trained on.
    pub train_pairs: usize,
    /// Pairs held out.
    pub validation_pairs: usize,
    /// Trainable scalars.
    pub parameters: usize,
    /// The last step's record; `None` before the first step.
    pub last: Option<StepRecord>,
    /// The latest validation metrics; `None` when validation has not run yet.
    pub validation: Option<ValMetrics>,
    /// Seconds to compute the frozen parts.
    pub cache_seconds: f64,
    /// Seconds of the step loop in this process.
    pub train_seconds: f64,
    /// Optimizer steps per second in this process (validation and checkpoints included).
    pub steps_per_second: f64,
    /// Peak resident memory of the process (Linux `VmHWM`).
    pub peak_rss_bytes: Option<u64>,
}

/// The frozen parts, one per slide and one per report.
struct Caches {
    slides: HashMap<String, SlidePrefix>,
    texts: HashMap<String, TextPrefix>,
}

/// The loaded base encoders and their fingerprints.
struct Bases {
    slide: SlideEncoder,
    text: TextEncoder,
    slide_dir: PathBuf,
    text_dir: PathBuf,
    fingerprints: BTreeMap<String, String>,
}

fn load_bases(pipeline: &Pipeline) -> Result<Bases> {
    let m = &pipeline.config.models;
    let need = |p: &Option<PathBuf>, key: &str| {
        p.clone().ok_or_else(|| {
            TrainError::Data(format!(
                "models.{key} is not configured for this data dir (ingest with it first, or set it in --config)"
            ))
        })
    };
    let (tile_dir, slide_dir, text_dir) = (
        need(&m.tile_dir().map(PathBuf::from), "tile_encoder")?,
        need(&m.slide_dir().map(PathBuf::from), "slide_encoder")?,
        need(&m.text_encoder, "text_encoder")?,
    );
    let precision = Precision::parse(&m.device, &m.dtype)?;
    let fingerprints = BTreeMap::from([
        ("tile".to_string(), model_fingerprint(&tile_dir)?),
        ("slide".to_string(), model_fingerprint(&slide_dir)?),
        ("text".to_string(), model_fingerprint(&text_dir)?),
    ]);
    Ok(Bases {
        slide: SlideEncoder::load(&slide_dir, &precision)?,
        text: TextEncoder::load(&text_dir, &precision)?,
        slide_dir,
        text_dir,
        fingerprints,
    })
}

/// The alignment config a run trains.
fn alignment_config(cfg: &RunConfig, bases: &Bases, run_id: &str) -> Result<AlignmentConfig> {
    let mut a = AlignmentConfig::new(bases.slide.config(), bases.text.config());
    let (slide_head, text_head) = cfg.heads()?;
    let (slide_pool, text_pool) = cfg.pools()?;
    a.joint_dim = cfg.model.joint_dim;
    a.slide_head = slide_head;
    a.text_head = text_head;
    a.slide_pool = slide_pool;
    a.text_pool = text_pool;
    a.max_logit_scale = cfg.model.max_logit_scale;
    a.slide_trainable_layers = cfg.model.slide_trainable_layers;
    a.text_trainable_layers = cfg.model.text_trainable_layers;
    a.base_fingerprints = bases.fingerprints.clone();
    a.run_id = run_id.to_string();
    a.validate().map_err(|msg| {
        let key = if msg.starts_with("slide_trainable") {
            "model.slide_trainable_layers"
        } else if msg.starts_with("text_trainable") {
            "model.text_trainable_layers"
        } else {
            "model"
        };
        TrainError::config(key, msg)
    })?;
    Ok(a)
}

/// Tile features, grid cells (checked) and the mpp the slide was tiled at, from a feature file.
pub(crate) fn read_features(path: &str, device: &Device) -> Result<(Tensor, Vec<[u32; 2]>, f64)> {
    let f = FeatureFile::read(path)?;
    let cells = f
        .grid_xy
        .iter()
        .map(|&[x, y]| {
            if x < 0 || y < 0 {
                Err(TrainError::Data(format!(
                    "{path}: negative grid cell ({x}, {y})"
                )))
            } else {
                Ok([x as u32, y as u32])
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::from_vec(f.features_f32(), (f.len(), f.dim), device)?;
    Ok((x, cells, f.metadata.tile_mpp))
}

fn build_caches(
    model: &Alignment,
    bases: &Bases,
    pairs: &[TrainingPair],
    cache_dir: &Path,
    device: &Device,
    progress: &dyn TrainProgress,
) -> Result<Caches> {
    let cfg = model.config();
    let identity = serde_json::json!({
        "format": 1,
        "base": bases.fingerprints,
        "slide_pool": cfg.slide_pool,
        "text_pool": cfg.text_pool,
    })
    .to_string();
    let mut disk = PrefixCache::open(cache_dir, &identity, device);
    let (slide_frozen, text_frozen) = (!model.fine_tunes_slide(), !model.fine_tunes_text());

    let mut slides = HashMap::new();
    let unique: Vec<&TrainingPair> = {
        let mut seen = std::collections::HashSet::new();
        pairs
            .iter()
            .filter(|p| seen.insert(p.slide_id.clone()))
            .collect()
    };
    progress.phase("caching slides", unique.len() as u64, 0);
    for p in unique {
        let key = PrefixCache::slide_key(&p.slide_id, &p.feature_path);
        let prefix = match disk.get(&key).filter(|_| slide_frozen) {
            Some(t) => SlidePrefix::Embedding(t.clone()),
            None => {
                let (x, cells, _) = read_features(&p.feature_path, device)?;
                let prefix = model.slide_prefix(&bases.slide, &x, &cells)?;
                if let SlidePrefix::Embedding(t) = &prefix {
                    disk.insert(key, t.clone());
                }
                prefix
            }
        };
        slides.insert(p.slide_id.clone(), prefix);
        progress.advance(1);
    }

    progress.phase("caching reports", pairs.len() as u64, 0);
    let mut texts = HashMap::new();
    let mut todo: Vec<&TrainingPair> = Vec::new();
    for p in pairs {
        match disk
            .get(&PrefixCache::text_key(&p.text))
            .filter(|_| text_frozen)
        {
            Some(t) => {
                texts.insert(p.report_id.clone(), TextPrefix::Embedding(t.clone()));
                progress.advance(1);
            }
            None => todo.push(p),
        }
    }
    // Similar lengths batch together: padding to the longest text is wasted work.
    todo.sort_by_key(|p| p.text.len());
    for chunk in todo.chunks(32) {
        let t: Vec<&str> = chunk.iter().map(|p| p.text.as_str()).collect();
        for (p, prefix) in chunk.iter().zip(model.text_prefixes(&bases.text, &t)?) {
            if let TextPrefix::Embedding(e) = &prefix {
                disk.insert(PrefixCache::text_key(&p.text), e.clone());
            }
            texts.insert(p.report_id.clone(), prefix);
        }
        progress.advance(chunk.len() as u64);
    }
    disk.save()?;
    Ok(Caches { slides, texts })
}

/// Joint embeddings of pairs (slides, texts), each [B, joint].
fn embed_pairs(
    model: &Alignment,
    caches: &Caches,
    pairs: &[&TrainingPair],
) -> Result<(Tensor, Tensor)> {
    let s: Vec<&SlidePrefix> = pairs.iter().map(|p| &caches.slides[&p.slide_id]).collect();
    let t: Vec<&TextPrefix> = pairs.iter().map(|p| &caches.texts[&p.report_id]).collect();
    Ok((
        model.project_slides(&model.slide_embeddings(&s)?)?,
        model.project_texts(&model.text_embeddings(&t)?)?,
    ))
}

/// Validation loss and cross-modal recall@k over the held-out pairs.
fn validate(
    model: &Alignment,
    caches: &Caches,
    pairs: &[&TrainingPair],
    batch: usize,
) -> Result<Option<ValMetrics>> {
    if pairs.len() < 2 {
        return Ok(None);
    }
    let mut loss_sum = 0.0;
    let mut batches = 0;
    let mut slides = Vec::new();
    let mut texts = Vec::new();
    for chunk in pairs.chunks(batch.max(2)) {
        let (s, t) = embed_pairs(model, caches, chunk)?;
        let (s, t) = (s.detach(), t.detach());
        if chunk.len() >= 2 {
            loss_sum += model.clip_loss(&s, &t)?.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        slides.extend(s.to_vec2::<f32>()?);
        texts.extend(t.to_vec2::<f32>()?);
    }
    let (s2r, r2s) = retrieval(pairs, &slides, &texts);
    Ok(Some(ValMetrics {
        loss: loss_sum / batches.max(1) as f64,
        pairs: pairs.len(),
        slide_to_report: s2r,
        report_to_slide: r2s,
    }))
}

/// Recall@1/5/10 both ways for pair-aligned joint embeddings (unit rows). Slides are
/// deduplicated; a slide query hits any of its reports, a report query its slide.
pub(crate) fn retrieval(
    pairs: &[&TrainingPair],
    slides: &[Vec<f32>],
    texts: &[Vec<f32>],
) -> (Recall, Recall) {
    let mut slide_ids: Vec<&str> = Vec::new();
    let mut slide_rows: Vec<&Vec<f32>> = Vec::new();
    for (p, s) in pairs.iter().zip(slides) {
        if !slide_ids.contains(&p.slide_id.as_str()) {
            slide_ids.push(&p.slide_id);
            slide_rows.push(s);
        }
    }
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let s2r_sim: Vec<Vec<f32>> = slide_rows
        .iter()
        .map(|s| texts.iter().map(|t| dot(s, t)).collect())
        .collect();
    let s2r_rel: Vec<Vec<usize>> = slide_ids
        .iter()
        .map(|id| {
            (0..pairs.len())
                .filter(|&j| pairs[j].slide_id == *id)
                .collect()
        })
        .collect();
    let r2s_sim: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| slide_rows.iter().map(|s| dot(t, s)).collect())
        .collect();
    let r2s_rel: Vec<Vec<usize>> = pairs
        .iter()
        .map(|p| {
            vec![slide_ids
                .iter()
                .position(|id| *id == p.slide_id)
                .expect("listed above")]
        })
        .collect();
    let recall = |sim: &[Vec<f32>], rel: &[Vec<usize>]| Recall {
        r1: recall_at_k(sim, rel, 1),
        r5: recall_at_k(sim, rel, 5),
        r10: recall_at_k(sim, rel, 10),
    };
    (recall(&s2r_sim, &s2r_rel), recall(&r2s_sim, &r2s_rel))
}

/// Peak resident memory of this process (Linux), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs (or resumes) the training run of `req` on the data dir of `pipeline`.
pub fn train(
    pipeline: &Pipeline,
    req: &TrainRequest,
    progress: &dyn TrainProgress,
) -> Result<RunOutcome> {
    let cfg = &req.config;
    cfg.validate()?;
    // The store's `joint` vectors were sized when its collections were created; a checkpoint of
    // another width could never be re-embedded into them, so say so before training.
    let store_joint = pipeline.config.store.dims.joint;
    if cfg.model.joint_dim != store_joint {
        return Err(TrainError::Config {
            key: "model.joint_dim".into(),
            msg: format!(
                "{} does not fit this data dir, whose vector store holds joint vectors of {store_joint} \
                 dimensions (fixed when its collections were created): set model.joint_dim = \
                 {store_joint}, or use a new data dir",
                cfg.model.joint_dim
            ),
        });
    }
    let run_id = cfg.run_id();
    let run_dir = pipeline
        .config
        .store
        .data_dir
        .join(ALIGNMENT_DIR)
        .join(&run_id);
    let catalog = &pipeline.store.catalog;
    let result = run(pipeline, req, &run_id, &run_dir, progress);
    if let Err(e) = &result {
        // A run that exists in the catalog records why it stopped; a bad config never got there.
        if pipeline
            .block_on(catalog.run(&run_id))
            .ok()
            .flatten()
            .is_some()
        {
            let _ = pipeline.block_on(catalog.update_run(
                &run_id,
                RunStatus::Failed,
                &serde_json::json!({}),
                None,
                None,
                Some(&e.to_string()),
            ));
        }
    }
    result
}

/// What every part of one run reads: the request, where it lives, its split and base weights.
struct RunCtx<'a> {
    pipeline: &'a Pipeline,
    cfg: &'a RunConfig,
    run_id: &'a str,
    run_dir: &'a Path,
    run_toml: &'a str,
    bases: &'a Bases,
}

/// The trainable parts of a run and their optimiser, fresh or restored from a checkpoint.
struct Trainable {
    model: Alignment,
    varmap: VarMap,
    optimizer: AdamW,
    /// The `logit_scale` parameter, clamped after every step.
    logit_scale: Var,
    /// The step the run starts (or resumes) at.
    start_step: u64,
}

fn run(
    pipeline: &Pipeline,
    req: &TrainRequest,
    run_id: &str,
    run_dir: &Path,
    progress: &dyn TrainProgress,
) -> Result<RunOutcome> {
    let cfg = &req.config;
    let run_toml = cfg.to_toml();
    let bases = load_bases(pipeline)?;
    let mut align_cfg = alignment_config(cfg, &bases, run_id)?;
    let ctx = RunCtx {
        pipeline,
        cfg,
        run_id,
        run_dir,
        run_toml: &run_toml,
        bases: &bases,
    };
    let resume_from = open_run_dir(&ctx)?;
    let (pairs, split) = load_split(&ctx, resume_from.as_deref())?;
    let train_pairs: Vec<&TrainingPair> = pairs
        .iter()
        .filter(|p| split.train.binary_search(&p.slide_id).is_ok())
        .collect();
    let val_pairs: Vec<&TrainingPair> = pairs
        .iter()
        .filter(|p| split.is_validation(&p.slide_id))
        .collect();
    if train_pairs.len() < 2 {
        return Err(TrainError::Data(format!(
            "{} training pair(s) found for run `{run_id}`'s split: need at least 2",
            train_pairs.len()
        )));
    }
    tracing::info!(
        "run {run_id}: {} training and {} validation pairs (split by {}), {} steps",
        train_pairs.len(),
        val_pairs.len(),
        split.by,
        cfg.optim.steps
    );

    let device = Precision::parse(&pipeline.config.models.device, "f32")?.device;
    let mut t = Trainable::init(
        &ctx,
        &align_cfg,
        &device,
        resume_from.as_deref(),
        &train_pairs,
    )?;
    let catalog = &pipeline.store.catalog;
    let run_json = serde_json::json!({
        "run": toml_to_json(&run_toml),
        "base_fingerprints": bases.fingerprints,
        "run_dir": run_dir,
    });
    pipeline.block_on(catalog.start_run(run_id, &run_json))?;

    let cache_start = Instant::now();
    let cache_dir = pipeline
        .config
        .store
        .data_dir
        .join(ALIGNMENT_DIR)
        .join(CACHE_DIR);
    let caches = build_caches(&t.model, &bases, &pairs, &cache_dir, &device, progress)?;
    let cache_seconds = cache_start.elapsed().as_secs_f64();

    let start_step = t.start_step;
    let total = cfg.optim.steps;
    let accum = cfg.optim.grad_accum_steps as u64;
    let order = BatchOrder::new(train_pairs.len(), cfg.optim.batch_size, cfg.run.seed);
    let metrics_path = run_dir.join(METRICS_FILE);
    let mut history = runlog::read(&metrics_path, start_step)?;
    let mut log = MetricsLog::open(&metrics_path, &history)?;
    let mut outcome = RunOutcome {
        run_id: run_id.to_string(),
        run_dir: run_dir.to_path_buf(),
        checkpoint: resume_from.clone(),
        checkpoint_fingerprint: match &resume_from {
            Some(d) => checkpoint::read_fingerprints(d)?.get("alignment").cloned(),
            None => None,
        },
        step: start_step,
        total_steps: total,
        resumed_from: resume_from.as_ref().map(|_| start_step),
        completed: start_step >= total,
        train_pairs: train_pairs.len(),
        validation_pairs: val_pairs.len(),
        parameters: t.optimizer.parameter_count(),
        last: history.last().cloned(),
        validation: history.iter().rev().find_map(|r| r.val.clone()),
        cache_seconds,
        train_seconds: 0.0,
        steps_per_second: 0.0,
        peak_rss_bytes: None,
    };
    progress.phase("training", total, start_step);
    let started = Instant::now();
    for step in start_step..total {
        let factor = lr_factor(step, total, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio);
        let (lr, encoder_lr) = (cfg.optim.lr * factor, cfg.optim.encoder_lr * factor);
        let batches: Vec<Vec<&TrainingPair>> = (0..accum)
            .map(|a| {
                let batch = order.batch(step * accum + a).into_iter();
                batch.map(|i| train_pairs[i]).collect()
            })
            .collect();
        let (loss, grad_norm) = t.step(cfg, &caches, &batches, lr, encoder_lr)?;
        let done = step + 1;
        let val_due =
            done == total || (cfg.eval.every_steps > 0 && done % cfg.eval.every_steps == 0);
        let val = if val_due {
            validate(&t.model, &caches, &val_pairs, order.batch_size())?
        } else {
            None
        };
        let record = StepRecord {
            step: done,
            epoch: order.epoch(step * accum),
            loss,
            lr,
            encoder_lr,
            logit_scale: t.model.logit_scale() as f64,
            grad_norm,
            elapsed_s: started.elapsed().as_secs_f64(),
            val: val.clone(),
        };
        if !record.loss.is_finite() {
            return Err(TrainError::Data(format!(
                "the loss is {} at step {done}: lower optim.lr (now {})",
                record.loss, cfg.optim.lr
            )));
        }
        log.write(&record)?;
        progress.step(&record);
        history.push(record.clone());
        outcome.step = done;
        outcome.last = Some(record);
        if val.is_some() {
            outcome.validation = val;
        }
        if done == total || done % cfg.checkpoint.every_steps == 0 {
            align_cfg.step = done;
            let state = TrainerState {
                run_id: run_id.to_string(),
                step: done,
                micro_batches: done * accum,
                epoch: order.epoch(done * accum),
                optimizer_t: t.optimizer.t,
                seed: cfg.run.seed,
                train_pairs: train_pairs.len(),
            };
            save_checkpoint(&ctx, &t, &align_cfg, &state, &split, &history, &mut outcome)?;
        }
        if req.stop_after == Some(done) && done < total {
            break;
        }
    }
    outcome.completed = outcome.step >= total;
    if outcome.completed && start_step >= total {
        // Nothing left to do: make sure the catalog says so (a kill may have hit after the last
        // checkpoint but before the status update).
        pipeline.block_on(
            catalog.update_run(
                run_id,
                RunStatus::Done,
                &run_metrics(&history, &outcome),
                outcome
                    .checkpoint
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .as_deref(),
                outcome.checkpoint_fingerprint.as_deref(),
                None,
            ),
        )?;
    }
    let steps_here = outcome.step - start_step;
    outcome.train_seconds = started.elapsed().as_secs_f64();
    outcome.steps_per_second = steps_here as f64 / outcome.train_seconds.max(1e-9);
    outcome.peak_rss_bytes = peak_rss_bytes();
    Ok(outcome)
}

/// Creates the run folder, or checks that an existing one is this run (same config, same base
/// weights); returns the checkpoint to resume from, if any.
fn open_run_dir(ctx: &RunCtx<'_>) -> Result<Option<PathBuf>> {
    let (run_id, run_dir) = (ctx.run_id, ctx.run_dir);
    let stored_config = run_dir.join(RUN_CONFIG);
    if stored_config.is_file() {
        let before = RunConfig::load(&stored_config)?;
        if &before != ctx.cfg {
            return Err(TrainError::Mismatch(format!(
                "run `{run_id}` exists in {} with a different config; give this config another \
                 run.id (or delete that folder to start over)",
                run_dir.display()
            )));
        }
    }
    std::fs::create_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
    checkpoint::tidy(run_dir, ctx.cfg.checkpoint.keep_last)?;
    let resume_from = checkpoint::latest(run_dir)?;
    if let Some(dir) = &resume_from {
        let fps = checkpoint::read_fingerprints(dir)?;
        for (role, fp) in &ctx.bases.fingerprints {
            if fps.get(role).is_some_and(|f| f != fp) {
                return Err(TrainError::Mismatch(format!(
                    "run `{run_id}` was trained on {role} weights {} but the data dir's {role} \
                     encoder is {fp}: resume with the same weights, or start a new run",
                    fps[role]
                )));
            }
        }
    }
    Ok(resume_from)
}

/// The catalog's training pairs for the base tile weights and the run's split: the
/// checkpoint's when resuming, the run folder's when it has one, else a new one. The split and
/// the run's config are written to the run folder.
fn load_split(ctx: &RunCtx<'_>, resume_from: Option<&Path>) -> Result<(Vec<TrainingPair>, Split)> {
    let pipeline = ctx.pipeline;
    let tile_fp = &ctx.bases.fingerprints["tile"];
    let pairs = pipeline.block_on(pipeline.store.training_pairs(tile_fp))?;
    if pairs.is_empty() {
        return Err(TrainError::Data(format!(
            "no training pairs in {}: no report belongs to a slide with tile features from the \
             configured tile encoder ({tile_fp}); ingest slides with --reports first",
            pipeline.config.store.data_dir.display()
        )));
    }
    let split = match resume_from {
        Some(dir) => checkpoint::read_split(dir)?,
        None if ctx.run_dir.join(checkpoint::SPLIT).is_file() => {
            checkpoint::read_split(ctx.run_dir)?
        }
        None => data::split(&pairs, &ctx.cfg.data, ctx.cfg.run.seed)?,
    };
    checkpoint::write_json(&ctx.run_dir.join(checkpoint::SPLIT), &split)?;
    checkpoint::write_text(&ctx.run_dir.join(RUN_CONFIG), ctx.run_toml)?;
    Ok((pairs, split))
}

impl Trainable {
    /// The alignment model and AdamW, restored from `resume_from` when given (which must have
    /// been trained over as many pairs as `train_pairs` holds).
    fn init(
        ctx: &RunCtx<'_>,
        align_cfg: &AlignmentConfig,
        device: &Device,
        resume_from: Option<&Path>,
        train_pairs: &[&TrainingPair],
    ) -> Result<Trainable> {
        let (model, mut varmap) = align::init_trainable(
            align_cfg,
            Some(&ctx.bases.slide_dir),
            Some(&ctx.bases.text_dir),
            ctx.cfg.run.seed,
            device,
        )?;
        let mut optimizer = AdamW::new(&varmap, &ctx.cfg.optim)?;
        let mut start_step = 0;
        if let Some(dir) = resume_from {
            let state = checkpoint::read_state(dir)?;
            if state.train_pairs != train_pairs.len() {
                return Err(TrainError::checkpoint(
                    dir,
                    format!(
                        "was trained over {} pairs, the catalog now gives {} for its split: the \
                         data order cannot be reproduced (start a new run)",
                        state.train_pairs,
                        train_pairs.len()
                    ),
                ));
            }
            varmap.load(dir.join(align::WEIGHTS_FILE)).map_err(|e| {
                TrainError::checkpoint(dir, format!("{}: {e}", align::WEIGHTS_FILE))
            })?;
            optimizer.load_state(&checkpoint::read_optimizer(dir, device)?, state.optimizer_t)?;
            start_step = state.step;
            tracing::info!(
                "run {}: resuming from {} (step {start_step})",
                ctx.run_id,
                dir.display()
            );
        }
        let logit_scale = varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get("logit_scale")
            .cloned()
            .expect("the alignment has a logit scale");
        Ok(Trainable {
            model,
            varmap,
            optimizer,
            logit_scale,
            start_step,
        })
    }

    /// One optimiser step over `batches` (the step's micro-batches): gradients accumulated,
    /// clipped, AdamW applied, the logit scale clamped. Returns the mean loss and the gradient
    /// norm before clipping.
    fn step(
        &mut self,
        cfg: &RunConfig,
        caches: &Caches,
        batches: &[Vec<&TrainingPair>],
        lr: f64,
        encoder_lr: f64,
    ) -> Result<(f64, f64)> {
        let accum = batches.len() as f64;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0.0;
        for batch in batches {
            let (s, t) = embed_pairs(&self.model, caches, batch)?;
            let loss = self.model.clip_loss(&s, &t)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = loss.affine(1.0 / accum, 0.0)?.backward()?;
            for (name, var) in self.optimizer.vars() {
                if let Some(g) = g.get(var.as_tensor()) {
                    let sum = match grads.remove(name) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.to_string(), sum);
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.optim.grad_clip_norm)?;
        self.optimizer.step(&grads, lr, encoder_lr)?;
        // open_clip clamps the parameter itself after each step, not just its use.
        let clamped = self
            .logit_scale
            .as_tensor()
            .minimum(cfg.model.max_logit_scale)?;
        self.logit_scale.set(&clamped)?;
        Ok((loss_sum / accum, grad_norm))
    }
}

/// Writes a checkpoint at `state.step`, prunes old ones, redraws the curve and records the
/// checkpoint (and the run's status) in the catalog and in `outcome`.
fn save_checkpoint(
    ctx: &RunCtx<'_>,
    t: &Trainable,
    align_cfg: &AlignmentConfig,
    state: &TrainerState,
    split: &Split,
    history: &[StepRecord],
    outcome: &mut RunOutcome,
) -> Result<()> {
    let (dir, fingerprint) = checkpoint::write(
        ctx.run_dir,
        &CheckpointContents {
            alignment: align_cfg,
            varmap: &t.varmap,
            optimizer: &t.optimizer,
            state,
            run_toml: ctx.run_toml,
            split,
            base_fingerprints: &ctx.bases.fingerprints,
        },
    )?;
    checkpoint::tidy(ctx.run_dir, ctx.cfg.checkpoint.keep_last)?;
    write_curve(&ctx.run_dir.join(CURVE_FILE), history)?;
    let status = if state.step == ctx.cfg.optim.steps {
        RunStatus::Done
    } else {
        RunStatus::Running
    };
    ctx.pipeline
        .block_on(ctx.pipeline.store.catalog.update_run(
            ctx.run_id,
            status,
            &run_metrics(history, outcome),
            Some(&dir.display().to_string()),
            Some(&fingerprint),
            None,
        ))?;
    outcome.checkpoint = Some(dir);
    outcome.checkpoint_fingerprint = Some(fingerprint);
    Ok(())
}

/// Run-level metrics for the catalog.
fn run_metrics(history: &[StepRecord], outcome: &RunOutcome) -> serde_json::Value {
    let last = history.last();
    let val = history.iter().rev().find_map(|r| r.val.as_ref());
    serde_json::json!({
        "step": last.map(|r| r.step),
        "total_steps": outcome.total_steps,
        "loss": last.map(|r| r.loss),
        "logit_scale": last.map(|r| r.logit_scale),
        "val_loss": val.map(|v| v.loss),
        "val_slide_to_report_r1": val.map(|v| v.slide_to_report.r1),
        "val_report_to_slide_r1": val.map(|v| v.report_to_slide.r1),
        "val_report_to_slide_r5": val.map(|v| v.report_to_slide.r5),
        "train_pairs": outcome.train_pairs,
        "validation_pairs": outcome.validation_pairs,
    })
}

fn toml_to_json(text: &str) -> serde_json::Value {
    text.parse::<toml::Table>()
        .ok()
        .and_then(|t| serde_json::to_value(t).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The run folder of `run_id` in a data dir.
pub fn run_dir(data_dir: &Path, run_id: &str) -> PathBuf {
    data_dir.join(ALIGNMENT_DIR).join(run_id)
}

/// The split a checkpoint was trained with (its `split.json`, else its run folder's).
pub fn checkpoint_split(checkpoint: &Path) -> Result<Option<Split>> {
    for dir in [Some(checkpoint), checkpoint.parent()]
        .into_iter()
        .flatten()
    {
        if dir.join(checkpoint::SPLIT).is_file() {
            return Ok(Some(checkpoint::read_split(dir)?));
        }
    }
    Ok(None)
}
