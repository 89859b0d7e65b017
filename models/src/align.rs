//! CLIP-style alignment of slide and report embeddings (spec section 5): the model, its loss and
//! its checkpoint format. Training runs live in `gigapath-train`; this module is the math.
//!
//! - Slide side: the slide encoder over stored tile features, frozen, or with its last k layers
//!   (and its output norms) fine-tuned as a [`SlideTail`]; then a projection head.
//! - Text side: the text encoder, frozen, or with its top k layers fine-tuned as a [`BertTail`];
//!   pooled, L2-normalised, then a projection head.
//! - Heads: `linear` (no bias, MI-Zero's 768 -> 512) or `mlp` (no bias, GELU; BiomedCLIP's
//!   768 -> 640 -> 512). Outputs are L2-normalised into the joint space.
//! - A learnable logit scale, init ln(1/0.07), clamped at ln 100 (open_clip), and the symmetric
//!   InfoNCE loss ([`Alignment::clip_loss`]).
//!
//! Everything a gradient flows through is built from differentiable candle ops: the LayerNorms
//! and softmaxes of the tails switch to their basic-op paths when a weight is a `Var` (see
//! [`crate::kernels`]), the dilated attention to `forward_ops`, and the loss's log-softmax is written
//! out here (candle 0.11's fused `layer_norm`, `softmax_last_dim`, `rms_norm` and `sdpa` record no
//! backward op).
//!
//! Checkpoint: a folder with `alignment.safetensors` (head weights `slide_head.*`, `text_head.*`,
//! `logit_scale`, and fine-tuned encoder layers under their original key names prefixed
//! `slide_encoder.` / `text_encoder.`) and `alignment.json` ([`AlignmentConfig`]: dims, head
//! kinds, trainable layer counts, pooling, the base model fingerprints it was trained on, run id
//! and step). The base encoders are not copied: [`Alignment::slide_joint`] and
//! [`Alignment::text_joint`] take them as arguments, and callers check
//! [`Alignment::base_fingerprints`] against the weights they loaded.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use gigapath_rng::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::slide_encoder::{self, SlideEncoder, SlidePool, SlideTail};
use crate::text_encoder::{self, l2_normalize, pool_states, BertTail, TextEncoder, TextPool};
use crate::weights::{find_file, read_json, var_builder};
use crate::{Error, Precision, Result};

/// Weights file of a checkpoint folder.
pub const WEIGHTS_FILE: &str = "alignment.safetensors";
/// Config file of a checkpoint folder.
pub const CONFIG_FILE: &str = "alignment.json";
/// `format` value of the config files this code writes and reads.
pub const FORMAT: &str = "gigapath-alignment/1";
/// open_clip's initial logit scale, ln(1 / 0.07).
pub const INIT_LOGIT_SCALE: f64 = 2.659_260_036_932_778;
/// open_clip's clamp of the logit scale, ln(100).
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

/// A projection head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeadKind {
    /// One linear map without bias (MI-Zero). Keys `<head>.proj.weight`.
    Linear,
    /// Linear, GELU, linear, no biases (BiomedCLIP / open_clip `proj = "mlp"`). Keys
    /// `<head>.fc1.weight`, `<head>.fc2.weight`.
    Mlp {
        /// Hidden width (BiomedCLIP: 640).
        hidden: usize,
    },
}

/// Token pooling, as `alignment.json` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// The CLS token.
    Cls,
    /// Mean over the tile (slide) or real (text) tokens.
    Mean,
}

impl Pool {
    fn slide(self) -> SlidePool {
        match self {
            Pool::Cls => SlidePool::Cls,
            Pool::Mean => SlidePool::Mean,
        }
    }

    fn text(self) -> TextPool {
        match self {
            Pool::Cls => TextPool::Cls,
            Pool::Mean => TextPool::Mean,
        }
    }
}

