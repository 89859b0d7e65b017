//! MI-Zero's robustness protocol (spec section 6): zero-shot accuracy depends a lot on the exact
//! prompts, so instead of one number from one prompt set, sample many prompt sets - one class
//! name per class and 1..=16 templates from the pool - and report the median balanced accuracy
//! and its spread over the samples. Sampling is seeded: the same seed gives the same sets.

use serde::{Deserialize, Serialize};

use crate::classify::{ClassEmbeddings, Embed, Temperature, TextEmbeddings};
use crate::error::{Result, ZeroShotError};
use crate::metrics::balanced_accuracy;
use crate::prompts::SubtypeSet;
use crate::rng::SplitMix64;

/// How many prompt sets to sample and how.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RobustnessConfig {
    /// Sampled prompt sets (MI-Zero: 50).
    pub sets: usize,
    /// At most this many templates per sampled set (MI-Zero: 16, its pool size).
    pub max_templates: usize,
    /// Seed of the sampling: the same seed gives the same sets.
    pub seed: u64,
}

impl Default for RobustnessConfig {
    fn default() -> Self {
        RobustnessConfig {
            sets: 50,
            max_templates: 16,
            seed: 0,
        }
    }
}

/// One sampled prompt set: one name per class (in class order) and its templates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledPromptSet {
    /// One class name per class, in class order.
    pub names: Vec<String>,
    /// The sampled templates, distinct.
    pub templates: Vec<String>,
}

/// Balanced accuracy over the sampled prompt sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustnessReport {
    /// Sets sampled and scored.
    pub sets: usize,
    /// Median balanced accuracy.
    pub median: f64,
    /// First quartile (linear interpolation, as numpy's default).
    pub q1: f64,
    /// Third quartile.
    pub q3: f64,
    /// Lowest balanced accuracy.
    pub min: f64,
    /// Highest balanced accuracy.
    pub max: f64,
    /// Mean balanced accuracy.
    pub mean: f64,
    /// Population standard deviation of the balanced accuracies.
    pub std: f64,
    /// One balanced accuracy per sampled set, in sampling order.
    pub balanced_accuracies: Vec<f64>,
}

/// Samples `cfg.sets` prompt sets from `set`: for each class one name uniformly from its pool;
/// a template count uniform in 1..=min(max_templates, pool), then that many distinct templates.
pub fn sample_prompt_sets(set: &SubtypeSet, cfg: &RobustnessConfig) -> Vec<SampledPromptSet> {
    let mut rng = SplitMix64::new(cfg.seed);
    let pool = &set.templates;
    let most = cfg.max_templates.clamp(1, pool.len().max(1));
    (0..cfg.sets)
        .map(|_| {
            let names = set
                .classes
                .iter()
                .map(|c| c.names[rng.below(c.names.len())].clone())
                .collect();
            let k = 1 + rng.below(most);
            let mut order: Vec<usize> = (0..pool.len()).collect();
            rng.shuffle(&mut order);
            let mut chosen: Vec<usize> = order.into_iter().take(k).collect();
            chosen.sort_unstable();
            SampledPromptSet {
                names,
                templates: chosen.into_iter().map(|i| pool[i].clone()).collect(),
            }
        })
        .collect()
}

/// Runs the protocol: zero-shot predictions of `slides` (joint embeddings) against each sampled
/// set's class embeddings, balanced accuracy against `truth` (class indices of `set`).
/// Every prompt is embedded once, however many sets use it.
pub fn robustness(
    set: &SubtypeSet,
    slides: &[Vec<f32>],
    truth: &[usize],
    cfg: &RobustnessConfig,
    embed: &mut dyn Embed,
) -> Result<RobustnessReport> {
    if slides.is_empty() || slides.len() != truth.len() {
        return Err(ZeroShotError::Input(format!(
            "{} slides and {} labels (need the same, non-zero number)",
            slides.len(),
            truth.len()
        )));
    }
    if cfg.sets == 0 {
        return Err(ZeroShotError::Input(
            "robustness needs at least one prompt set".into(),
        ));
    }
    let texts = TextEmbeddings::compute(&set.all_prompts(), embed)?;
    let labels = set.labels();
    let mut baccs = Vec::with_capacity(cfg.sets);
    for sample in sample_prompt_sets(set, cfg) {
        let pools: Vec<Vec<String>> = sample.names.iter().map(|n| vec![n.clone()]).collect();
        let classes = ClassEmbeddings::from_pools(&labels, &pools, &sample.templates, &texts)?;
        let pred = slides
            .iter()
            .map(|s| Ok(classes.classify(s, Temperature::None)?.index))
            .collect::<Result<Vec<_>>>()?;
        baccs.push(balanced_accuracy(truth, &pred, labels.len()));
    }
    Ok(summarise(baccs))
}

