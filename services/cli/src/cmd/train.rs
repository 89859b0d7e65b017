//! `gigapath train`, `gigapath reembed`, `gigapath eval`: alignment runs, re-embedding the stores
//! with a checkpoint, and zero-shot / retrieval evaluation (crate `gigapath-train`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use gigapath_pipeline::{Config, Pipeline};
use gigapath_train::checkpoint;
use gigapath_train::eval::{EvalRequest, EvalSplit};
use gigapath_train::runlog::StepRecord;
use gigapath_train::trainer::ALIGNMENT_DIR;
use gigapath_train::{RunConfig, TrainProgress, TrainRequest};
use gigapath_zeroshot::{PromptLibrary, RobustnessConfig};
use indicatif::ProgressBar;

#[derive(Args)]
pub struct TrainArgs {
    /// Data directory (catalog, vectors, feature files; runs go to DATA_DIR/alignment/<run_id>/).
    #[arg(long, env = "GIGAPATH_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Run config (TOML; keys it leaves out take their defaults, see --show-config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective run config, every default included, and exit.
    #[arg(long)]
    pub show_config: bool,
    /// Run id (overrides `run.id`; default: a hash of the config, so re-running resumes).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ReembedArgs {
    #[arg(long, env = "GIGAPATH_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// An alignment checkpoint folder (`step-<N>/`), or a run folder (its `latest` checkpoint).
    #[arg(long)]
    pub alignment: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SplitArg {
    /// The checkpoint's held-out slides.
    Validation,
    /// Every slide-report pair of the data dir.
    All,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long, env = "GIGAPATH_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Checkpoint or run folder. Default: the data dir's `models.alignment`, else the newest run.
    #[arg(long)]
    pub alignment: Option<PathBuf>,
    /// Subtype prompt set (its `name` or file name). Default: the set whose classes match the
    /// most slide labels.
    #[arg(long)]
    pub prompts: Option<String>,
    /// Folder of prompt sets (default: GIGAPATH_PROMPTS_DIR, ./prompts, or the checkout's).
    #[arg(long)]
    pub prompts_dir: Option<PathBuf>,
    /// Slide label that zero-shot predictions are scored against.
    #[arg(long, default_value = "subtype")]
    pub label: String,
    #[arg(long, value_enum, default_value = "validation")]
    pub split: SplitArg,
    /// Prompt sets sampled for the MI-Zero robustness protocol.
    #[arg(long, default_value_t = 50)]
    pub robustness_sets: usize,
    /// Seed of the sampled prompt sets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Softmax over raw cosines (TITAN) instead of the trained logit scale.
    #[arg(long)]
    pub no_temperature: bool,
    #[arg(long)]
    pub json: bool,
}

/// Progress bars for the phases and the steps.
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        Bars {
            bar: Mutex::new(None),
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

impl TrainProgress for Bars {
    fn phase(&self, name: &str, total: u64, done: u64) {
        self.finish();
        tracing::info!("{name}: {done}/{total}");
        let bar = crate::progress::bar(total, name);
        bar.set_position(done);
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.inc(n);
        }
    }

    fn step(&self, r: &StepRecord) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.inc(1);
            b.set_message(format!("loss {:.3}", r.loss));
        }
        if let Some(v) = &r.val {
            tracing::info!(
                "step {}: loss {:.4}, val loss {:.4}, report->slide R@1 {:.2} R@5 {:.2}",
                r.step,
                r.loss,
                v.loss,
                v.report_to_slide.r1,
                v.report_to_slide.r5
            );
        }
    }
}

fn open(data_dir: &Path, alignment: Option<&Path>) -> Result<Pipeline> {
    let mut config = Config::load(Some(data_dir), None)?;
    if let Some(a) = alignment {
        config.models.alignment = Some(a.to_path_buf());
    }
    config.absolutize();
    config.validate()?;
    Pipeline::open(config).with_context(|| format!("opening the data dir {}", data_dir.display()))
}