/// `alignment.json`: everything needed to rebuild the model around its base encoders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignmentConfig {
    /// [`FORMAT`].
    pub format: String,
    /// Width of the joint space.
    pub joint_dim: usize,
    /// Width of the slide embedding the slide head takes (the slide encoder's `embed_dim`).
    pub slide_dim: usize,
    /// Width of the text embedding the text head takes (the text encoder's `hidden_size`).
    pub text_dim: usize,
    /// Slide projection head.
    pub slide_head: HeadKind,
    /// Text projection head.
    pub text_head: HeadKind,
    /// Last slide-encoder layers fine-tuned (0: frozen encoder).
    pub slide_trainable_layers: usize,
    /// Top text-encoder layers fine-tuned (0: frozen encoder).
    pub text_trainable_layers: usize,
    /// Slide embedding pooling.
    pub slide_pool: Pool,
    /// Text embedding pooling (before L2 normalisation).
    pub text_pool: Pool,
    /// Upper clamp of the (log) logit scale.
    pub max_logit_scale: f64,
    /// The base slide encoder's config, needed to rebuild fine-tuned slide layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide_encoder: Option<slide_encoder::Config>,
    /// The base text encoder's config, needed to rebuild fine-tuned text layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<text_encoder::Config>,
    /// Fingerprints of the base weights (`tile`, `slide`, `text`) the checkpoint was trained on.
    #[serde(default)]
    pub base_fingerprints: BTreeMap<String, String>,
    /// The training run that wrote the checkpoint.
    #[serde(default)]
    pub run_id: String,
    /// Optimizer steps done when it was written.
    #[serde(default)]
    pub step: u64,
}

impl AlignmentConfig {
    /// A config for the given base encoders with the defaults of the paper's setup: joint 512,
    /// linear heads, frozen encoders, mean pooling, clamp ln 100.
    pub fn new(slide: &slide_encoder::Config, text: &text_encoder::Config) -> Self {
        Self {
            format: FORMAT.into(),
            joint_dim: 512,
            slide_dim: slide.embed_dim,
            text_dim: text.hidden_size,
            slide_head: HeadKind::Linear,
            text_head: HeadKind::Linear,
            slide_trainable_layers: 0,
            text_trainable_layers: 0,
            slide_pool: Pool::Mean,
            text_pool: Pool::Mean,
            max_logit_scale: MAX_LOGIT_SCALE,
            slide_encoder: Some(slide.clone()),
            text_encoder: Some(text.clone()),
            base_fingerprints: BTreeMap::new(),
            run_id: String::new(),
            step: 0,
        }
    }

    /// Checks the values; the message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {:?}: this build reads {FORMAT:?}",
                self.format
            ));
        }
        for (key, v) in [
            ("joint_dim", self.joint_dim),
            ("slide_dim", self.slide_dim),
            ("text_dim", self.text_dim),
        ] {
            if v == 0 || v > 65_536 {
                return Err(format!("{key} = {v}: must be between 1 and 65536"));
            }
        }
        for (key, head) in [
            ("slide_head", self.slide_head),
            ("text_head", self.text_head),
        ] {
            if let HeadKind::Mlp { hidden } = head {
                if hidden == 0 || hidden > 65_536 {
                    return Err(format!(
                        "{key}.hidden = {hidden}: must be between 1 and 65536"
                    ));
                }
            }
        }
        if !(self.max_logit_scale.is_finite() && self.max_logit_scale > 0.0) {
            return Err(format!(
                "max_logit_scale = {}: must be positive",
                self.max_logit_scale
            ));
        }
        if self.slide_trainable_layers > 0 {
            let Some(c) = &self.slide_encoder else {
                return Err("slide_trainable_layers > 0 needs the slide_encoder config".into());
            };
            if self.slide_trainable_layers > c.depth {
                return Err(format!(
                    "slide_trainable_layers = {}: the slide encoder has {} layers",
                    self.slide_trainable_layers, c.depth
                ));
            }
            if c.embed_dim != self.slide_dim {
                return Err(format!(
                    "slide_dim = {} but slide_encoder.embed_dim = {}",
                    self.slide_dim, c.embed_dim
                ));
            }
        }
        if self.text_trainable_layers > 0 {
            let Some(c) = &self.text_encoder else {
                return Err("text_trainable_layers > 0 needs the text_encoder config".into());
            };
            if self.text_trainable_layers > c.num_hidden_layers {
                return Err(format!(
                    "text_trainable_layers = {}: the text encoder has {} layers",
                    self.text_trainable_layers, c.num_hidden_layers
                ));
            }
            if c.hidden_size != self.text_dim {
                return Err(format!(
                    "text_dim = {} but text_encoder.hidden_size = {}",
                    self.text_dim, c.hidden_size
                ));
            }
        }
        Ok(())
    }

    /// Reads and validates `dir/alignment.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(Error::Io {
                path: path.clone(),
                cause: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not an alignment checkpoint (no alignment.json)",
                ),
            });
        }
        let cfg: Self = read_json(&path)?;
        cfg.validate().map_err(|msg| Error::config(&path, msg))?;
        Ok(cfg)
    }
}

