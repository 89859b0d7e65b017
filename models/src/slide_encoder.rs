//! The Prov-GigaPath slide encoder (`gigapath_slide_enc12l768d`): a LongNet ViT over the tile
//! embeddings of one slide and their grid positions.
//!
//! `features` [N, in_chans] -> `patch_embed.proj` -> + 2D sin-cos position of each tile's grid cell
//! -> CLS prepended -> `depth` pre-LN sub-LN layers with dilated attention -> pooled outputs.
//!
//! Sequence order is the caller's: tiles go through the segments of the dilated attention in the
//! order given (the release and our tiler use row-major order, y then x). Positions come from the
//! grid cell, `floor(level-0 px / tile_size)`, and are computed on the fly in f64 (the reference
//! keeps a 3 GB table). Cells outside `slide_ngrids x slide_ngrids` are an error: the reference
//! fails on x and silently wraps y into the next row.
//!
//! Model folder: `slide_encoder.pth` (`{"model": state_dict}`, the official key names) and an
//! optional `config.json` (schema of [`Config`]); without it, the official config. The Hugging
//! Face release folder, shared with the tile encoder, works too (see [`ModelFiles::find`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;
use serde::{Deserialize, Serialize};

use crate::device::Precision;
use crate::dilated_attention::DilatedAttention;
use crate::kernels::needs_grad;
use crate::nn::{linear, LayerNorm};
use crate::weights::{find_file, read_json, var_builder};

/// Rows of the feed-forward block processed at once: keeps the [rows, 4D] activations small at
/// 100k tiles (the FFN is position-wise, so chunking is exact). GPUs take larger chunks (fewer,
/// fuller launches; 200 MB of bf16 activations per [rows, 4D] buffer).
const FFN_CHUNK_ROWS: usize = 4096;
const GPU_FFN_CHUNK_ROWS: usize = 32768;
/// Attention scores held at once on a GPU (f32 elements: 256 MiB).
const GPU_CHUNK_SCORES: usize = 1 << 26;

/// Slide encoder configuration (the schema of the reference fixture's `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Tile embedding width (1536 for the Prov-GigaPath tile encoder).
    #[serde(default = "defaults::in_chans")]
    pub in_chans: usize,
    /// Model width D.
    #[serde(default = "defaults::embed_dim")]
    pub embed_dim: usize,
    /// Number of LongNet layers.
    #[serde(default = "defaults::depth")]
    pub depth: usize,
    /// Attention heads.
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    /// FFN width ratio (FFN = D * mlp_ratio).
    #[serde(default = "defaults::mlp_ratio")]
    pub mlp_ratio: f64,
    /// Level-0 tile size in pixels that coordinates are divided by.
    #[serde(default = "defaults::tile_size")]
    pub tile_size: usize,
    /// Grid cells per side of the position table.
    #[serde(default = "defaults::slide_ngrids")]
    pub slide_ngrids: usize,
    /// Dilated attention segment lengths, one per branch.
    #[serde(default = "defaults::segment_length")]
    pub segment_length: Vec<usize>,
    /// Dilation ratios, one per branch.
    #[serde(default = "defaults::dilated_ratio")]
    pub dilated_ratio: Vec<usize>,
    /// LayerNorm eps inside the encoder.
    #[serde(default = "defaults::layernorm_eps")]
    pub layernorm_eps: f64,
    /// LayerNorm eps of the outer `norm`.
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f64,
}

mod defaults {
    pub fn in_chans() -> usize {
        1536
    }
    pub fn embed_dim() -> usize {
        768
    }
    pub fn depth() -> usize {
        12
    }
    pub fn num_heads() -> usize {
        16
    }
    pub fn mlp_ratio() -> f64 {
        4.0
    }
    pub fn tile_size() -> usize {
        256
    }
    pub fn slide_ngrids() -> usize {
        1000
    }
    /// Derived by the release from max_wsi_size 262144 (its config file's value is overridden).
    pub fn segment_length() -> Vec<usize> {
        vec![1024, 5792, 32768, 185363, 1048576]
    }
    pub fn dilated_ratio() -> Vec<usize> {
        vec![1, 2, 4, 8, 16]
    }
    pub fn layernorm_eps() -> f64 {
        1e-5
    }
    pub fn norm_eps() -> f64 {
        1e-6
    }
}

