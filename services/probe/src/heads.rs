//! Heads on slide vectors: a multinomial logistic-regression linear probe (L2, trained with
//! candle autograd and the alignment trainer's AdamW), k-nearest neighbours by cosine, and
//! prototypes (class means of L2-normalised vectors, cosine).
//!
//! Each head maps a vector to class probabilities. kNN's are the (similarity-weighted) vote
//! shares; the prototype head's are softmax(cosine / 0.1), so AUROC has scores to rank.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarMap};
use gigapath_train::config::OptimSection;
use gigapath_train::optim::AdamW;
use gigapath_zeroshot::cosine;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{ProbeError, Result};

/// Temperature of the prototype head's softmax over cosines.
pub const PROTOTYPE_TEMPERATURE: f32 = 0.1;

/// How a linear probe is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearConfig {
    /// L2 penalty: loss = weighted mean cross-entropy + lambda / 2 x ||W||^2 (on standardised
    /// inputs; sklearn's `C` is about 1 / (lambda x n)).
    pub lambda: f64,
    /// Full-batch AdamW steps.
    pub steps: u64,
    /// Learning rate.
    pub lr: f64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            lambda: 1e-2,
            steps: 300,
            lr: 0.05,
        }
    }
}

/// The penalties the inner validation chooses from.
pub const LAMBDA_SWEEP: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// A fitted linear probe: `softmax(((x - mean) / std) W + b)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearProbe {
    /// Per-dimension training mean.
    pub mean: Vec<f32>,
    /// Per-dimension training standard deviation (at least 1e-6).
    pub std: Vec<f32>,
    /// `[dim][classes]`.
    pub weight: Vec<Vec<f32>>,
    /// `[classes]`.
    pub bias: Vec<f32>,
    /// The penalty it was fitted with.
    pub lambda: f64,
}

/// Softmax of a vector (max subtracted).
pub(crate) fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

impl LinearProbe {
    /// Fits on `ds` (every class must be present): class-balanced sample weights, zero init,
    /// full-batch AdamW without decoupled decay (the L2 term is in the loss).
    pub fn fit(ds: &Dataset, cfg: &LinearConfig) -> Result<Self> {
        let (n, d, c) = (ds.len(), ds.dim, ds.classes.len());
        let support = ds.support();
        if let Some(missing) = support.iter().position(|&s| s == 0) {
            return Err(ProbeError::Invalid(format!(
                "class `{}` has no training slide",
                ds.classes[missing]
            )));
        }
        let mut mean = vec![0f32; d];
        for x in &ds.x {
            for (m, v) in mean.iter_mut().zip(x) {
                *m += v / n as f32;
            }
        }
        let mut std = vec![0f32; d];
        for x in &ds.x {
            for ((s, v), m) in std.iter_mut().zip(x).zip(&mean) {
                *s += (v - m) * (v - m) / n as f32;
            }
        }
        let std: Vec<f32> = std.into_iter().map(|v| v.sqrt().max(1e-6)).collect();
        let dev = Device::Cpu;
        let flat: Vec<f32> =
            ds.x.iter()
                .flat_map(|x| x.iter().zip(&mean).zip(&std).map(|((v, m), s)| (v - m) / s))
                .collect();
        let x = Tensor::from_vec(flat, (n, d), &dev)?;
        // One-hot targets scaled by n / (classes x support): sklearn's "balanced" weights.
        let mut target = vec![0f32; n * c];
        for (i, &y) in ds.y.iter().enumerate() {
            target[i * c + y] = n as f32 / (c as f32 * support[y] as f32);
        }
        let target = Tensor::from_vec(target, (n, c), &dev)?;
        let varmap = VarMap::new();
        let w = varmap.get((d, c), "linear.weight", Init::Const(0.0), DType::F32, &dev)?;
        let b = varmap.get(c, "linear.bias", Init::Const(0.0), DType::F32, &dev)?;
        let mut opt = AdamW::new(
            &varmap,
            &OptimSection {
                weight_decay: 0.0,
                beta2: 0.999,
                eps: 1e-8,
                ..OptimSection::default()
            },
        )?;
        for _ in 0..cfg.steps {
            let loss = Self::loss(&x, &w, &b, &target, cfg.lambda, n)?;
            let grads = loss.backward()?;
            let by_name: HashMap<String, Tensor> = opt
                .vars()
                .filter_map(|(name, v)| Some((name.to_string(), grads.get(v.as_tensor())?.clone())))
                .collect();
            opt.step(&by_name, cfg.lr, cfg.lr)?;
        }
        Ok(LinearProbe {
            mean,
            std,
            weight: w.to_vec2()?,
            bias: b.to_vec1()?,
            lambda: cfg.lambda,
        })
    }

    /// Weighted mean cross-entropy (log-softmax from differentiable basic ops) plus the L2 term.
    fn loss(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        target: &Tensor,
        lambda: f64,
        n: usize,
    ) -> Result<Tensor> {
        let logits = x.matmul(w)?.broadcast_add(b)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let ce = (logp * target)?.sum_all()?.affine(-1.0 / n as f64, 0.0)?;
        let l2 = w.sqr()?.sum_all()?.affine(lambda / 2.0, 0.0)?;
        Ok((ce + l2)?)
    }

