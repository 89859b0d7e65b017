//! Evaluation done the way papers report it: stratified k-fold cross-validation grouped by
//! patient, out-of-fold predictions pooled and scored with balanced accuracy, weighted F1 and
//! macro one-vs-rest AUROC (the metrics of `gigapath_zeroshot::metrics`), each with a
//! percentile bootstrap confidence interval that resamples patients; and few-shot curves:
//! k = 1, 2, 4, 8, 16 labelled slides per class, many seeded draws, mean and spread.

use gigapath_zeroshot::metrics::{balanced_accuracy, macro_auroc_ovr, weighted_f1};
use gigapath_zeroshot::rng::SplitMix64;
use gigapath_zeroshot::ClassificationReport;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{ProbeError, Result};
use crate::heads::{HeadKind, Knn, LinearConfig, LinearProbe, Prototypes, SlideHead, LAMBDA_SWEEP};
use crate::split::{few_shot_draw, stratified_group_folds};

/// A metric with its 95% bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricCi {
    /// On all samples.
    pub value: f64,
    /// 2.5th percentile of the bootstrap replicates.
    pub low: f64,
    /// 97.5th percentile.
    pub high: f64,
}

impl std::fmt::Display for MetricCi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} [{:.3}, {:.3}]", self.value, self.low, self.high)
    }
}

/// Scores of one set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Balanced accuracy (mean recall over classes).
    pub balanced_accuracy: MetricCi,
    /// Support-weighted F1.
    pub weighted_f1: MetricCi,
    /// Macro one-vs-rest AUROC; `None` when no class has positives and negatives.
    pub macro_auroc: Option<MetricCi>,
    /// Bootstrap replicates drawn.
    pub bootstrap: usize,
    /// Counts, accuracy and the confusion matrix.
    pub report: ClassificationReport,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn ci(value: f64, mut reps: Vec<f64>) -> MetricCi {
    reps.retain(|v| v.is_finite());
    reps.sort_by(f64::total_cmp);
    MetricCi {
        value,
        low: percentile(&reps, 0.025),
        high: percentile(&reps, 0.975),
    }
}

/// Scores of `probabilities` against `truth`, with 95% intervals from `reps` bootstrap
/// replicates that resample `groups` (patients) with replacement, all slides of a drawn patient
/// included (seeded).
pub fn score(
    classes: &[String],
    truth: &[usize],
    probabilities: &[Vec<f32>],
    groups: &[String],
    reps: usize,
    seed: u64,
) -> Result<Scores> {
    let report = ClassificationReport::new(classes, truth, probabilities)?;
    if groups.len() != truth.len() {
        return Err(ProbeError::Invalid(format!(
            "{} groups for {} predictions",
            groups.len(),
            truth.len()
        )));
    }
    let k = classes.len();
    let pred: Vec<usize> = probabilities
        .iter()
        .map(|p| gigapath_zeroshot::classify::argmax(p))
        .collect();
    let mut members: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, g) in groups.iter().enumerate() {
        members.entry(g).or_default().push(i);
    }
    let members: Vec<Vec<usize>> = members.into_values().collect();
    let mut rng = SplitMix64::new(seed);
    let (mut ba, mut f1, mut auc) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let idx: Vec<usize> = (0..members.len())
            .flat_map(|_| members[rng.below(members.len())].iter().copied())
            .collect();
        let t: Vec<usize> = idx.iter().map(|&i| truth[i]).collect();
        let p: Vec<usize> = idx.iter().map(|&i| pred[i]).collect();
        let probs: Vec<Vec<f32>> = idx.iter().map(|&i| probabilities[i].clone()).collect();
        ba.push(balanced_accuracy(&t, &p, k));
        f1.push(weighted_f1(&t, &p, k));
        auc.push(macro_auroc_ovr(&t, &probs, k).unwrap_or(f64::NAN));
    }
    Ok(Scores {
        balanced_accuracy: ci(report.balanced_accuracy, ba),
        weighted_f1: ci(report.weighted_f1, f1),
        macro_auroc: report.macro_auroc.map(|a| ci(a, auc)),
        bootstrap: reps,
        report,
    })
}

/// How cross-validation and the heads run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvConfig {
    /// Outer folds (grouped by patient, stratified by class).
    pub folds: usize,
    /// Inner folds that choose the linear probe's penalty from [`LAMBDA_SWEEP`].
    pub inner_folds: usize,
    /// Neighbours of the kNN head.
    pub knn_k: usize,
    /// Bootstrap replicates of the confidence intervals.
    pub bootstrap: usize,
    /// Seed of folds, draws and bootstrap.
    pub seed: u64,
    /// AdamW steps and learning rate of each linear fit (its `lambda` is swept).
    pub linear: LinearConfig,
}

