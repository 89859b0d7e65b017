//! `gigapath`: the command line that ties the crates together.
//!
//! Every subcommand is a thin shell over a library crate (`gigapath-wsi`, `gigapath-models`, ...):
//! it parses flags, calls the library, and prints. Logs go to stderr through `tracing`; stdout is
//! kept for machine-readable results (one-line JSON summaries, `--json` output).

mod cmd;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gigapath",
    version,
    about = "Whole-slide pathology with Prov-GigaPath: slides to tiles to embeddings to search",
    long_about = "Whole-slide pathology with Prov-GigaPath.\n\n\
        Reads gigapixel slides (SVS, NDPI, MRXS, tiled TIFF) through OpenSlide, cuts the tissue into \
        256 px tiles at 0.5 um/px, embeds them with the Prov-GigaPath tile and slide encoders, and \
        aligns slide embeddings with report text.\n\n\
        Run `gigapath <COMMAND> --help` for the details of each command."
)]
struct Cli {
    /// Log filter for stderr (`error`, `warn`, `info`, `debug`, or a tracing directive such as
    /// `gigapath_wsi=debug`). RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info", env = "GIGAPATH_LOG")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect whole-slide images (vendor, pyramid levels, mpp and how it was found).
    #[command(subcommand)]
    Slide(cmd::slide::SlideCommand),
    /// Segment the tissue of a slide and cut its 256 px tile grid at 0.5 um/px.
    ///
    /// Writes `tiles.csv` (one row per kept tile, row-major: y then x), `tiles.safetensors`
    /// (the same grid as tensors), `mask.png`, `overlay.png`, `thumbnail.png` and `summary.json`
    /// to the output directory, and prints a one-line JSON summary on stdout.
    Tile(cmd::tile::TileArgs),
    /// Run one encoder (tile, slide or text) on tensors from a safetensors or JSON file.
    #[command(subcommand)]
    Encode(cmd::encode::EncodeCommand),
    /// Embed slides (and reports) into the data dir: tiles, features, slide embeddings, vectors.
    /// Resumable: re-running skips what is done with the same weights; interrupted work is redone.
    Ingest(cmd::ingest::IngestArgs),
    /// Process queued slide jobs (several workers on several machines can share a Postgres
    /// catalog and a Qdrant server).
    Worker(cmd::ingest::WorkerArgs),
    /// Counts per state of slides, jobs, reports and stored points.
    Status(cmd::ingest::StatusArgs),
    /// The ingest job queue: list jobs, retry failed (parked) ones, cancel queued or running ones.
    #[command(subcommand)]
    Jobs(cmd::jobs::JobsCommand),
    /// The effective configuration: defaults, `DATA_DIR/gigapath.toml`, `--config`, environment.
    Config(cmd::ingest::ConfigArgs),
    /// The HTTP service: search, zero-shot, slides, ingest endpoints (OpenAPI at /v1/openapi.json).
    Serve(cmd::serve::ServeArgs),
    /// Train the slide-report alignment (CLIP loss) on the data dir's pairs; resumes after a kill.
    Train(cmd::train::TrainArgs),
    /// Re-embed every stored slide and report with an alignment checkpoint (joint vectors).
    Reembed(cmd::train::ReembedArgs),
    /// Evaluate an alignment: cross-modal retrieval, zero-shot classification, MI-Zero robustness.
    Eval(cmd::train::EvalArgs),
    /// Model folders: `gigapath models init` writes small random encoders for tests and demos.
    #[command(subcommand)]
    Models(cmd::models::ModelsCommand),
    /// Write synthetic slides or whole labelled cohorts with reports (for tests and demos).
    #[command(subcommand)]
    Synth(cmd::synth::SynthCommand),
    /// Benchmarks, run side by side with the Python reference stack where one exists.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// The main job on the embedded defaults: what the README's first command runs.
    Demo(cmd::demo::DemoArgs),
    /// Image questions: slides similar to a slide, regions similar to a box on a slide.
    #[command(subcommand)]
    Search(cmd::search::SearchCommand),
    /// Indexes built from stored data: `gigapath index tiles` (region search) for slides
    /// ingested before.
    #[command(subcommand)]
    Index(cmd::index::IndexCommand),
    /// Few-shot and supervised heads on the stored embeddings: train, evaluate, list and apply
    /// named heads; compare them with zero-shot for one label.
    #[command(subcommand)]
    Probe(cmd::probe::ProbeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain: "reading slide x.svs: not a slide OpenSlide knows".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command line in this process (`args` without the program name), as if typed: the
/// demo chains the real commands through this.
pub(crate) fn run_argv(args: &[&str]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("gigapath").chain(args.iter().copied()))?;
    dispatch(cli.command)
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Slide(c) => cmd::slide::run(c),
        Command::Tile(a) => cmd::tile::run(a),
        Command::Encode(c) => cmd::encode::run(c),
        Command::Ingest(a) => cmd::ingest::ingest(a),
        Command::Worker(a) => cmd::ingest::worker(a),
        Command::Status(a) => cmd::ingest::status(a),
        Command::Jobs(c) => cmd::jobs::run(c),
        Command::Config(a) => cmd::ingest::config(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Train(a) => cmd::train::train(a),
        Command::Reembed(a) => cmd::train::reembed(a),
        Command::Eval(a) => cmd::train::eval(a),
        Command::Models(c) => cmd::models::run(c),
        Command::Synth(c) => cmd::synth::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Search(c) => cmd::search::run(c),
        Command::Index(c) => cmd::index::run(c),
        Command::Probe(c) => cmd::probe::run(c),
    }
}

fn init_logging(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    // qdrant-edge logs its internals (WAL opened, feature flags it cannot be given from outside)
    // at info / warn; keep them out unless asked for by name.
    let quiet = if default_filter.contains("qdrant_edge") {
        default_filter.to_string()
    } else {
        format!("{default_filter},qdrant_edge=error")
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&quiet))
        .unwrap_or_else(|_| EnvFilter::new("info,qdrant_edge=error"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .compact()
        .init();
}