impl Default for Config {
    /// The official `gigapath_slide_enc12l768d`.
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl Config {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()
            .map_err(|msg| crate::Error::config(path, msg))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if !self.embed_dim.is_multiple_of(4) {
            return Err(format!(
                "embed_dim {} must be a multiple of 4 for the 2D sin-cos positions",
                self.embed_dim
            ));
        }
        if self.tile_size == 0 || self.slide_ngrids == 0 {
            return Err("tile_size and slide_ngrids must be positive".into());
        }
        self.attention().map(|_| ())
    }

    /// FFN width: `int(D * mlp_ratio)`.
    pub fn ffn_dim(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    fn attention(&self) -> std::result::Result<DilatedAttention, String> {
        DilatedAttention::new(
            &self.segment_length,
            &self.dilated_ratio,
            self.num_heads,
            self.embed_dim / self.num_heads,
        )
    }
}

/// The files of a slide encoder in a model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The slide config, `None` for the official `gigapath_slide_enc12l768d` ([`Config::default`]).
    pub config: Option<PathBuf>,
    /// The checkpoint.
    pub weights: PathBuf,
    /// Whether the folder is the Hugging Face release, shared with the tile encoder.
    pub release: bool,
}

/// Whether a `config.json` is timm's (the tile encoder's, as the hub ships it) rather than a
/// slide config: timm's has `architecture` or `model_args`, which no slide config has.
pub(crate) fn is_timm_config(path: &Path) -> crate::Result<bool> {
    let v: serde_json::Value = read_json(path)?;
    Ok(v.get("architecture").is_some() || v.get("model_args").is_some())
}

impl ModelFiles {
    /// Finds the slide encoder's files in `dir`, in one of two layouts:
    ///
    /// - its own folder: `slide_encoder.pth` (or `model.safetensors`) and an optional slide
    ///   `config.json` (schema of [`Config`]);
    /// - the Hugging Face release (`huggingface-cli download prov-gigapath/prov-gigapath`), one
    ///   folder for both encoders: `config.json` is the tile encoder's timm config, so the slide
    ///   encoder takes `slide_encoder.pth` (or `slide_encoder.safetensors`) with the official
    ///   config, or `slide_config.json` when one is there. `model.safetensors` is the tile
    ///   encoder's in that layout and is never taken for the slide encoder.
    pub fn find(dir: &Path) -> crate::Result<Self> {
        let config_path = dir.join("config.json");
        let own_config = dir.join("slide_config.json");
        let release = config_path.is_file() && is_timm_config(&config_path)?;
        if release {
            let weights = find_file(dir, &["slide_encoder.pth", "slide_encoder.safetensors"])
                .map_err(|_| {
                    crate::Error::config(
                        &config_path,
                        "this folder holds a tile encoder (timm config.json) but no \
                         slide_encoder.pth: download the whole Prov-GigaPath release \
                         (`gigapath models fetch prov-gigapath --to DIR`) or point the slide \
                         encoder at its own folder",
                    )
                })?;
            return Ok(Self {
                config: own_config.is_file().then_some(own_config),
                weights,
                release,
            });
        }
        let config = if own_config.is_file() {
            Some(own_config)
        } else {
            config_path.is_file().then_some(config_path)
        };
        Ok(Self {
            config,
            weights: find_file(dir, &["slide_encoder.pth", "model.safetensors"])?,
            release,
        })
    }

    /// The config these files describe (validated).
    pub fn config(&self) -> crate::Result<Config> {
        match &self.config {
            Some(path) => Config::from_file(path),
            None => Ok(Config::default()),
        }
    }
}