impl Default for CvConfig {
    fn default() -> Self {
        CvConfig {
            folds: 5,
            inner_folds: 3,
            knn_k: 5,
            bootstrap: 1000,
            seed: 0,
            linear: LinearConfig::default(),
        }
    }
}

/// A linear probe whose penalty was chosen by inner stratified grouped validation on `ds`,
/// then refitted on all of `ds`. Returns the probe and the inner balanced accuracy per penalty
/// (empty when `ds` has too few patients per class for inner folds: the default penalty).
pub fn fit_linear_swept(ds: &Dataset, cfg: &CvConfig) -> Result<(LinearProbe, Vec<(f64, f64)>)> {
    let inner = match stratified_group_folds(ds, cfg.inner_folds, cfg.seed ^ 0x1A7E) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!("no penalty sweep ({e}); lambda {}", cfg.linear.lambda);
            return Ok((LinearProbe::fit(ds, &cfg.linear)?, Vec::new()));
        }
    };
    let mut table = Vec::new();
    for &lambda in &LAMBDA_SWEEP {
        let lc = LinearConfig {
            lambda,
            ..cfg.linear
        };
        let mut pred = vec![0usize; ds.len()];
        for f in 0..cfg.inner_folds {
            let (train, val) = sides(&inner, f);
            let probe = LinearProbe::fit(&ds.subset(&train), &lc)?;
            for i in val {
                pred[i] = gigapath_zeroshot::classify::argmax(&probe.predict_proba(&ds.x[i])?);
            }
        }
        table.push((lambda, balanced_accuracy(&ds.y, &pred, ds.classes.len())));
    }
    // Best inner balanced accuracy; ties go to the stronger penalty.
    let best = table
        .iter()
        .copied()
        .fold((cfg.linear.lambda, -1.0), |best, (l, s)| {
            if s >= best.1 {
                (l, s)
            } else {
                best
            }
        });
    let probe = LinearProbe::fit(
        ds,
        &LinearConfig {
            lambda: best.0,
            ..cfg.linear
        },
    )?;
    Ok((probe, table))
}

/// Fits a head of `kind` on all of `ds` (the linear probe with its penalty sweep).
pub fn fit_head(ds: &Dataset, kind: HeadKind, cfg: &CvConfig) -> Result<SlideHead> {
    Ok(match kind {
        HeadKind::Linear => SlideHead::Linear(fit_linear_swept(ds, cfg)?.0),
        HeadKind::Knn => SlideHead::Knn(Knn::fit(ds, cfg.knn_k)?),
        HeadKind::Prototype => SlideHead::Prototype(Prototypes::fit(ds)?),
        HeadKind::Abmil => {
            return Err(ProbeError::Invalid(
                "an abmil head learns from tile features, not slide vectors (see gigapath_probe::abmil)".into(),
            ))
        }
    })
}

fn sides(folds: &[usize], f: usize) -> (Vec<usize>, Vec<usize>) {
    (0..folds.len()).partition(|&i| folds[i] != f)
}

/// Out-of-fold results of one head kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvResult {
    /// The head.
    pub kind: HeadKind,
    /// Outer folds.
    pub folds: usize,
    /// Slides scored (each once, by the head trained without its patient).
    pub slides: usize,
    /// Pooled out-of-fold scores with bootstrap intervals.
    pub scores: Scores,
    /// The linear probe's chosen penalty per fold (empty for other heads).
    pub lambdas: Vec<f64>,
}

/// Stratified grouped k-fold cross-validation of `kind` on `ds`.
pub fn cross_validate(ds: &Dataset, kind: HeadKind, cfg: &CvConfig) -> Result<CvResult> {
    let folds = stratified_group_folds(ds, cfg.folds, cfg.seed)?;
    let mut probs = vec![Vec::new(); ds.len()];
    let mut lambdas = Vec::new();
    for f in 0..cfg.folds {
        let (train, test) = sides(&folds, f);
        let train = ds.subset(&train);
        let head = fit_head(&train, kind, cfg)?;
        if let SlideHead::Linear(p) = &head {
            lambdas.push(p.lambda);
        }
        for i in test {
            probs[i] = head.predict_proba(&ds.x[i])?;
        }
    }
    Ok(CvResult {
        kind,
        folds: cfg.folds,
        slides: ds.len(),
        scores: score(
            &ds.classes,
            &ds.y,
            &probs,
            &ds.groups,
            cfg.bootstrap,
            cfg.seed,
        )?,
        lambdas,
    })
}

