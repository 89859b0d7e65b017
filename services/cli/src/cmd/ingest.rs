//! `gigapath ingest`, `gigapath worker`, `gigapath status`, `gigapath config`: the ingest
//! pipeline's commands (crate `gigapath-pipeline`).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::Args;
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Progress, RunSummary};
use indicatif::ProgressBar;

/// Where the data lives and which config applies (shared by the pipeline commands).
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Data directory: catalog, vectors, feature files, tiling pictures, `gigapath.toml`.
    #[arg(long, env = "GIGAPATH_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// A TOML config (layered over the data dir's own `gigapath.toml`; see `gigapath config`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl DataArgs {
    pub fn load(&self) -> Result<Config> {
        Ok(Config::load(Some(&self.data_dir), self.config.as_deref())?)
    }
}

#[derive(Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Slide files or folders (searched recursively for .svs .tif .tiff .ndpi .mrxs .scn ...).
    pub inputs: Vec<PathBuf>,
    /// Reports: CSV or JSONL with slide_id and report_text (or text); optional report_id;
    /// every other column is a label (subtype, site, cohort, ...).
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// Queue slides that failed in an earlier run again.
    #[arg(long)]
    pub retry_failed: bool,
    /// Re-embed a slide id already known from a different file (other size or content) from
    /// the file given now; without it such a file is refused, naming both paths.
    #[arg(long)]
    pub replace: bool,
    /// Level-0 um/px for slides that record none.
    #[arg(long, allow_negative_numbers = true)]
    pub mpp: Option<f64>,
    /// Tile encoder folder (overrides the config).
    #[arg(long)]
    pub tile_encoder: Option<PathBuf>,
    /// Slide encoder folder (overrides the config).
    #[arg(long)]
    pub slide_encoder: Option<PathBuf>,
    /// Text encoder folder (overrides the config).
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Exit when the queue is empty instead of waiting for new jobs.
    #[arg(long)]
    pub exit_when_idle: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Print the effective configuration (defaults, data dir file, --config, environment).
    #[arg(long)]
    pub show: bool,
}

/// Progress bars: one for the run's slides, one for the tiles of the current slide.
struct Bars {
    run: ProgressBar,
    slide: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            run: crate::progress::bar(0, "slides"),
            slide: Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn run_started(&self, slides: usize) {
        self.run.set_length(slides as u64);
    }
    fn slide_started(&self, slide_id: &str, tiles: usize) {
        let bar = crate::progress::bar(tiles as u64, slide_id);
        *self.slide.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }
    fn tiles_done(&self, n: usize) {
        if let Some(b) = &*self.slide.lock().unwrap_or_else(|e| e.into_inner()) {
            b.inc(n as u64);
        }
    }
    fn slide_finished(&self, _slide_id: &str, _error: Option<&str>) {
        if let Some(b) = self.slide.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
        self.run.inc(1);
    }
}

pub fn ingest(args: IngestArgs) -> Result<()> {
    let mut config = args.data.load()?;
    if let Some(p) = args.tile_encoder {
        config.models.tile_encoder = Some(p);
    }
    if let Some(p) = args.slide_encoder {
        config.models.slide_encoder = Some(p);
    }
    if let Some(p) = args.text_encoder {
        config.models.text_encoder = Some(p);
    }
    config.absolutize();
    config.validate()?;
    if args.inputs.is_empty() && args.reports.is_none() {
        anyhow::bail!("nothing to ingest: give slide files or folders, and/or --reports FILE");
    }
    let pipeline = Pipeline::open(config).context("opening the data dir")?;
    let bars = Bars::new();
    let summary = pipeline.ingest(
        &IngestRequest {
            inputs: args.inputs,
            reports: args.reports,
            retry_failed: args.retry_failed,
            mpp: args.mpp,
            replace: args.replace,
        },
        &bars,
    )?;
    bars.run.finish_and_clear();
    for id in &summary.replaced {
        eprintln!("replaced {id}: its earlier embedding was removed and it was embedded again");
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "slides: {} found, {} embedded, {} failed, {} already done, {} failed earlier (not retried)",
            summary.slides_found,
            summary.run.slides_ok,
            summary.run.slides_failed,
            summary.already_done,
            summary.previously_failed
        );
        print_run(&summary.run);
        println!(
            "reports: {} embedded, {} rejected",
            summary.reports.ok,
            summary.reports.errors.len()
        );
        for e in &summary.reports.errors {
            println!("  line {}: {}", e.line, e.message);
        }
    }
    // Exit status (README "Exit codes"): 0 when something was ingested or already done, even if
    // other slides or rows failed (they are listed above); 1 when everything failed.
    let failed =
        summary.run.slides_failed + summary.previously_failed + summary.reports.errors.len() as u64;
    let succeeded = summary.run.slides_ok + summary.already_done + summary.reports.ok;
    if failed > 0 && succeeded == 0 {
        anyhow::bail!(
            "nothing was ingested: {} slide(s) failed, {} failed earlier (not retried), {} report row(s) rejected",
            summary.run.slides_failed,
            summary.previously_failed,
            summary.reports.errors.len()
        );
    }
    if failed > 0 {
        eprintln!(
            "warning: partly ingested: {} slide(s) failed, {} failed earlier (not retried), {} report row(s) rejected (listed above)",
            summary.run.slides_failed,
            summary.previously_failed,
            summary.reports.errors.len()
        );
    }
    Ok(())
}

fn print_run(run: &RunSummary) {
    let t = &run.timings;
    if run.tiles > 0 {
        println!(
            "tiles: {} in {:.1} s ({:.1} tiles/s); time: tiling {:.1} s, waiting for tiles {:.1} s, tile encoder {:.1} s, \
             writing {:.1} s, slide encoder {:.1} s, store {:.1} s",
            run.tiles,
            run.seconds,
            run.tiles as f64 / run.seconds.max(1e-9),
            t.tiling_s,
            t.read_wait_s,
            t.encode_s,
            t.write_s,
            t.slide_encode_s,
            t.store_s
        );
    }
    for (id, why) in &run.failures {
        println!("  failed {id}: {why}");
    }
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let pipeline = Pipeline::open(args.data.load()?).context("opening the data dir")?;
    tracing::info!(
        "worker {} on {}",
        pipeline.worker_id,
        pipeline.config.store.data_dir.display()
    );
    let bars = Bars::new();
    let run = pipeline.work(&bars, &AtomicBool::new(false), args.exit_when_idle)?;
    bars.run.finish_and_clear();
    println!(
        "slides: {} embedded, {} failed",
        run.slides_ok, run.slides_failed
    );
    print_run(&run);
    Ok(())
}

pub fn status(args: StatusArgs) -> Result<()> {
    let pipeline = Pipeline::open(args.data.load()?).context("opening the data dir")?;
    let status = pipeline.status()?;
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        println!("{}", status.to_text());
    }
    Ok(())
}

pub fn config(args: ConfigArgs) -> Result<()> {
    let config = args.data.load()?;
    if !args.show {
        eprintln!("(pass --show to print the effective configuration)");
    }
    print!("{}", config.to_toml());
    Ok(())
}
