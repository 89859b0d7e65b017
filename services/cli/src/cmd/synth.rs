//! `gigapath synth slide|cohort`: synthetic slides with real H&E texture in known shapes, and
//! whole synthetic cohorts (subtype-specific slides + noisy reports) for tests and the demo.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use gigapath_synth::{CohortSpec, Subtype};
use gigapath_wsi::slide_writer::{self, Metadata, Scene, SlideSpec};

#[derive(Subcommand)]
pub enum SynthCommand {
    /// One pyramidal JPEG TIFF with tissue blobs on glass (true tissue known from the shapes).
    Slide(SynthArgs),
    /// A labelled cohort: RCC-like subtypes that differ in colour, density and architecture,
    /// `slides/*.svs`, `reports.jsonl` (reports with distractors, synonyms and noise),
    /// `labels.csv` and `manifest.json`. Same seed, same bytes.
    Cohort(CohortArgs),
}

#[derive(Args)]
pub struct CohortArgs {
    /// Output folder.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Subtypes to draw (CCRCC, PRCC, CHRCC), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "CCRCC,PRCC,CHRCC")]
    pub subtypes: Vec<String>,
    /// Slides per subtype.
    #[arg(long, default_value_t = 40)]
    pub slides_per_subtype: usize,
    /// Seed of everything random.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Mean slide side in microns (1024 um = 8 x 8 tiles at 0.5 um/px).
    #[arg(long, default_value_t = 1024.0)]
    pub slide_um: f64,
    /// Share of slides scanned at 40x (0.2527 um/px); the rest are 20x.
    #[arg(long, default_value_t = 0.1)]
    pub fraction_40x: f64,
    /// How alike the subtypes look, 0 (as designed) to 1 (stain balance shared, larger stain
    /// jitter: architecture must tell them apart). The harder cohort of the probe comparisons.
    #[arg(long, default_value_t = 0.0)]
    pub closeness: f64,
}

pub fn run(cmd: SynthCommand) -> Result<()> {
    match cmd {
        SynthCommand::Slide(a) => slide(a),
        SynthCommand::Cohort(a) => cohort(a),
    }
}

fn cohort(args: CohortArgs) -> Result<()> {
    let subtypes = args
        .subtypes
        .iter()
        .map(|s| {
            Subtype::from_label(s)
                .ok_or_else(|| anyhow::anyhow!("unknown subtype {s:?} (CCRCC, PRCC or CHRCC)"))
        })
        .collect::<Result<Vec<_>>>()?;
    if !(0.0..=1.0).contains(&args.fraction_40x) {
        bail!("--fraction-40x {} not in [0, 1]", args.fraction_40x);
    }
    let spec = CohortSpec {
        subtypes,
        slides_per_subtype: args.slides_per_subtype,
        seed: args.seed,
        slide_um: args.slide_um,
        fraction_40x: args.fraction_40x,
        closeness: args.closeness,
        ..CohortSpec::default()
    };
    let bar = crate::progress::bar(0, "synth slides");
    let cohort = gigapath_synth::generate(&args.output, &spec, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!(
        "{}",
        serde_json::json!({"cohort": args.output, "slides": cohort.slides.len(), "reports": args.output.join("reports.jsonl"), "seed": args.seed})
    );
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MetadataArg {
    /// Aperio ImageDescription (`|AppMag = ..|MPP = ..`): vendor aperio, mpp known.
    Aperio,
    /// Generic TIFF with XResolution/YResolution tags (px/cm): mpp from the tags.
    TiffResolution,
    /// Generic TIFF without any resolution: `--mpp` needed downstream.
    None,
    /// OME-TIFF: OME-XML `PhysicalSizeX/Y`, reduced levels as SubIFDs of level 0.
    Ome,
    /// OME-TIFF with the reduced levels in the main IFD chain (a flat pyramid).
    OmeFlat,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output slide file (`.svs` or `.tiff`).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Level-0 width in pixels.
    #[arg(long, default_value_t = 8192)]
    pub width: u64,
    /// Level-0 height in pixels.
    #[arg(long, default_value_t = 8192)]
    pub height: u64,
    /// Level-0 microns per pixel (0.499 = 20x, 0.2527 = 40x).
    #[arg(long, default_value_t = 0.499)]
    pub mpp: f64,
    /// Pyramid downsamples, comma-separated, starting at 1.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub levels: Vec<u32>,
    /// How the slide records its resolution.
    #[arg(long, value_enum, default_value = "aperio")]
    pub metadata: MetadataArg,
    /// JPEG quality of the tiles (1-100).
    #[arg(long, default_value_t = 90)]
    pub quality: u8,
    /// Damage these stored 256 px tiles of level 0 (`TX,TY`, repeatable) so that they cannot
    /// be decoded: a slide with unreadable tiles, for testing.
    #[arg(long = "corrupt-tile", value_parser = parse_tile_xy)]
    pub corrupt_tiles: Vec<(u32, u32)>,
    /// What the slide shows: `blobs` (tissue on glass) or `artifacts` (the same with a blue
    /// pen stroke, a green ink dot, a black pen line, an out-of-focus patch and debris).
    #[arg(long, value_enum, default_value = "blobs")]
    pub scene: SceneArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SceneArg {
    Blobs,
    Artifacts,
}

fn parse_tile_xy(s: &str) -> std::result::Result<(u32, u32), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?} is not TX,TY"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} in {s:?} is not a tile index"))
    };
    Ok((n(x)?, n(y)?))
}

fn slide(args: SynthArgs) -> Result<()> {
    if !(args.mpp.is_finite() && args.mpp > 0.0) {
        bail!(
            "invalid --mpp {}: must be a positive number of microns per pixel",
            args.mpp
        );
    }
    let app_mag = (10.0 / args.mpp).round() as u32;
    let spec = SlideSpec {
        width: args.width,
        height: args.height,
        mpp: args.mpp,
        downsamples: args.levels.clone(),
        metadata: match args.metadata {
            MetadataArg::Aperio => Metadata::Aperio { app_mag },
            MetadataArg::TiffResolution => Metadata::TiffResolution,
            MetadataArg::None => Metadata::None,
            MetadataArg::Ome => Metadata::Ome { sub_ifds: true },
            MetadataArg::OmeFlat => Metadata::Ome { sub_ifds: false },
        },
        jpeg_quality: args.quality,
    };
    let (w_um, h_um) = (args.width as f64 * args.mpp, args.height as f64 * args.mpp);
    let scene = match args.scene {
        SceneArg::Blobs => Scene::blobs(w_um, h_um),
        SceneArg::Artifacts => Scene::blobs_with_artifacts(w_um, h_um),
    };
    let t = std::time::Instant::now();
    slide_writer::write_slide(&args.output, &spec, &scene)?;
    if !args.corrupt_tiles.is_empty() {
        if let Err(e) = slide_writer::corrupt_tiles(&args.output, 0, &args.corrupt_tiles) {
            let _ = std::fs::remove_file(&args.output);
            return Err(e.into());
        }
    }
    tracing::info!(
        "wrote {} in {:.1} s",
        args.output.display(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({"slide": args.output, "width": args.width, "height": args.height, "mpp": args.mpp, "levels": args.levels})
    );
    Ok(())
}
