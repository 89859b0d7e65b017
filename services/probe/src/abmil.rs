//! Attention-based multiple-instance learning on tile features (Ilse, Tomczak and Welling 2018,
//! gated attention): each slide is a bag of tile feature vectors; the model weighs every tile,
//! pools the weighted mean and classifies it. The weights are the heatmap: which tiles the
//! prediction rests on.
//!
//! ```text
//! h_i   = ReLU(W1 x_i + b1)                                [N, hidden]
//! a_i   = w^T (tanh(V h_i + b_v) * sigmoid(U h_i + b_u)) + b_w
//! alpha = softmax_i(a_i)                                    [N]
//! z     = sum_i alpha_i h_i;  logits = C z + b_c
//! ```
//!
//! Trained with candle autograd one bag at a time (the paper's batch of one) and the alignment
//! trainer's AdamW. The softmax and sigmoid are written from basic ops (max-subtracted
//! exp / sum, 1 / (1 + exp(-x))): candle 0.11's fused softmax records no gradient. Inputs are
//! standardised with the training tiles' per-dimension mean and deviation.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use gigapath_store::catalog::SlideState;
use gigapath_store::Store;
use gigapath_train::config::OptimSection;
use gigapath_train::optim::AdamW;
use gigapath_zeroshot::rng::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{ProbeError, Result};

/// One slide's tiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Bag {
    /// Row-major `[tiles, dim]` features.
    pub features: Vec<f32>,
    /// Tiles.
    pub tiles: usize,
    /// Feature width.
    pub dim: usize,
    /// Grid cell (gx, gy) of each tile, in the order of the rows.
    pub grid: Vec<[u32; 2]>,
}

impl Bag {
    /// Reads a feature file (`gigapath_store::FeatureFile`).
    pub fn read(path: &Path) -> Result<Bag> {
        let f = gigapath_store::FeatureFile::read(path)?;
        if f.is_empty() {
            return Err(ProbeError::Invalid(format!(
                "{} holds no tile",
                path.display()
            )));
        }
        Ok(Bag {
            features: f.features_f32(),
            tiles: f.len(),
            dim: f.dim,
            grid: f
                .grid_xy
                .iter()
                .map(|g| [g[0] as u32, g[1] as u32])
                .collect(),
        })
    }
}

/// The bag of every slide of `slide_ids`, in order, from the feature files of its tile encoder,
/// and that encoder's fingerprint (all slides must share it).
pub async fn load_bags(store: &Store, slide_ids: &[String]) -> Result<(Vec<Bag>, String)> {
    let records = store
        .catalog
        .list_slides(Some(SlideState::Embedded))
        .await?;
    let tile_fp: HashMap<&str, &str> = records
        .iter()
        .filter_map(|r| Some((r.id.as_str(), r.fingerprints.get("tile")?.as_str())))
        .collect();
    let mut bags = Vec::with_capacity(slide_ids.len());
    let mut first: Option<&str> = None;
    for id in slide_ids {
        let fp = *tile_fp
            .get(id.as_str())
            .ok_or_else(|| ProbeError::UnknownSlide(id.clone()))?;
        if let Some(f) = first.filter(|f| *f != fp) {
            return Err(ProbeError::Fingerprint(format!(
                "slide `{id}` has tile features from weights {fp}, others from {f}: re-embed them first"
            )));
        }
        first = Some(fp);
        let rec = store.feature_file(id, fp).await?.ok_or_else(|| {
            ProbeError::Invalid(format!(
                "slide `{id}` has no feature file for tile weights {fp}"
            ))
        })?;
        bags.push(Bag::read(Path::new(&rec.path))?);
    }
    Ok((bags, first.unwrap_or_default().to_string()))
}

/// Sizes and training schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AbmilConfig {
    /// Width of h.
    pub hidden: usize,
    /// Width of the attention branches.
    pub attention: usize,
    /// Passes over the training bags.
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay (not on biases).
    pub weight_decay: f64,
    /// Seed of the initial weights and the bag order.
    pub seed: u64,
}

impl Default for AbmilConfig {
    fn default() -> Self {
        AbmilConfig {
            hidden: 64,
            attention: 32,
            epochs: 20,
            lr: 1e-3,
            weight_decay: 1e-4,
            seed: 0,
        }
    }
}

