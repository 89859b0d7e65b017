//! Fused CUDA paths for half-precision inference (bf16 / f16 on sm_80 and newer).
//!
//! candle 0.11 runs a linear layer as a cuBLAS product plus a separate broadcast bias add, a
//! LayerNorm as three kernels through f32, and attention by materialising every score. On an H200
//! the ViT-g block spent more time in those extra passes than in its products, and the slide
//! encoder's dilated attention wrote ~11.5 G f32 scores per layer at 100k tiles. Here:
//!
//! - [`linear`]: one cuBLASLt product with the bias in its epilogue and the residual as its C
//!   input (`beta = 1`, no copy), descriptors and algorithm chosen once per shape;
//! - [`flash_attention`]: a FlashAttention-2 style kernel (tensor cores, online softmax, the
//!   log-sum-exp the dilated-attention branch mix needs), reading any (batch, head, token)
//!   strides, so the tile encoder's packed qkv is read in place;
//! - [`dilated_attention`]: LongNet's branches through the same kernel, each reading its segments
//!   and head groups in place and writing dense outputs and lses, then one mix kernel;
//! - [`layer_norm`] (optionally after GELU) and [`swiglu`]: one pass each, half in and out.
//!
//! Every function returns `Ok(None)` when its fast path does not apply (CPU, f32, a tensor that
//! needs a gradient, unsupported shapes or alignment, compute capability below 8.0, or
//! `GIGAPATH_CUDA_KERNELS=0`); the caller then runs the plain candle ops. Without the `cuda`
//! feature the same functions exist and always return `None`.

use candle_core::{DType, Device, Result, Tensor};

use super::branch::Branch;

#[cfg(feature = "cuda")]
mod cublaslt;
#[cfg(feature = "cuda")]
mod imp;

/// Whether the fused kernels may run for a `dtype` tensor on `device` (no gradient considered).
pub fn available(device: &Device, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && imp::device_ok(device)
}

/// [`available`] for `t`, and `t` needs no gradient.
pub fn applies(t: &Tensor) -> bool {
    available(t.device(), t.dtype()) && !t.track_op()
}

/// One (batch, head, token) strided operand of [`flash_attention`]: element `offset + b * batch +
/// h * head + t * token` starts the row of token t; its `head_dim` values are contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    /// The tensor holding the operand (half precision, on CUDA).
    pub tensor: &'a Tensor,
    /// Element offset of the operand's first row, from the tensor's layout start.
    pub offset: usize,
    /// Element stride between batch items.
    pub batch: usize,
    /// Element stride between heads.
    pub head: usize,
    /// Element stride between tokens.
    pub token: usize,
}

/// Shape of one [`flash_attention`] call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Batch items.
    pub batch: usize,
    /// Attention heads per item.
    pub heads: usize,
    /// Tokens (queries = keys) per head.
    pub tokens: usize,
    /// Values per head and token.
    pub head_dim: usize,
    /// Softmax scale applied to the logits.
    pub scale: f32,
}

/// `softmax(scale * q k^T) v` without masking -> out `[batch, tokens, heads, head_dim]`
/// (contiguous). [`dilated_attention`] runs the same kernel with its log-sum-exp.
pub fn flash_attention(
    q: Strided,
    k: Strided,
    v: Strided,
    shape: AttentionShape,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::flash_attention(q, k, v, shape);
    #[cfg(not(feature = "cuda"))]
    no_cuda((q, k, v, shape))
}

/// LongNet dilated attention of `q`, `k`, `v` `[L, H, Dh]` (each row of H x Dh contiguous, any
/// row stride, e.g. views into one packed `[L, 3, H, Dh]` projection) over `branches`, exactly
/// as [`crate::dilated_attention::DilatedAttention::forward`]: one flash launch per branch reads
/// its segments and head groups in place (no gather) and writes outputs and lses to their dense
/// positions (no scatter); one kernel mixes the branches. Lengths must pass
/// [`Branch::check_len`]. At most 8 branches.
pub fn dilated_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    branches: &[Branch],
    scale: f32,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::dilated_attention(q, k, v, branches, scale);
    #[cfg(not(feature = "cuda"))]
    no_cuda((q, k, v, branches, scale))
}

/// `x [rows, in] @ w^T [in, out] + bias (+ residual [rows, out])` in one cuBLASLt call.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::linear(x, w, bias, residual);
    #[cfg(not(feature = "cuda"))]
    no_cuda((x, w, bias, residual))
}

/// LayerNorm over the last dimension with f32 `weight` / `bias`; output in `x`'s dtype. With
/// `gelu`, of `gelu_erf(x)` (rounded to `x`'s dtype first, as two separate ops would).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    gelu: bool,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::layer_norm(x, weight, bias, eps, gelu);
    #[cfg(not(feature = "cuda"))]
    no_cuda((x, weight, bias, eps, gelu))
}

/// `silu(x[.., :H]) * x[.., H:]` of a packed `[.., 2H]` tensor -> `[.., H]`.
pub fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::swiglu(x);
    #[cfg(not(feature = "cuda"))]
    no_cuda(x)
}

/// Without the `cuda` feature every fused path declines.
#[cfg(not(feature = "cuda"))]
fn no_cuda<A, T>(_: A) -> Result<Option<T>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    /// Without the feature no device runs the fused kernels.
    pub fn device_ok(_: &candle_core::Device) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off CUDA every fused path declines, so callers run candle's ops (the CPU parity tests
    /// cover those); the kernels themselves are checked on a GPU by `bench_encoders kernels`.
    #[test]
    fn cpu_tensors_take_the_plain_path() -> Result<()> {
        let dev = Device::Cpu;
        assert!(!available(&dev, DType::BF16));
        assert!(!available(&dev, DType::F32));
        let x = Tensor::ones((4, 16), DType::F32, &dev)?;
        let w = Tensor::ones((8, 16), DType::F32, &dev)?;
        assert!(linear(&x, &w, None, None)?.is_none());
        let p = Tensor::ones(16, DType::F32, &dev)?;
        assert!(layer_norm(&x, &p, &p, 1e-5, true)?.is_none());
        assert!(swiglu(&x)?.is_none());
        let qkv = Tensor::ones((2, 8, 16), DType::F32, &dev)?;
        let s = Strided {
            tensor: &qkv,
            offset: 0,
            batch: 128,
            head: 0,
            token: 16,
        };
        let shape = AttentionShape {
            batch: 2,
            heads: 1,
            tokens: 8,
            head_dim: 16,
            scale: 0.25,
        };
        assert!(flash_attention(s, s, s, shape)?.is_none());
        Ok(())
    }
}
