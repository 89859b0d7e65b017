//! AdamW with parameter groups, the warmup + cosine schedule and global-norm clipping.
//!
//! Written here rather than taken from `candle_nn::AdamW` for three reasons: weight decay must be
//! off for biases, norms and the logit scale (open_clip), fine-tuned encoder layers take their own
//! learning rate, and an exact resume needs the moment estimates saved and restored.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use crate::config::OptimSection;
use crate::error::{Result, TrainError};

/// Which learning rate a parameter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Projection heads and the logit scale: `optim.lr`.
    Head,
    /// Fine-tuned encoder layers: `optim.encoder_lr`.
    Encoder,
}

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
    group: Group,
}

/// AdamW over every tensor of a `VarMap`, in name order.
pub struct AdamW {
    params: Vec<Param>,
    cfg: OptimSection,
    /// Updates done (Adam's bias-correction step count).
    pub t: u64,
}

impl AdamW {
    /// Zero moments for every variable of `varmap`; decay by [`gigapath_models::align::decays`],
    /// group by key prefix.
    pub fn new(varmap: &VarMap, cfg: &OptimSection) -> Result<Self> {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let params = names
            .into_iter()
            .map(|name| {
                let var = data[name].clone();
                let zeros = var.as_tensor().zeros_like()?;
                let encoder =
                    name.starts_with("slide_encoder.") || name.starts_with("text_encoder.");
                Ok(Param {
                    name: name.clone(),
                    m: zeros.clone(),
                    v: zeros,
                    decay: gigapath_models::align::decays(name),
                    group: if encoder { Group::Encoder } else { Group::Head },
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            cfg: cfg.clone(),
            t: 0,
        })
    }

    /// Parameter names and variables, in update order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// How many parameters (scalars) are trained.
    pub fn parameter_count(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.var.as_tensor().elem_count())
            .sum()
    }

    /// One update with gradients by name (a missing gradient counts as zero) at the learning
    /// rates of this step.
    pub fn step(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr_head: f64,
        lr_encoder: f64,
    ) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for p in &mut self.params {
            let lr = match p.group {
                Group::Head => lr_head,
                Group::Encoder => lr_encoder,
            };
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            p.m = ((&p.m * b1)? + (g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&p.m / c1)?;
            let v_hat = (&p.v / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.cfg.eps)?)?;
            let mut value = p.var.as_tensor().detach();
            if p.decay && self.cfg.weight_decay > 0.0 {
                value = (value * (1.0 - lr * self.cfg.weight_decay))?;
            }
            p.var.set(&(value - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as tensors `m.<name>` / `v.<name>`, for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("m.{}", p.name), p.m.clone()),
                    (format!("v.{}", p.name), p.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for p in &mut self.params {
            for (slot, prefix) in [(&mut p.m, "m"), (&mut p.v, "v")] {
                let key = format!("{prefix}.{}", p.name);
                let saved = tensors.get(&key).ok_or_else(|| {
                    TrainError::Data(format!(
                        "optimizer state has no `{key}` (a different model?)"
                    ))
                })?;
                if saved.dims() != slot.dims() {
                    return Err(TrainError::Data(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        saved.dims(),
                        slot.dims()
                    )));
                }
                *slot = saved.to_dtype(DType::F32)?.to_device(slot.device())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The learning-rate multiplier of step `step` (0-based): linear warmup from 0 to 1 over
/// `warmup` steps, then a cosine from 1 down to `min_ratio` at `total`.
pub fn lr_factor(step: u64, total: u64, warmup: u64, min_ratio: f64) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    min_ratio + (1.0 - min_ratio) * cosine
}

/// Global L2 norm of the gradients; when above `max_norm` (> 0) they are scaled down to it.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.values() {
        sum += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sum.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_follows_a_cosine() {
        assert!((lr_factor(0, 100, 10, 0.0) - 0.1).abs() < 1e-12);
        assert!((lr_factor(9, 100, 10, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_factor(10, 100, 10, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_factor(55, 100, 10, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_factor(100, 100, 10, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_the_reference_update_and_skips_decay_where_asked() {
        let varmap = VarMap::new();
        let dev = Device::Cpu;
        for (name, v) in [("head.weight", 1.0f32), ("head.bias", 1.0)] {
            varmap.data().lock().unwrap().insert(
                name.into(),
                Var::from_tensor(&Tensor::new(&[v], &dev).unwrap()).unwrap(),
            );
        }
        let cfg = OptimSection {
            weight_decay: 0.5,
            ..OptimSection::default()
        };
        let mut opt = AdamW::new(&varmap, &cfg).unwrap();
        let g = Tensor::new(&[0.2f32], &dev).unwrap();
        let grads = HashMap::from([
            ("head.weight".to_string(), g.clone()),
            ("head.bias".to_string(), g),
        ]);
        opt.step(&grads, 0.1, 0.0).unwrap();
        // Step 1: m_hat = g, v_hat = g^2, update = g / (|g| + eps) ~ 1.
        let update = 0.2 / (0.2 + 1e-6);
        let w = varmap.data().lock().unwrap()["head.weight"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()[0];
        let b = varmap.data().lock().unwrap()["head.bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            (w as f64 - (1.0 * (1.0 - 0.1 * 0.5) - 0.1 * update)).abs() < 1e-6,
            "{w}"
        );
        assert!(
            (b as f64 - (1.0 - 0.1 * update)).abs() < 1e-6,
            "bias is not decayed: {b}"
        );
        // State round trip.
        let state = opt.state();
        let mut again = AdamW::new(&varmap, &cfg).unwrap();
        again.load_state(&state, opt.t).unwrap();
        assert_eq!(again.t, 1);
        assert!(again.load_state(&HashMap::new(), 1).is_err());
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[4.0f32], &dev).unwrap()),
        ]);
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a = grads["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }
}
