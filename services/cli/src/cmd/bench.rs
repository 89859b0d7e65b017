//! `gigapath bench ...`: throughput measured side by side with the Python reference stack on the
//! same input in the same run (these machines are shared and noisy: only ratios mean much).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use gigapath_wsi::slide_writer::{self, Metadata, Scene, SlideSpec};
use gigapath_wsi::{
    outputs, tile_slide, BatchData, Slide, StreamConfig, TileStream, TilingOptions,
};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tile reading: read + decode + crop + normalise per second, one thread and all threads,
    /// against openslide-python's read_region on the same tiles.
    Tiles(TilesArgs),
    /// End-to-end ingest on CPU with small generated encoders: tiles per second, where the time
    /// goes, and how much of the tile decoding the pipeline hides behind inference.
    Ingest(IngestBenchArgs),
}

#[derive(Args)]
pub struct IngestBenchArgs {
    /// Where models, slides and the data dir go (the data dir is made anew each run).
    #[arg(long, default_value = "target/bench-ingest")]
    pub work_dir: PathBuf,
    /// Slides to ingest.
    #[arg(long, default_value_t = 6)]
    pub slides: usize,
    /// Mean slide side in microns (3000 um is about 24 x 24 tiles at 0.5 um/px).
    #[arg(long, default_value_t = 3000.0)]
    pub slide_um: f64,
    /// Encoder sizes: `tiny` (tile 96-d x 2 blocks) or `small` (tile 192-d x 4 blocks).
    #[arg(long, value_enum, default_value = "small")]
    pub preset: crate::cmd::models::Preset,
}

#[derive(Args)]
pub struct TilesArgs {
    /// Slide to read (default: a generated 20x slide of --size px in --work-dir, made once).
    #[arg(long)]
    pub slide: Option<PathBuf>,
    /// Where the generated slide, its grid and the Python script go.
    #[arg(long, default_value = "target/bench")]
    pub work_dir: PathBuf,
    /// Side of the generated slide in level-0 pixels.
    #[arg(long, default_value_t = 20_000)]
    pub size: u64,
    /// Threads (and Python processes) for the parallel run (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Read at most this many tiles (0 = all kept tiles).
    #[arg(long, default_value_t = 0)]
    pub max_tiles: usize,
    /// Python interpreter with openslide-python, openslide-bin, numpy and pillow.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the openslide-python side.
    #[arg(long)]
    pub no_python: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Tiles(args) => tiles(args),
        BenchCommand::Ingest(args) => ingest(args),
    }
}

fn tiles(args: TilesArgs) -> Result<()> {
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let slide_path = match &args.slide {
        Some(p) => p.clone(),
        None => generated_slide(&args.work_dir, args.size)?,
    };
    let slide = Slide::open(&slide_path, None)?;
    let tiling = tile_slide(&slide, &TilingOptions::default())?;
    let grid_dir = args.work_dir.join("tiles");
    outputs::write_tiling(&grid_dir, &slide, &tiling)?;
    let mut tiles = tiling.tiles.clone();
    if args.max_tiles > 0 {
        tiles.truncate(args.max_tiles);
    }
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let plan = &tiling.plan;
    eprintln!(
        "bench tiles: {} tiles of {} (level {}, {} px read per tile{})",
        tiles.len(),
        slide_path.display(),
        plan.read_level,
        plan.read_px,
        if plan.resampled {
            ", resampled to 256"
        } else {
            ""
        }
    );
    let tiles: Arc<[_]> = tiles.into();
    let ours_1 = rust_rate(&slide_path, plan, tiles.clone(), 1)?;
    let ours_n = rust_rate(&slide_path, plan, tiles.clone(), threads)?;
    let reference = if args.no_python {
        None
    } else {
        python_rates(&args, &slide_path, &grid_dir, plan, tiles.len(), threads)
    };
    println!(
        "tile reading (read + decode + crop 224 + normalise), {} tiles",
        tiles.len()
    );
    println!(
        "{:<22} {:>14} {:>18} {:>8}",
        "", "gigapath", "openslide-python", "ratio"
    );
    let row = |name: &str, ours: f64, theirs: Option<f64>| {
        let (t, r) = match theirs {
            Some(t) => (format!("{t:.0} tiles/s"), format!("{:.2}x", ours / t)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<22} {:>14} {t:>18} {r:>8}",
            format!("{ours:.0} tiles/s")
        );
    };
    row("1 thread / process", ours_1, reference.map(|r| r.0));
    row(
        &format!("{threads} threads / processes"),
        ours_n,
        reference.map(|r| r.1),
    );
    Ok(())
}