/// A trained (or freshly initialised) gated-attention MIL model.
#[derive(Debug, Clone)]
pub struct Abmil {
    /// Tensors by name: `fc.weight` `[hidden, dim]`, `fc.bias`, `attention_v.*`,
    /// `attention_u.*` `[attention, hidden]`, `attention_w.*` `[1, attention]`, `classifier.*`
    /// `[classes, hidden]`, and the input standardisation `input.mean` / `input.std` `[dim]`.
    pub tensors: HashMap<String, Tensor>,
}

/// One bag's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct BagPrediction {
    /// Class probabilities.
    pub probabilities: Vec<f32>,
    /// Attention weight per tile (sums to 1), in the bag's tile order.
    pub attention: Vec<f32>,
}

/// `1 / (1 + exp(-x))` from differentiable basic ops.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Softmax over the last dimension from differentiable basic ops (max subtracted).
fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

const LAYERS: [&str; 5] = [
    "fc",
    "attention_v",
    "attention_u",
    "attention_w",
    "classifier",
];

impl Abmil {
    /// Seeded uniform(+-1/sqrt(fan_in)) weights (PyTorch's `nn.Linear` default), zero biases.
    fn init(
        dim: usize,
        classes: usize,
        cfg: &AbmilConfig,
        mean: Vec<f32>,
        std: Vec<f32>,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let mut rng = SplitMix64::new(cfg.seed ^ 0xAB_1117);
        let shapes = [
            ("fc", cfg.hidden, dim),
            ("attention_v", cfg.attention, cfg.hidden),
            ("attention_u", cfg.attention, cfg.hidden),
            ("attention_w", 1, cfg.attention),
            ("classifier", classes, cfg.hidden),
        ];
        let mut tensors = HashMap::new();
        for (name, out, inp) in shapes {
            let bound = 1.0 / (inp as f64).sqrt();
            let w: Vec<f32> = (0..out * inp)
                .map(|_| ((rng.next_u64() as f64 / u64::MAX as f64) * 2.0 - 1.0) * bound)
                .map(|v| v as f32)
                .collect();
            tensors.insert(
                format!("{name}.weight"),
                Tensor::from_vec(w, (out, inp), &dev)?,
            );
            tensors.insert(
                format!("{name}.bias"),
                Tensor::zeros(out, DType::F32, &dev)?,
            );
        }
        tensors.insert("input.mean".into(), Tensor::from_vec(mean, dim, &dev)?);
        tensors.insert("input.std".into(), Tensor::from_vec(std, dim, &dev)?);
        Ok(Abmil { tensors })
    }

    /// From saved tensors; every layer must be there.
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Result<Self> {
        for l in LAYERS {
            for p in ["weight", "bias"] {
                if !tensors.contains_key(&format!("{l}.{p}")) {
                    return Err(ProbeError::Invalid(format!("abmil weights lack `{l}.{p}`")));
                }
            }
        }
        for k in ["input.mean", "input.std"] {
            if !tensors.contains_key(k) {
                return Err(ProbeError::Invalid(format!("abmil weights lack `{k}`")));
            }
        }
        Ok(Abmil { tensors })
    }

    /// Feature width expected.
    pub fn dim(&self) -> usize {
        self.tensors["input.mean"].dims()[0]
    }

    /// Classes predicted.
    pub fn classes(&self) -> usize {
        self.tensors["classifier.bias"].dims()[0]
    }

