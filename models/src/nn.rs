//! Layers shared by the encoders, with one rule: the fast fused candle kernels for inference, the
//! differentiable composition of basic ops whenever a gradient can flow.
//!
//! candle 0.11's fused `layer_norm` and `softmax_last_dim` record no backward op. The slide and text
//! encoders are fine-tuned later (last k layers, CLIP alignment), so every norm and softmax here
//! checks [`Tensor::track_op`] (true when a `Var` is upstream) and takes the slow, differentiable
//! path only then. Inference, where no tensor tracks ops, gets a fused kernel.
//!
//! LayerNorm's fused kernel is our own two-pass one: candle's computes the variance as
//! `E[x^2] - E[x]^2` in f32, which loses about three digits once a channel's mean is large
//! against its spread (1e-3 absolute error at mean 50, std 1), as residual streams allow.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::cuda_ops;

/// Whether a gradient can flow through `t` (it is a `Var` or depends on one).
pub fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

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

    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

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

    /// The fused cuBLASLt path ([`cuda_ops::linear`]), or `None` where it does not apply.
    fn forward_cuda(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        if !cuda_ops::applies(xs) || xs.rank() == 0 {
            return Ok(None);
        }
        let dims = xs.dims();
        let k = dims[dims.len() - 1];
        let rows = xs.elem_count() / k.max(1);
        let n = self.weight().dim(0)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = n;
        if residual.is_some_and(|r| r.dims() != out_dims.as_slice()) {
            return Ok(None);
        }
        let x = xs.contiguous()?.reshape((rows, k))?;
        let residual = match residual {
            Some(r) => Some(r.contiguous()?.reshape((rows, n))?),
            None => None,
        };
        let y = cuda_ops::linear(&x, self.weight(), self.bias(), residual.as_ref())?;
        y.map(|y| y.reshape(out_dims)).transpose()
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
        if let Some(y) = self.forward_cuda(xs, false)? {
            return Ok(y);
        }
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let grads = needs_grad(&x) || needs_grad(&self.weight) || needs_grad(&self.bias);
        let y = if x.device().is_cpu() && !grads {
            let op = TwoPassLayerNorm { eps: self.eps };
            x.contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op)?
        } else if !grads && dtype != DType::F32 {
            // Half-precision inference on a GPU: candle's fused kernel (in f32). Its one-pass
            // variance loses digits only far below the bf16 / f16 rounding of the output; the
            // eleven-kernel composition below cost more than the matmuls on an H200.
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?
        } else {
            layer_norm_differentiable(&x, &self.weight, &self.bias, self.eps)?
        };
        y.to_dtype(dtype)
    }
}

impl LayerNorm {
    /// `forward(gelu_erf(xs))`, one kernel on CUDA in half precision.
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cuda(xs, true)? {
            return Ok(y);
        }
        self.forward(&xs.gelu_erf()?)
    }

    /// The fused CUDA kernel ([`cuda_ops::layer_norm`]), or `None` where it does not apply.
    fn forward_cuda(&self, xs: &Tensor, gelu: bool) -> Result<Option<Tensor>> {
        if !cuda_ops::applies(xs) {
            return Ok(None);
        }
        cuda_ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps, gelu)
    }
}

/// The f32 values of a contiguous CPU tensor, for the kernels below.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((a, b))) => Ok(&data[a..b]),
        _ => candle_core::bail!("this CPU kernel expects a contiguous f32 tensor"),
    }
}

/// CPU LayerNorm over the last dimension, rows in parallel: mean, then the variance of the
/// centred values (f32, eight partial sums per pass).
struct TwoPassLayerNorm {
    eps: f64,
}

impl CustomOp3 for TwoPassLayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-two-pass"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?, f32_slice(bs, bl)?);
        let n = w.len();
        if n == 0 || xl.dims().last() != Some(&n) || bias.len() != n {
            candle_core::bail!(
                "layer-norm: input {:?}, weight {n}, bias {}",
                xl.dims(),
                bias.len()
            )
        }
        let eps = self.eps as f32;
        let mut out = vec![0f32; x.len()];
        x.par_chunks(n)
            .zip(out.par_chunks_mut(n))
            .with_min_len(8)
            .for_each(|(row, y)| layer_norm_row(row, w, bias, eps, y));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // Safety: the features were just detected.
        return unsafe { layer_norm_row_avx2(x, w, b, eps, y) };
    }
    layer_norm_row_portable(x, w, b, eps, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_row_avx2(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    layer_norm_row_portable(x, w, b, eps, y)
}

#[inline(always)]
fn layer_norm_row_portable(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let n = x.len() as f32;
    let mean = sum8(x, |v| v) / n;
    let var = sum8(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((y, &v), &g), &c) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (v - mean) * inv * g + c;
    }
}