fn generated_slide(dir: &Path, size: u64) -> Result<PathBuf> {
    let path = dir.join(format!("synthetic-20x-{size}.svs"));
    if path.exists() {
        return Ok(path);
    }
    eprintln!(
        "generating {} ({size} x {size} px, 20x) once...",
        path.display()
    );
    let mpp = 0.499;
    let spec = SlideSpec {
        width: size,
        height: size,
        mpp,
        downsamples: vec![1, 4, 16, 64],
        metadata: Metadata::Aperio { app_mag: 20 },
        jpeg_quality: 85,
    };
    let scene = Scene::blobs(size as f64 * mpp, size as f64 * mpp);
    slide_writer::write_slide(&path, &spec, &scene)?;
    Ok(path)
}

/// Tiles per second through the real stream (reader threads, ordered batches).
fn rust_rate(
    path: &Path,
    plan: &gigapath_wsi::TilePlan,
    tiles: Arc<[gigapath_wsi::TileRef]>,
    threads: usize,
) -> Result<f64> {
    let config = StreamConfig {
        threads,
        ..StreamConfig::default()
    };
    let n = tiles.len();
    let t = Instant::now();
    let mut checksum = 0f64;
    for batch in TileStream::start(path, plan, tiles, &config)? {
        if let BatchData::Normalized(px) = batch?.data {
            checksum += px[0] as f64;
        }
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    tracing::debug!("{threads} threads: {rate:.0} tiles/s (checksum {checksum})");
    Ok(rate)
}

/// (1 process, `threads` processes) tiles per second from `scripts/bench_tiles.py`, or `None`
/// with a warning when Python or openslide-python is missing.
fn python_rates(
    args: &TilesArgs,
    slide: &Path,
    grid_dir: &Path,
    plan: &gigapath_wsi::TilePlan,
    n: usize,
    threads: usize,
) -> Option<(f64, f64)> {
    let script = args.work_dir.join("bench_tiles.py");
    if let Err(e) = std::fs::write(&script, include_str!("../../../../scripts/bench_tiles.py")) {
        tracing::warn!("cannot write {}: {e}", script.display());
        return None;
    }
    let out = Command::new(&args.python)
        .arg(&script)
        .arg("--slide")
        .arg(slide)
        .arg("--tiles")
        .arg(grid_dir.join("tiles.csv"))
        .args(["--level", &plan.read_level.to_string()])
        .args(["--read-px", &plan.read_px.to_string()])
        .args(["--max-tiles", &n.to_string()])
        .args(["--workers", "1", &threads.to_string()])
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            tracing::warn!(
                "openslide-python side failed (pip install openslide-python openslide-bin numpy pillow): {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
            return None;
        }
        Err(e) => {
            tracing::warn!("cannot run {}: {e}", args.python);
            return None;
        }
    };
    let rates: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["tiles_per_s"].as_f64())
        .collect();
    match rates[..] {
        [one, many] => Some((one, many)),
        _ => None,
    }
}

