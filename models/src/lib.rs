//! Model math for gigapath, in candle: the Prov-GigaPath tile encoder (timm ViT), the LongNet slide
//! encoder with dilated attention, and BERT-family text encoders.
//!
//! This crate knows nothing of slides, HTTP or databases: tensors in, tensors out. Each encoder is
//! built from a model folder as the public releases ship it (see `models/README.md`) and mirrors the
//! checkpoint's key tree, so a missing or misnamed tensor fails at load with its full key path.
//!
//! - [`tile_encoder`]: [`TileEncoder`], timm `vit_giant_patch14_dinov2` at 224 px / patch 16.
//! - [`tile_transform`]: u8 RGB tiles to the normalised `pixel_values` the tile encoder expects.
//! - [`slide_encoder`]: [`SlideEncoder`], the LongNet ViT over tile features and grid positions.
//! - [`dilated_attention`]: LongNet's dilated attention, segment by segment.
//! - [`nn`]: the shared layers (`Linear`, `LayerNorm`); [`kernels`]: the ops under every model and
//!   the one rule that picks a fused CPU, fused CUDA or differentiable implementation.
//! - [`text_encoder`]: [`TextEncoder`], a BERT-family model with its tokenizer and pooling.
//! - [`init`]: small seeded random model folders for tests and the demo.
//! - [`device`]: `cpu` / `cuda:N` and `f32` / `bf16` / `f16` as strings from the command line.

pub mod align;
pub mod device;
pub mod dilated_attention;
mod error;
pub mod init;
pub mod kernels;
pub mod nn;
pub mod slide_encoder;
pub mod text_encoder;
pub mod tile_encoder;
pub mod tile_transform;
mod weights;

pub use device::{parse_device, parse_dtype, Precision};
pub use error::{Error, Result};
pub use slide_encoder::{SlideEncoder, SlideOutput, SlidePool};
pub use text_encoder::{TextEncoder, TextPool};
pub use tile_encoder::TileEncoder;
