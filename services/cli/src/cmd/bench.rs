//! `gigapath bench ...`: throughput measured side by side with the Python reference stack on the
//! same input in the same run (these machines are shared and noisy: only ratios mean much).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use gigapath_wsi::synth::{self, Metadata, Scene, SlideSpec};
use gigapath_wsi::{
    outputs, tile_slide, BatchData, Slide, StreamConfig, TileStream, TilingOptions,
};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tile reading: read + decode + crop + normalise per second, one thread and all threads,
    /// against openslide-python's read_region on the same tiles.
    Tiles(TilesArgs),
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
    synth::write_slide(&path, &spec, &scene)?;
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