    /// Class probabilities of `x`.
    pub fn predict_proba(&self, x: &[f32]) -> Result<Vec<f32>> {
        check_dim(x, self.mean.len())?;
        let c = self.bias.len();
        let mut logits = self.bias.clone();
        for (j, ((v, m), s)) in x.iter().zip(&self.mean).zip(&self.std).enumerate() {
            let z = (v - m) / s;
            for (k, l) in logits.iter_mut().enumerate().take(c) {
                *l += z * self.weight[j][k];
            }
        }
        Ok(softmax(&logits))
    }
}

fn check_dim(x: &[f32], dim: usize) -> Result<()> {
    if x.len() != dim {
        return Err(ProbeError::DimensionMismatch {
            what: "the slide vector".into(),
            expected: dim,
            got: x.len(),
        });
    }
    Ok(())
}

/// k-nearest neighbours by cosine over the training vectors; probabilities are the
/// similarity-weighted vote shares of the k nearest (cosine shifted to [0, 2], so every
/// neighbour counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Knn {
    /// Neighbours that vote.
    pub k: usize,
    /// Training vectors.
    pub x: Vec<Vec<f32>>,
    /// Their classes.
    pub y: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
}

impl Knn {
    /// Keeps the training set; `k` is capped at its size.
    pub fn fit(ds: &Dataset, k: usize) -> Result<Self> {
        if k == 0 {
            return Err(ProbeError::Invalid("kNN with k = 0".into()));
        }
        Ok(Knn {
            k: k.min(ds.len()),
            x: ds.x.clone(),
            y: ds.y.clone(),
            classes: ds.classes.len(),
        })
    }

    /// Vote shares of the k nearest training vectors.
    pub fn predict_proba(&self, x: &[f32]) -> Result<Vec<f32>> {
        check_dim(x, self.x.first().map_or(x.len(), Vec::len))?;
        let mut sims: Vec<(f32, usize)> = self
            .x
            .iter()
            .zip(&self.y)
            .map(|(t, &y)| (cosine(t, x), y))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes = vec![0f32; self.classes];
        for (s, y) in sims.iter().take(self.k) {
            votes[*y] += 1.0 + s;
        }
        let total: f32 = votes.iter().sum();
        Ok(votes
            .into_iter()
            .map(|v| v / total.max(f32::MIN_POSITIVE))
            .collect())
    }
}

/// Class prototypes: the renormalised mean of each class's L2-normalised vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prototypes {
    /// `[classes][dim]`, unit length.
    pub prototypes: Vec<Vec<f32>>,
}

impl Prototypes {
    /// One prototype per class of `ds` (every class must be present).
    pub fn fit(ds: &Dataset) -> Result<Self> {
        let mut sums = vec![vec![0f32; ds.dim]; ds.classes.len()];
        let mut n = vec![0usize; ds.classes.len()];
        for (x, &y) in ds.x.iter().zip(&ds.y) {
            let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            for (s, v) in sums[y].iter_mut().zip(x) {
                *s += v / norm;
            }
            n[y] += 1;
        }
        if let Some(c) = n.iter().position(|&k| k == 0) {
            return Err(ProbeError::Invalid(format!(
                "class `{}` has no training slide",
                ds.classes[c]
            )));
        }
        let prototypes = sums
            .into_iter()
            .map(|s| {
                let norm = s.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                s.into_iter().map(|v| v / norm).collect()
            })
            .collect();
        Ok(Prototypes { prototypes })
    }

    /// softmax(cosine to each prototype / [`PROTOTYPE_TEMPERATURE`]).
    pub fn predict_proba(&self, x: &[f32]) -> Result<Vec<f32>> {
        check_dim(x, self.prototypes[0].len())?;
        let logits: Vec<f32> = self
            .prototypes
            .iter()
            .map(|p| cosine(p, x) / PROTOTYPE_TEMPERATURE)
            .collect();
        Ok(softmax(&logits))
    }
}

/// A fitted head on slide vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SlideHead {
    /// Logistic regression.
    Linear(LinearProbe),
    /// k-nearest neighbours.
    Knn(Knn),
    /// Class prototypes.
    Prototype(Prototypes),
}

impl SlideHead {
    /// `linear`, `knn` or `prototype`.
    pub fn kind(&self) -> HeadKind {
        match self {
            SlideHead::Linear(_) => HeadKind::Linear,
            SlideHead::Knn(_) => HeadKind::Knn,
            SlideHead::Prototype(_) => HeadKind::Prototype,
        }
    }

    /// Class probabilities of `x`.
    pub fn predict_proba(&self, x: &[f32]) -> Result<Vec<f32>> {
        match self {
            SlideHead::Linear(h) => h.predict_proba(x),
            SlideHead::Knn(h) => h.predict_proba(x),
            SlideHead::Prototype(h) => h.predict_proba(x),
        }
    }
}

/// The kinds of head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// [`LinearProbe`].
    Linear,
    /// [`Knn`].
    Knn,
    /// [`Prototypes`].
    Prototype,
    /// Attention MIL on tile features ([`crate::abmil`]).
    Abmil,
}