pub fn train(args: TrainArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => RunConfig::load(path)?,
        None => RunConfig::default(),
    };
    if let Some(id) = args.run_id {
        config.run.id = id;
        config.validate()?;
    }
    if args.show_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let pipeline = open(&args.data_dir, None)?;
    let bars = Bars::new();
    let outcome = gigapath_train::train(
        &pipeline,
        &TrainRequest {
            config,
            stop_after: None,
        },
        &bars,
    )?;
    bars.finish();
    if args.json {
        println!("{}", serde_json::to_string(&outcome)?);
        return Ok(());
    }
    println!(
        "run {}: step {}/{}{} ({} training pairs, {} validation, {} trainable parameters)",
        outcome.run_id,
        outcome.step,
        outcome.total_steps,
        match outcome.resumed_from {
            Some(s) if s >= outcome.total_steps => " - already complete".to_string(),
            Some(s) => format!(", resumed from step {s}"),
            None => String::new(),
        },
        outcome.train_pairs,
        outcome.validation_pairs,
        outcome.parameters
    );
    if let Some(r) = &outcome.last {
        println!("  loss {:.4}, logit scale {:.1}", r.loss, r.logit_scale);
    }
    if let Some(v) = &outcome.validation {
        println!(
            "  validation: loss {:.4}; report->slide R@1 {:.3} R@5 {:.3}; slide->report R@1 {:.3} R@5 {:.3} ({} pairs)",
            v.loss, v.report_to_slide.r1, v.report_to_slide.r5, v.slide_to_report.r1, v.slide_to_report.r5, v.pairs
        );
    }
    println!(
        "  time: caching {:.1} s, training {:.1} s ({:.1} steps/s); peak memory {}",
        outcome.cache_seconds,
        outcome.train_seconds,
        outcome.steps_per_second,
        outcome
            .peak_rss_bytes
            .map(|b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "n/a".into())
    );
    if let Some(c) = &outcome.checkpoint {
        println!("  checkpoint: {}", c.display());
        println!(
            "  curve: {}",
            outcome
                .run_dir
                .join(gigapath_train::trainer::CURVE_FILE)
                .display()
        );
        println!(
            "next: gigapath eval --data-dir {dir} --alignment {c}\n      gigapath reembed --data-dir {dir} --alignment {c}",
            dir = args.data_dir.display(),
            c = c.display()
        );
    }
    Ok(())
}

pub fn reembed(args: ReembedArgs) -> Result<()> {
    let checkpoint = checkpoint::resolve(&args.alignment)?;
    let checkpoint = std::fs::canonicalize(&checkpoint).unwrap_or(checkpoint);
    let pipeline = open(&args.data_dir, Some(&checkpoint))?;
    let bars = Bars::new();
    let summary = gigapath_train::reembed(&pipeline, &bars)?;
    bars.finish();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    println!(
        "re-embedded {} slides and {} reports with {} (fingerprint {}) in {:.1} s",
        summary.slides,
        summary.reports,
        summary.alignment.display(),
        summary.alignment_fingerprint,
        summary.seconds
    );
    println!(
        "  slides: fingerprint {}{}; reports: fingerprint {}",
        summary.slide_fingerprint,
        if summary.slide_vectors_changed {
            " (slide vectors changed: fine-tuned layers)"
        } else {
            ""
        },
        summary.report_fingerprint
    );
    println!(
        "  {} now names this checkpoint (models.alignment): later ingests write joint vectors with it",
        args.data_dir.join(gigapath_pipeline::config::DATA_DIR_CONFIG).display()
    );
    Ok(())
}

/// The newest run's latest checkpoint in a data dir.
fn newest_checkpoint(data_dir: &Path) -> Option<PathBuf> {
    let runs = std::fs::read_dir(data_dir.join(ALIGNMENT_DIR)).ok()?;
    runs.filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|run| {
            let t = std::fs::metadata(run.join(checkpoint::LATEST))
                .ok()?
                .modified()
                .ok()?;
            Some((t, checkpoint::latest(&run).ok()??))
        })
        .max_by_key(|(t, _)| *t)
        .map(|(_, c)| c)
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let pipeline = open(&args.data_dir, None)?;
    let checkpoint = match &args.alignment {
        Some(p) => checkpoint::resolve(p)?,
        None => pipeline
            .config
            .models
            .alignment
            .clone()
            .or_else(|| newest_checkpoint(&args.data_dir))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no alignment checkpoint: train one (gigapath train) or pass --alignment DIR"
                )
            })?,
    };
    let bars = Bars::new();
    let report = gigapath_train::evaluate(
        &pipeline,
        &EvalRequest {
            checkpoint,
            prompts_dir: args.prompts_dir.unwrap_or_else(PromptLibrary::default_dir),
            prompt_set: args.prompts,
            label: args.label,
            split: match args.split {
                SplitArg::Validation => EvalSplit::Validation,
                SplitArg::All => EvalSplit::All,
            },
            robustness: RobustnessConfig {
                sets: args.robustness_sets,
                seed: args.seed,
                ..RobustnessConfig::default()
            },
            no_temperature: args.no_temperature,
        },
        &bars,
    )?;
    bars.finish();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
