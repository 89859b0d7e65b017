//! Encoder benchmarks, run by `scripts/bench-encoders.sh` next to PyTorch (not a timed test).
//!
//! ```text
//! bench_encoders tile   --model DIR --input pixels.safetensors [--iters N]
//! bench_encoders tile   --random [--depth 40 --dim 1536 --heads 24] --batch B [--iters N]
//! bench_encoders slide  --tiles N [--layers 12]
//! bench_encoders ops    [--batch 16] [--dim 1536] [--heads 24] [--hidden 8192]
//! bench_encoders parity --fixtures DIR
//! bench_encoders kernels
//! bench_encoders slide-ops --tiles N
//! ```
//! `slide-ops` times the parts of one slide-encoder layer at N tiles (CUDA half precision: each
//! dilated-attention branch alone, the whole dilated attention, the projections, the FFN).
//! `kernels` checks each fused CUDA kernel of `gigapath_models::kernels::cuda` (flash attention, the
//! dilated attention through it, LayerNorm, SwiGLU, cuBLASLt linear with bias and residual)
//! against the plain candle ops in f32 on the same inputs, at `--dtype` (bf16 / f16), and fails
//! above 2e-2 relative error.
//! `tile`, `slide` and `parity` take `--device cpu|cuda[:N]` and `--dtype f32|bf16|f16` (half
//! precision on CUDA only); `scripts/gpu_check.py` runs them on a lent GPU next to PyTorch.
//! `parity` runs the tile and slide fixtures of `tests/fixtures/reference` at that precision and
//! prints the relative error and max-abs difference of every output.
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

/// `--device` / `--dtype` (default: f32 on CPU).
fn precision(args: &[String]) -> anyhow::Result<Precision> {
    let device = arg(args, "--device").unwrap_or_else(|| "cpu".into());
    let dtype = arg(args, "--dtype").unwrap_or_else(|| "f32".into());
    Ok(Precision::parse(&device, &dtype)?)
}

/// A tile encoder with random weights: the Prov-GigaPath ViT-g unless overridden.
fn random_tile_encoder(args: &[String], precision: &Precision) -> anyhow::Result<TileEncoder> {
    let get = |name: &str, default: usize| arg(args, name).map_or(default, |s| s.parse().unwrap());
    let config = serde_json::json!({
        "architecture": "vit_giant_patch14_dinov2",
        "num_features": get("--dim", 1536),
        "global_pool": "token",
        "model_args": {
            "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": get("--dim", 1536),
            "depth": get("--depth", 40), "num_heads": get("--heads", 24), "init_values": 1e-5,
            "mlp_ratio": 5.33334, "num_classes": 0
        }
    });
    let cfg: gigapath_models::tile_encoder::Config = serde_json::from_value(config)?;
    let vb = VarBuilder::from_backend(
        Box::new(RandomWeights),
        precision.dtype,
        precision.device.clone(),
    );
    Ok(TileEncoder::new(&cfg, vb)?)
}

fn tile(args: &[String]) -> anyhow::Result<()> {
    let iters: usize = arg(args, "--iters").map_or(3, |s| s.parse().unwrap());
    let precision = precision(args)?;
    let (model, pixels) = if args.iter().any(|a| a == "--random") {
        let batch: usize = arg(args, "--batch").map_or(16, |s| s.parse().unwrap());
        let model = random_tile_encoder(args, &precision)?;
        let pixels = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &precision.device)?
            .to_dtype(precision.dtype)?;
        (model, pixels)
    } else {
        let model_dir = arg(args, "--model").expect("--model DIR");
        let input = arg(args, "--input").expect("--input FILE");
        let model = TileEncoder::load(model_dir.as_ref(), &precision)?;
        let pixels = candle_core::safetensors::load(&input, &Device::Cpu)?
            .remove("pixel_values")
            .expect("pixel_values")
            .to_device(&precision.device)?
            .to_dtype(precision.dtype)?;
        (model, pixels)
    };
    let batch = pixels.dim(0)?;
    // Warm-up (and CUDA kernel JIT), also the output the caller compares; `embed` returns f32 and
    // copying it to the host waits for the device.
    let out = model.embed(&pixels)?.to_device(&Device::Cpu)?;
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        model.embed(&pixels)?.to_device(&Device::Cpu)?;
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
        serde_json::json!({
            "side": "candle", "model": "tile", "batch": batch, "dtype": dtype_name(&precision),
            "seconds": median, "tiles_per_s": batch as f64 / median,
        })
    );
    Ok(())
}

