//! Layers shared by the encoders, with one rule: the fast fused candle kernels for inference, the
//! differentiable composition of basic ops whenever a gradient can flow.
//!
//! candle 0.11's fused `layer_norm` and `softmax_last_dim` record no backward op. The slide and text
//! encoders are fine-tuned later (last k layers, CLIP alignment), so every norm and softmax here
//! checks [`Tensor::track_op`] (true when a `Var` is upstream) and takes the slow, differentiable
//! path only then. Inference, where no tensor tracks ops, always gets the fused kernel.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Whether a gradient can flow through `t` (it is a `Var` or depends on one).
pub fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// `nn.Linear` with bias, weight `[out, in]` as PyTorch stores it.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<candle_nn::Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

/// LayerNorm over the last dimension, computed in f32 whatever the activation dtype.
///
/// Weights are kept in f32: in bf16 the affine parameters alone would cost ~3 significant digits.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` / `bias` (or the old `gamma` / `beta` names some BERT checkpoints use).
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let vb = vb.set_dtype(DType::F32);
        let name = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find(|n| vb.contains_tensor(n))
                .unwrap_or(names[0])
        };
        let weight = vb.get(size, name(["weight", "gamma"]))?;
        let bias = vb.get(size, name(["bias", "beta"]))?;
        Ok(Self { weight, bias, eps })
    }

    /// Builds a LayerNorm from existing f32 parameters.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            bias: bias.to_dtype(DType::F32)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let y = if needs_grad(&x) || needs_grad(&self.weight) || needs_grad(&self.bias) {
            layer_norm_differentiable(&x, &self.weight, &self.bias, self.eps)?
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?
        };
        y.to_dtype(dtype)
    }
}

/// Two-pass LayerNorm from basic ops (mean, then variance of the centred values).
pub fn layer_norm_differentiable(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Softmax over the last dimension: fused kernel for inference, basic ops when training.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if needs_grad(xs) {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_and_differentiable_layer_norm_agree() {
        let dev = Device::Cpu;
        // A large common offset is where a one-pass E[x^2]-E[x]^2 variance would lose digits.
        let x = (Tensor::randn(0f32, 1., (7, 33), &dev).unwrap() + 50.0).unwrap();
        let w = Tensor::randn(1f32, 0.1, 33, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 33, &dev).unwrap();
        let ln = LayerNorm::new(w.clone(), b.clone(), 1e-6).unwrap();
        let fused = ln.forward(&x).unwrap();
        let slow = layer_norm_differentiable(&x, &w, &b, 1e-6).unwrap();
        assert!(max_abs_diff(&fused, &slow) < 1e-3);
    }

    #[test]
    fn gradients_flow_through_norm_and_softmax() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones(5, DType::F32, &dev).unwrap()).unwrap();
        let ln = LayerNorm::new(
            w.as_tensor().clone(),
            Tensor::zeros(5, DType::F32, &dev).unwrap(),
            1e-5,
        )
        .unwrap();
        let x = Tensor::new(&[[1f32, 2., 3., 4., 6.]], &dev).unwrap();
        let y = softmax_last_dim(&ln.forward(&x).unwrap()).unwrap();
        let loss = y.narrow(1, 4, 1).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(w.as_tensor())
            .expect("LayerNorm weight gets a gradient");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
