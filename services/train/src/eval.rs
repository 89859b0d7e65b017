//! Evaluation of an alignment checkpoint on the data dir: cross-modal retrieval on its held-out
//! pairs, zero-shot classification of labelled slides with a prompt set, and MI-Zero's
//! robustness protocol (spec section 6).
//!
//! Embeddings are computed from the feature files and report texts with the checkpoint and the
//! configured base encoders (whose fingerprints must be the ones it was trained on), so a
//! checkpoint can be evaluated before the stores are re-embedded with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gigapath_models::align::Alignment;
use gigapath_models::{Precision, SlideEncoder, TextEncoder};
use gigapath_pipeline::fingerprint::model_fingerprint;
use gigapath_pipeline::Pipeline;
use gigapath_store::catalog::TrainingPair;
use gigapath_zeroshot::{
    robustness, ClassificationReport, PromptLibrary, RobustnessConfig, RobustnessReport,
    SubtypeSet, Temperature,
};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::runlog::Recall;
use crate::trainer::{checkpoint_split, read_features, retrieval, TrainProgress};

/// Which pairs to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSplit {
    /// The checkpoint's held-out slides (its `split.json`).
    Validation,
    /// Every pair in the catalog.
    All,
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    /// An alignment checkpoint folder.
    pub checkpoint: PathBuf,
    /// The prompts folder.
    pub prompts_dir: PathBuf,
    /// A subtype prompt set; `None`: the set whose class labels match the most slides.
    pub prompt_set: Option<String>,
    /// The slide label zero-shot predictions are scored against.
    pub label: String,
    /// Which slides to evaluate.
    pub split: EvalSplit,
    /// How the MI-Zero prompt sets are sampled.
    pub robustness: RobustnessConfig,
    /// Softmax over raw cosines (TITAN) instead of the trained logit scale.
    pub no_temperature: bool,
}

/// Retrieval between the evaluated slides and their reports.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    /// (slide, report) pairs ranked.
    pub pairs: usize,
    /// Distinct slides among them.
    pub slides: usize,
    /// Recall of a slide's own reports among all reports.
    pub slide_to_report: Recall,
    /// Recall of a report's slide among all slides.
    pub report_to_slide: Recall,
    /// Recall@k of a random ranking of report -> slide (k / slides).
    pub report_to_slide_chance: Recall,
}

/// Zero-shot classification of the evaluated slides.
#[derive(Debug, Clone, Serialize)]
pub struct ZeroShotSection {
    /// The subtype prompt set used.
    pub prompt_set: String,
    /// The slide label scored against.
    pub label: String,
    /// `logit_scale` (softmax(scale x cosine)) or `none` (softmax(cosine), TITAN).
    pub temperature: String,
    /// The checkpoint's trained `exp(logit_scale)` (used unless `temperature` is `none`).
    pub logit_scale: f32,
    /// Prompts embedded, over all classes.
    pub prompts: usize,
    /// Slides without the label, or with a value that is not a class of the set.
    pub skipped_slides: usize,
    /// Accuracy, balanced accuracy, F1, AUROC and confusion of the scored slides.
    pub report: ClassificationReport,
    /// The scored slides (for callers that add intervals or compare with other heads).
    #[serde(skip)]
    pub slide_ids: Vec<String>,
    /// Their true class indices, in the set's label order.
    #[serde(skip)]
    pub truth: Vec<usize>,
    /// Their class probabilities.
    #[serde(skip)]
    pub probabilities: Vec<Vec<f32>>,
}

