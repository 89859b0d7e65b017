//! The Prov-GigaPath tile encoder: timm `vit_giant_patch14_dinov2` as the model ships it
//! (224 px, patch 16, one CLS token, no registers, LayerScale, packed SwiGLU MLP, LayerNorm eps
//! 1e-6). The tile embedding is the CLS token after the final norm.
//!
//! Built from a model folder: `config.json` (timm format; the sizes come from `model_args`) and
//! `pytorch_model.bin` or `model.safetensors` with timm's key names. candle's `dinov2` model does not
//! fit (it hard-codes 518 px / patch 14, a GELU MLP and another eps).

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;
use serde::Deserialize;

use crate::device::Precision;
use crate::kernels::{self, scaled_residual, softmax_last_dim, swiglu_packed};
use crate::nn::{linear, LayerNorm};
use crate::weights::{find_file, read_json, var_builder};

/// The only architecture this module implements; others have a GELU MLP or register tokens.
pub const ARCHITECTURE: &str = "vit_giant_patch14_dinov2";
const LN_EPS: f64 = 1e-6;

/// A timm `config.json` as Hugging Face hub models ship it.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// timm model name; must be [`ARCHITECTURE`].
    pub architecture: String,
    /// Output width (equals `model_args.embed_dim`).
    #[serde(default)]
    pub num_features: Option<usize>,
    /// `token` (CLS) is the only pooling the release uses.
    #[serde(default)]
    pub global_pool: Option<String>,
    /// Constructor overrides; these define the network.
    pub model_args: ModelArgs,
}

/// timm `model_args`: the overrides applied to the named architecture.
///
/// What timm writes is accepted: `img_size` as an int or `[h, w]` (square only: the tile
/// encoder takes square tiles), and the other `VisionTransformer` arguments timm re-exports
/// (`save_for_hf` / `push_to_hf_hub`) carry, in [`ModelArgs::extra`]. Of those, training-only
/// ones (dropout, init) are ignored and the others must keep the value this implementation
/// computes (see [`ModelArgs::check_extra`]); an unknown key is refused by name.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    /// Input side in pixels (224 for Prov-GigaPath); `[h, w]` in the file must be square.
    #[serde(deserialize_with = "image_side")]
    pub img_size: usize,
    /// Input channels.
    #[serde(default = "three")]
    pub in_chans: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// LayerScale init; `None` means the blocks have no LayerScale.
    #[serde(default)]
    pub init_values: Option<f64>,
    /// MLP width ratio; the packed SwiGLU hidden size is `int(D * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// Classifier outputs; must be 0 (the embedding model has no head).
    #[serde(default)]
    pub num_classes: usize,
    /// Register tokens (not supported: Prov-GigaPath has none).
    #[serde(default)]
    pub reg_tokens: usize,
    /// Whether the position table skips the CLS slot (not supported).
    #[serde(default)]
    pub no_embed_class: bool,
    /// Whether qkv has a bias (timm default true).
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// Every other key, checked by [`ModelArgs::check_extra`].
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

/// `img_size` as timm writes it: `224` or `[224, 224]`.
fn image_side<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    use serde::de::Error as _;
    let v = serde_json::Value::deserialize(d)?;
    let side = |v: &serde_json::Value| v.as_u64().filter(|&n| n > 0).map(|n| n as usize);
    let parsed = match &v {
        serde_json::Value::Number(_) => side(&v),
        serde_json::Value::Array(hw) if hw.len() == 2 => match (side(&hw[0]), side(&hw[1])) {
            (Some(h), Some(w)) if h == w => Some(h),
            (Some(h), Some(w)) => {
                return Err(D::Error::custom(format!(
                    "img_size [{h}, {w}] is not square; the tile encoder takes square tiles"
                )))
            }
            _ => None,
        },
        _ => None,
    };
    parsed.ok_or_else(|| {
        D::Error::custom(format!(
            "img_size {v} is not a positive integer or a [height, width] pair"
        ))
    })
}

