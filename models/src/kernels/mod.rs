//! The kernel layer under the models, shaped like candle's own split: the model files
//! (`tile_encoder`, `slide_encoder`, `dilated_attention`, `text_encoder`, `nn`) read as the
//! reference's modules and call the ops here; how an op runs is decided in one place below them.
//!
//! - [`ops`]: the ops the models call (LayerNorm, the fused linear, SwiGLU, softmaxes, qkv and
//!   dilated attention), each choosing its implementation by [`dispatch::path`].
//! - [`dispatch`]: the one rule: fused CPU kernels for f32 inference, fused CUDA kernels for half
//!   precision inference, candle's differentiable basic ops whenever a gradient can flow.
//! - `cpu`: the CPU kernels, as candle custom ops (attention, LayerNorm, SwiGLU, softmax + lse).
//! - `simd`: their vectorised row loops, with the AVX2 + FMA dispatch written once.
//! - [`cuda`]: the CUDA kernels (`cuda/kernels.cu`) and the cuBLASLt wrapper, behind the `cuda`
//!   feature; without it every CUDA function declines.
//! - [`branch`]: the geometry of LongNet's dilated attention that every implementation shares.
//!
//! Modules here import only downwards (`ops` -> `dispatch` / `cpu` / `cuda` -> `simd` / `branch`);
//! nothing here imports a model file.

pub mod branch;
mod cpu;
pub mod cuda;
pub mod dispatch;
pub mod ops;
mod simd;

pub use branch::{Branch, BranchLayout, UNCOVERED_LSE};
pub use dispatch::{needs_grad, path, Path};
pub use ops::*;
