//! `gigapath encode {tile,slide,text}`: run one encoder on tensors from a file.
//!
//! Inputs are safetensors (or JSON for texts), outputs a safetensors file with one f32 tensor,
//! `embedding`, written atomically (temp file + rename: an error never leaves a partial file).
//! A one-line JSON summary goes to stdout. These commands are how users check our encoders against
//! the reference implementations on their own weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand, ValueEnum};
use gigapath_models::text_encoder::TextPool;
use gigapath_models::tile_transform::{tiles_to_pixel_values, CROP_PX};
use gigapath_models::{Precision, SlideEncoder, SlidePool, TextEncoder, TileEncoder};

#[derive(Subcommand)]
pub enum EncodeCommand {
    /// Tile encoder (timm ViT): `tiles` u8 `[B,256,256,3]` or `pixel_values` f32 `[B,3,224,224]` in,
    /// `embedding` f32 `[B,D]` out.
    Tile(TileArgs),
    /// Slide encoder (LongNet): `features` f32 `[N,in_chans]` and `coords` f32 `[N,2]` (level-0 pixels,
    /// x then y, in sequence order) in, `embedding` f32 `[D]` (or `[depth+1,D]` with --all-layers) out.
    Slide(SlideArgs),
    /// Text encoder (BERT family): texts in, `embedding` f32 `[B,D]` out.
    Text(TextArgs),
}