/// `model_args` keys that only matter for training or initialisation: any value is accepted.
const TRAINING_ONLY_ARGS: &[&str] = &[
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "fix_init",
    // Interpolating positions for other input sizes: inputs here are always `img_size`.
    "dynamic_img_size",
    "dynamic_img_pad",
    "pretrained_strict",
];

impl ModelArgs {
    /// Checks the keys beyond the sizes: a key that would change the model must keep the value
    /// this implementation computes (timm's default for the architecture), and unknown keys are
    /// refused, each error naming the key.
    pub fn check_extra(&self) -> std::result::Result<(), String> {
        use serde_json::Value;
        for (key, value) in &self.extra {
            if TRAINING_ONLY_ARGS.contains(&key.as_str()) {
                continue;
            }
            let supported: Vec<Value> = match key.as_str() {
                "global_pool" => vec![Value::from("token")],
                "class_token" => vec![Value::Bool(true)],
                "pos_embed" => vec![Value::from("learn")],
                "pre_norm" | "qk_norm" | "scale_attn_norm" | "scale_mlp_norm" | "fc_norm" => {
                    vec![Value::Bool(false), Value::Null]
                }
                "final_norm" | "proj_bias" => vec![Value::Bool(true)],
                "embed_layer" | "norm_layer" | "act_layer" | "block_fn" | "mlp_layer" => {
                    vec![Value::Null]
                }
                _ => {
                    return Err(format!(
                        "model_args.{key} = {value} is not a timm VisionTransformer argument \
                         gigapath knows; it may change the model, so it is refused"
                    ))
                }
            };
            if !supported.contains(value) {
                let want: Vec<String> = supported.iter().map(|v| v.to_string()).collect();
                return Err(format!(
                    "model_args.{key} = {value} changes the model; gigapath implements only {}",
                    want.join(" or ")
                ));
            }
        }
        Ok(())
    }
}

fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}

impl Config {
    /// Reads a timm `config.json`.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()
            .map_err(|msg| crate::Error::config(path, msg))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let a = &self.model_args;
        if self.architecture != ARCHITECTURE {
            return Err(format!(
                "architecture {:?} is not supported (expected {ARCHITECTURE})",
                self.architecture
            ));
        }
        if let Some(pool) = self.global_pool.as_deref() {
            if pool != "token" {
                return Err(format!("global_pool {pool:?}: only \"token\" is supported"));
            }
        }
        for (key, unsupported) in [
            ("reg_tokens", a.reg_tokens != 0),
            ("no_embed_class", a.no_embed_class),
            ("qkv_bias", !a.qkv_bias),
            ("num_classes", a.num_classes != 0),
        ] {
            if unsupported {
                return Err(format!(
                    "model_args.{key} changes the model: reg_tokens > 0, no_embed_class, \
                     qkv_bias = false and num_classes > 0 are not supported"
                ));
            }
        }
        a.check_extra()?;
        if a.patch_size == 0 || !a.img_size.is_multiple_of(a.patch_size) {
            return Err(format!(
                "img_size {} is not a multiple of patch_size {}",
                a.img_size, a.patch_size
            ));
        }
        if a.num_heads == 0 || !a.embed_dim.is_multiple_of(a.num_heads) {
            return Err(format!(
                "embed_dim {} is not divisible by num_heads {}",
                a.embed_dim, a.num_heads
            ));
        }
        if !self.mlp_hidden().is_multiple_of(2) {
            return Err(format!(
                "int(embed_dim * mlp_ratio) = {} must be even for the packed SwiGLU",
                self.mlp_hidden()
            ));
        }
        if let Some(n) = self.num_features {
            if n != a.embed_dim {
                return Err(format!(
                    "num_features {n} differs from embed_dim {}",
                    a.embed_dim
                ));
            }
        }
        Ok(())
    }

    /// `fc1` output width: `int(D * mlp_ratio)`, truncated as Python's `int` does.
    pub fn mlp_hidden(&self) -> usize {
        (self.model_args.embed_dim as f64 * self.model_args.mlp_ratio) as usize
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.model_args.img_size / self.model_args.patch_size
    }
}