/// Grid cell (x, y) of each tile: `floor(coord / tile_size)` per axis, checked against the grid.
///
/// `coords_px` holds level-0 pixel coordinates `[x0, y0, x1, y1, ...]`. The division is in f32 like
/// the reference's (`torch.floor(coords / tile_size)` on a float tensor).
pub fn grid_cells(
    coords_px: &[f32],
    tile_size: f32,
    ngrids: usize,
) -> crate::Result<Vec<[u32; 2]>> {
    if !coords_px.len().is_multiple_of(2) {
        return Err(crate::Error::input("coords must hold (x, y) pairs"));
    }
    if tile_size.is_nan() || tile_size <= 0.0 {
        return Err(crate::Error::input(format!(
            "tile size {tile_size} must be positive"
        )));
    }
    coords_px
        .chunks_exact(2)
        .enumerate()
        .map(|(i, xy)| {
            let cell = |v: f32| (v / tile_size).floor();
            let (gx, gy) = (cell(xy[0]), cell(xy[1]));
            let inside = |g: f32| g >= 0.0 && g < ngrids as f32;
            if !(inside(gx) && inside(gy)) {
                return Err(crate::Error::input(format!(
                    "tile {i} at ({}, {}) px is grid cell ({gx}, {gy}) with tile size {tile_size}, \
                     outside the {ngrids} x {ngrids} position grid (coordinates must be level-0 \
                     pixels at the encoder's tile size)",
                    xy[0], xy[1]
                )));
            }
            Ok([gx as u32, gy as u32])
        })
        .collect()
}

/// The 2D sin-cos position embedding of grid cells, [N, dim] as f32.
///
/// Per cell: `[sin(gy w), cos(gy w), sin(gx w), cos(gx w)]`, each `dim / 4` wide with
/// `w_k = 10000^(-k / (dim / 4))`, computed in f64 and rounded once, like the reference's numpy
/// table (y first: the table is indexed `gx * ngrids + gy` but built with its halves swapped).
pub fn sincos_position_embedding(cells: &[[u32; 2]], dim: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(cells.len() * dim);
    for &[gx, gy] in cells {
        for g in [gy as f64, gx as f64] {
            out.extend(omega.iter().map(|w| (g * w).sin() as f32));
            out.extend(omega.iter().map(|w| (g * w).cos() as f32));
        }
    }
    out
}

