//! BERT-family text encoders (PubMedBERT, BiomedBERT, all-MiniLM-L6-v2, ...) with their tokenizer.
//!
//! A Hugging Face model folder: `config.json`, `model.safetensors` or `pytorch_model.bin` (keys with
//! or without the `bert.` prefix; an MLM head is ignored), and either `tokenizer.json` or, as older
//! PubMedBERT folders ship, `vocab.txt` (+ `tokenizer_config.json` for `do_lower_case`).
//! Output: CLS or attention-mask-aware mean pooling of the last hidden state, optionally
//! L2-normalised. Inputs are truncated to the model's maximum length (512 at most).
//!
//! The model is written here rather than taken from `candle_transformers::models::bert` so its
//! LayerNorms and softmax keep a gradient path ([`crate::kernels`]): the top layers are fine-tuned for
//! the CLIP alignment.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::nn::Linear;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::device::Precision;
use crate::kernels::softmax_last_dim;
use crate::nn::{linear, LayerNorm};
use crate::weights::{find_file, read_json, var_builder};
use crate::Error;

/// The longest input BERT-family models accept.
pub const MAX_TOKENS: usize = 512;

/// Hugging Face `BertConfig` (only the fields that shape the network; others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width D.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// FFN activation: `gelu` (exact), `gelu_new` / `gelu_pytorch_tanh` (tanh form) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Rows of the position table.
    pub max_position_embeddings: usize,
    /// Rows of the token type table.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm eps.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// `bert` for the models this module targets.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl Config {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let cfg: Self = read_json(path)?;
        let fail = |msg: String| Err(Error::config(path, msg));
        if let Some(t) = cfg.position_embedding_type.as_deref() {
            if t != "absolute" {
                return fail(format!("position_embedding_type {t:?} is not supported"));
            }
        }
        if let Some(t) = cfg.model_type.as_deref() {
            if !matches!(t, "bert" | "BertModel") {
                return fail(format!(
                    "model_type {t:?}: only BERT-family models are supported"
                ));
            }
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return fail(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            ));
        }
        if !matches!(
            cfg.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return fail(format!("hidden_act {:?} is not supported", cfg.hidden_act));
        }
        Ok(cfg)
    }
}

struct Embeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl Embeddings {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let table = |n: usize, name: &str| -> Result<Embedding> {
            Ok(Embedding::new(vb.pp(name).get((n, d), "weight")?, d))
        };
        Ok(Self {
            word_embeddings: table(cfg.vocab_size, "word_embeddings")?,
            position_embeddings: table(cfg.max_position_embeddings, "position_embeddings")?,
            token_type_embeddings: table(cfg.type_vocab_size, "token_type_embeddings")?,
            layer_norm: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `input_ids` [B, T] -> [B, T, D]; token type 0 and positions 0..T, as single-text BERT uses.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let types = Tensor::zeros(t, DType::U32, input_ids.device())?;
        let xs = self
            .word_embeddings
            .forward(input_ids)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?
            .broadcast_add(&self.token_type_embeddings.forward(&types)?)?;
        self.layer_norm.forward(&xs)
    }
}

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    output_norm: LayerNorm,
    num_heads: usize,
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let out = vb.pp("output");
        Ok(Self {
            query: linear(d, d, vb.pp("self").pp("query"))?,
            key: linear(d, d, vb.pp("self").pp("key"))?,
            value: linear(d, d, vb.pp("self").pp("value"))?,
            output: linear(d, d, out.pp("dense"))?,
            output_norm: LayerNorm::load(d, cfg.layer_norm_eps, out.pp("LayerNorm"))?,
            num_heads: cfg.num_attention_heads,
        })
    }

    /// `xs` [B, T, D], `mask_bias` [B, 1, 1, T] (0 or a large negative) -> [B, T, D].
    fn forward(&self, xs: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let dh = d / self.num_heads;
        let heads = |l: &Linear| -> Result<Tensor> {
            l.forward(xs)?
                .reshape((b, t, self.num_heads, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (heads(&self.query)? * (dh as f64).powf(-0.5))?;
        let (k, v) = (heads(&self.key)?, heads(&self.value)?);
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask_bias)?;
        let ctx = softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        self.output_norm
            .forward(&(self.output.forward(&ctx)? + xs)?)
    }
}

struct Layer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: String,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            attention: SelfAttention::new(cfg, vb.pp("attention"))?,
            intermediate: linear(d, f, vb.pp("intermediate").pp("dense"))?,
            output: linear(f, d, vb.pp("output").pp("dense"))?,
            output_norm: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            act: cfg.hidden_act.clone(),
        })
    }

    fn forward(&self, xs: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let xs = self.attention.forward(xs, mask_bias)?;
        let h = self.intermediate.forward(&xs)?;
        let h = match self.act.as_str() {
            "gelu" => h.gelu_erf()?,
            "relu" => h.relu()?,
            _ => h.gelu()?,
        };
        self.output_norm.forward(&(self.output.forward(&h)? + xs)?)
    }
}