/// `patch_embed.proj`: a stride-p conv, done as one matmul over flattened patches.
#[derive(Debug, Clone)]
struct PatchEmbed {
    proj: Linear,
    patch: usize,
}

impl PatchEmbed {
    fn new(cfg: &ModelArgs, vb: VarBuilder) -> Result<Self> {
        let p = cfg.patch_size;
        let vb = vb.pp("proj");
        let w = vb.get((cfg.embed_dim, cfg.in_chans, p, p), "weight")?;
        let b = vb.get(cfg.embed_dim, "bias")?;
        // Conv weight [D, C, p, p] flattened in the same (c, y, x) order as the patches below.
        let w = w.reshape((cfg.embed_dim, cfg.in_chans * p * p))?;
        Ok(Self {
            proj: Linear::new(w, Some(b)),
            patch: p,
        })
    }

    /// [B, C, H, W] -> [B, (H/p)(W/p), D], patches row-major.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = xs
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        self.proj.forward(&patches)
    }
}

/// timm `Attention`: fused qkv with bias, heads contiguous, output projection.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl Attention {
    /// `gamma`: the block's LayerScale, folded into `proj` (see [`Block`]).
    fn new(cfg: &ModelArgs, vb: VarBuilder, gamma: Option<&Tensor>) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Self {
            qkv: linear(d, 3 * d, vb.pp("qkv"))?,
            proj: scaled_linear(d, d, vb.pp("proj"), gamma)?,
            num_heads: cfg.num_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        self.proj
            .forward(&attention_from_qkv(&qkv, self.num_heads)?)
    }

    /// `residual + forward(xs)`, the residual added by the output projection.
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        self.proj
            .forward_residual(&attention_from_qkv(&qkv, self.num_heads)?, residual)
    }
}

/// `nn.Linear` whose output is multiplied by `gamma` (per output channel), folded into the weight
/// and bias in f32 before they are cast: `gamma * (W x + b) = (gamma W) x + gamma b`.
fn scaled_linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    gamma: Option<&Tensor>,
) -> Result<Linear> {
    let Some(gamma) = gamma else {
        return linear(in_dim, out_dim, vb);
    };
    let dtype = vb.dtype();
    let vb = vb.set_dtype(DType::F32);
    let gamma = gamma.to_dtype(DType::F32)?;
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = vb.get(out_dim, "bias")?;
    let w = w.broadcast_mul(&gamma.unsqueeze(1)?)?.to_dtype(dtype)?;
    let b = (b * &gamma)?.to_dtype(dtype)?;
    Ok(Linear::new(w, Some(b)))
}

/// Multi-head self-attention core from timm's fused projection: `qkv` [B, N, 3D] (rows
/// `[q; k; v]`, heads contiguous) -> [B, N, D] with heads merged, scale `(D/H)^-0.5`.
///
/// One fused kernel where [`kernels::qkv_attention`] has one (f32 CPU inference, half precision
/// on CUDA); otherwise candle ops.
pub fn attention_from_qkv(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, three_d) = qkv.dims3()?;
    let d = three_d / 3;
    let scale = ((d / heads) as f64).powf(-0.5);
    if let Some(out) = kernels::qkv_attention(qkv, heads, scale as f32)? {
        return Ok(out);
    }
    // [B, N, 3D] -> [3, B, H, N, D/H]
    let qkv = qkv
        .reshape((b, n, 3, heads, d / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)?.contiguous()? * scale)?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = softmax_last_dim(&q.matmul(&k.t()?)?)?; // [B, H, N, N]
    attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))
}

/// timm `GluMlp` as `SwiGLUPacked`: `fc2(silu(x1) * x2)` with `fc1`'s output split gate-first.
///
/// On CPU `fc1` stays packed and one fused pass gates it. On a GPU `fc1` is split at load into
/// its gate and value halves, two products with contiguous outputs: gating the two strided halves
/// of the packed output cost 2.5x the products themselves on an H200.
#[derive(Debug, Clone)]
struct SwiGluPacked {
    fc1: Fc1,
    fc2: Linear,
}