/// [`sincos_position_embedding`] as an f32 tensor `[N, dim]` on `device`. Off the CPU it is
/// computed there, in f64 like the reference: 100k tiles are 77 M sines and cosines, 0.8 s on
/// one CPU core (4.5 ms on an H200), several times what the whole slide encoder takes on a GPU.
pub fn position_embedding(cells: &[[u32; 2]], dim: usize, device: &Device) -> Result<Tensor> {
    let n = cells.len();
    if device.is_cpu() || n == 0 {
        return Tensor::from_vec(sincos_position_embedding(cells, dim), (n, dim), device);
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let omega = Tensor::from_vec(omega, (1, quarter), device)?;
    let axis = |i: usize| -> Result<(Tensor, Tensor)> {
        let g: Vec<f64> = cells.iter().map(|c| c[i] as f64).collect();
        let angle = Tensor::from_vec(g, (n, 1), device)?.broadcast_mul(&omega)?;
        Ok((angle.sin()?, angle.cos()?))
    };
    let ((ys, yc), (xs, xc)) = (axis(1)?, axis(0)?);
    Tensor::cat(&[&ys, &yc, &xs, &xc], 1)?.to_dtype(DType::F32)
}

/// torchscale `MultiheadAttention` with LongNet's dilated attention and sub-LN.
#[derive(Debug, Clone)]
struct SelfAttention {
    projections: Projections,
    out_proj: Linear,
    inner_attn_ln: LayerNorm,
    attention: DilatedAttention,
    num_heads: usize,
}

/// The q, k and v projections: separate as in the checkpoint, or packed into one `[3D, D]` product
/// where the fused CUDA kernels run (inference weights only: a packed copy of trainable weights
/// would go stale after the first optimizer step). The dilated-attention kernel reads q, k and v
/// in place from the packed rows.
#[derive(Debug, Clone)]
enum Projections {
    Separate { q: Linear, k: Linear, v: Linear },
    Packed(Linear),
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let (q, k, v) = (
            linear(d, d, vb.pp("q_proj"))?,
            linear(d, d, vb.pp("k_proj"))?,
            linear(d, d, vb.pp("v_proj"))?,
        );
        let frozen = [&q, &k, &v]
            .iter()
            .all(|p| !needs_grad(p.weight()) && p.bias().is_none_or(|b| !needs_grad(b)));
        let projections = match (
            crate::kernels::cuda::available(vb.device(), vb.dtype()),
            frozen,
        ) {
            (true, true) => {
                let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
                let bias = match (q.bias(), k.bias(), v.bias()) {
                    (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
                    _ => None,
                };
                match bias.is_some() || q.bias().is_none() {
                    true => Projections::Packed(Linear::new(weight, bias)),
                    false => Projections::Separate { q, k, v },
                }
            }
            _ => Projections::Separate { q, k, v },
        };
        Ok(Self {
            projections,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            inner_attn_ln: LayerNorm::load(d, cfg.layernorm_eps, vb.pp("inner_attn_ln"))?,
            attention: {
                let attention = cfg.attention().map_err(candle_core::Error::msg)?;
                // GPUs want fewer, larger attention chunks (256 MiB of f32 scores at a time);
                // the CPU kernel's default keeps a chunk near the cache sizes.
                if vb.device().is_cpu() {
                    attention
                } else {
                    attention.with_chunk_scores(GPU_CHUNK_SCORES)
                }
            },
            num_heads: cfg.num_heads,
        })
    }

    /// [L, D] -> `residual` + attention [L, D]. Takes its input by value and drops every [L, D]
    /// buffer as soon as it is used: at 100k tiles each one is 300 MB.
    fn forward(&self, xs: Tensor, residual: &Tensor) -> Result<Tensor> {
        let (l, d) = xs.dims2()?;
        let (h, dh) = (self.num_heads, d / self.num_heads);
        let out = match &self.projections {
            Projections::Separate { q, k, v } => {
                let heads = |t: Tensor| t.reshape((l, h, dh));
                let q = heads(q.forward(&xs)?)?;
                let k = heads(k.forward(&xs)?)?;
                let v = heads(v.forward(&xs)?)?;
                drop(xs);
                self.attention.forward(&q, &k, &v)?.reshape((l, d))?
            }
            Projections::Packed(qkv) => {
                let qkv = qkv.forward(&xs)?.reshape((l, 3, h, dh))?;
                drop(xs);
                let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1);
                let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                self.attention.forward(&q, &k, &v)?.reshape((l, d))?
            }
        };
        let out = self.inner_attn_ln.forward(&out)?;
        self.out_proj.forward_residual(&out, residual)
    }
}

/// torchscale `FeedForwardNetwork` with sub-LN: `fc2(ffn_layernorm(gelu(fc1(x))))`, exact GELU.
#[derive(Debug, Clone)]
struct FeedForward {
    fc1: Linear,
    ffn_layernorm: LayerNorm,
    fc2: Linear,
}

impl FeedForward {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.embed_dim, cfg.ffn_dim());
        Ok(Self {
            fc1: linear(d, f, vb.pp("fc1"))?,
            ffn_layernorm: LayerNorm::load(f, cfg.layernorm_eps, vb.pp("ffn_layernorm"))?,
            fc2: linear(f, d, vb.pp("fc2"))?,
        })
    }

    /// `residual + ffn(xs)`.
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.ffn_layernorm.forward_gelu(&self.fc1.forward(xs)?)?;
        self.fc2.forward_residual(&h, residual)
    }
}