/// A projection head (see [`HeadKind`]).
#[derive(Debug, Clone)]
struct Head {
    first: Linear,
    second: Option<Linear>,
}

impl Head {
    fn new(
        kind: HeadKind,
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(match kind {
            HeadKind::Linear => Self {
                first: candle_nn::linear_no_bias(in_dim, out_dim, vb.pp("proj"))?,
                second: None,
            },
            HeadKind::Mlp { hidden } => Self {
                first: candle_nn::linear_no_bias(in_dim, hidden, vb.pp("fc1"))?,
                second: Some(candle_nn::linear_no_bias(hidden, out_dim, vb.pp("fc2"))?),
            },
        })
    }

    /// [B, in] -> [B, out], not normalised.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.first.forward(xs)?;
        match &self.second {
            None => Ok(h),
            Some(fc2) => fc2.forward(&h.gelu_erf()?),
        }
    }
}

/// What the frozen part of the slide side produces for one slide; a trainer computes it once
/// and caches it.
#[derive(Debug, Clone)]
pub enum SlidePrefix {
    /// The pooled slide embedding [D] (frozen slide encoder).
    Embedding(Tensor),
    /// The hidden state [N + 1, D] before the fine-tuned layers.
    Hidden(Tensor),
}

/// What the frozen part of the text side produces for one text (cacheable, like [`SlidePrefix`]).
#[derive(Debug, Clone)]
pub enum TextPrefix {
    /// The pooled, L2-normalised text embedding [D] (frozen text encoder).
    Embedding(Tensor),
    /// The hidden states [T, D] of the text's real tokens before the fine-tuned layers.
    Hidden(Tensor),
}

/// The alignment model: heads, logit scale and any fine-tuned encoder layers.
pub struct Alignment {
    config: AlignmentConfig,
    slide_head: Head,
    text_head: Head,
    logit_scale: Tensor,
    slide_tail: Option<SlideTail>,
    text_tail: Option<BertTail>,
    device: Device,
}