#[derive(Debug, Clone)]
enum Fc1 {
    Packed(Linear),
    Split { gate: Linear, value: Linear },
}

impl SwiGluPacked {
    /// `gamma`: the block's LayerScale, folded into `fc2` (see [`Block`]).
    fn new(cfg: &Config, vb: VarBuilder, gamma: Option<&Tensor>) -> Result<Self> {
        let d = cfg.model_args.embed_dim;
        let hidden = cfg.mlp_hidden();
        let packed = linear(d, hidden, vb.pp("fc1"))?;
        // Packed where one pass gates it: our CPU kernel, or the CUDA kernel in half precision.
        let fc1 = if vb.device().is_cpu() || kernels::cuda::available(vb.device(), vb.dtype()) {
            Fc1::Packed(packed)
        } else {
            let half = hidden / 2;
            let part = |start: usize| -> Result<Linear> {
                let w = packed.weight().narrow(0, start, half)?.contiguous()?;
                let b = match packed.bias() {
                    Some(b) => Some(b.narrow(0, start, half)?.contiguous()?),
                    None => None,
                };
                Ok(Linear::new(w, b))
            };
            Fc1::Split {
                gate: part(0)?,
                value: part(half)?,
            }
        };
        Ok(Self {
            fc1,
            fc2: scaled_linear(hidden / 2, d, vb.pp("fc2"), gamma)?,
        })
    }

    fn gated(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.fc1 {
            Fc1::Packed(fc1) => swiglu_packed(&fc1.forward(xs)?),
            Fc1::Split { gate, value } => gate.forward(xs)?.silu()? * value.forward(xs)?,
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.gated(xs)?)
    }

    /// `residual + forward(xs)`, the residual added by `fc2`.
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fc2.forward_residual(&self.gated(xs)?, residual)
    }
}

/// Pre-LN block: `x + ls1 * attn(norm1(x))`, then `x + ls2 * mlp(norm2(x))`.
///
/// Where the fused CUDA kernels run (half precision, sm_80+), LayerScale is folded into `proj` and
/// `fc2` at load and each residual is added by the product that ends its branch: two products,
/// no elementwise pass, per branch tail.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    mlp: SwiGluPacked,
    ls2: Option<Tensor>,
    fused_residual: bool,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.model_args.embed_dim;
        let layer_scale = |name: &str| -> Result<Option<Tensor>> {
            match cfg.model_args.init_values {
                Some(_) => vb.pp(name).set_dtype(DType::F32).get(d, "gamma").map(Some),
                None => Ok(None),
            }
        };
        let (ls1, ls2) = (layer_scale("ls1")?, layer_scale("ls2")?);
        let fused_residual = kernels::cuda::available(vb.device(), vb.dtype());
        let (fold1, fold2) = match fused_residual {
            true => (ls1.as_ref(), ls2.as_ref()),
            false => (None, None),
        };
        let cast = |t: Option<Tensor>| -> Result<Option<Tensor>> {
            match (t, fused_residual) {
                (Some(t), false) => t.to_dtype(vb.dtype()).map(Some),
                _ => Ok(None),
            }
        };
        Ok(Self {
            norm1: LayerNorm::load(d, LN_EPS, vb.pp("norm1"))?,
            attn: Attention::new(&cfg.model_args, vb.pp("attn"), fold1)?,
            norm2: LayerNorm::load(d, LN_EPS, vb.pp("norm2"))?,
            mlp: SwiGluPacked::new(cfg, vb.pp("mlp"), fold2)?,
            ls1: cast(ls1)?,
            ls2: cast(ls2)?,
            fused_residual,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fused_residual {
            let xs = self.attn.forward_residual(&self.norm1.forward(xs)?, xs)?;
            return self.mlp.forward_residual(&self.norm2.forward(&xs)?, &xs);
        }
        let residual = |x: &Tensor, y: Tensor, gamma: &Option<Tensor>| match gamma {
            Some(g) => scaled_residual(x, &y, g),
            None => x + y,
        };
        let xs = residual(xs, self.attn.forward(&self.norm1.forward(xs)?)?, &self.ls1)?;
        residual(&xs, self.mlp.forward(&self.norm2.forward(&xs)?)?, &self.ls2)
    }
}

