//! Encoder benchmarks, run by `scripts/bench-encoders.sh` next to PyTorch (not a timed test).
//!
//! ```text
//! bench_encoders tile  --model DIR --input pixels.safetensors [--iters N]
//! bench_encoders slide --tiles N [--layers 12]
//! bench_encoders ops   [--batch 16] [--dim 1536] [--heads 24] [--hidden 8192]
//! ```
//! `ops` times each operation of one tile-encoder block with the giant block's shapes, for the
//! per-op comparison with PyTorch (`scripts/bench_encoders.py` prints both).
//! Each prints one JSON line on stdout: tiles/s for the tile encoder (same weights and input as the
//! PyTorch side), wall time and peak RSS (VmHWM) for the full-size slide encoder with random
//! weights. Run each case in its own process so the peak RSS is that case's alone.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use gigapath_models::slide_encoder::{Config, SlideEncoder};
use gigapath_models::{Precision, TileEncoder};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Peak resident set size of this process in MiB, from /proc/self/status.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Random weights with the right shapes: N(0, 0.02), norm scales around 1.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let is_norm_scale =
            (name.contains("norm") || name.contains("_ln")) && name.ends_with("weight");
        let mean = if is_norm_scale { 1.0 } else { 0.0 };
        Tensor::randn(mean, 0.02f32, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn tile(args: &[String]) -> anyhow::Result<()> {
    let model_dir = arg(args, "--model").expect("--model DIR");
    let input = arg(args, "--input").expect("--input FILE");
    let iters: usize = arg(args, "--iters").map_or(3, |s| s.parse().unwrap());
    let model = TileEncoder::load(model_dir.as_ref(), &Precision::cpu())?;
    let pixels = candle_core::safetensors::load(&input, &Device::Cpu)?
        .remove("pixel_values")
        .expect("pixel_values");
    let batch = pixels.dim(0)?;
    let out = model.embed(&pixels)?; // warm-up, also the output the caller compares
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        model.embed(&pixels)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if let Some(path) = arg(args, "--output") {
        let map = std::collections::HashMap::from([("embedding".to_string(), out)]);
        candle_core::safetensors::save(&map, path)?;
    }
    println!(
        "{}",
        serde_json::json!({"batch": batch, "seconds": median, "tiles_per_s": batch as f64 / median})
    );
    Ok(())
}

fn slide(args: &[String]) -> anyhow::Result<()> {
    let tiles: usize = arg(args, "--tiles").expect("--tiles N").parse()?;
    let mut cfg = Config::default();
    if let Some(layers) = arg(args, "--layers") {
        cfg.depth = layers.parse()?;
    }
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    let model = SlideEncoder::new(&cfg, vb)?;
    let features = Tensor::randn(0f32, 1.0, (tiles, cfg.in_chans), &Device::Cpu)?;
    // Row-major tiles of a square-ish slide, as the tiler emits them.
    let side = (tiles as f64).sqrt().ceil() as u32;
    let cells: Vec<[u32; 2]> = (0..tiles as u32).map(|i| [i % side, i / side]).collect();
    let rss_before = peak_rss_mib();
    let t = Instant::now();
    let out = model.encode_cells(&features, &cells)?;
    let seconds = t.elapsed().as_secs_f64();
    let norm: f32 = out.cls.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
    println!(
        "{}",
        serde_json::json!({
            "tiles": tiles, "layers": cfg.depth, "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss_before,
            "cls_norm": norm,
        })
    );
    Ok(())
}

/// Median seconds of `f` over `iters` runs after one warm-up.
fn time<T>(iters: usize, mut f: impl FnMut() -> candle_core::Result<T>) -> anyhow::Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        std::hint::black_box(f()?);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One tile-encoder block, op by op, through the same functions the model uses.
fn ops(args: &[String]) -> anyhow::Result<()> {
    use candle_core::Module;
    use candle_nn::Linear;
    use gigapath_models::nn::{scaled_residual, swiglu_packed, LayerNorm};
    use gigapath_models::tile_encoder::attention_from_qkv;
    let get = |name: &str, default: usize| arg(args, name).map_or(default, |s| s.parse().unwrap());
    let (b, d, heads, hidden) = (
        get("--batch", 16),
        get("--dim", 1536),
        get("--heads", 24),
        get("--hidden", 8192),
    );
    let iters = get("--iters", 5);
    let n = 197;
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev);
    let linear = |i: usize, o: usize| -> candle_core::Result<Linear> {
        Ok(Linear::new(rand(&[o, i])?, Some(rand(&[o])?)))
    };
    let x = rand(&[b, n, d])?;
    let ln = LayerNorm::new(
        Tensor::ones(d, DType::F32, &dev)?,
        Tensor::zeros(d, DType::F32, &dev)?,
        1e-6,
    )?;
    let (qkv, proj, fc1, fc2) = (
        linear(d, 3 * d)?,
        linear(d, d)?,
        linear(d, hidden)?,
        linear(hidden / 2, d)?,
    );
    let gamma = rand(&[d])?;
    let qkv_out = qkv.forward(&x)?;
    let h = fc1.forward(&x)?;
    let gated = swiglu_packed(&h)?;
    let rows: Vec<(&str, f64)> = vec![
        ("layer_norm", time(iters, || ln.forward(&x))?),
        ("qkv linear", time(iters, || qkv.forward(&x))?),
        (
            "attention",
            time(iters, || attention_from_qkv(&qkv_out, heads))?,
        ),
        ("proj linear", time(iters, || proj.forward(&x))?),
        (
            "layer scale + residual",
            time(iters, || scaled_residual(&x, &x, &gamma))?,
        ),
        ("fc1 linear", time(iters, || fc1.forward(&x))?),
        ("SwiGLU gate", time(iters, || swiglu_packed(&h))?),
        ("fc2 linear", time(iters, || fc2.forward(&gated))?),
    ];
    let map: serde_json::Map<String, serde_json::Value> = rows
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    println!("{}", serde_json::Value::Object(map));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("tile") => tile(&args),
        Some("slide") => slide(&args),
        Some("ops") => ops(&args),
        _ => anyhow::bail!("usage: bench_encoders tile --model DIR --input FILE | slide --tiles N"),
    }
}