impl std::fmt::Display for HeadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeadKind::Linear => "linear",
            HeadKind::Knn => "knn",
            HeadKind::Prototype => "prototype",
            HeadKind::Abmil => "abmil",
        })
    }
}

impl std::str::FromStr for HeadKind {
    type Err = ProbeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(HeadKind::Linear),
            "knn" => Ok(HeadKind::Knn),
            "prototype" => Ok(HeadKind::Prototype),
            "abmil" => Ok(HeadKind::Abmil),
            other => Err(ProbeError::Invalid(format!(
                "head kind `{other}`: expected linear, knn, prototype or abmil"
            ))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::LabelledSlide;
    use gigapath_zeroshot::rng::SplitMix64;

    /// Gaussian-ish noise in [-1, 1] (sum of uniforms).
    pub(crate) fn noise(rng: &mut SplitMix64) -> f32 {
        (0..4)
            .map(|_| rng.next_u64() as f32 / u64::MAX as f32)
            .sum::<f32>()
            / 2.0
            - 1.0
    }

    /// `per_class` slides of each of `classes` classes in `dim` dimensions: class means
    /// `separation` apart along their own axis, plus noise; `shuffle_labels` replaces the
    /// labels with random ones (nothing to learn).
    pub(crate) fn blobs(
        per_class: usize,
        classes: usize,
        dim: usize,
        separation: f32,
        shuffle_labels: bool,
        seed: u64,
    ) -> Dataset {
        let mut rng = SplitMix64::new(seed);
        let rows = (0..per_class * classes)
            .map(|i| {
                let c = i % classes;
                let mut x: Vec<f32> = (0..dim).map(|_| noise(&mut rng)).collect();
                x[c] += separation;
                x[dim - 1] += 3.0; // a common offset, as real embeddings have
                let label = if shuffle_labels {
                    rng.below(classes)
                } else {
                    c
                };
                LabelledSlide {
                    slide_id: format!("S{i:03}"),
                    value: format!("C{label}"),
                    patient: Some(format!("P{i:03}")),
                    x,
                }
            })
            .collect();
        Dataset::new("subtype", rows, None).unwrap()
    }

    fn accuracy(head: &SlideHead, ds: &Dataset) -> f64 {
        let ok =
            ds.x.iter()
                .zip(&ds.y)
                .filter(|(x, &y)| {
                    gigapath_zeroshot::classify::argmax(&head.predict_proba(x).unwrap()) == y
                })
                .count();
        ok as f64 / ds.len() as f64
    }

    #[test]
    fn heads_separate_separable_classes() {
        let train = blobs(20, 3, 16, 4.0, false, 1);
        let test = blobs(20, 3, 16, 4.0, false, 2);
        let heads = [
            SlideHead::Linear(LinearProbe::fit(&train, &LinearConfig::default()).unwrap()),
            SlideHead::Knn(Knn::fit(&train, 5).unwrap()),
            SlideHead::Prototype(Prototypes::fit(&train).unwrap()),
        ];
        for h in &heads {
            let acc = accuracy(h, &test);
            assert!(acc >= 0.95, "{:?}: {acc}", h.kind());
            let p = h.predict_proba(&test.x[0]).unwrap();
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let err = heads[0].predict_proba(&[1.0, 2.0]).unwrap_err().to_string();
        assert!(
            err.contains("dimension mismatch: the slide vector has 2 dimensions, expected 16"),
            "{err}"
        );
    }

    #[test]
    fn linear_probe_loss_has_gradients_and_decreases() {
        let ds = blobs(10, 2, 8, 2.0, false, 3);
        let short = LinearProbe::fit(
            &ds,
            &LinearConfig {
                steps: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            short.weight.iter().flatten().any(|w| w.abs() > 1e-4),
            "one step moved W"
        );
        let dev = Device::Cpu;
        let x = Tensor::from_vec(ds.x.concat(), (ds.len(), 8), &dev).unwrap();
        let mut t = vec![0f32; ds.len() * 2];
        for (i, &y) in ds.y.iter().enumerate() {
            t[i * 2 + y] = 1.0;
        }
        let target = Tensor::from_vec(t, (ds.len(), 2), &dev).unwrap();
        let loss_of = |p: &LinearProbe| {
            let w = Tensor::new(p.weight.clone(), &dev).unwrap();
            let b = Tensor::new(p.bias.clone(), &dev).unwrap();
            let xs = x
                .broadcast_sub(&Tensor::new(p.mean.clone(), &dev).unwrap())
                .unwrap()
                .broadcast_div(&Tensor::new(p.std.clone(), &dev).unwrap())
                .unwrap();
            LinearProbe::loss(&xs, &w, &b, &target, 0.0, ds.len())
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let long = LinearProbe::fit(
            &ds,
            &LinearConfig {
                steps: 200,
                ..Default::default()
            },
        )
        .unwrap();
        let (l1, l200) = (loss_of(&short), loss_of(&long));
        assert!(
            l1 < std::f32::consts::LN_2 && l200 < 0.5 * l1,
            "{l1} -> {l200}"
        );
    }
}
