//! The ops the models call. Each picks its implementation once, by [`path`]: a fused CPU kernel,
//! a fused CUDA kernel (which may decline a shape), or candle's basic ops, which are the only
//! differentiable ones.

use candle_core::{DType, Result, Tensor, D};

use super::branch::Branch;
use super::dispatch::{needs_grad, path, Path};
use super::{cpu, cuda};

/// LayerNorm over the last dimension with f32 `weight` / `bias`, computed in f32 whatever the
/// activation dtype; the output has `xs`'s dtype.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if path(&[xs]) == Path::Cuda {
        if let Some(y) = cuda::layer_norm(&xs.contiguous()?, weight, bias, eps, false)? {
            return Ok(y);
        }
    }
    let dtype = xs.dtype();
    let x = xs.to_dtype(DType::F32)?;
    let grads = [&x, weight, bias].iter().any(|t| needs_grad(t));
    let y = match path(&[&x, weight, bias]) {
        Path::Cpu => {
            x.contiguous()?
                .apply_op3_no_bwd(weight, bias, &cpu::TwoPassLayerNorm { eps })?
        }
        // Half-precision inference on a GPU: candle's fused kernel (in f32). Its one-pass
        // variance loses digits only far below the bf16 / f16 rounding of the output; the
        // eleven-kernel composition below cost more than the matmuls on an H200.
        _ if !grads && dtype != DType::F32 => {
            candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)?
        }
        _ => layer_norm_differentiable(&x, weight, bias, eps)?,
    };
    y.to_dtype(dtype)
}

/// `layer_norm(gelu_erf(xs))`, one kernel on CUDA in half precision (the GELU output rounded to
/// `xs`'s dtype first, as two separate ops would).
pub fn layer_norm_gelu(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if path(&[xs]) == Path::Cuda {
        if let Some(y) = cuda::layer_norm(&xs.contiguous()?, weight, bias, eps, true)? {
            return Ok(y);
        }
    }
    layer_norm(&xs.gelu_erf()?, weight, bias, eps)
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

/// `xs @ weight^T + bias (+ residual)` as ONE fused cuBLASLt product over the flattened leading
/// dimensions, or `None` where that does not apply (not [`Path::Cuda`], rank 0, a residual of
/// another shape, a shape the kernel declines); the caller then runs candle's product.
pub fn linear_fused(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if path(&[xs]) != Path::Cuda || xs.rank() == 0 {
        return Ok(None);
    }
    let dims = xs.dims();
    let k = dims[dims.len() - 1];
    let rows = xs.elem_count() / k.max(1);
    let n = weight.dim(0)?;
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
    let y = cuda::linear(&x, weight, bias, residual.as_ref())?;
    y.map(|y| y.reshape(out_dims)).transpose()
}

/// `x + y * gamma` (LayerScale then the residual add), `gamma` broadcast over the last dimension.
///
/// One pass on CPU (f32, no gradient); basic ops otherwise.
pub fn scaled_residual(x: &Tensor, y: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    let shapes_fit = x.dims() == y.dims() && x.dims().last() == gamma.dims().last();
    if path(&[x, y, gamma]) == Path::Cpu && shapes_fit {
        return x.contiguous()?.apply_op3_no_bwd(
            &y.contiguous()?,
            &gamma.contiguous()?,
            &cpu::ScaledResidual,
        );
    }
    x + y.broadcast_mul(gamma)?
}

/// timm's packed SwiGLU gate: `silu(h[..., :n]) * h[..., n:]` for `h` [..., 2n].
///
/// One vectorised pass on CPU (f32, no gradient) and on CUDA in half precision; basic ops
/// otherwise.
pub fn swiglu_packed(h: &Tensor) -> Result<Tensor> {
    match path(&[h]) {
        Path::Cpu => return h.contiguous()?.apply_op1_no_bwd(&cpu::SwiGluPacked),
        Path::Cuda => {
            if let Some(y) = cuda::swiglu(&h.contiguous()?)? {
                return Ok(y);
            }
        }
        Path::Ops => {}
    }
    let half = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, half)?.silu()? * h.narrow(D::Minus1, half, half)?
}