    fn t(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }

    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        x.matmul(&self.t(&format!("{name}.weight")).t()?)?
            .broadcast_add(self.t(&format!("{name}.bias")))
    }

    /// Logits [1, classes] and attention [1, N] of a bag [N, dim].
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let x = x
            .broadcast_sub(self.t("input.mean"))?
            .broadcast_div(self.t("input.std"))?;
        let h = self.linear(&x, "fc")?.relu()?;
        let gate =
            (self.linear(&h, "attention_v")?.tanh()? * sigmoid(&self.linear(&h, "attention_u")?)?)?;
        let scores = self.linear(&gate, "attention_w")?.t()?; // [1, N]
        let alpha = softmax_last(&scores)?;
        let z = alpha.matmul(&h)?; // [1, hidden]
        Ok((self.linear(&z, "classifier")?, alpha))
    }

    fn bag_tensor(&self, bag: &Bag) -> Result<Tensor> {
        if bag.dim != self.dim() {
            return Err(ProbeError::DimensionMismatch {
                what: "the tile features".into(),
                expected: self.dim(),
                got: bag.dim,
            });
        }
        Ok(Tensor::from_slice(
            &bag.features,
            (bag.tiles, bag.dim),
            &Device::Cpu,
        )?)
    }

    /// Class probabilities and per-tile attention of `bag`.
    pub fn predict(&self, bag: &Bag) -> Result<BagPrediction> {
        let (logits, alpha) = self.forward(&self.bag_tensor(bag)?)?;
        let probabilities = crate::heads::softmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        Ok(BagPrediction {
            probabilities,
            attention: alpha.squeeze(0)?.to_vec1()?,
        })
    }

    /// Trains on the bags of `ds` (in `ds` order); returns the model and the mean loss of each
    /// epoch.
    pub fn fit(ds: &Dataset, bags: &[Bag], cfg: &AbmilConfig) -> Result<(Abmil, Vec<f64>)> {
        if bags.len() != ds.len() || bags.is_empty() {
            return Err(ProbeError::Invalid(format!(
                "{} bags for {} slides",
                bags.len(),
                ds.len()
            )));
        }
        let dim = bags[0].dim;
        if let Some(b) = bags.iter().find(|b| b.dim != dim) {
            return Err(ProbeError::DimensionMismatch {
                what: "a bag's tile features".into(),
                expected: dim,
                got: b.dim,
            });
        }
        let total: usize = bags.iter().map(|b| b.tiles).sum();
        let mut mean = vec![0f64; dim];
        let mut sq = vec![0f64; dim];
        for b in bags {
            for row in b.features.chunks_exact(dim) {
                for (j, &v) in row.iter().enumerate() {
                    mean[j] += v as f64;
                    sq[j] += (v as f64) * (v as f64);
                }
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / total as f64) as f32).collect();
        let std: Vec<f32> = sq
            .iter()
            .zip(&mean)
            .map(|(s, &m)| {
                ((s / total as f64 - (m as f64).powi(2)).max(0.0).sqrt() as f32).max(1e-6)
            })
            .collect();
        let init = Abmil::init(dim, ds.classes.len(), cfg, mean, std)?;
        // Trainable copies of the layers in a VarMap, for the shared AdamW.
        let mut varmap = VarMap::new();
        for l in LAYERS {
            for p in ["weight", "bias"] {
                let name = format!("{l}.{p}");
                let t = &init.tensors[&name];
                varmap.get(
                    t.dims(),
                    &name,
                    candle_nn::Init::Const(0.0),
                    DType::F32,
                    &Device::Cpu,
                )?;
                varmap.set_one(&name, t)?;
            }
        }
        let mut opt = AdamW::new(
            &varmap,
            &OptimSection {
                weight_decay: cfg.weight_decay,
                beta2: 0.999,
                eps: 1e-8,
                ..OptimSection::default()
            },
        )?;
        let vars: Vec<(String, Var)> = opt
            .vars()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        let model_of = |vars: &[(String, Var)]| {
            let mut tensors = init.tensors.clone();
            for (n, v) in vars {
                tensors.insert(n.clone(), v.as_tensor().clone());
            }
            Abmil { tensors }
        };
        let mut order: Vec<usize> = (0..bags.len()).collect();
        let mut rng = SplitMix64::new(cfg.seed);
        let mut losses = Vec::with_capacity(cfg.epochs);
        let model = model_of(&vars);
        for _ in 0..cfg.epochs {
            rng.shuffle(&mut order);
            let mut sum = 0.0;
            for &i in &order {
                let (logits, _) = model.forward(&model.bag_tensor(&bags[i])?)?;
                let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                let loss = logp.narrow(1, ds.y[i], 1)?.sum_all()?.neg()?;
                sum += loss.to_scalar::<f32>()? as f64;
                let grads = loss.backward()?;
                let by_name: HashMap<String, Tensor> = vars
                    .iter()
                    .filter_map(|(n, v)| Some((n.clone(), grads.get(v.as_tensor())?.clone())))
                    .collect();
                opt.step(&by_name, cfg.lr, cfg.lr)?;
            }
            losses.push(sum / bags.len() as f64);
        }
        // Detached copies: the trained model holds plain tensors.
        let mut trained = model_of(&vars);
        for t in trained.tensors.values_mut() {
            *t = t.detach();
        }
        Ok((trained, losses))
    }
}

