//! `gigapath tile`: segment a slide's tissue and write its 0.5 um/px tile grid.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use gigapath_wsi::{
    artifacts::{ArtifactOptions, DEFAULT_BLUR_THRESHOLD},
    grid::{DEFAULT_MAX_TILES, DEFAULT_TISSUE_THRESHOLD},
    outputs, tile_slide, Slide, TilingOptions, TissueMethod,
};

#[derive(Args)]
pub struct TileArgs {
    /// The slide file (SVS, NDPI, MRXS, SCN, tiled TIFF, ...).
    pub slide: PathBuf,
    /// Output directory (default: `<slide name>.tiles` in the current directory).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Level-0 microns per pixel, used only when the slide records none.
    #[arg(long, allow_negative_numbers = true)]
    pub mpp: Option<f64>,
    /// Keep a tile when the tissue covers more than this fraction of it (the reference's 0.1).
    #[arg(long, default_value_t = DEFAULT_TISSUE_THRESHOLD, allow_negative_numbers = true)]
    pub tissue_threshold: f64,
    /// Tissue segmentation: `otsu` (the reference: Otsu on RGB-mean luminance) or `saturation`
    /// (CLAM-like: HSV saturation, median blur, threshold, close, area filters).
    #[arg(long, default_value = "otsu", value_parser = parse_method)]
    pub method: TissueMethod,
    /// Refuse a slide whose grid (kept or not) has more tiles than this, before reading pixels.
    #[arg(long, default_value_t = DEFAULT_MAX_TILES)]
    pub max_tiles: u64,
    /// Leave out pen marks, dark debris and out-of-focus tiles (rules in the README); each
    /// rule can then be turned off with `--no-pen`, `--no-debris`, `--no-blur`.
    #[arg(long)]
    pub artifacts: bool,
    #[arg(long, requires = "artifacts")]
    pub no_pen: bool,
    #[arg(long, requires = "artifacts")]
    pub no_debris: bool,
    #[arg(long, requires = "artifacts")]
    pub no_blur: bool,
    /// Variance of the Laplacian (grey levels^2, 0.5 um/px) under which a tile is out of focus.
    #[arg(long, default_value_t = DEFAULT_BLUR_THRESHOLD)]
    pub blur_threshold: f64,
    /// A corrected mask (GeoJSON in level-0 pixels, as QuPath exports the `mask.geojson` this
    /// command writes) used instead of segmentation: tiles are kept by the same tissue rule.
    #[arg(long, conflicts_with = "artifacts")]
    pub mask_geojson: Option<PathBuf>,
}

fn parse_method(s: &str) -> std::result::Result<TissueMethod, String> {
    s.parse()
}

pub fn run(args: TileArgs) -> Result<()> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.slide));
    let slide = Slide::open(&args.slide, args.mpp)?;
    let opts = TilingOptions {
        method: args.method,
        tissue_threshold: args.tissue_threshold,
        max_tiles: args.max_tiles,
        artifacts: ArtifactOptions {
            enabled: args.artifacts,
            pen: !args.no_pen,
            debris: !args.no_debris,
            blur: !args.no_blur,
            blur_threshold: args.blur_threshold,
        },
        mask_geojson: args.mask_geojson.clone(),
    };
    let tiling = tile_slide(&slide, &opts)?;
    let summary = outputs::write_tiling(&output, &slide, &tiling)
        .with_context(|| format!("writing the tiling of {}", args.slide.display()))?;
    tracing::info!(
        "{}: {} tiles kept of {} x {}; mask and overlay in {}",
        args.slide.display(),
        summary.tiles,
        summary.grid_width,
        summary.grid_height,
        output.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn default_output(slide: &std::path::Path) -> PathBuf {
    let stem = slide
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "slide".into());
    PathBuf::from(format!("{stem}.tiles"))
}