fn ingest(args: IngestBenchArgs) -> Result<()> {
    use gigapath_models::init::{init_slide_encoder, init_tile_encoder};
    use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};

    let w = &args.work_dir;
    let (tile, slide) = args.preset.sizes();
    let models = w.join(format!("models-{}", args.preset.name()));
    if !models.join("slide/model.safetensors").exists() {
        init_tile_encoder(&models.join("tile"), tile, 0)?;
        init_slide_encoder(&models.join("slide"), slide, 1)?;
    }
    let cohort = w.join(format!("cohort-{}-{}", args.slides, args.slide_um));
    let spec = gigapath_synth::CohortSpec {
        slides_per_subtype: args.slides.div_ceil(3),
        slide_um: args.slide_um,
        fraction_40x: 0.0,
        ..gigapath_synth::CohortSpec::default()
    };
    let generated = gigapath_synth::generate(&cohort, &spec, &|_, _| {})?;
    let slides: Vec<PathBuf> = generated
        .slides
        .iter()
        .take(args.slides)
        .map(|s| cohort.join(&s.path))
        .collect();

    // Decoding alone: every kept tile through the reader threads, no encoder.
    let mut tiles_total = 0usize;
    let mut decode_s = 0.0;
    for path in &slides {
        let slide = Slide::open(path, None)?;
        let tiling = tile_slide(&slide, &TilingOptions::default())?;
        tiles_total += tiling.tiles.len();
        let tiles: Arc<[_]> = tiling.tiles.clone().into();
        let t = Instant::now();
        for batch in TileStream::start(path, &tiling.plan, tiles, &StreamConfig::default())? {
            batch?;
        }
        decode_s += t.elapsed().as_secs_f64();
    }

    // The tile encoder alone on as many tiles.
    let mut cfg = Config::default();
    cfg.models.tile_encoder = Some(models.join("tile"));
    cfg.models.slide_encoder = Some(models.join("slide"));
    let batch = cfg.ingest.batch_size;
    let encoders = gigapath_pipeline::encoders::SlideModels::load(&cfg.models)?;
    let pixels = vec![0.1f32; batch * gigapath_wsi::transform::NORMALIZED_LEN];
    let t = Instant::now();
    let mut done = 0;
    while done < tiles_total {
        let n = batch.min(tiles_total - done);
        encoders.encode_tiles(
            pixels[..n * gigapath_wsi::transform::NORMALIZED_LEN].to_vec(),
            n,
        )?;
        done += n;
    }
    let encode_s = t.elapsed().as_secs_f64();
    drop(encoders);

    // The real pipeline, from scratch.
    let data = w.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let mut cfg = Config::load(Some(&data), None)?;
    cfg.models.tile_encoder = Some(models.join("tile"));
    cfg.models.slide_encoder = Some(models.join("slide"));
    let pipeline = Pipeline::open(cfg)?;
    let t = Instant::now();
    let summary = pipeline.ingest(
        &IngestRequest {
            inputs: slides.clone(),
            ..IngestRequest::default()
        },
        &Quiet,
    )?;
    let wall = t.elapsed().as_secs_f64();
    let r = &summary.run;
    let tm = &r.timings;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("ingest benchmark: {} slides, {} tiles, preset {} (tile {}-d x {} blocks), {cores} cores, batch {batch}",
        slides.len(), r.tiles, args.preset.name(), tile.embed_dim, tile.depth);
    println!(
        "end to end:       {wall:.1} s, {:.1} tiles/s ({} ok, {} failed)",
        r.tiles as f64 / wall,
        r.slides_ok,
        r.slides_failed
    );
    println!("time split:       tiling {:.1} s | waiting for decoded tiles {:.1} s | tile encoder {:.1} s | feature files {:.1} s | slide encoder {:.1} s | store {:.1} s",
        tm.tiling_s, tm.read_wait_s, tm.encode_s, tm.write_s, tm.slide_encode_s, tm.store_s);
    println!("alone:            decoding {decode_s:.1} s ({:.0} tiles/s), tile encoder {encode_s:.1} s ({:.0} tiles/s)",
        tiles_total as f64 / decode_s, tiles_total as f64 / encode_s);
    let hidden = (decode_s - tm.read_wait_s).max(0.0);
    println!("overlap:          of {decode_s:.1} s of decoding, the encoder waited {:.1} s: {:.0}% of it ran behind inference \
              (decode then encode: {:.1} s; in the pipeline: {:.1} s)",
        tm.read_wait_s, 100.0 * hidden / decode_s.max(1e-9), decode_s + encode_s, tm.read_wait_s + tm.encode_s + tm.write_s);
    Ok(())
}