/// Stratified grouped k-fold cross-validation of attention MIL on `bags` (in `ds` order).
pub fn cross_validate(
    ds: &Dataset,
    bags: &[Bag],
    cv: &crate::eval::CvConfig,
    cfg: &AbmilConfig,
) -> Result<crate::eval::CvResult> {
    let folds = crate::split::stratified_group_folds(ds, cv.folds, cv.seed)?;
    let mut probs = vec![Vec::new(); ds.len()];
    for f in 0..cv.folds {
        let (train, test): (Vec<usize>, Vec<usize>) = (0..ds.len()).partition(|&i| folds[i] != f);
        let train_bags: Vec<Bag> = train.iter().map(|&i| bags[i].clone()).collect();
        let (model, _) = Abmil::fit(&ds.subset(&train), &train_bags, cfg)?;
        for i in test {
            probs[i] = model.predict(&bags[i])?.probabilities;
        }
    }
    Ok(crate::eval::CvResult {
        kind: crate::heads::HeadKind::Abmil,
        folds: cv.folds,
        slides: ds.len(),
        scores: crate::eval::score(
            &ds.classes,
            &ds.y,
            &probs,
            &ds.groups,
            cv.bootstrap,
            cv.seed,
        )?,
        lambdas: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::LabelledSlide;
    use crate::heads::tests::noise;

    /// Bags of 20 tiles in 8 dimensions; a positive bag hides 3 "tumour" tiles (dimension 0
    /// raised) among background tiles. Returns the dataset, the bags and the tumour tiles.
    fn bags(n: usize, seed: u64) -> (Dataset, Vec<Bag>, Vec<Vec<usize>>) {
        let mut rng = SplitMix64::new(seed);
        let mut rows = Vec::new();
        let mut out = Vec::new();
        let mut tumour = Vec::new();
        for i in 0..n {
            let positive = i % 2 == 1;
            let mut f = Vec::new();
            let mut hot = Vec::new();
            for t in 0..20 {
                let mut x: Vec<f32> = (0..8).map(|_| noise(&mut rng)).collect();
                if positive && t % 7 == 3 {
                    x[0] += 4.0;
                    hot.push(t);
                }
                f.extend(x);
            }
            rows.push(LabelledSlide {
                slide_id: format!("S{i}"),
                value: if positive {
                    "tumour".into()
                } else {
                    "normal".into()
                },
                patient: None,
                x: vec![0.0],
            });
            out.push(Bag {
                features: f,
                tiles: 20,
                dim: 8,
                grid: (0..20).map(|t| [t % 5, t / 5]).collect(),
            });
            tumour.push(hot);
        }
        (Dataset::new("status", rows, None).unwrap(), out, tumour)
    }

    #[test]
    fn abmil_learns_positive_bags_and_attends_to_their_key_tiles() {
        let (train, train_bags, _) = bags(40, 1);
        let (test, test_bags, hot) = bags(20, 2);
        let cfg = AbmilConfig {
            epochs: 15,
            ..Default::default()
        };
        let (model, losses) = Abmil::fit(&train, &train_bags, &cfg).unwrap();
        assert!(
            losses[losses.len() - 1] < 0.5 * losses[0],
            "loss {losses:?}"
        );
        let mut correct = 0;
        for (i, b) in test_bags.iter().enumerate() {
            let p = model.predict(b).unwrap();
            assert!((p.attention.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            assert_eq!(p.attention.len(), 20);
            if gigapath_zeroshot::classify::argmax(&p.probabilities) == test.y[i] {
                correct += 1;
            }
            if test.classes[test.y[i]] == "tumour" {
                let on_hot: f32 = hot[i].iter().map(|&t| p.attention[t]).sum();
                assert!(
                    on_hot > 0.5,
                    "bag {i}: attention on the 3 tumour tiles {on_hot}"
                );
            }
        }
        assert!(correct >= 19, "{correct}/20");
        let err = model
            .predict(&Bag {
                features: vec![0.0; 4],
                tiles: 1,
                dim: 4,
                grid: vec![[0, 0]],
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("dimension mismatch: the tile features has 4 dimensions, expected 8"),
            "{err}"
        );
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let (ds, bags, _) = bags(2, 3);
        let model = Abmil::init(8, 2, &AbmilConfig::default(), vec![0.0; 8], vec![1.0; 8]).unwrap();
        let vars: HashMap<String, Var> = model
            .tensors
            .iter()
            .filter(|(n, _)| !n.starts_with("input."))
            .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
            .collect();
        let mut tracked = model.clone();
        for (n, v) in &vars {
            tracked.tensors.insert(n.clone(), v.as_tensor().clone());
        }
        let (logits, _) = tracked
            .forward(&tracked.bag_tensor(&bags[1]).unwrap())
            .unwrap();
        let loss = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .narrow(1, ds.y[1], 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (n, v) in &vars {
            if n == "attention_w.bias" {
                // Softmax ignores a shift common to every tile: its gradient is exactly zero.
                continue;
            }
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "zero gradient for {n}");
        }
    }
}