fn slide(args: &[String]) -> anyhow::Result<()> {
    let tiles: usize = arg(args, "--tiles").expect("--tiles N").parse()?;
    let mut cfg = Config::default();
    if let Some(layers) = arg(args, "--layers") {
        cfg.depth = layers.parse()?;
    }
    let precision = precision(args)?;
    let vb = VarBuilder::from_backend(
        Box::new(RandomWeights),
        precision.dtype,
        precision.device.clone(),
    );
    let model = SlideEncoder::new(&cfg, vb)?;
    // Row-major tiles of a square-ish slide, as the tiler emits them.
    let cells = |n: usize| -> Vec<[u32; 2]> {
        let side = (n as f64).sqrt().ceil() as u32;
        (0..n as u32).map(|i| [i % side, i / side]).collect()
    };
    let features = |n: usize| Tensor::randn(0f32, 1.0, (n, cfg.in_chans), &precision.device);
    if !precision.device.is_cpu() {
        // Pays the CUDA kernel JIT and cuBLAS set-up outside the timed run.
        model.encode_cells(&features(2000)?, &cells(2000))?;
        precision.device.synchronize()?;
    }
    let (features, cells) = (features(tiles)?, cells(tiles));
    precision.device.synchronize()?;
    let rss_before = peak_rss_mib();
    let t = Instant::now();
    let out = model.encode_cells(&features, &cells)?;
    let cls = out.cls.to_device(&Device::Cpu)?;
    let seconds = t.elapsed().as_secs_f64();
    let norm: f32 = cls.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
    println!(
        "{}",
        serde_json::json!({
            "side": "candle", "model": "slide", "dtype": dtype_name(&precision),
            "tiles": tiles, "layers": cfg.depth, "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss_before,
            "cls_norm": norm,
        })
    );
    Ok(())
}

thread_local! {
    /// The device `time` waits for after each run (CUDA work is asynchronous).
    static SYNC: std::cell::RefCell<Device> = const { std::cell::RefCell::new(Device::Cpu) };
}

/// Median seconds of `f` over `iters` runs after one warm-up.
fn time<T>(iters: usize, mut f: impl FnMut() -> candle_core::Result<T>) -> anyhow::Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        std::hint::black_box(f()?);
        SYNC.with(|d| d.borrow().synchronize())?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One tile-encoder block, op by op, through the same functions the model uses.
fn ops(args: &[String]) -> anyhow::Result<()> {
    use candle_core::Module;
    use gigapath_models::kernels::{scaled_residual, swiglu_packed};
    use gigapath_models::nn::LayerNorm;
    use gigapath_models::nn::Linear; // the layer the models use (one flattened product)
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
    let precision = precision(args)?;
    let dev = precision.device.clone();
    let dtype = precision.dtype;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev)?.to_dtype(dtype);
    let linear = |i: usize, o: usize| -> candle_core::Result<Linear> {
        Ok(Linear::new(rand(&[o, i])?, Some(rand(&[o])?)))
    };
    let x = rand(&[b, n, d])?;
    SYNC.with(|s| *s.borrow_mut() = dev.clone());
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
    // Where a linear layer's time goes: the product alone on the flattened rows, the bias add,
    // and (CUDA) the product with cuBLAS's reduced-precision bf16 compute type.
    let x2 = x.reshape((b * n, d))?;
    let w1t = fc1.weight().t()?;
    let y2 = x2.matmul(&w1t)?;
    let b1 = fc1.bias().expect("bias").clone();
    let mut rows = rows;
    rows.push((
        "fc1 matmul only, [B*N, D] rows",
        time(iters, || x2.matmul(&w1t))?,
    ));
    rows.push((
        "fc1 bias add (broadcast)",
        time(iters, || y2.broadcast_add(&b1))?,
    ));
    rows.push(("silu(h) contiguous", time(iters, || y2.silu())?));
    rows.push(("mul contiguous", time(iters, || &y2 * &y2)?));
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda::set_gemm_reduced_precision_bf16(true);
        rows.push((
            "fc1 matmul only, reduced-precision bf16 gemm",
            time(iters, || x2.matmul(&w1t))?,
        ));
        candle_core::cuda::set_gemm_reduced_precision_bf16(false);
    }
    let map: serde_json::Map<String, serde_json::Value> = rows
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    println!("{}", serde_json::Value::Object(map));
    Ok(())
}

fn dtype_name(precision: &Precision) -> &'static str {
    match precision.dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// (relative error ||got - want|| / ||want||, max-abs difference), in f64 on the host.