/// The BERT encoder (embeddings + layers, no pooler).
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    dtype: DType,
}

impl Bert {
    /// Builds the model; keys may carry a `bert.` prefix (as `BertForMaskedLM` saves them) or not.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp("encoder").pp("layer").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            dtype: vb.dtype(),
        })
    }

    /// `input_ids`, `attention_mask` [B, T] (u32) -> last hidden state [B, T, D].
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_layers(input_ids, attention_mask, self.layers.len())
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The hidden state after the embeddings and the first `layers` layers, [B, T, D]: the input
    /// of a [`BertTail`] that fine-tunes the remaining layers.
    pub fn forward_layers(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        layers: usize,
    ) -> Result<Tensor> {
        if layers > self.layers.len() {
            candle_core::bail!(
                "hidden state after {layers} layers asked of a {}-layer BERT",
                self.layers.len()
            )
        }
        let mask_bias = attention_mask_bias(attention_mask, self.dtype)?;
        let mut xs = self.embeddings.forward(input_ids)?.to_dtype(self.dtype)?;
        for layer in &self.layers[..layers] {
            xs = layer.forward(&xs, &mask_bias)?;
        }
        Ok(xs)
    }
}

/// `attention_mask` [B, T] (1 = token, 0 = padding) -> additive attention bias [B, 1, 1, T].
fn attention_mask_bias(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    // -1e4 rather than the dtype's minimum: exp() of it is exactly 0 in f32, bf16 and f16 alike.
    ((attention_mask.to_dtype(dtype)? - 1.0)? * 1e4)?.reshape((b, 1, 1, t))
}

/// The top layers of a BERT, owned apart from the model so that they can be fine-tuned (CLIP
/// alignment, `crate::align`) while the embeddings and lower layers stay frozen.
///
/// Built from a `VarBuilder` positioned where `encoder.layer.{i}.*` live (no `bert.` prefix), so a
/// fine-tuned tail saves and loads under the original key names. LayerNorm and softmax take their
/// differentiable paths whenever a weight is a `Var` (see [`crate::nn`]).
pub struct BertTail {
    first_layer: usize,
    layers: Vec<Layer>,
    dtype: DType,
}

impl BertTail {
    /// Layers `first_layer..num_hidden_layers`.
    pub fn new(cfg: &Config, first_layer: usize, vb: VarBuilder) -> Result<Self> {
        if first_layer >= cfg.num_hidden_layers {
            candle_core::bail!(
                "a BERT tail from layer {first_layer} of a {}-layer model is empty",
                cfg.num_hidden_layers
            )
        }
        let layers = (first_layer..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp("encoder").pp("layer").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            first_layer,
            layers,
            dtype: vb.dtype(),
        })
    }

    /// Index of the first layer this tail runs.
    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    /// Hidden state [B, T, D] after layer `first_layer - 1` (from [`Bert::forward_layers`]) and
    /// its attention mask [B, T] -> last hidden state [B, T, D] (f32).
    pub fn forward(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mask_bias = attention_mask_bias(attention_mask, self.dtype)?;
        let mut xs = hidden.to_dtype(self.dtype)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask_bias)?;
        }
        xs.to_dtype(DType::F32)
    }
}

/// How token states become one text embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPool {
    /// The `[CLS]` token's last hidden state (MI-Zero's PubMedBERT setup).
    Cls,
    /// Mean over real (unpadded) tokens (sentence-transformers, all-MiniLM-L6-v2).
    Mean,
}

/// A tokenised batch: ids and attention mask, [B, T] each, padded to the longest text.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Token ids.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
}

/// A BERT-family model with its tokenizer.
pub struct TextEncoder {
    model: Bert,
    tokenizer: Tokenizer,
    device: Device,
    config: Config,
}

impl TextEncoder {
    /// Loads model and tokenizer from a Hugging Face folder (see the module docs).
    pub fn load(dir: &Path, precision: &Precision) -> crate::Result<Self> {
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let weights = find_file(dir, &["model.safetensors", "pytorch_model.bin"])?;
        let vb = var_builder(&weights, None, precision.dtype, &precision.device)?;
        let model = Bert::new(&cfg, vb).map_err(|cause| Error::Weights {
            path: weights,
            cause,
        })?;
        let max_len = max_length(dir, &cfg)?;
        let tokenizer = load_tokenizer(dir, max_len)?;
        Ok(Self {
            model,
            tokenizer,
            device: precision.device.clone(),
            config: cfg,
        })
    }

    /// Embedding width D.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The model's `config.json`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The tokenizer (truncation and batch padding already configured).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model, for callers that need token states or gradients.
    pub fn model(&self) -> &Bert {
        &self.model
    }