impl Alignment {
    /// Builds the model from a `VarBuilder` over the checkpoint's key names (a loaded file, or a
    /// `VarMap` for training). Heads and the logit scale are f32; tails use the builder's dtype.
    pub fn new(config: &AlignmentConfig, vb: VarBuilder) -> Result<Self> {
        config
            .validate()
            .map_err(|msg| Error::input(format!("alignment config: {msg}")))?;
        let slide_tail = match (&config.slide_encoder, config.slide_trainable_layers) {
            (Some(c), k) if k > 0 => Some(SlideTail::new(c, c.depth - k, vb.pp("slide_encoder"))?),
            _ => None,
        };
        let text_tail = match (&config.text_encoder, config.text_trainable_layers) {
            (Some(c), k) if k > 0 => Some(BertTail::new(
                c,
                c.num_hidden_layers - k,
                vb.pp("text_encoder"),
            )?),
            _ => None,
        };
        let f32_vb = vb.clone().set_dtype(DType::F32);
        let (j, ds, dt) = (config.joint_dim, config.slide_dim, config.text_dim);
        Ok(Self {
            slide_head: Head::new(config.slide_head, ds, j, f32_vb.pp("slide_head"))?,
            text_head: Head::new(config.text_head, dt, j, f32_vb.pp("text_head"))?,
            logit_scale: f32_vb.get_with_hints(
                1,
                "logit_scale",
                candle_nn::Init::Const(INIT_LOGIT_SCALE),
            )?,
            slide_tail,
            text_tail,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    /// Loads a checkpoint folder (`alignment.json` + `alignment.safetensors`).
    pub fn load(dir: &Path, precision: &Precision) -> Result<Self> {
        let config = AlignmentConfig::load(dir)?;
        let weights = find_file(dir, &[WEIGHTS_FILE])?;
        let vb = var_builder(&weights, None, precision.dtype, &precision.device)?;
        Self::new(&config, vb).map_err(|e| match e {
            Error::Candle(cause) => Error::Weights {
                path: weights,
                cause,
            },
            other => other,
        })
    }

    /// The checkpoint's config.
    pub fn config(&self) -> &AlignmentConfig {
        &self.config
    }

    /// Width of the joint space.
    pub fn joint_dim(&self) -> usize {
        self.config.joint_dim
    }

    /// The multiplier of cosine similarities, `exp(min(logit_scale, max))`.
    pub fn logit_scale(&self) -> f32 {
        self.logit_scale
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map(|v| (v[0] as f64).min(self.config.max_logit_scale).exp() as f32)
            .unwrap_or(f32::NAN)
    }

    /// Fingerprints of the base weights (`tile`, `slide`, `text`) the checkpoint was trained on.
    pub fn base_fingerprints(&self) -> BTreeMap<String, String> {
        self.config.base_fingerprints.clone()
    }

    /// Whether slide-encoder layers were fine-tuned (then the `slide` embedding changes too).
    pub fn fine_tunes_slide(&self) -> bool {
        self.slide_tail.is_some()
    }

    /// Whether text-encoder layers were fine-tuned.
    pub fn fine_tunes_text(&self) -> bool {
        self.text_tail.is_some()
    }

    fn check_slide_base(&self, base: &SlideEncoder) -> Result<()> {
        let c = base.config();
        if c.embed_dim != self.config.slide_dim {
            return Err(Error::input(format!(
                "the slide encoder gives {}-d embeddings; this alignment was trained on {}-d",
                c.embed_dim, self.config.slide_dim
            )));
        }
        if self.slide_tail.is_some() && self.config.slide_encoder.as_ref() != Some(c) {
            return Err(Error::input(
                "the slide encoder's config differs from the one this alignment fine-tuned",
            ));
        }
        Ok(())
    }

    fn check_text_base(&self, base: &TextEncoder) -> Result<()> {
        if base.hidden_size() != self.config.text_dim {
            return Err(Error::input(format!(
                "the text encoder gives {}-d embeddings; this alignment was trained on {}-d",
                base.hidden_size(),
                self.config.text_dim
            )));
        }
        if self.text_tail.is_some() && self.config.text_encoder.as_ref() != Some(base.config()) {
            return Err(Error::input(
                "the text encoder's config differs from the one this alignment fine-tuned",
            ));
        }
        Ok(())
    }

    /// The frozen part of the slide side for one slide (no gradient; cacheable).
    pub fn slide_prefix(
        &self,
        base: &SlideEncoder,
        features: &Tensor,
        cells: &[[u32; 2]],
    ) -> Result<SlidePrefix> {
        self.check_slide_base(base)?;
        Ok(match &self.slide_tail {
            None => {
                let out = base.encode_cells(features, cells)?;
                SlidePrefix::Embedding(
                    out.select(self.config.slide_pool.slide(), false)
                        .to_dtype(DType::F32)?
                        .to_device(&self.device)?,
                )
            }
            Some(tail) => SlidePrefix::Hidden(
                base.hidden_state(features, cells, tail.first_layer())?
                    .detach()
                    .to_device(&self.device)?,
            ),
        })
    }

    /// Slide embeddings [B, D] (f32) from prefixes, through the fine-tuned layers if any.
    pub fn slide_embeddings(&self, prefixes: &[&SlidePrefix]) -> Result<Tensor> {
        if prefixes.is_empty() {
            return Err(Error::input("no slides"));
        }
        let rows = prefixes
            .iter()
            .map(|p| match (p, &self.slide_tail) {
                (SlidePrefix::Embedding(e), None) => Ok(e.clone()),
                (SlidePrefix::Hidden(h), Some(tail)) => {
                    Ok(tail.forward(h, self.config.slide_pool.slide())?)
                }
                _ => Err(Error::input(
                    "slide prefix does not match the alignment (frozen vs fine-tuned layers)",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// The frozen part of the text side, one prefix per text (no gradient; cacheable).
    pub fn text_prefixes<S: AsRef<str>>(
        &self,
        base: &TextEncoder,
        texts: &[S],
    ) -> Result<Vec<TextPrefix>> {
        self.check_text_base(base)?;
        let batch = base.tokenize(texts)?;
        match &self.text_tail {
            None => {
                let states = base.hidden_states(&batch)?;
                let pooled =
                    pool_states(&states, &batch.attention_mask, self.config.text_pool.text())?;
                let pooled = l2_normalize(&pooled)?.to_device(&self.device)?;
                (0..texts.len())
                    .map(|i| Ok(TextPrefix::Embedding(pooled.get(i)?)))
                    .collect()
            }
            Some(tail) => {
                let states = base
                    .model()
                    .forward_layers(&batch.input_ids, &batch.attention_mask, tail.first_layer())?
                    .to_dtype(DType::F32)?
                    .detach()
                    .to_device(&self.device)?;
                let lengths: Vec<u32> = batch
                    .attention_mask
                    .to_dtype(DType::U32)?
                    .sum(1)?
                    .to_vec1()?;
                // Padding is on the right: a text's real tokens are its first `len` rows.
                lengths
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| {
                        Ok(TextPrefix::Hidden(
                            states.get(i)?.narrow(0, 0, len as usize)?.contiguous()?,
                        ))
                    })
                    .collect()
            }
        }
    }

    /// Pooled, L2-normalised text embeddings [B, D] (f32) from prefixes, through the fine-tuned
    /// layers if any (prefixes of different lengths are zero-padded and masked).
    pub fn text_embeddings(&self, prefixes: &[&TextPrefix]) -> Result<Tensor> {
        if prefixes.is_empty() {
            return Err(Error::input("no texts"));
        }
        match &self.text_tail {
            None => {
                let rows = prefixes
                    .iter()
                    .map(|p| match p {
                        TextPrefix::Embedding(e) => Ok(e.clone()),
                        TextPrefix::Hidden(_) => Err(Error::input(
                            "text prefix has hidden states but the text encoder is frozen",
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::stack(&rows, 0)?)
            }
            Some(tail) => {
                let states = prefixes
                    .iter()
                    .map(|p| match p {
                        TextPrefix::Hidden(h) => Ok(h),
                        TextPrefix::Embedding(_) => Err(Error::input(
                            "text prefix is an embedding but text layers are fine-tuned",
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let t_max = states
                    .iter()
                    .map(|h| h.dim(0))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let t_max = t_max.into_iter().max().unwrap_or(1);
                let d = states[0].dim(1)?;
                let mut padded = Vec::with_capacity(states.len());
                let mut mask = Vec::with_capacity(states.len() * t_max);
                for h in &states {
                    let t = h.dim(0)?;
                    padded.push(if t < t_max {
                        Tensor::cat(
                            &[
                                (*h).clone(),
                                Tensor::zeros((t_max - t, d), h.dtype(), h.device())?,
                            ],
                            0,
                        )?
                    } else {
                        (*h).clone()
                    });
                    mask.extend((0..t_max).map(|i| u32::from(i < t)));
                }
                let hidden = Tensor::stack(&padded, 0)?;
                let mask = Tensor::from_vec(mask, (states.len(), t_max), &self.device)?;
                let out = tail.forward(&hidden, &mask)?;
                let pooled = pool_states(&out, &mask, self.config.text_pool.text())?;
                Ok(l2_normalize(&pooled)?)
            }
        }
    }

    /// Slide embeddings [B, slide_dim] -> joint embeddings [B, joint_dim], L2-normalised. Also
    /// takes per-tile token outputs (for similarity heatmaps), any f32 rows of `slide_dim`.
    pub fn project_slides(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.to_dtype(DType::F32)?.to_device(&self.device)?;
        Ok(l2_normalize(&self.slide_head.forward(&xs)?)?)
    }

    /// Text embeddings [B, text_dim] -> joint embeddings [B, joint_dim], L2-normalised.
    pub fn project_texts(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.to_dtype(DType::F32)?.to_device(&self.device)?;
        Ok(l2_normalize(&self.text_head.forward(&xs)?)?)
    }

    /// Symmetric InfoNCE over a batch of matching rows: `(CE(S T^T s) + CE(T S^T s)) / 2` with
    /// `s = exp(min(logit_scale, max))`; row i of `slides` belongs with row i of `texts`.
    pub fn clip_loss(&self, slides: &Tensor, texts: &Tensor) -> Result<Tensor> {
        let b = slides.dim(0)?;
        if b == 0 || texts.dims() != slides.dims() {
            return Err(Error::input(format!(
                "clip loss of slides {:?} and texts {:?}",
                slides.dims(),
                texts.dims()
            )));
        }
        let scale = self
            .logit_scale
            .minimum(self.config.max_logit_scale)?
            .exp()?;
        let logits = slides.matmul(&texts.t()?)?.broadcast_mul(&scale)?;
        let eye = Tensor::eye(b, DType::F32, slides.device())?;
        let ce = |l: &Tensor| -> candle_core::Result<Tensor> {
            (log_softmax_rows(l)? * &eye)?
                .sum_all()?
                .affine(-1.0 / b as f64, 0.0)
        };
        let loss = ((ce(&logits)? + ce(&logits.t()?.contiguous()?)?)? * 0.5)?;
        Ok(loss)
    }

    /// The slide embedding (after any fine-tuned layers; the `slide` vector to store) and its
    /// L2-normalised joint embedding, from tile features [N, in_chans] at grid cells.
    pub fn slide_joint(
        &self,
        base: &SlideEncoder,
        features: &Tensor,
        cells: &[[u32; 2]],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let prefix = self.slide_prefix(base, features, cells)?;
        let emb = self.slide_embeddings(&[&prefix])?;
        let joint = self.project_slides(&emb)?;
        Ok((emb.get(0)?.to_vec1()?, joint.get(0)?.to_vec1()?))
    }

    /// Joint embeddings [B, joint_dim] (L2-normalised) of texts, fine-tuned layers applied.
    pub fn text_joint(&self, base: &TextEncoder, texts: &[&str]) -> Result<Tensor> {
        let prefixes = self.text_prefixes(base, texts)?;
        let refs: Vec<&TextPrefix> = prefixes.iter().collect();
        self.project_texts(&self.text_embeddings(&refs)?)
    }
}

/// `log_softmax` over the last dimension of a 2-D tensor, from differentiable basic ops.
fn log_softmax_rows(xs: &Tensor) -> candle_core::Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let shifted = xs.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Whether AdamW's weight decay applies to a parameter: not to biases, norms or the logit scale
/// (open_clip's exclusion list, by key name).
pub fn decays(name: &str) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let norm = ["norm", "LayerNorm", "_ln", "layernorm"]
        .iter()
        .any(|p| name.contains(p));
    !(leaf == "bias" || leaf == "beta" || norm || name == "logit_scale")
}

/// A fresh trainable alignment: heads from a seeded uniform(+-1/sqrt(fan_in)) (PyTorch's
/// `nn.Linear` default), the logit scale at [`INIT_LOGIT_SCALE`], and fine-tuned layers copied
/// from the base weight files (`slide_dir`, `text_dir`: the encoders' model folders, needed only
/// when the config fine-tunes layers). Every tensor of the returned `VarMap` is trainable.
pub fn init_trainable(
    config: &AlignmentConfig,
    slide_dir: Option<&Path>,
    text_dir: Option<&Path>,
    seed: u64,
    device: &Device,
) -> Result<(Alignment, VarMap)> {
    let varmap = VarMap::new();
    let model = Alignment::new(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let base_slide = match (config.slide_trainable_layers, slide_dir) {
        (0, _) => None,
        (_, Some(dir)) => {
            let w = crate::slide_encoder::ModelFiles::find(dir)?.weights;
            Some((var_builder(&w, Some("model"), DType::F32, device)?, w))
        }
        (_, None) => {
            return Err(Error::input(
                "fine-tuning slide-encoder layers needs the slide encoder folder",
            ))
        }
    };
    let base_text = match (config.text_trainable_layers, text_dir) {
        (0, _) => None,
        (_, Some(dir)) => {
            let w = find_file(dir, &["model.safetensors", "pytorch_model.bin"])?;
            Some((var_builder(&w, None, DType::F32, device)?, w))
        }
        (_, None) => {
            return Err(Error::input(
                "fine-tuning text-encoder layers needs the text encoder folder",
            ))
        }
    };
    {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let shape = var.shape().clone();
            let value = if name == "logit_scale" {
                Tensor::full(INIT_LOGIT_SCALE as f32, shape, device)?
            } else if let Some(key) = name.strip_prefix("slide_encoder.") {
                let (vb, path) = base_slide
                    .as_ref()
                    .expect("slide tail implies base weights");
                copy_base(vb, path, key, &shape, &[])?
            } else if let Some(key) = name.strip_prefix("text_encoder.") {
                let (vb, path) = base_text.as_ref().expect("text tail implies base weights");
                copy_base(vb, path, key, &shape, &["bert."])?
            } else {
                let dims = shape.dims();
                let fan_in = dims.last().copied().unwrap_or(1).max(1);
                let bound = 1.0 / (fan_in as f64).sqrt();
                // Seeded by name, so a head starts the same whatever else is trainable.
                let mut rng = SplitMix64::new(seed ^ fnv1a(name.as_bytes()));
                let values: Vec<f32> = (0..shape.elem_count())
                    .map(|_| ((rng.f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                Tensor::from_vec(values, shape, device)?
            };
            var.set(&value)?;
        }
    }
    Ok((model, varmap))
}

/// A base tensor for `key`, trying the key as is, under each prefix, and with a LayerNorm's old
/// `gamma` / `beta` names.
fn copy_base(
    vb: &VarBuilder,
    path: &Path,
    key: &str,
    shape: &candle_core::Shape,
    prefixes: &[&str],
) -> Result<Tensor> {
    let mut candidates = vec![key.to_string()];
    if let Some(stem) = key.strip_suffix(".weight") {
        candidates.push(format!("{stem}.gamma"));
    }
    if let Some(stem) = key.strip_suffix(".bias") {
        candidates.push(format!("{stem}.beta"));
    }
    for c in candidates.clone() {
        candidates.extend(prefixes.iter().map(|p| format!("{p}{c}")));
    }
    let found = candidates.iter().find(|c| vb.contains_tensor(c));
    let Some(name) = found else {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            cause: candle_core::Error::msg(format!("no tensor {key} to fine-tune from")),
        });
    };
    vb.get(shape.clone(), name).map_err(|cause| Error::Weights {
        path: path.to_path_buf(),
        cause,
    })
}

/// Writes `alignment.safetensors` (every tensor of `varmap`) and `alignment.json` into `dir`.
/// Callers make the folder appear atomically (write elsewhere, then rename).
pub fn save_checkpoint(dir: &Path, config: &AlignmentConfig, varmap: &VarMap) -> Result<()> {
    let io = |path: &Path, cause: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        cause,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    varmap.save(dir.join(WEIGHTS_FILE))?;
    let json = serde_json::to_string_pretty(config).expect("config serialises");
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, json).map_err(|e| io(&path, e))
}

/// FNV-1a, a stable 64-bit hash of a key name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