fn errors(got: &Tensor, want: &Tensor) -> anyhow::Result<(f64, f64)> {
    anyhow::ensure!(
        got.dims() == want.dims(),
        "shape {:?} vs {:?}",
        got.dims(),
        want.dims()
    );
    let g = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&g - &w)?;
    let norm = |t: &Tensor| -> candle_core::Result<f64> { t.sqr()?.sum_all()?.sqrt()?.to_scalar() };
    let max_abs: f64 = diff.abs()?.max(0)?.to_scalar()?;
    Ok((norm(&diff)? / norm(&w)?, max_abs))
}

/// The tile and slide fixtures at `--device` / `--dtype`: one JSON line of errors per output.
fn parity(args: &[String]) -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(arg(args, "--fixtures").expect("--fixtures DIR"));
    let precision = precision(args)?;
    let load = |p: std::path::PathBuf| candle_core::safetensors::load(p, &Device::Cpu);
    let mut rows = serde_json::Map::new();
    let mut put = |name: &str, got: &Tensor, want: &Tensor| -> anyhow::Result<()> {
        let (rel, max_abs) = errors(got, want)?;
        rows.insert(
            name.into(),
            serde_json::json!({"rel_err": rel, "max_abs": max_abs}),
        );
        Ok(())
    };

    let tile_dir = dir.join("tile_encoder");
    let expected = load(tile_dir.join("expected.safetensors"))?;
    let model = TileEncoder::load(&tile_dir, &precision)?;
    let pixels = expected["pixel_values"]
        .to_device(&precision.device)?
        .to_dtype(precision.dtype)?;
    put(
        "tile/tokens",
        &model.forward_tokens(&pixels)?,
        &expected["tokens"],
    )?;
    put("tile/cls", &model.embed(&pixels)?, &expected["cls"])?;

    let slide_dir = dir.join("slide_encoder");
    let inputs = load(slide_dir.join("inputs.safetensors"))?;
    let expected = load(slide_dir.join("expected.safetensors"))?;
    let model = SlideEncoder::load(&slide_dir, &precision)?;
    let out = model.encode(&inputs["features"], &inputs["coords"], 256.0)?;
    put("slide/cls", &out.cls, &expected["cls"])?;
    put("slide/pool", &out.pool, &expected["pool"])?;
    put(
        "slide/all_layers_cls",
        &out.all_layers_cls,
        &expected["all_layers_cls"],
    )?;
    put(
        "slide/all_layers_pool",
        &out.all_layers_pool,
        &expected["all_layers_pool"],
    )?;
    println!(
        "{}",
        serde_json::json!({"side": "candle", "model": "parity", "dtype": dtype_name(&precision),
                           "outputs": rows})
    );
    Ok(())
}