    /// Tokenises texts with `[CLS] ... [SEP]`, truncation and padding to the longest.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> crate::Result<TokenBatch> {
        if texts.is_empty() {
            return Err(Error::input("no texts to encode"));
        }
        let inputs: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
        let enc = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let t = enc[0].get_ids().len();
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        Ok(TokenBatch {
            input_ids: Tensor::from_vec(ids, (enc.len(), t), &self.device)?,
            attention_mask: Tensor::from_vec(mask, (enc.len(), t), &self.device)?,
        })
    }

    /// Last hidden state [B, T, D] (f32) of a tokenised batch.
    pub fn hidden_states(&self, batch: &TokenBatch) -> crate::Result<Tensor> {
        Ok(self
            .model
            .forward(&batch.input_ids, &batch.attention_mask)?
            .to_dtype(DType::F32)?)
    }

    /// Text embeddings [B, D] (f32): pooled, then L2-normalised if `normalize`.
    pub fn encode<S: AsRef<str>>(
        &self,
        texts: &[S],
        pool: TextPool,
        normalize: bool,
    ) -> crate::Result<Tensor> {
        let batch = self.tokenize(texts)?;
        let states = self.hidden_states(&batch)?;
        let pooled = pool_states(&states, &batch.attention_mask, pool)?;
        Ok(if normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        })
    }
}

/// Pools [B, T, D] states with a [B, T] mask into [B, D].
pub fn pool_states(states: &Tensor, attention_mask: &Tensor, pool: TextPool) -> Result<Tensor> {
    match pool {
        TextPool::Cls => states.narrow(1, 0, 1)?.squeeze(1),
        TextPool::Mean => {
            let mask = attention_mask
                .to_dtype(states.dtype())?
                .unsqueeze(D::Minus1)?;
            let sum = states.broadcast_mul(&mask)?.sum(1)?;
            // sentence-transformers clamps the token count at 1e-9.
            let count = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
            sum.broadcast_div(&count)
        }
    }
}

/// `x / max(||x||, 1e-12)` per row, as `torch.nn.functional.normalize`.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    xs.broadcast_div(&norm)
}

/// Truncation length: 512, the position table, and sentence-transformers' `max_seq_length` if the
/// folder has a `sentence_bert_config.json` (256 for all-MiniLM-L6-v2), whichever is smallest.
fn max_length(dir: &Path, cfg: &Config) -> crate::Result<usize> {
    #[derive(Deserialize)]
    struct SentenceBert {
        max_seq_length: Option<usize>,
    }
    let mut max_len = MAX_TOKENS.min(cfg.max_position_embeddings);
    let st = dir.join("sentence_bert_config.json");
    if st.is_file() {
        if let Some(n) = read_json::<SentenceBert>(&st)?.max_seq_length {
            max_len = max_len.min(n);
        }
    }
    Ok(max_len)
}

/// `tokenizer.json` if present, else a BERT WordPiece tokenizer built from `vocab.txt`; either way
/// truncating to `max_len` and padding each batch to its longest text.
pub fn load_tokenizer(dir: &Path, max_len: usize) -> crate::Result<Tokenizer> {
    let tok_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let json = dir.join("tokenizer.json");
    let mut tokenizer = if json.is_file() {
        Tokenizer::from_file(&json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?
    } else {
        wordpiece_from_vocab(dir)?
    };
    let pad_token = "[PAD]";
    let pad_id = tokenizer.token_to_id(pad_token).unwrap_or(0);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(tok_err)?;
    tokenizer.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::BatchLongest,
        pad_id,
        pad_token: pad_token.into(),
        ..Default::default()
    }));
    Ok(tokenizer)
}

/// The `BertTokenizer` of `transformers` rebuilt from `vocab.txt` and `tokenizer_config.json`.
fn wordpiece_from_vocab(dir: &Path) -> crate::Result<Tokenizer> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;

    #[derive(Deserialize, Default)]
    struct TokenizerConfig {
        do_lower_case: Option<bool>,
        strip_accents: Option<bool>,
        tokenize_chinese_chars: Option<bool>,
        unk_token: Option<String>,
        cls_token: Option<String>,
        sep_token: Option<String>,
    }
    let vocab = find_file(dir, &["vocab.txt"]).map_err(|_| {
        Error::Tokenizer(format!(
            "{}: neither tokenizer.json nor vocab.txt found",
            dir.display()
        ))
    })?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: TokenizerConfig = if cfg_path.is_file() {
        read_json(&cfg_path)?
    } else {
        TokenizerConfig::default()
    };
    let unk = cfg.unk_token.unwrap_or_else(|| "[UNK]".into());
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token(unk)
        .build()
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", vocab.display())))?;
    let mut tokenizer = Tokenizer::new(model);
    let special = |name: Option<String>, default: &str| -> crate::Result<(String, u32)> {
        let token = name.unwrap_or_else(|| default.into());
        let id = tokenizer
            .token_to_id(&token)
            .ok_or_else(|| Error::Tokenizer(format!("{}: no {token} token", vocab.display())))?;
        Ok((token, id))
    };
    let cls = special(cfg.cls_token, "[CLS]")?;
    let sep = special(cfg.sep_token, "[SEP]")?;
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(
            true,
            cfg.tokenize_chinese_chars.unwrap_or(true),
            cfg.strip_accents,
            cfg.do_lower_case.unwrap_or(true),
        )))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(sep, cls)));
    tokenizer.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    Ok(tokenizer)
}