/// How few-shot curves are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotConfig {
    /// Labelled slides per class.
    pub shots: Vec<usize>,
    /// Random draws per k (the test fold cycles through the folds).
    pub draws: usize,
    /// Grouped folds: draw r tests on fold r mod folds and draws its shots from the others.
    pub folds: usize,
    /// Heads fitted on each draw (kNN votes with min(k, its k) neighbours).
    pub kinds: Vec<HeadKind>,
    /// Neighbours of the kNN head.
    pub knn_k: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for FewShotConfig {
    fn default() -> Self {
        FewShotConfig {
            shots: vec![1, 2, 4, 8, 16],
            draws: 100,
            folds: 5,
            kinds: vec![HeadKind::Prototype, HeadKind::Knn],
            knn_k: 5,
            seed: 0,
        }
    }
}

/// One point of a few-shot curve: a head at k shots over many draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotPoint {
    /// The head.
    pub kind: HeadKind,
    /// Labelled slides per class.
    pub k: usize,
    /// Draws scored.
    pub draws: usize,
    /// Balanced accuracy over draws: mean, standard deviation, 2.5th and 97.5th percentiles.
    pub mean: f64,
    /// Standard deviation over draws.
    pub std: f64,
    /// 2.5th percentile over draws.
    pub low: f64,
    /// 97.5th percentile over draws.
    pub high: f64,
    /// Mean macro AUROC over draws (draws where it is defined).
    pub macro_auroc: Option<f64>,
    /// Why this k was not drawn (e.g. too few slides per class), when it was not.
    pub skipped: Option<String>,
}