/// Everything `gigapath eval` prints.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The checkpoint folder.
    pub checkpoint: PathBuf,
    /// Its weights' fingerprint.
    pub fingerprint: String,
    /// The run that wrote it.
    pub run_id: String,
    /// The optimizer step it was written at.
    pub step: u64,
    /// Which slides were evaluated.
    pub split: EvalSplit,
    /// Slides evaluated.
    pub slides: usize,
    /// Reports (pairs) evaluated.
    pub reports: usize,
    /// Cross-modal retrieval; `None` with fewer than two slides.
    pub retrieval: Option<RetrievalReport>,
    /// Zero-shot classification; `None` when no slide has a label of the set.
    pub zero_shot: Option<ZeroShotSection>,
    /// Balanced accuracy over sampled prompt sets; `None` when zero-shot is.
    pub robustness: Option<RobustnessReport>,
    /// Wall-clock seconds of the evaluation.
    pub seconds: f64,
}

/// Evaluates `req.checkpoint` on the data dir of `pipeline`.
pub fn evaluate(
    pipeline: &Pipeline,
    req: &EvalRequest,
    progress: &dyn TrainProgress,
) -> Result<EvalReport> {
    let start = Instant::now();
    let m = &pipeline.config.models;
    let precision = Precision::parse(&m.device, &m.dtype)?;
    let alignment = Alignment::load(&req.checkpoint, &precision)?;
    let dir = |p: &Option<PathBuf>, key: &str| {
        p.clone().ok_or_else(|| {
            TrainError::Data(format!("models.{key} is not configured for this data dir"))
        })
    };
    let (tile_dir, slide_dir, text_dir) = (
        dir(&m.tile_dir().map(PathBuf::from), "tile_encoder")?,
        dir(&m.slide_dir().map(PathBuf::from), "slide_encoder")?,
        dir(&m.text_encoder, "text_encoder")?,
    );
    let actual = BTreeMap::from([
        ("tile".to_string(), model_fingerprint(&tile_dir)?),
        ("slide".to_string(), model_fingerprint(&slide_dir)?),
        ("text".to_string(), model_fingerprint(&text_dir)?),
    ]);
    check_base(&req.checkpoint, &alignment.base_fingerprints(), &actual)?;
    let slide_encoder = SlideEncoder::load(&slide_dir, &precision)?;
    let text_encoder = TextEncoder::load(&text_dir, &precision)?;

    let mut pairs = pipeline.block_on(pipeline.store.training_pairs(&actual["tile"]))?;
    if req.split == EvalSplit::Validation {
        let split = checkpoint_split(&req.checkpoint)?.ok_or_else(|| {
            TrainError::checkpoint(
                &req.checkpoint,
                "has no split.json: evaluate with --split all",
            )
        })?;
        pairs.retain(|p| split.is_validation(&p.slide_id));
    }
    if pairs.is_empty() {
        return Err(TrainError::Data(format!(
            "no slide-report pairs to evaluate ({:?} split, tile features {})",
            req.split, actual["tile"]
        )));
    }

    // Joint embeddings: one per slide, one per report.
    let mut slide_ids: Vec<String> = pairs.iter().map(|p| p.slide_id.clone()).collect();
    slide_ids.dedup();
    progress.phase("embedding slides", slide_ids.len() as u64, 0);
    let mut slide_joint: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for p in &pairs {
        if slide_joint.contains_key(&p.slide_id) {
            continue;
        }
        let (x, cells, _) = read_features(&p.feature_path, &precision.device)?;
        let (_, joint) = alignment.slide_joint(&slide_encoder, &x, &cells)?;
        slide_joint.insert(p.slide_id.clone(), joint);
        progress.advance(1);
    }
    progress.phase("embedding reports", pairs.len() as u64, 0);
    let mut texts: Vec<Vec<f32>> = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(32) {
        let t: Vec<&str> = chunk.iter().map(|p| p.text.as_str()).collect();
        texts.extend(alignment.text_joint(&text_encoder, &t)?.to_vec2::<f32>()?);
        progress.advance(chunk.len() as u64);
    }
    let pair_refs: Vec<&TrainingPair> = pairs.iter().collect();
    let slides_per_pair: Vec<Vec<f32>> = pairs
        .iter()
        .map(|p| slide_joint[&p.slide_id].clone())
        .collect();
    let retrieval_report = (slide_joint.len() >= 2).then(|| {
        let (s2r, r2s) = retrieval(&pair_refs, &slides_per_pair, &texts);
        let n = slide_joint.len() as f64;
        RetrievalReport {
            pairs: pairs.len(),
            slides: slide_joint.len(),
            slide_to_report: s2r,
            report_to_slide: r2s,
            report_to_slide_chance: Recall {
                r1: (1.0 / n).min(1.0),
                r5: (5.0 / n).min(1.0),
                r10: (10.0 / n).min(1.0),
            },
        }
    });

    // Zero-shot on the labelled slides.
    let library = PromptLibrary::load(&req.prompts_dir)?;
    let labels: BTreeMap<&str, &str> = pairs
        .iter()
        .filter_map(|p| {
            p.labels
                .get(&req.label)
                .map(|l| (p.slide_id.as_str(), l.as_str()))
        })
        .collect();
    let set = match &req.prompt_set {
        Some(name) => library.subtype(name)?.clone(),
        None => best_set(&library, &labels).ok_or_else(|| {
            TrainError::Data(format!(
                "no prompt set in {} has classes matching the `{}` labels of these slides; \
                 name one with --prompts",
                req.prompts_dir.display(),
                req.label
            ))
        })?,
    };
    let mut embed = |t: &[String]| -> std::result::Result<Vec<Vec<f32>>, String> {
        let refs: Vec<&str> = t.iter().map(String::as_str).collect();
        alignment
            .text_joint(&text_encoder, &refs)
            .and_then(|x| Ok(x.to_vec2::<f32>()?))
            .map_err(|e| e.to_string())
    };
    let mut scored: Vec<(Vec<f32>, usize)> = Vec::new();
    let mut scored_ids: Vec<String> = Vec::new();
    for (id, joint) in &slide_joint {
        if let Some(class) = labels.get(id.as_str()).and_then(|l| set.class_index(l)) {
            scored.push((joint.clone(), class));
            scored_ids.push(id.clone());
        }
    }
    let (zero_shot, robust) = if scored.is_empty() {
        (None, None)
    } else {
        progress.phase("zero-shot prompts", 1, 0);
        let classes = set.class_embeddings(&mut embed)?;
        let temperature = if req.no_temperature {
            Temperature::None
        } else {
            Temperature::LogitScale(alignment.logit_scale())
        };
        let probabilities = scored
            .iter()
            .map(|(e, _)| classes.probabilities(e, temperature))
            .collect::<gigapath_zeroshot::Result<Vec<_>>>()?;
        let truth: Vec<usize> = scored.iter().map(|(_, c)| *c).collect();
        let report = ClassificationReport::new(&set.labels(), &truth, &probabilities)?;
        progress.advance(1);
        progress.phase("MI-Zero prompt sets", 1, 0);
        let embeddings: Vec<Vec<f32>> = scored.iter().map(|(e, _)| e.clone()).collect();
        let robust = robustness(&set, &embeddings, &truth, &req.robustness, &mut embed)?;
        progress.advance(1);
        (
            Some(ZeroShotSection {
                prompt_set: set.name.clone(),
                label: req.label.clone(),
                temperature: if req.no_temperature {
                    "none"
                } else {
                    "logit_scale"
                }
                .into(),
                logit_scale: alignment.logit_scale(),
                prompts: classes.prompts_per_class.iter().sum(),
                skipped_slides: slide_joint.len() - scored.len(),
                report,
                slide_ids: scored_ids,
                truth,
                probabilities,
            }),
            Some(robust),
        )
    };
    let cfg = alignment.config();
    Ok(EvalReport {
        checkpoint: req.checkpoint.clone(),
        fingerprint: model_fingerprint(&req.checkpoint)?,
        run_id: cfg.run_id.clone(),
        step: cfg.step,
        split: req.split,
        slides: slide_joint.len(),
        reports: pairs.len(),
        retrieval: retrieval_report,
        zero_shot,
        robustness: robust,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Errors unless the checkpoint's base weights are the configured ones.
pub(crate) fn check_base(
    checkpoint: &Path,
    trained: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> Result<()> {
    for (role, fp) in actual {
        if let Some(t) = trained.get(role) {
            if t != fp {
                return Err(TrainError::Mismatch(format!(
                    "alignment {} was trained on {role} weights {t}, but the data dir's {role} \
                     encoder is {fp}: its embeddings would not be aligned",
                    checkpoint.display()
                )));
            }
        }
    }
    Ok(())
}

/// The subtype set whose class labels cover the most labelled slides.
fn best_set(library: &PromptLibrary, labels: &BTreeMap<&str, &str>) -> Option<SubtypeSet> {
    library
        .subtype_sets()
        .map(|s| {
            (
                labels
                    .values()
                    .filter(|l| s.class_index(l).is_some())
                    .count(),
                s,
            )
        })
        .filter(|(n, _)| *n > 0)
        .max_by_key(|(n, _)| *n)
        .map(|(_, s)| s.clone())
}

impl EvalReport {
    /// The report as readable text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let pct = |v: f64| format!("{:5.1}%", 100.0 * v);
        s.push_str(&format!(
            "checkpoint {} (run {}, step {}, fingerprint {})\n",
            self.checkpoint.display(),
            self.run_id,
            self.step,
            self.fingerprint
        ));
        s.push_str(&format!(
            "split: {:?} - {} slides, {} reports\n",
            self.split, self.slides, self.reports
        ));
        if let Some(r) = &self.retrieval {
            s.push_str("\ncross-modal retrieval        R@1    R@5   R@10\n");
            for (name, v) in [
                ("slide -> report", &r.slide_to_report),
                ("report -> slide", &r.report_to_slide),
                ("report -> slide (chance)", &r.report_to_slide_chance),
            ] {
                s.push_str(&format!(
                    "  {name:<25} {} {} {}\n",
                    pct(v.r1),
                    pct(v.r5),
                    pct(v.r10)
                ));
            }
        }
        match &self.zero_shot {
            Some(z) => {
                let r = &z.report;
                s.push_str(&format!(
                    "\nzero-shot `{}` with prompt set `{}` ({} prompts, softmax {}{}), {} slides{}\n",
                    z.label,
                    z.prompt_set,
                    z.prompts,
                    if z.temperature == "none" { "over raw cosines" } else { "x logit scale " },
                    if z.temperature == "none" { String::new() } else { format!("{:.1}", z.logit_scale) },
                    r.n,
                    if z.skipped_slides > 0 { format!(" ({} without a matching label skipped)", z.skipped_slides) } else { String::new() }
                ));
                s.push_str(&format!(
                    "  balanced accuracy  {:.3}\n",
                    r.balanced_accuracy
                ));
                s.push_str(&format!("  weighted F1        {:.3}\n", r.weighted_f1));
                match r.macro_auroc {
                    Some(a) => s.push_str(&format!("  macro AUROC (OvR)  {a:.3}\n")),
                    None => s.push_str(
                        "  macro AUROC (OvR)  n/a (a class has no positives or no negatives)\n",
                    ),
                }
                s.push_str(&format!("  accuracy           {:.3}\n", r.accuracy));
                for line in r.confusion_text().lines() {
                    s.push_str(&format!("  {line}\n"));
                }
            }
            None => {
                s.push_str("\nzero-shot: no slide carries a label of the prompt set's classes\n")
            }
        }
        if let Some(b) = &self.robustness {
            s.push_str(&format!(
                "\nMI-Zero robustness ({} sampled prompt sets: one name per class, 1-16 templates)\n",
                b.sets
            ));
            s.push_str(&format!(
                "  balanced accuracy median {:.3}  IQR {:.3}-{:.3}  min {:.3}  max {:.3}  std {:.3}\n",
                b.median, b.q1, b.q3, b.min, b.max, b.std
            ));
        }
        s.push_str(&format!("\n({:.1} s)\n", self.seconds));
        s
    }
}