/// torchscale `EncoderLayer` (pre-LN): attention and FFN residual branches.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: SelfAttention,
    self_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.layernorm_eps;
        Ok(Self {
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            self_attn_layer_norm: LayerNorm::load(
                cfg.embed_dim,
                eps,
                vb.pp("self_attn_layer_norm"),
            )?,
            ffn: FeedForward::new(cfg, vb.pp("ffn"))?,
            final_layer_norm: LayerNorm::load(cfg.embed_dim, eps, vb.pp("final_layer_norm"))?,
        })
    }

    /// [L, D] -> [L, D]
    fn forward(&self, xs: Tensor) -> Result<Tensor> {
        let xs = self
            .self_attn
            .forward(self.self_attn_layer_norm.forward(&xs)?, &xs)?;
        let rows = xs.dim(0)?;
        let chunk = match xs.device().is_cpu() {
            true => FFN_CHUNK_ROWS,
            false => GPU_FFN_CHUNK_ROWS,
        };
        if rows <= chunk {
            return self
                .ffn
                .forward_residual(&self.final_layer_norm.forward(&xs)?, &xs);
        }
        let mut parts = Vec::with_capacity(rows.div_ceil(chunk));
        for start in (0..rows).step_by(chunk) {
            let x = xs.narrow(0, start, chunk.min(rows - start))?;
            parts.push(
                self.ffn
                    .forward_residual(&self.final_layer_norm.forward(&x)?, &x)?,
            );
        }
        Tensor::cat(&parts, 0)
    }
}

/// Pooling of the slide encoder's token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidePool {
    /// The CLS token (the release's default; note the CLS token was not trained in pretraining).
    Cls,
    /// Mean over the tile tokens (the release's `global_pool`, used by TRIDENT and fine-tuning).
    Mean,
}

/// Every output the release can produce, each after the outer `norm`.
#[derive(Debug, Clone)]
pub struct SlideOutput {
    /// `norm(encoder.layer_norm(s_depth))[0]`: `[D]`.
    pub cls: Tensor,
    /// `norm(mean(encoder.layer_norm(s_depth)[1:]))`: `[D]`.
    pub pool: Tensor,
    /// `norm(s_i)[0]` for the hidden states s_0..s_depth (no encoder layer norm): [depth + 1, D].
    pub all_layers_cls: Tensor,
    /// `norm(mean(s_i[1:]))` for s_0..s_depth: [depth + 1, D].
    pub all_layers_pool: Tensor,
}

impl SlideOutput {
    /// The output for a pooling and a layer mode: `[D]`, or `[depth + 1, D]` with `all_layers`.
    pub fn select(&self, pool: SlidePool, all_layers: bool) -> &Tensor {
        match (pool, all_layers) {
            (SlidePool::Cls, false) => &self.cls,
            (SlidePool::Mean, false) => &self.pool,
            (SlidePool::Cls, true) => &self.all_layers_cls,
            (SlidePool::Mean, true) => &self.all_layers_pool,
        }
    }
}

/// The LongNet slide encoder.
#[derive(Debug, Clone)]
pub struct SlideEncoder {
    patch_embed: Linear,
    cls_token: Tensor,
    layers: Vec<EncoderLayer>,
    encoder_layer_norm: LayerNorm,
    norm: LayerNorm,
    cfg: Config,
    dtype: DType,
    device: Device,
}

