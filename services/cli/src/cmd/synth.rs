//! `gigapath synth`: write a synthetic pyramidal slide with real H&E texture in known shapes.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use gigapath_wsi::synth::{self, Metadata, Scene, SlideSpec};

#[derive(Clone, Copy, ValueEnum)]
pub enum MetadataArg {
    /// Aperio ImageDescription (`|AppMag = ..|MPP = ..`): vendor aperio, mpp known.
    Aperio,
    /// Generic TIFF with XResolution/YResolution tags (px/cm): mpp from the tags.
    TiffResolution,
    /// Generic TIFF without any resolution: `--mpp` needed downstream.
    None,
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
}

pub fn run(args: SynthArgs) -> Result<()> {
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
        },
        jpeg_quality: args.quality,
    };
    let scene = Scene::blobs(args.width as f64 * args.mpp, args.height as f64 * args.mpp);
    let t = std::time::Instant::now();
    synth::write_slide(&args.output, &spec, &scene)?;
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