/// `sum(f(x))` with eight interleaved partial sums (vectorisable, and more accurate than one).
#[inline(always)]
fn sum8(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    chunks.remainder().iter().map(|&v| f(v)).sum::<f32>() + acc.iter().sum::<f32>()
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

/// `x + y * gamma` (LayerScale then the residual add), `gamma` broadcast over the last dimension.
///
/// One pass on CPU (f32, no gradient); basic ops otherwise.
pub fn scaled_residual(x: &Tensor, y: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    let cpu = [x, y, gamma]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !needs_grad(t));
    if cpu && x.dims() == y.dims() && x.dims().last() == gamma.dims().last() {
        return x.contiguous()?.apply_op3_no_bwd(
            &y.contiguous()?,
            &gamma.contiguous()?,
            &ScaledResidual,
        );
    }
    x + y.broadcast_mul(gamma)?
}

struct ScaledResidual;

impl CustomOp3 for ScaledResidual {
    fn name(&self) -> &'static str {
        "scaled-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, y, g) = (f32_slice(xs, xl)?, f32_slice(ys, yl)?, f32_slice(gs, gl)?);
        let mut out = x.to_vec();
        out.par_chunks_mut(g.len())
            .zip(y.par_chunks(g.len()))
            .with_min_len(8)
            .for_each(|(o, y)| {
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    *o += y * g;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// timm's packed SwiGLU gate: `silu(h[..., :n]) * h[..., n:]` for `h` [..., 2n].
///
/// One vectorised pass on CPU (f32, no gradient) and on CUDA in half precision
/// ([`crate::cuda_ops::swiglu`]); basic ops otherwise.
pub fn swiglu_packed(h: &Tensor) -> Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 && !needs_grad(h) {
        return h.contiguous()?.apply_op1_no_bwd(&SwiGluPacked);
    }
    if cuda_ops::applies(h) {
        if let Some(y) = cuda_ops::swiglu(&h.contiguous()?)? {
            return Ok(y);
        }
    }
    let half = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, half)?.silu()? * h.narrow(D::Minus1, half, half)?
}

struct SwiGluPacked;

impl candle_core::CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "swiglu-packed"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let mut dims = layout.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || width % 2 != 0 {
            candle_core::bail!("swiglu: last dimension {width} must be even")
        }
        let half = width / 2;
        let mut out = vec![0f32; x.len() / 2];
        x.par_chunks(width)
            .zip(out.par_chunks_mut(half))
            .with_min_len(8)
            .for_each(|(row, y)| {
                let (gate, value) = row.split_at(half);
                crate::cpu_attention::silu_mul(gate, value, y);
            });
        *dims.last_mut().unwrap() = half;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
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
        let exact = layer_norm_differentiable(
            &x.to_dtype(DType::F64).unwrap(),
            &w.to_dtype(DType::F64).unwrap(),
            &b.to_dtype(DType::F64).unwrap(),
            1e-6,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        for (name, y) in [("fused", &fused), ("basic ops", &slow)] {
            let d = max_abs_diff(y, &exact);
            assert!(d < 2e-5, "{name}: max abs diff {d} from the f64 result");
        }
        // candle's one-pass fused kernel is what this guards against.
        let candle = candle_nn::ops::layer_norm(&x, &w, &b, 1e-6).unwrap();
        assert!(max_abs_diff(&candle, &exact) > 1e-4);
    }

    #[test]
    fn fused_scaled_residual_matches_basic_ops() {
        let x = Tensor::randn(0f32, 1., (3, 4, 10), &Device::Cpu).unwrap();
        let y = Tensor::randn(0f32, 1., (3, 4, 10), &Device::Cpu).unwrap();
        let g = Tensor::randn(0f32, 1., 10, &Device::Cpu).unwrap();
        let fused = scaled_residual(&x, &y, &g).unwrap();
        let reference = (&x + y.broadcast_mul(&g).unwrap()).unwrap();
        assert_eq!(max_abs_diff(&fused, &reference), 0.0);
    }

    #[test]
    fn fused_swiglu_matches_basic_ops() {
        let h = (Tensor::randn(0f32, 3., (5, 2, 38), &Device::Cpu).unwrap() * 3.0).unwrap();
        let fused = swiglu_packed(&h).unwrap();
        let x1 = h.narrow(2, 0, 19).unwrap();
        let reference = (x1.silu().unwrap() * h.narrow(2, 19, 19).unwrap()).unwrap();
        assert_eq!(fused.dims(), [5, 2, 19]);
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
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
