//! Layers shared by the encoders, as PyTorch names them: `Linear`, `LayerNorm`.
//!
//! They hold weights and call the ops of [`crate::kernels`], which pick the implementation: fused
//! kernels for inference, the differentiable composition of basic ops whenever a gradient can
//! flow (candle 0.11's fused `layer_norm` and `softmax_last_dim` record no backward op, and the
//! slide and text encoders are fine-tuned later: last k layers, CLIP alignment).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;

/// `nn.Linear` with bias, weight `[out, in]` as PyTorch stores it.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear(in_dim, out_dim, vb)?))
}

/// `nn.Linear` that runs as ONE matrix product whatever the leading dimensions: [B, N, K] is
/// flattened to [B * N, K]. candle's own `Linear` broadcasts the weight into a batched product of
/// B small [N, K] x [K, M] problems, which cuBLAS ran 5-7x below one [B * N, K] product on an
/// H200 for the tile encoder's shapes.
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    /// From a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(candle_nn::Linear::new(weight, bias))
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    /// The bias, `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.0.bias()
    }
}

impl Linear {
    /// `residual + self.forward(xs)`; on CUDA in half precision the product adds the residual
    /// itself (cuBLASLt with `beta = 1`), saving a pass over the output.
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cuda(xs, Some(residual))? {
            return Ok(y);
        }
        residual + self.forward(xs)?
    }

    /// The fused cuBLASLt path ([`kernels::linear_fused`]), or `None` where it does not apply.
    fn forward_cuda(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        kernels::linear_fused(xs, self.weight(), self.bias(), residual)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cuda(xs, None)? {
            return Ok(y);
        }
        let dims = xs.dims();
        if dims.len() <= 2 {
            return self.0.forward(xs);
        }
        let k = dims[dims.len() - 1];
        let rows = xs.elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank > 2") = self.weight().dim(0)?;
        self.0.forward(&xs.reshape((rows, k))?)?.reshape(out_dims)
    }
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
        kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

impl LayerNorm {
    /// `forward(gelu_erf(xs))`, one kernel on CUDA in half precision.
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::layer_norm_gelu(xs, &self.weight, &self.bias, self.eps)
    }
}