/// Where and in which precision a model runs.
#[derive(Args)]
pub struct DeviceArgs {
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight and activation dtype: `f32`, or `bf16` / `f16` on CUDA. Norms and softmax
    /// statistics stay f32.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

impl DeviceArgs {
    fn precision(&self) -> Result<Precision> {
        Ok(Precision::parse(&self.device, &self.dtype)?)
    }
}

#[derive(Args)]
pub struct TileArgs {
    /// Model folder: timm `config.json` + `pytorch_model.bin` or `model.safetensors`.
    #[arg(long)]
    model: PathBuf,
    /// safetensors with `tiles` (u8 `[B,256,256,3]`, RGB) or `pixel_values` (f32 `[B,3,224,224]`).
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors (`embedding` f32 `[B,D]`).
    #[arg(long)]
    output: PathBuf,
    /// Tiles per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum Pool {
    /// The CLS token.
    Cls,
    /// Mean over tokens (tile tokens for slides, unpadded tokens for texts).
    Mean,
}

#[derive(Args)]
pub struct SlideArgs {
    /// Model folder: `slide_encoder.pth` (+ optional `config.json`; default the official config).
    #[arg(long)]
    model: PathBuf,
    /// safetensors with `features` (f32 `[N,in_chans]`) and `coords` (f32 `[N,2]`, level-0 px, x, y).
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors (`embedding`).
    #[arg(long)]
    output: PathBuf,
    /// CLS token (the release's default) or mean of the tile tokens (its `global_pool`).
    #[arg(long, value_enum, default_value = "cls")]
    pool: Pool,
    /// Output every hidden state s0..s_depth (without the encoder's final LayerNorm), pooled and
    /// normalised: [depth+1, D].
    #[arg(long)]
    all_layers: bool,
    /// Level-0 tile size in pixels that coordinates are divided by (default: the config's, 256).
    #[arg(long)]
    tile_size: Option<f32>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct TextArgs {
    /// Hugging Face BERT-family folder (config.json, weights, tokenizer.json or vocab.txt).
    #[arg(long)]
    model: PathBuf,
    /// A text to encode (repeat for a batch).
    #[arg(
        long = "text",
        conflicts_with = "input",
        required_unless_present = "input"
    )]
    texts: Vec<String>,
    /// JSON file `{"texts": [...]}`.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Output safetensors (`embedding` f32 `[B,D]`).
    #[arg(long)]
    output: PathBuf,
    /// CLS token or attention-mask-aware mean (sentence-transformers models use mean).
    #[arg(long, value_enum, default_value = "mean")]
    pool: Pool,
    /// L2-normalise each embedding.
    #[arg(long)]
    normalize: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(cmd: EncodeCommand) -> Result<()> {
    match cmd {
        EncodeCommand::Tile(a) => tile(a),
        EncodeCommand::Slide(a) => slide(a),
        EncodeCommand::Text(a) => text(a),
    }
}

fn tile(args: TileArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let precision = args.device.precision()?;
    let inputs = read_safetensors(&args.input)?;
    let model = TileEncoder::load(&args.model, &precision)
        .with_context(|| format!("loading tile encoder from {}", args.model.display()))?;
    let embedding = if let Some(tiles) = inputs.get("tiles") {
        encode_tiles(&model, tiles, args.batch_size)?
    } else if let Some(pixels) = inputs.get("pixel_values") {
        let n = pixels.dim(0).unwrap_or(0);
        let mut parts = Vec::new();
        for start in (0..n).step_by(args.batch_size) {
            let batch = pixels.narrow(0, start, args.batch_size.min(n - start))?;
            parts.push(model.embed(&batch).context("pixel_values")?);
        }
        concat(parts, model.embed_dim())?
    } else {
        bail!(
            "{}: no `tiles` (u8 [B,256,256,3]) or `pixel_values` (f32 [B,3,{CROP_PX},{CROP_PX}]) tensor; found {}",
            args.input.display(),
            names(&inputs)
        );
    };
    write_embedding(&args.output, &embedding, &args.model)
}

fn encode_tiles(model: &TileEncoder, tiles: &Tensor, batch_size: usize) -> Result<Tensor> {
    let dims = tiles.dims();
    if tiles.dtype() != DType::U8 || dims.len() != 4 || dims[3] != 3 {
        bail!(
            "`tiles` is {:?} {dims:?}, expected u8 [B, H, W, 3] (RGB)",
            tiles.dtype()
        );
    }
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    let device = Device::Cpu;
    let mut parts = Vec::new();
    for start in (0..n).step_by(batch_size) {
        let b = batch_size.min(n - start);
        let bytes: Vec<u8> = tiles.narrow(0, start, b)?.flatten_all()?.to_vec1()?;
        let pixels = tiles_to_pixel_values(&bytes, b, h, w).context("`tiles`")?;
        let pixels = Tensor::from_vec(pixels, (b, 3, CROP_PX, CROP_PX), &device)?;
        parts.push(model.embed(&pixels)?);
        tracing::debug!(done = start + b, total = n, "tiles encoded");
    }
    concat(parts, model.embed_dim())
}

fn concat(parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if parts.is_empty() {
        return Ok(Tensor::zeros((0, dim), DType::F32, &Device::Cpu)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

fn slide(args: SlideArgs) -> Result<()> {
    let precision = args.device.precision()?;
    let inputs = read_safetensors(&args.input)?;
    let get = |name: &str, what: &str| {
        inputs.get(name).with_context(|| {
            format!(
                "{}: no `{name}` tensor ({what}); found {}",
                args.input.display(),
                names(&inputs)
            )
        })
    };
    let features = get("features", "f32 [N, in_chans]")?;
    let coords = get("coords", "f32 [N, 2], level-0 pixels x, y")?;
    for (name, t) in [("features", features), ("coords", coords)] {
        if !t.dtype().is_float() {
            bail!("`{name}` has dtype {:?}, expected f32", t.dtype());
        }
    }
    let model = SlideEncoder::load(&args.model, &precision)
        .with_context(|| format!("loading slide encoder from {}", args.model.display()))?;
    let tile_size = args.tile_size.unwrap_or(model.config().tile_size as f32);
    let out = model.encode(features, coords, tile_size)?;
    let pool = match args.pool {
        Pool::Cls => SlidePool::Cls,
        Pool::Mean => SlidePool::Mean,
    };
    write_embedding(&args.output, out.select(pool, args.all_layers), &args.model)
}

fn text(args: TextArgs) -> Result<()> {
    let texts = match &args.input {
        Some(path) => read_texts(path)?,
        None => args.texts.clone(),
    };
    if texts.is_empty() {
        bail!("no texts to encode");
    }
    let precision = args.device.precision()?;
    let model = TextEncoder::load(&args.model, &precision)
        .with_context(|| format!("loading text encoder from {}", args.model.display()))?;
    let pool = match args.pool {
        Pool::Cls => TextPool::Cls,
        Pool::Mean => TextPool::Mean,
    };
    let embedding = model.encode(&texts, pool, args.normalize)?;
    write_embedding(&args.output, &embedding, &args.model)
}

fn read_texts(path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Texts {
        texts: Vec<String>,
    }
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let parsed: Texts = serde_json::from_str(&raw)
        .with_context(|| format!("{}: expected {{\"texts\": [\"...\", ...]}}", path.display()))?;
    Ok(parsed.texts)
}

fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading input {}", path.display()))
}

fn names(tensors: &HashMap<String, Tensor>) -> String {
    let mut names: Vec<String> = tensors
        .iter()
        .map(|(k, t)| format!("`{k}` {:?} {:?}", t.dtype(), t.dims()))
        .collect();
    names.sort();
    if names.is_empty() {
        "no tensors".into()
    } else {
        names.join(", ")
    }
}

/// Writes `{"embedding": t}` (f32, on CPU) next to `path` and renames it into place.
fn write_embedding(path: &Path, embedding: &Tensor, model: &Path) -> Result<()> {
    let embedding = embedding.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let file_name = path
        .file_name()
        .with_context(|| format!("output {} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let tensors = HashMap::from([("embedding".to_string(), embedding.clone())]);
    let written = candle_core::safetensors::save(&tensors, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    let summary = serde_json::json!({
        "output": path,
        "tensor": "embedding",
        "shape": embedding.dims(),
        "model": model,
    });
    println!("{summary}");
    Ok(())
}