/// The few-shot curve of every head kind of `cfg` on `ds`.
pub fn few_shot_curve(ds: &Dataset, cfg: &FewShotConfig) -> Result<Vec<FewShotPoint>> {
    let folds = stratified_group_folds(ds, cfg.folds, cfg.seed)?;
    let mut out = Vec::new();
    for &kind in &cfg.kinds {
        if !matches!(kind, HeadKind::Prototype | HeadKind::Knn | HeadKind::Linear) {
            return Err(ProbeError::Invalid(format!("few-shot with a {kind} head")));
        }
        for &k in &cfg.shots {
            let mut bas = Vec::new();
            let mut aucs = Vec::new();
            let mut skipped = None;
            for r in 0..cfg.draws {
                let f = r % cfg.folds;
                let (pool, test) = sides(&folds, f);
                let seed = cfg.seed ^ ((k as u64) << 32) ^ (r as u64).wrapping_mul(0x9E37_79B9);
                let shots = match few_shot_draw(ds, &pool, k, seed) {
                    Ok(s) => s,
                    Err(e @ ProbeError::TooFewSlides { .. }) => {
                        skipped = Some(e.to_string());
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let train = ds.subset(&shots);
                let head = match kind {
                    HeadKind::Knn => SlideHead::Knn(Knn::fit(&train, cfg.knn_k.min(k))?),
                    HeadKind::Prototype => SlideHead::Prototype(Prototypes::fit(&train)?),
                    _ => SlideHead::Linear(LinearProbe::fit(&train, &LinearConfig::default())?),
                };
                let probs: Vec<Vec<f32>> = test
                    .iter()
                    .map(|&i| head.predict_proba(&ds.x[i]))
                    .collect::<Result<_>>()?;
                let truth: Vec<usize> = test.iter().map(|&i| ds.y[i]).collect();
                let pred: Vec<usize> = probs
                    .iter()
                    .map(|p| gigapath_zeroshot::classify::argmax(p))
                    .collect();
                bas.push(balanced_accuracy(&truth, &pred, ds.classes.len()));
                if let Some(a) = macro_auroc_ovr(&truth, &probs, ds.classes.len()) {
                    aucs.push(a);
                }
            }
            let n = bas.len();
            let mean = if n > 0 {
                bas.iter().sum::<f64>() / n as f64
            } else {
                f64::NAN
            };
            let std = if n > 1 {
                (bas.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            } else {
                0.0
            };
            let mut sorted = bas.clone();
            sorted.sort_by(f64::total_cmp);
            out.push(FewShotPoint {
                kind,
                k,
                draws: if skipped.is_some() { 0 } else { n },
                mean,
                std,
                low: percentile(&sorted, 0.025),
                high: percentile(&sorted, 0.975),
                macro_auroc: (!aucs.is_empty())
                    .then(|| aucs.iter().sum::<f64>() / aucs.len() as f64),
                skipped,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::tests::blobs;

    #[test]
    fn separable_data_scores_near_one_with_tight_intervals() {
        let ds = blobs(16, 3, 12, 5.0, false, 11);
        let cfg = CvConfig {
            bootstrap: 200,
            linear: LinearConfig {
                steps: 150,
                ..Default::default()
            },
            ..Default::default()
        };
        for kind in [HeadKind::Linear, HeadKind::Knn, HeadKind::Prototype] {
            let r = cross_validate(&ds, kind, &cfg).unwrap();
            let ba = r.scores.balanced_accuracy;
            assert!(ba.value >= 0.95, "{kind}: {ba}");
            assert!(
                ba.low <= ba.value && ba.value <= ba.high && ba.low > 0.85,
                "{kind}: {ba}"
            );
            assert!(r.scores.macro_auroc.unwrap().value > 0.98, "{kind}");
            assert_eq!(r.scores.report.n, 48);
            if kind == HeadKind::Linear {
                assert_eq!(r.lambdas.len(), 5);
                assert!(r.lambdas.iter().all(|l| LAMBDA_SWEEP.contains(l)));
            }
        }
    }

    #[test]
    fn random_labels_score_near_chance() {
        // Labels drawn independently of the vectors: nothing to learn, chance is 1/3.
        let ds = blobs(20, 3, 12, 5.0, true, 12);
        let cfg = CvConfig {
            bootstrap: 200,
            linear: LinearConfig {
                steps: 150,
                ..Default::default()
            },
            ..Default::default()
        };
        for kind in [HeadKind::Linear, HeadKind::Knn, HeadKind::Prototype] {
            let r = cross_validate(&ds, kind, &cfg).unwrap();
            let ba = r.scores.balanced_accuracy;
            assert!((0.15..=0.52).contains(&ba.value), "{kind}: {ba}");
            assert!(
                ba.low < 1.0 / 3.0 + 0.05,
                "{kind}: the interval reaches chance: {ba}"
            );
        }
    }

    #[test]
    fn few_shot_curve_rises_with_k_and_reports_too_few_slides() {
        let ds = blobs(12, 3, 12, 1.5, false, 13);
        let cfg = FewShotConfig {
            draws: 40,
            ..Default::default()
        };
        let curve = few_shot_curve(&ds, &cfg).unwrap();
        let proto: Vec<&FewShotPoint> = curve
            .iter()
            .filter(|p| p.kind == HeadKind::Prototype)
            .collect();
        assert_eq!(
            proto.iter().map(|p| p.k).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16]
        );
        assert!(
            proto[3].mean > proto[0].mean,
            "k=8 {} vs k=1 {}",
            proto[3].mean,
            proto[0].mean
        );
        assert!(proto[0].mean > 0.4 && proto[3].mean > 0.8, "{proto:?}");
        let p0 = proto[0];
        assert!(
            p0.std > 0.0 && p0.low <= p0.mean + 1e-12 && p0.mean <= p0.high + 1e-12,
            "{p0:?}"
        );
        // 12 slides per class, a fifth held out: k = 16 cannot be drawn.
        let err = proto[4].skipped.as_deref().unwrap();
        assert!(err.contains("too few slides per class for k = 16"), "{err}");
        assert_eq!(proto[4].draws, 0);
    }

    #[test]
    fn bootstrap_resamples_patients_and_is_seeded() {
        let classes = ["a".to_string(), "b".to_string()];
        let truth = [0, 0, 1, 1, 0, 1];
        let probs: Vec<Vec<f32>> = [0.9, 0.6, 0.4, 0.2, 0.3, 0.8]
            .iter()
            .map(|&p| vec![p, 1.0 - p])
            .collect();
        let groups: Vec<String> = ["p1", "p1", "p2", "p3", "p4", "p5"]
            .map(String::from)
            .to_vec();
        let s = score(&classes, &truth, &probs, &groups, 500, 3).unwrap();
        assert_eq!(s, score(&classes, &truth, &probs, &groups, 500, 3).unwrap());
        // Predictions: a a b b b a -> recalls a 2/3, b 2/3.
        assert!((s.balanced_accuracy.value - 2.0 / 3.0).abs() < 1e-12);
        assert!(
            s.balanced_accuracy.low < s.balanced_accuracy.value
                && s.balanced_accuracy.high > s.balanced_accuracy.value
        );
        assert!(score(&classes, &truth, &probs, &groups[..3], 10, 0).is_err());
    }
}
