//! Which implementation runs an op: the one rule every op of [`crate::kernels`] follows.
//!
//! - [`Path::Cpu`]: every operand f32 on the CPU and none needs a gradient: our fused CPU kernels
//!   (`kernels::cpu`), which record no backward op.
//! - [`Path::Cuda`]: half precision (bf16 / f16) on a CUDA device that runs our fused kernels
//!   ([`super::cuda::available`]), no gradient. A fused kernel may still decline a shape; the op
//!   then falls back to [`Path::Ops`].
//! - [`Path::Ops`]: everything else (training, f64, f32 on a GPU, mixed operands): candle's basic
//!   ops, differentiable. candle 0.11's own fused `layer_norm`, `softmax_last_dim`, `rms_norm` and
//!   `sdpa` record no backward either, so training must never reach them.

use candle_core::{DType, Tensor};

/// Whether a gradient can flow through `t` (it is a `Var` or depends on one).
pub fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// Where an op on a set of operands runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused CPU kernels, f32, inference.
    Cpu,
    /// Fused CUDA kernels, half precision, inference.
    Cuda,
    /// candle's basic ops (differentiable).
    Ops,
}

/// The path for an op over `operands` (all of them: a weight that is a `Var` sends it to
/// [`Path::Ops`] as surely as an activation that tracks a gradient).
pub fn path(operands: &[&Tensor]) -> Path {
    let Some(first) = operands.first() else {
        return Path::Ops;
    };
    if operands.iter().any(|t| needs_grad(t)) {
        return Path::Ops;
    }
    let same = |f: &dyn Fn(&Tensor) -> bool| operands.iter().all(|t| f(t));
    if same(&|t| t.device().is_cpu() && t.dtype() == DType::F32) {
        return Path::Cpu;
    }
    let (device, dtype) = (first.device(), first.dtype());
    if super::cuda::available(device, dtype)
        && same(&|t| t.dtype() == dtype && t.device().same_device(device))
    {
        return Path::Cuda;
    }
    Path::Ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn inference_in_f32_on_the_cpu_takes_the_cpu_kernels() {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(path(&[&x, &x]), Path::Cpu);
        let half = x.to_dtype(DType::BF16).unwrap();
        assert_eq!(
            path(&[&half]),
            Path::Ops,
            "no CUDA here: bf16 on CPU is candle ops"
        );
        assert_eq!(path(&[&x, &half]), Path::Ops, "mixed dtypes");
        assert_eq!(path(&[]), Path::Ops);
    }

    #[test]
    fn any_operand_that_needs_a_gradient_takes_the_ops() {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let w = Var::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert!(needs_grad(w.as_tensor()) && !needs_grad(&x));
        assert_eq!(path(&[&x, w.as_tensor()]), Path::Ops);
        let y = (&x * w.as_tensor()).unwrap();
        assert_eq!(path(&[&y]), Path::Ops);
    }
}