impl SlideEncoder {
    /// Builds the model from a `VarBuilder` over the release's key names.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let d = cfg.embed_dim;
        let enc = vb.pp("encoder");
        let layers = (0..cfg.depth)
            .map(|i| EncoderLayer::new(cfg, enc.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: linear(cfg.in_chans, d, vb.pp("patch_embed").pp("proj"))?,
            cls_token: vb.get((1, 1, d), "cls_token")?.reshape((1, d))?,
            layers,
            encoder_layer_norm: LayerNorm::load(d, cfg.layernorm_eps, enc.pp("layer_norm"))?,
            norm: LayerNorm::load(d, cfg.norm_eps, vb.pp("norm"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads the slide encoder of a model folder (see [`ModelFiles::find`]): its own folder, or
    /// the Hugging Face release folder shared with the tile encoder.
    pub fn load(dir: &Path, precision: &Precision) -> crate::Result<Self> {
        let files = ModelFiles::find(dir)?;
        let cfg = files.config()?;
        let weights = files.weights;
        let vb = var_builder(&weights, Some("model"), precision.dtype, &precision.device)?;
        Self::new(&cfg, vb).map_err(|cause| crate::Error::Weights {
            path: weights,
            cause,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Largest number of tiles the dilated attention accepts (see
    /// [`crate::dilated_attention::Branch::check_len`]); `None` when unbounded.
    pub fn max_tiles(&self) -> Option<usize> {
        let attention = self.cfg.attention().ok()?;
        attention
            .branches()
            .iter()
            .filter(|b| b.segment_length % b.ratio != 0)
            .map(|b| b.segment_length - 1)
            .min()
    }

    /// Encodes one slide from level-0 pixel coordinates.
    ///
    /// `features` [N, in_chans] (any float dtype, any device), `coords_px` [N, 2] as (x, y),
    /// `tile_size_px`: the level-0 tile size the coordinates are divided by (the config's
    /// `tile_size`, 256, for 20x slides tiled at 256 px).
    pub fn encode(
        &self,
        features: &Tensor,
        coords_px: &Tensor,
        tile_size_px: f32,
    ) -> crate::Result<SlideOutput> {
        let n = features.dim(0).unwrap_or(0);
        if coords_px.dims() != [n, 2] {
            return Err(crate::Error::input(format!(
                "coords has shape {:?}, expected [{n}, 2] to match features {:?}",
                coords_px.dims(),
                features.dims()
            )));
        }
        let coords: Vec<f32> = coords_px.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let cells = grid_cells(&coords, tile_size_px, self.cfg.slide_ngrids)?;
        self.encode_cells(features, &cells)
    }

    /// Encodes one slide from grid cells (x, y), as the tiler produces them.
    pub fn encode_cells(
        &self,
        features: &Tensor,
        cells: &[[u32; 2]],
    ) -> crate::Result<SlideOutput> {
        let tokens = self.input_tokens(features, cells)?;
        Ok(self.forward_tokens(tokens)?)
    }

    /// The hidden state s_`layers` after the first `layers` layers, [N + 1, D] (CLS first): the
    /// input of a [`SlideTail`] that fine-tunes the remaining layers.
    pub fn hidden_state(
        &self,
        features: &Tensor,
        cells: &[[u32; 2]],
        layers: usize,
    ) -> crate::Result<Tensor> {
        if layers > self.layers.len() {
            return Err(crate::Error::input(format!(
                "hidden state after {layers} layers asked of a {}-layer slide encoder",
                self.layers.len()
            )));
        }
        let mut xs = self.input_tokens(features, cells)?;
        for layer in &self.layers[..layers] {
            xs = layer.forward(xs)?;
        }
        Ok(xs)
    }

    /// Contextualised tile embeddings, `norm(encoder.layer_norm(s_depth))[1:]`: [N, D] in f32,
    /// each tile's output after attending over the whole slide. Prompt heatmaps project these
    /// through the alignment's slide head, as the pooled slide embedding is.
    pub fn tile_tokens(&self, features: &Tensor, cells: &[[u32; 2]]) -> crate::Result<Tensor> {
        let xs = self.hidden_state(features, cells, self.layers.len())?;
        let out = self.norm.forward(&self.encoder_layer_norm.forward(&xs)?)?;
        Ok(out.narrow(0, 1, cells.len())?.to_dtype(DType::F32)?)
    }

    /// Checks a slide's inputs and builds s0, `[cls_token; patch_embed(features) + pos]`.
    fn input_tokens(&self, features: &Tensor, cells: &[[u32; 2]]) -> crate::Result<Tensor> {
        let dims = features.dims();
        if dims.len() != 2 || dims[1] != self.cfg.in_chans || dims[0] != cells.len() {
            return Err(crate::Error::input(format!(
                "features has shape {dims:?}, expected [{}, {}] (one row per tile)",
                cells.len(),
                self.cfg.in_chans
            )));
        }
        if cells.is_empty() {
            return Err(crate::Error::input("a slide needs at least one tile"));
        }
        if !features.dtype().is_float() {
            return Err(crate::Error::input(format!(
                "features has dtype {:?}, expected a float dtype",
                features.dtype()
            )));
        }
        let ngrids = self.cfg.slide_ngrids as u32;
        if let Some((i, c)) = cells
            .iter()
            .enumerate()
            .find(|(_, c)| c[0] >= ngrids || c[1] >= ngrids)
        {
            return Err(crate::Error::input(format!(
                "tile {i} is grid cell {c:?}, outside the {ngrids} x {ngrids} position grid"
            )));
        }
        self.cfg
            .attention()
            .and_then(|a| a.check_len(cells.len() + 1))
            .map_err(crate::Error::Input)?;
        let pos = position_embedding(cells, self.cfg.embed_dim, &self.device)?;
        Ok(self.embed(&features.to_device(&self.device)?, &pos)?)
    }

    /// `features` [N, in_chans] and position embeddings [N, D] (f32) -> all outputs.
    pub fn forward(&self, features: &Tensor, pos: &Tensor) -> Result<SlideOutput> {
        self.forward_tokens(self.embed(features, pos)?)
    }

    /// The input sequence s0: `[cls_token; patch_embed(features) + pos]`, [N + 1, D].
    pub fn embed(&self, features: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let h = (self.patch_embed.forward(&features.to_dtype(self.dtype)?)?
            + pos.to_dtype(self.dtype)?)?;
        Tensor::cat(&[&self.cls_token, &h], 0)
    }

    /// Runs the layers on s0 [L, D] and pools every output.
    pub fn forward_tokens(&self, tokens: Tensor) -> Result<SlideOutput> {
        let mut xs = tokens;
        // Pool each hidden state as it goes by; keeping 13 states of 100k tokens would cost GBs.
        let (mut cls, mut mean) = (
            vec![pooled(&xs, SlidePool::Cls)?],
            vec![pooled(&xs, SlidePool::Mean)?],
        );
        for layer in &self.layers {
            xs = layer.forward(xs)?;
            cls.push(pooled(&xs, SlidePool::Cls)?);
            mean.push(pooled(&xs, SlidePool::Mean)?);
        }
        let out = self.encoder_layer_norm.forward(&xs)?;
        let norm = |t: &Tensor| self.norm.forward(t)?.to_dtype(DType::F32);
        Ok(SlideOutput {
            cls: norm(&pooled(&out, SlidePool::Cls)?)?,
            pool: norm(&pooled(&out, SlidePool::Mean)?)?,
            all_layers_cls: norm(&Tensor::stack(&cls, 0)?)?,
            all_layers_pool: norm(&Tensor::stack(&mean, 0)?)?,
        })
    }
}

/// The last layers of a slide encoder and its output norms, owned apart from the encoder so that
/// they can be fine-tuned (CLIP alignment, `crate::align`) while the first layers stay frozen.
///
/// Built from a `VarBuilder` at the model root over the release's key names
/// (`encoder.layers.{i}.*`, `encoder.layer_norm.*`, `norm.*`), so a fine-tuned tail saves and
/// loads under the same keys. Every op on the way has a backward (see [`crate::nn`]).
#[derive(Debug, Clone)]
pub struct SlideTail {
    first_layer: usize,
    layers: Vec<EncoderLayer>,
    encoder_layer_norm: LayerNorm,
    norm: LayerNorm,
}

impl SlideTail {
    /// Layers `first_layer..depth` plus `encoder.layer_norm` and `norm`.
    pub fn new(cfg: &Config, first_layer: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        if first_layer >= cfg.depth {
            candle_core::bail!(
                "a slide tail from layer {first_layer} of a {}-layer encoder is empty",
                cfg.depth
            )
        }
        let d = cfg.embed_dim;
        let enc = vb.pp("encoder");
        let layers = (first_layer..cfg.depth)
            .map(|i| EncoderLayer::new(cfg, enc.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            first_layer,
            layers,
            encoder_layer_norm: LayerNorm::load(d, cfg.layernorm_eps, enc.pp("layer_norm"))?,
            norm: LayerNorm::load(d, cfg.norm_eps, vb.pp("norm"))?,
        })
    }

    /// Index of the first layer this tail runs.
    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    /// s_`first_layer` [L, D] (from [`SlideEncoder::hidden_state`]) -> the pooled slide
    /// embedding `[D]` in f32, as [`SlideOutput::cls`] / [`SlideOutput::pool`] define it. The mean
    /// is a plain f32 mean here (differentiable), not the f64 accumulation of inference.
    pub fn forward(&self, hidden: &Tensor, pool: SlidePool) -> Result<Tensor> {
        let mut xs = hidden.clone();
        for layer in &self.layers {
            xs = layer.forward(xs)?;
        }
        let out = self.encoder_layer_norm.forward(&xs)?;
        let pooled = match pool {
            SlidePool::Cls => out.get(0)?,
            SlidePool::Mean => {
                let n = out.dim(0)? - 1;
                if n == 0 {
                    candle_core::bail!("mean pooling needs at least one tile token")
                }
                out.narrow(0, 1, n)?.mean(0)?
            }
        };
        self.norm.forward(&pooled)?.to_dtype(DType::F32)
    }
}

/// `[L, D]` -> `[D]`: the CLS row, or the mean over the tile rows. On CPU accumulated in f64 (a
/// sum over 100k f32 rows would otherwise lose digits the parity tests can see), a block of rows
/// at a time so the f64 copy stays small; on GPUs as f32 products (see below).
pub fn pooled(xs: &Tensor, pool: SlidePool) -> Result<Tensor> {
    const ROWS: usize = 4096;
    match pool {
        // A fresh one-row buffer: a view (and `Tensor::copy`, which clones the whole storage)
        // would keep the whole hidden state alive.
        SlidePool::Cls => xs.get(0)?.affine(1.0, 0.0),
        SlidePool::Mean if !xs.device().is_cpu() => {
            // GPUs: each chunk's column sums as one f32 product with a row of ones (cuBLAS
            // accumulates in f32); a strided f64 reduction per 4096 rows cost ~1,000 launches per
            // slide at 100k tiles.
            const GPU_ROWS: usize = 32768;
            let n = xs.dim(0)? - 1;
            let mut sum = Tensor::zeros((1, xs.dim(1)?), DType::F32, xs.device())?;
            for start in (1..=n).step_by(GPU_ROWS) {
                let r = GPU_ROWS.min(n + 1 - start);
                let rows = xs.narrow(0, start, r)?.to_dtype(DType::F32)?;
                let ones = Tensor::ones((1, r), DType::F32, xs.device())?;
                sum = (sum + ones.matmul(&rows)?)?;
            }
            (sum.squeeze(0)? / n as f64)?.to_dtype(xs.dtype())
        }
        SlidePool::Mean => {
            let n = xs.dim(0)? - 1;
            let mut sum = Tensor::zeros(xs.dim(1)?, DType::F64, xs.device())?;
            for start in (1..=n).step_by(ROWS) {
                let rows = xs.narrow(0, start, ROWS.min(n + 1 - start))?;
                sum = (sum + rows.to_dtype(DType::F64)?.sum(0)?)?;
            }
            (sum / n as f64)?.to_dtype(xs.dtype())
        }
    }
}