/// Fused CUDA kernels against the plain ops in f32 on the same (rounded) inputs.
fn kernels(args: &[String]) -> anyhow::Result<()> {
    use candle_core::Module;
    use gigapath_models::dilated_attention::DilatedAttention;
    use gigapath_models::kernels::swiglu_packed;
    use gigapath_models::nn::{LayerNorm, Linear};
    use gigapath_models::tile_encoder::attention_from_qkv;
    let precision = precision(args)?;
    let (dev, dtype) = (precision.device.clone(), precision.dtype);
    anyhow::ensure!(
        gigapath_models::kernels::cuda::available(&dev, dtype),
        "the fused kernels do not run on {dev:?} / {dtype:?} (need CUDA, bf16 or f16, sm_80+)"
    );
    // Half-precision input and its exact f32 copy.
    let rand = |shape: &[usize], mean: f32, std: f32| -> candle_core::Result<(Tensor, Tensor)> {
        let half = Tensor::randn(mean, std, shape, &dev)?.to_dtype(dtype)?;
        let full = half.to_dtype(DType::F32)?;
        Ok((half, full))
    };
    let mut rows = serde_json::Map::new();
    let mut failures = Vec::new();
    let mut put = |name: String, got: &Tensor, want: &Tensor| -> anyhow::Result<()> {
        let (rel, max_abs) = errors(&got.to_dtype(DType::F32)?, &want.to_device(&Device::Cpu)?)?;
        if rel.is_nan() || rel > 2e-2 {
            failures.push(format!("{name}: rel err {rel:.2e}"));
        }
        rows.insert(
            name,
            serde_json::json!({"rel_err": rel, "max_abs": max_abs}),
        );
        Ok(())
    };
    // Tile attention from packed qkv: ViT-g heads, a ragged small case, every head size.
    for (b, n, heads, dh) in [
        (3, 257, 24, 64),
        (2, 70, 4, 48),
        (1, 130, 2, 32),
        (2, 65, 2, 80),
        (1, 64, 2, 96),
        (1, 200, 2, 128),
    ] {
        let (h, f) = rand(&[b, n, 3 * heads * dh], 0.0, 1.0)?;
        put(
            format!("attention b{b} n{n} h{heads} d{dh}"),
            &attention_from_qkv(&h, heads)?,
            &attention_from_qkv(&f, heads)?,
        )?;
    }
    // Dilated attention (its lse mix) at the slide encoder's head size.
    for l in [1000usize, 3001] {
        let att = DilatedAttention::new(&[256, 1024, 4096], &[1, 2, 4], 16, 48)
            .map_err(anyhow::Error::msg)?;
        let (qh, qf) = rand(&[l, 16, 48], 0.0, 1.0)?;
        let (kh, kf) = rand(&[l, 16, 48], 0.0, 1.0)?;
        let (vh, vf) = rand(&[l, 16, 48], 0.0, 1.0)?;
        put(
            format!("dilated attention L{l}"),
            &att.forward(&qh, &kh, &vh)?,
            &att.forward(&qf, &kf, &vf)?,
        )?;
        // The same from views into one packed [L, 3, H, Dh] projection (the GPU layout).
        let packed = Tensor::stack(&[&qh, &kh, &vh], 1)?;
        let part = |i: usize| packed.narrow(1, i, 1)?.squeeze(1);
        put(
            format!("dilated attention L{l}, packed qkv"),
            &att.forward(&part(0)?, &part(1)?, &part(2)?)?,
            &att.forward(&qf, &kf, &vf)?,
        )?;
    }
    // LayerNorm: the tile encoder's width with a large mean (what a one-pass variance gets
    // wrong), the slide encoder's, and its FFN sub-LN with GELU in front (block-per-row kernel).
    for (rows, dim, mean, eps, gelu) in [
        (300, 1536, 20.0, 1e-6, false),
        (77, 768, 0.0, 1e-5, false),
        (200, 3072, 0.0, 1e-5, true),
    ] {
        let (xh, xf) = rand(&[rows, dim], mean, 1.0)?;
        let ln = LayerNorm::new(
            Tensor::randn(1f32, 0.1, dim, &dev)?,
            Tensor::randn(0f32, 0.1, dim, &dev)?,
            eps,
        )?;
        let run = |x: &Tensor| match gelu {
            true => ln.forward_gelu(x),
            false => ln.forward(x),
        };
        let name = format!("{}layer_norm {dim}", if gelu { "gelu + " } else { "" });
        put(name, &run(&xh)?, &run(&xf)?)?;
    }
    let (hh, hf) = rand(&[2, 33, 256], 0.0, 2.0)?;
    put("swiglu".into(), &swiglu_packed(&hh)?, &swiglu_packed(&hf)?)?;
    // Linear with bias, and with bias plus residual, on [B, N, K] rows.
    let (wh, wf) = rand(&[384, 512], 0.0, 0.05)?;
    let (bh, bf) = rand(&[384], 0.0, 1.0)?;
    let (xh, xf) = rand(&[3, 77, 512], 0.0, 1.0)?;
    let (rh, rf) = rand(&[3, 77, 384], 0.0, 1.0)?;
    let (lh, lf) = (Linear::new(wh, Some(bh)), Linear::new(wf, Some(bf)));
    put("linear + bias".into(), &lh.forward(&xh)?, &lf.forward(&xf)?)?;
    put(
        "linear + bias + residual".into(),
        &lh.forward_residual(&xh, &rh)?,
        &lf.forward_residual(&xf, &rf)?,
    )?;
    println!(
        "{}",
        serde_json::json!({"side": "candle", "model": "kernels",
                                      "dtype": dtype_name(&precision), "outputs": rows})
    );
    anyhow::ensure!(
        failures.is_empty(),
        "fused kernels off: {}",
        failures.join("; ")
    );
    Ok(())
}