fn summarise(values: Vec<f64>) -> RobustnessReport {
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let std = (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    RobustnessReport {
        sets: values.len(),
        median: quantile(&sorted, 0.5),
        q1: quantile(&sorted, 0.25),
        q3: quantile(&sorted, 0.75),
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        mean,
        std,
        balanced_accuracies: values,
    }
}

/// numpy's default (linear) quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::ClassPrompts;

    fn set() -> SubtypeSet {
        SubtypeSet::inline(
            "toy",
            vec![
                ClassPrompts {
                    label: "A".into(),
                    names: vec!["apple".into(), "acorn".into(), "zebra".into()],
                },
                ClassPrompts {
                    label: "B".into(),
                    names: vec!["banana".into(), "berry".into()],
                },
            ],
            (0..20).map(|i| format!("t{i} CLASSNAME")).collect(),
        )
        .unwrap()
    }

    #[test]
    fn sampling_is_seeded_and_within_bounds() {
        let cfg = RobustnessConfig::default();
        let a = sample_prompt_sets(&set(), &cfg);
        assert_eq!(a, sample_prompt_sets(&set(), &cfg));
        assert_ne!(
            a,
            sample_prompt_sets(&set(), &RobustnessConfig { seed: 1, ..cfg })
        );
        assert_eq!(a.len(), 50);
        for s in &a {
            assert!((1..=16).contains(&s.templates.len()));
            let mut t = s.templates.clone();
            t.dedup();
            assert_eq!(t.len(), s.templates.len(), "distinct templates");
            assert!(["apple", "acorn", "zebra"].contains(&s.names[0].as_str()));
        }
        let sizes: std::collections::BTreeSet<usize> =
            a.iter().map(|s| s.templates.len()).collect();
        assert!(sizes.len() > 5, "template counts vary: {sizes:?}");
    }

    #[test]
    fn median_and_spread_reflect_bad_names() {
        // A toy encoder: first letter a -> x axis, b -> y axis; "zebra" lands exactly on B, so
        // a set naming class A "zebra" cannot tell the classes apart (ties go to the first).
        let mut embed = |texts: &[String]| -> std::result::Result<Vec<Vec<f32>>, String> {
            Ok(texts
                .iter()
                .map(|t| {
                    let name = t.split(' ').nth(1).unwrap_or("");
                    match name.chars().next() {
                        Some('a') => vec![1.0, 0.1],
                        Some('b') => vec![0.1, 1.0],
                        _ => vec![0.1, 1.0],
                    }
                })
                .collect())
        };
        let slides = vec![
            vec![1.0, 0.0],
            vec![0.9, 0.2],
            vec![0.0, 1.0],
            vec![0.2, 0.9],
        ];
        let truth = [0, 0, 1, 1];
        let r = robustness(
            &set(),
            &slides,
            &truth,
            &RobustnessConfig::default(),
            &mut embed,
        )
        .unwrap();
        assert_eq!(r.sets, 50);
        // With "zebra" for class A both classes sit on the y axis: those sets score 0.5.
        assert!(r.balanced_accuracies.iter().all(|&b| b == 1.0 || b == 0.5));
        assert!(r.balanced_accuracies.contains(&0.5) && r.balanced_accuracies.contains(&1.0));
        assert_eq!(r.median, 1.0);
        assert!(r.min == 0.5 && r.max == 1.0 && r.std > 0.0);
        assert!(robustness(
            &set(),
            &slides,
            &truth[..3],
            &RobustnessConfig::default(),
            &mut embed
        )
        .is_err());
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert_eq!(quantile(&v, 0.25), 1.75);
    }
}