/// The tile encoder. `forward` maps `pixel_values` [B, 3, 224, 224] to the CLS embedding [B, D].
#[derive(Debug, Clone)]
pub struct TileEncoder {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    cfg: Config,
    dtype: DType,
}

impl TileEncoder {
    /// Builds the model from a `VarBuilder` holding timm's key names.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let a = &cfg.model_args;
        let d = a.embed_dim;
        let tokens = 1 + cfg.grid() * cfg.grid();
        let blocks = (0..a.depth)
            .map(|i| Block::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(a, vb.pp("patch_embed"))?,
            cls_token: vb.get((1, 1, d), "cls_token")?,
            pos_embed: vb.get((1, tokens, d), "pos_embed")?,
            blocks,
            norm: LayerNorm::load(d, LN_EPS, vb.pp("norm"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads `config.json` and `model.safetensors` (preferred) or `pytorch_model.bin` from `dir`.
    pub fn load(dir: &Path, precision: &Precision) -> crate::Result<Self> {
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let weights = find_file(dir, &["model.safetensors", "pytorch_model.bin"])?;
        let vb = var_builder(&weights, None, precision.dtype, &precision.device)?;
        Self::new(&cfg, vb).map_err(|cause| crate::Error::Weights {
            path: weights,
            cause,
        })
    }

    /// The parsed config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Embedding width D.
    pub fn embed_dim(&self) -> usize {
        self.cfg.model_args.embed_dim
    }

    /// Input side in pixels (224).
    pub fn img_size(&self) -> usize {
        self.cfg.model_args.img_size
    }

    /// Tokens after the last block, before the final norm: [B, 1 + (img/patch)^2, D].
    fn features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let xs = self
            .patch_embed
            .forward(&pixel_values.to_dtype(self.dtype)?)?;
        let b = xs.dim(0)?;
        let cls = self.cls_token.expand((b, 1, self.embed_dim()))?;
        let mut xs = Tensor::cat(&[&cls, &xs], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            xs = block.forward(&xs)?;
        }
        Ok(xs)
    }

    /// All tokens after the final norm: [B, 1 + (img/patch)^2, D], CLS first.
    pub fn forward_tokens(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.features(pixel_values)?)
    }

    /// Checks `pixel_values` (any float dtype, [B, C, img, img]) and returns the f32 CLS
    /// embeddings [B, D]; errors name the expected shape instead of failing inside a matmul.
    pub fn embed(&self, pixel_values: &Tensor) -> crate::Result<Tensor> {
        let a = &self.cfg.model_args;
        let want = [a.in_chans, a.img_size, a.img_size];
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[1..] != want {
            return Err(crate::Error::input(format!(
                "pixel_values has shape {dims:?}, expected [B, {}, {}, {}]",
                want[0], want[1], want[2]
            )));
        }
        if !pixel_values.dtype().is_float() {
            return Err(crate::Error::input(format!(
                "pixel_values has dtype {:?}, expected a float dtype",
                pixel_values.dtype()
            )));
        }
        let xs = pixel_values.to_device(self.cls_token.device())?;
        Ok(self.forward(&xs)?.to_dtype(DType::F32)?)
    }
}

impl Module for TileEncoder {
    /// `pixel_values` [B, 3, 224, 224] -> CLS embedding [B, D] (in the model dtype).
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        // The norm is per token, so only the CLS row needs it.
        let cls = self.features(pixel_values)?.narrow(1, 0, 1)?.squeeze(1)?;
        self.norm.forward(&cls)
    }
}
