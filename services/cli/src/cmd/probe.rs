//! `gigapath probe train|eval|list|compare|classify`: few-shot and supervised heads on the
//! stored embeddings (crate `gigapath-probe`), next to zero-shot.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use gigapath_pipeline::Pipeline;
use gigapath_probe::abmil::AbmilConfig;
use gigapath_probe::eval::{CvConfig, FewShotConfig};
use gigapath_probe::heads::LinearConfig;
use gigapath_probe::{
    artefact, classify, cross_validate, few_shot_curve, load_dataset, probes_dir, score,
    train_head, Comparison, HeadKind, LabelSource, TrainHeadRequest, ZeroShotRow,
};
use gigapath_query::Space;
use gigapath_train::eval::{EvalRequest, EvalSplit};
use gigapath_zeroshot::{PromptLibrary, RobustnessConfig};

use crate::cmd::ingest::DataArgs;

#[derive(Subcommand)]
pub enum ProbeCommand {
    /// Train a named head on labelled stored slides (cross-validated first unless --no-eval)
    /// and save it as DATA_DIR/probes/NAME/ (head.safetensors + manifest.json).
    Train(TrainArgs),
    /// Cross-validate heads for a label (stratified k-fold by patient; balanced accuracy,
    /// weighted F1, macro AUROC with bootstrap intervals), or score a saved head (--head) on
    /// labelled slides.
    Eval(EvalArgs),
    /// The heads saved in the data dir.
    List(ListArgs),
    /// Zero-shot, the few-shot curve (k = 1, 2, 4, 8, 16 per class) and the cross-validated
    /// linear probe, kNN and prototype heads side by side for one label, with intervals.
    Compare(CompareArgs),
    /// Apply a saved head to stored slides: probabilities, prediction, the head's provenance.
    Classify(ClassifyArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    /// Multinomial logistic regression, L2 penalty chosen by inner validation.
    Linear,
    /// k-nearest neighbours by cosine.
    Knn,
    /// Class means of L2-normalised vectors, cosine.
    Prototype,
    /// Gated attention MIL on the tile feature files.
    Abmil,
}

impl From<KindArg> for HeadKind {
    fn from(k: KindArg) -> HeadKind {
        match k {
            KindArg::Linear => HeadKind::Linear,
            KindArg::Knn => HeadKind::Knn,
            KindArg::Prototype => HeadKind::Prototype,
            KindArg::Abmil => HeadKind::Abmil,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SpaceArg {
    /// The slide encoder's vector.
    Slide,
    /// The aligned vector (after `gigapath reembed`).
    Joint,
}

impl From<SpaceArg> for Space {
    fn from(s: SpaceArg) -> Space {
        match s {
            SpaceArg::Slide => Space::Slide,
            SpaceArg::Joint => Space::Joint,
        }
    }
}

/// Which labelled slides, and which vectors.
#[derive(Args)]
pub struct LabelArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The label to learn: a column of the ingested reports (`subtype`, a gene such as `KRAS`
    /// with mutant / wildtype values, ...) or of --labels-csv.
    #[arg(long, default_value = "subtype")]
    pub label: String,
    /// Labels from a CSV (`slide_id`, the label column or `label`, optional `patient_id`)
    /// instead of the catalog.
    #[arg(long)]
    pub labels_csv: Option<PathBuf>,
    /// Slide vectors the heads read.
    #[arg(long, value_enum, default_value = "slide")]
    pub space: SpaceArg,
    /// Cross-validation folds (grouped by patient, stratified by class).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Bootstrap replicates of the 95% intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of folds, draws, bootstrap and attention-MIL initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Neighbours of the kNN head.
    #[arg(long, default_value_t = 5)]
    pub knn_k: usize,
    /// Passes over the training slides of attention MIL.
    #[arg(long, default_value_t = 20)]
    pub abmil_epochs: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl LabelArgs {
    fn source(&self) -> LabelSource {
        LabelSource {
            label: self.label.clone(),
            csv: self.labels_csv.clone(),
        }
    }

    fn cv(&self) -> Result<CvConfig> {
        if self.bootstrap == 0 || self.knn_k == 0 || self.abmil_epochs == 0 {
            bail!("--bootstrap, --knn-k and --abmil-epochs must be at least 1");
        }
        Ok(CvConfig {
            folds: self.folds,
            knn_k: self.knn_k,
            bootstrap: self.bootstrap,
            seed: self.seed,
            linear: LinearConfig::default(),
            ..CvConfig::default()
        })
    }

    fn abmil(&self) -> AbmilConfig {
        AbmilConfig {
            epochs: self.abmil_epochs,
            seed: self.seed,
            ..AbmilConfig::default()
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub labels: LabelArgs,
    /// The head's name (letters, digits, `_`, `.`, `-`).
    #[arg(long)]
    pub name: String,
    #[arg(long, value_enum, default_value = "linear")]
    pub kind: KindArg,
    /// Skip the cross-validation (the manifest then has no metrics).
    #[arg(long)]
    pub no_eval: bool,
    /// Replace a head of the same name.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub labels: LabelArgs,
    /// Heads to cross-validate.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "linear,knn,prototype"
    )]
    pub kinds: Vec<KindArg>,
    /// Score this saved head on the labelled slides instead (no training).
    #[arg(long)]
    pub head: Option<String>,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SplitArg {
    /// The alignment's held-out slides.
    Validation,
    /// Every labelled slide with a report.
    All,
}

#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub labels: LabelArgs,
    /// Labelled slides per class of the few-shot curve.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub shots: Vec<usize>,
    /// Random draws per k.
    #[arg(long, default_value_t = 100)]
    pub draws: usize,
    /// Heads fitted on each few-shot draw (`linear`: the probe at its default penalty, no
    /// sweep, slower).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "prototype,knn"
    )]
    pub few_shot_heads: Vec<KindArg>,
    /// Also cross-validate attention MIL on the tile features (slower).
    #[arg(long)]
    pub abmil: bool,
    /// Alignment checkpoint or run folder for zero-shot (default: the data dir's
    /// `models.alignment`); without one, zero-shot is left out.
    #[arg(long)]
    pub alignment: Option<PathBuf>,
    /// Subtype prompt set (default: the set whose classes match the most labels).
    #[arg(long)]
    pub prompts: Option<String>,
    #[arg(long)]
    pub prompts_dir: Option<PathBuf>,
    /// Slides zero-shot is scored on.
    #[arg(long, value_enum, default_value = "validation")]
    pub split: SplitArg,
    /// Leave zero-shot out.
    #[arg(long)]
    pub no_zero_shot: bool,
}

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The saved head.
    #[arg(long)]
    pub head: String,
    /// Stored slide ids.
    #[arg(required = true)]
    pub slides: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: ProbeCommand) -> Result<()> {
    match cmd {
        ProbeCommand::Train(a) => train(a),
        ProbeCommand::Eval(a) => eval(a),
        ProbeCommand::List(a) => list(a),
        ProbeCommand::Compare(a) => compare(a),
        ProbeCommand::Classify(a) => classify_cmd(a),
    }
}

fn open(data: &DataArgs) -> Result<Pipeline> {
    Pipeline::open(data.load()?)
        .with_context(|| format!("opening the data dir {}", data.data_dir.display()))
}

fn train(args: TrainArgs) -> Result<()> {
    let pipeline = open(&args.labels.data)?;
    let req = TrainHeadRequest {
        name: args.name.clone(),
        kind: args.kind.into(),
        source: args.labels.source(),
        space: args.labels.space.into(),
        cv: args.labels.cv()?,
        abmil: args.labels.abmil(),
        evaluate: !args.no_eval,
        replace: args.replace,
    };
    let started = Instant::now();
    let m = pipeline.block_on(train_head(&pipeline.store, &req))?;
    if args.labels.json {
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    println!(
        "head `{}` ({}, label `{}`: {}) trained on {} slides of {} patients, {} input {} dims, in {:.1} s",
        m.name,
        m.kind,
        m.label,
        m.classes.join(" / "),
        m.training_set.slides,
        m.training_set.patients,
        m.input,
        m.dim,
        started.elapsed().as_secs_f64()
    );
    if let Some(r) = &m.metrics {
        println!(
            "  {}-fold by patient: balanced accuracy {}, weighted F1 {}, macro AUROC {}",
            r.folds,
            r.scores.balanced_accuracy,
            r.scores.weighted_f1,
            r.scores
                .macro_auroc
                .map(|a| a.to_string())
                .unwrap_or_else(|| "n/a".into())
        );
    }
    if let Some(l) = m.params.get("lambda") {
        println!(
            "  L2 penalty {l} (chosen by inner {}-fold validation)",
            req.cv.inner_folds
        );
    }
    println!(
        "  saved: {} (fingerprint {}, training set {}, input weights {})",
        probes_dir(&args.labels.data.data_dir)
            .join(&m.name)
            .display(),
        m.fingerprint,
        m.training_set.fingerprint,
        m.input_fingerprint
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let a = &args.labels;
    let pipeline = open(&a.data)?;
    let cv = a.cv()?;
    if let Some(name) = &args.head {
        let head = artefact::load(&probes_dir(&a.data.data_dir), name)?;
        let (ds, _, _) =
            pipeline.block_on(load_dataset(&pipeline.store, &a.source(), a.space.into()))?;
        let answers = pipeline.block_on(classify(&pipeline.store, &head, &ds.slide_ids))?;
        let truth = ds
            .slide_ids
            .iter()
            .zip(&ds.y)
            .map(|(id, &y)| {
                let value = &ds.classes[y];
                head.manifest
                    .classes
                    .iter()
                    .position(|c| c == value)
                    .ok_or_else(|| gigapath_probe::ProbeError::UnknownLabel {
                        value: value.clone(),
                        slide: id.clone(),
                        known: head.manifest.classes.join(", "),
                    })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let probs: Vec<Vec<f32>> = answers
            .iter()
            .map(|c| {
                head.manifest
                    .classes
                    .iter()
                    .map(|k| c.probabilities[k])
                    .collect()
            })
            .collect();
        let s = score(
            &head.manifest.classes,
            &truth,
            &probs,
            &ds.groups,
            cv.bootstrap,
            cv.seed,
        )?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"head": head.manifest.name, "slides": ds.len(), "scores": s})
            );
        } else {
            println!(
                "head `{}` on {} labelled slides: balanced accuracy {}, weighted F1 {}, macro AUROC {}",
                head.manifest.name,
                ds.len(),
                s.balanced_accuracy,
                s.weighted_f1,
                s.macro_auroc.map(|x| x.to_string()).unwrap_or_else(|| "n/a".into())
            );
            println!("(slides the head was trained on score optimistically; use held-out slides)");
        }
        return Ok(());
    }
    let (ds, info, _) =
        pipeline.block_on(load_dataset(&pipeline.store, &a.source(), a.space.into()))?;
    let mut results = Vec::new();
    for &k in &args.kinds {
        let kind: HeadKind = k.into();
        let r = if kind == HeadKind::Abmil {
            let (bags, _) = pipeline.block_on(gigapath_probe::abmil::load_bags(
                &pipeline.store,
                &ds.slide_ids,
            ))?;
            gigapath_probe::abmil::cross_validate(&ds, &bags, &cv, &a.abmil())?
        } else {
            cross_validate(&ds, kind, &cv)?
        };
        results.push(r);
    }
    let cmp = comparison(
        &ds,
        &info.space.to_string(),
        None,
        None,
        Vec::new(),
        results,
        0.0,
    );
    if a.json {
        println!("{}", serde_json::to_string(&cmp)?);
    } else {
        print!("{}", cmp.to_text());
    }
    Ok(())
}

fn comparison(
    ds: &gigapath_probe::Dataset,
    space: &str,
    zero_shot: Option<ZeroShotRow>,
    zero_shot_note: Option<String>,
    few_shot: Vec<gigapath_probe::FewShotPoint>,
    supervised: Vec<gigapath_probe::CvResult>,
    seconds: f64,
) -> Comparison {
    Comparison {
        label: ds.label.clone(),
        classes: ds.classes.clone(),
        slides: ds.len(),
        patients: ds
            .groups
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        support: ds.support(),
        space: space.into(),
        zero_shot,
        zero_shot_note,
        few_shot,
        supervised,
        seconds,
    }
}

fn list(args: ListArgs) -> Result<()> {
    let heads = artefact::list(&probes_dir(&args.data.data_dir))?;
    if args.json {
        println!("{}", serde_json::to_string(&heads)?);
        return Ok(());
    }
    if heads.is_empty() {
        println!(
            "no heads in {} (gigapath probe train)",
            probes_dir(&args.data.data_dir).display()
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<12} {:<7} {:>7} {:<24} {:<17} created",
        "name", "kind", "label", "input", "slides", "balanced acc. [95% CI]", "fingerprint"
    );
    for m in heads {
        println!(
            "{:<20} {:<10} {:<12} {:<7} {:>7} {:<24} {:<17} {}",
            m.name,
            m.kind.to_string(),
            m.label,
            m.input.to_string(),
            m.training_set.slides,
            m.metrics
                .as_ref()
                .map(|r| r.scores.balanced_accuracy.to_string())
                .unwrap_or_else(|| "-".into()),
            m.fingerprint,
            m.created_at
        );
    }
    Ok(())
}

fn compare(args: CompareArgs) -> Result<()> {
    let a = &args.labels;
    let started = Instant::now();
    if args.draws == 0 || args.shots.is_empty() || args.shots.contains(&0) {
        bail!("--draws must be at least 1 and --shots a list of k >= 1");
    }
    if args.few_shot_heads.contains(&KindArg::Abmil) {
        bail!("--few-shot-heads takes linear, knn or prototype (attention MIL: --abmil)");
    }
    let pipeline = open(&a.data)?;
    let cv = a.cv()?;
    let (ds, info, _) =
        pipeline.block_on(load_dataset(&pipeline.store, &a.source(), a.space.into()))?;
    let bar = crate::progress::bar(4 + args.abmil as u64, "heads");
    let (zero_shot, note) = if args.no_zero_shot {
        (None, Some("left out (--no-zero-shot)".to_string()))
    } else {
        match zero_shot(&pipeline, &args, &ds, &cv) {
            Ok(z) => (Some(z), None),
            Err(e) => (None, Some(format!("n/a: {e:#}"))),
        }
    };
    bar.inc(1);
    let few = few_shot_curve(
        &ds,
        &FewShotConfig {
            shots: args.shots.clone(),
            draws: args.draws,
            folds: a.folds,
            kinds: args.few_shot_heads.iter().map(|&k| k.into()).collect(),
            knn_k: a.knn_k,
            seed: a.seed,
        },
    )?;
    bar.inc(1);
    let mut supervised = Vec::new();
    for kind in [HeadKind::Linear, HeadKind::Knn, HeadKind::Prototype] {
        supervised.push(cross_validate(&ds, kind, &cv)?);
        bar.inc(1);
    }
    if args.abmil {
        let (bags, _) = pipeline.block_on(gigapath_probe::abmil::load_bags(
            &pipeline.store,
            &ds.slide_ids,
        ))?;
        supervised.push(gigapath_probe::abmil::cross_validate(
            &ds,
            &bags,
            &cv,
            &a.abmil(),
        )?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let cmp = comparison(
        &ds,
        &info.space.to_string(),
        zero_shot,
        note,
        few,
        supervised,
        started.elapsed().as_secs_f64(),
    );
    if a.json {
        println!("{}", serde_json::to_string(&cmp)?);
    } else {
        print!("{}", cmp.to_text());
    }
    Ok(())
}

/// Zero-shot of the same label with the data dir's alignment, scored with bootstrap intervals.
fn zero_shot(
    pipeline: &Pipeline,
    args: &CompareArgs,
    ds: &gigapath_probe::Dataset,
    cv: &CvConfig,
) -> Result<ZeroShotRow> {
    let checkpoint = match &args.alignment {
        Some(p) => gigapath_train::checkpoint::resolve(p)?,
        None => pipeline.config.models.alignment.clone().context(
            "no alignment checkpoint in the data dir (gigapath train + reembed, or --alignment)",
        )?,
    };
    let report = gigapath_train::evaluate(
        pipeline,
        &EvalRequest {
            checkpoint,
            prompts_dir: args
                .prompts_dir
                .clone()
                .unwrap_or_else(PromptLibrary::default_dir),
            prompt_set: args.prompts.clone(),
            label: args.labels.label.clone(),
            split: match args.split {
                SplitArg::Validation => EvalSplit::Validation,
                SplitArg::All => EvalSplit::All,
            },
            robustness: RobustnessConfig {
                sets: 1,
                ..RobustnessConfig::default()
            },
            no_temperature: false,
        },
        &gigapath_train::Silent,
    )?;
    let z = report
        .zero_shot
        .context("no labelled slide matches a class of the prompt set")?;
    let group_of: std::collections::BTreeMap<&str, &str> = ds
        .slide_ids
        .iter()
        .zip(&ds.groups)
        .map(|(s, g)| (s.as_str(), g.as_str()))
        .collect();
    let groups: Vec<String> = z
        .slide_ids
        .iter()
        .map(|s| group_of.get(s.as_str()).copied().unwrap_or(s).to_string())
        .collect();
    let scores = score(
        &z.report.labels,
        &z.truth,
        &z.probabilities,
        &groups,
        cv.bootstrap,
        cv.seed,
    )?;
    Ok(ZeroShotRow {
        prompt_set: z.prompt_set,
        split: match args.split {
            SplitArg::Validation => "held-out".into(),
            SplitArg::All => "all".into(),
        },
        scores,
    })
}

fn classify_cmd(args: ClassifyArgs) -> Result<()> {
    let pipeline = open(&args.data)?;
    let head = artefact::load(&probes_dir(&args.data.data_dir), &args.head)?;
    let answers = pipeline.block_on(classify(&pipeline.store, &head, &args.slides))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"head": head.manifest, "results": answers})
        );
        return Ok(());
    }
    let m = &head.manifest;
    println!(
        "head `{}` ({}, label `{}`, trained {} on {} slides, fingerprint {})",
        m.name, m.kind, m.label, m.created_at, m.training_set.slides, m.fingerprint
    );
    for c in answers {
        let probs: Vec<String> = c
            .probabilities
            .iter()
            .map(|(k, p)| format!("{k} {p:.3}"))
            .collect();
        println!(
            "  {:<16} {:<10} {}{}",
            c.slide_id,
            c.predicted,
            probs.join("  "),
            c.known_label
                .map(|l| format!("  (known: {l})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