/// One slide-encoder layer's parts at `--tiles` (full config shapes, random values).
fn slide_ops(args: &[String]) -> anyhow::Result<()> {
    use candle_core::Module;
    use gigapath_models::dilated_attention::{Branch, DilatedAttention};
    use gigapath_models::nn::{LayerNorm, Linear};
    let tiles: usize = arg(args, "--tiles").expect("--tiles N").parse()?;
    let iters = arg(args, "--iters").map_or(3, |s| s.parse().unwrap());
    let cfg = Config::default();
    let precision = precision(args)?;
    let (dev, dtype) = (precision.device.clone(), precision.dtype);
    SYNC.with(|s| *s.borrow_mut() = dev.clone());
    let (l, h, d) = (tiles + 1, cfg.num_heads, cfg.embed_dim);
    let (dh, f) = (d / h, cfg.ffn_dim());
    let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dtype);
    let (q, k, v) = (rand(&[l, h, dh])?, rand(&[l, h, dh])?, rand(&[l, h, dh])?);
    let x = rand(&[l, d])?;
    let hidden = rand(&[l, f])?;
    let linear = |i: usize, o: usize| -> candle_core::Result<Linear> {
        Ok(Linear::new((rand(&[o, i])? * 0.02)?, Some(rand(&[o])?)))
    };
    let (proj, fc1, fc2) = (linear(d, d)?, linear(d, f)?, linear(f, d)?);
    let ln = LayerNorm::new(
        Tensor::ones(f, DType::F32, &dev)?,
        Tensor::zeros(f, DType::F32, &dev)?,
        1e-5,
    )?;
    let scale = (dh as f32).powf(-0.5);
    let mut rows: Vec<(String, f64)> = Vec::new();
    for (&segment_length, &ratio) in cfg.segment_length.iter().zip(&cfg.dilated_ratio) {
        let one = [Branch {
            segment_length,
            ratio,
        }];
        rows.push((
            format!("branch ({segment_length}, {ratio}) fused, mix included"),
            time(iters, || {
                gigapath_models::kernels::cuda::dilated_attention(&q, &k, &v, &one, scale)
                    .map(|y| y.expect("fused path"))
            })?,
        ));
    }
    let att = DilatedAttention::new(&cfg.segment_length, &cfg.dilated_ratio, h, dh)
        .map_err(anyhow::Error::msg)?;
    rows.push((
        "dilated attention, all branches".into(),
        time(iters, || att.forward(&q, &k, &v))?,
    ));
    let qkv = linear(d, 3 * d)?;
    rows.push((
        "packed qkv projection".into(),
        time(iters, || qkv.forward(&x))?,
    ));
    rows.push((
        "q/k/v/out projection (one)".into(),
        time(iters, || proj.forward(&x))?,
    ));
    rows.push((
        "out projection + residual".into(),
        time(iters, || proj.forward_residual(&x, &x))?,
    ));
    rows.push(("fc1".into(), time(iters, || fc1.forward(&x))?));
    rows.push(("gelu (erf)".into(), time(iters, || hidden.gelu_erf())?));
    rows.push(("ffn_layernorm".into(), time(iters, || ln.forward(&hidden))?));
    rows.push((
        "gelu + ffn_layernorm, fused".into(),
        time(iters, || ln.forward_gelu(&hidden))?,
    ));
    let ln768 = LayerNorm::new(
        Tensor::ones(d, DType::F32, &dev)?,
        Tensor::zeros(d, DType::F32, &dev)?,
        1e-5,
    )?;
    rows.push(("layer_norm 768".into(), time(iters, || ln768.forward(&x))?));
    rows.push((
        "mean pool (one hidden state)".into(),
        time(iters, || {
            gigapath_models::slide_encoder::pooled(&x, gigapath_models::SlidePool::Mean)
        })?,
    ));
    let cells: Vec<[u32; 2]> = (0..tiles as u32).map(|i| [i % 317, i / 317]).collect();
    rows.push((
        "position embedding".into(),
        time(iters, || {
            gigapath_models::slide_encoder::position_embedding(&cells, d, &dev)
        })?,
    ));
    rows.push((
        "fc2 + residual".into(),
        time(iters, || fc2.forward_residual(&hidden, &x))?,
    ));
    let map: serde_json::Map<String, serde_json::Value> = rows
        .into_iter()
        .map(|(k, v)| (k, (v * 1e3).into()))
        .collect();
    println!(
        "{}",
        serde_json::json!({"side": "candle", "model": "slide-ops", "tiles": tiles,
                                      "ms": map})
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--reduced-gemm") {
        // cuBLAS CUBLAS_COMPUTE_32F_FAST_16BF for bf16 products (CUDA builds only).
        #[cfg(feature = "cuda")]
        candle_core::cuda::set_gemm_reduced_precision_bf16(true);
    }
    match args.get(1).map(String::as_str) {
        Some("tile") => tile(&args),
        Some("slide") => slide(&args),
        Some("ops") => ops(&args),
        Some("parity") => parity(&args),
        Some("kernels") => kernels(&args),
        Some("slide-ops") => slide_ops(&args),
        _ => {
            anyhow::bail!(
                "usage: bench_encoders tile|slide|ops|parity|kernels|slide-ops ... (see the source header)"
            )
        }
    }
}