/// Softmax over the last dimension: candle's fused kernel for inference, basic ops when a
/// gradient flows (the fused one records no backward).
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if needs_grad(xs) {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// Multi-head self-attention core from timm's fused projection, fused: `qkv` [B, N, 3D] (rows
/// `[q; k; v]`, heads contiguous) -> [B, N, D] with heads merged, or `None` where no fused kernel
/// applies (the caller then composes candle ops).
pub fn qkv_attention(qkv: &Tensor, heads: usize, scale: f32) -> Result<Option<Tensor>> {
    let (b, n, three_d) = qkv.dims3()?;
    let d = three_d / 3;
    match path(&[qkv]) {
        Path::Cpu => {
            let op = cpu::FusedQkvAttention { heads, scale };
            qkv.contiguous()?.apply_op1_no_bwd(&op).map(Some)
        }
        Path::Cuda => {
            // The flash kernel reads q, k and v in place from the packed rows.
            let qkv = qkv.contiguous()?;
            let part = |offset: usize| cuda::Strided {
                tensor: &qkv,
                offset,
                batch: n * three_d,
                head: d / heads,
                token: three_d,
            };
            let shape = cuda::AttentionShape {
                batch: b,
                heads,
                tokens: n,
                head_dim: d / heads,
                scale,
            };
            match cuda::flash_attention(part(0), part(d), part(2 * d), shape)? {
                Some(out) => out.reshape((b, n, d)).map(Some),
                None => Ok(None),
            }
        }
        Path::Ops => Ok(None),
    }
}

/// LongNet dilated attention of `q`, `k`, `v` [L, H, Dh] over `branches` in one fused kernel
/// (CPU f32, or CUDA in half precision), or `None` where none applies; the caller then runs the
/// composed ops (`DilatedAttention::forward_ops`). Errors where a branch cannot take L tokens
/// as the reference would ([`Branch::check_len`]).
pub fn dilated_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    branches: &[Branch],
    scale: f32,
) -> Result<Option<Tensor>> {
    let fused = path(&[q, k, v]);
    if fused == Path::Ops {
        return Ok(None);
    }
    let len = q.dim(0)?;
    for branch in branches {
        branch.check_len(len).map_err(candle_core::Error::msg)?;
    }
    if fused == Path::Cuda {
        return cuda::dilated_attention(q, k, v, branches, scale);
    }
    let op = cpu::DilatedAttentionCpu {
        branches: branches.to_vec(),
        scale,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
        .map(Some)
}

/// Plain unmasked attention that also returns the natural-log log-sum-exp of the scaled logits,
/// the quantity flash-attn returns and the branch mix needs.
///
/// `q` [B, M, Dh], `k`, `v` [B, N, Dh] -> (`out` [B, M, Dh], `lse` [B, M] in f32).
pub fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let scores = q.matmul(&k.t()?)?;
    let (p, lse) = softmax_with_lse(&scores, scale)?;
    Ok((p.to_dtype(v.dtype())?.matmul(v)?, lse))
}

/// `softmax(scale * x)` over the last dimension and its log-sum-exp (f32), for attention scores.
///
/// On CPU without gradient this is one fused pass; otherwise (CUDA, training) basic ops in f32.
pub fn softmax_with_lse(scores: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    if path(&[scores]) == Path::Cpu {
        let n = scores.dim(D::Minus1)?;
        let packed = scores
            .contiguous()?
            .apply_op1_no_bwd(&cpu::SoftmaxWithLse {
                scale: scale as f32,
            })?;
        let p = packed.narrow(D::Minus1, 0, n)?;
        let lse = packed.narrow(D::Minus1, n, 1)?.squeeze(D::Minus1)?;
        return Ok((p, lse));
    }
    if !needs_grad(scores) {
        return softmax_with_lse_fused(scores, scale);
    }
    let x = (scores.to_dtype(DType::F32)? * scale)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let p = e.broadcast_div(&sum)?;
    let lse = (max + sum.log()?)?.squeeze(D::Minus1)?;
    Ok((p, lse))
}

/// Inference off the CPU kernel (CUDA, f64, half precision): candle's fused softmax, and the lse
/// from the two row maxima, `lse = max(x) - ln(max(p))` (the largest probability is `1 / sum`, so
/// this is `max + ln(sum(exp(x - max)))` without another pass over `exp`). Five kernels instead of
/// nine; the fused softmax has no backward, so training never comes here.
pub fn softmax_with_lse_fused(scores: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let x = scores.to_dtype(DType::F32)?.affine(scale, 0.0)?;
    let p = candle_nn::ops::softmax_last_dim(&x)?;
    let max_x = x.max_keepdim(D::Minus1)?;
    let max_p = p.max_keepdim(D::Minus1)?;
    let lse = (max_x - max_p.log()?)?.squeeze(D::Minus1)?;
    Ok((p, lse))
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
        let fused = layer_norm(&x, &w, &b, 1e-6).unwrap();
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
        let b = Tensor::zeros(5, DType::F32, &dev).unwrap();
        let x = Tensor::new(&[[1f32, 2., 3., 4., 6.]], &dev).unwrap();
        let y = softmax_last_dim(&layer_norm(&x, w.as_tensor(), &b, 1e-5).unwrap()).unwrap();
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
