//! `gigapath demo`: the main job on the embedded defaults, what the README's first command runs.
//!
//! Today it covers what exists end to end without downloads: a real H&E slide bundled in the
//! binary plus synthetic 20x and 40x slides with known tissue are written to the data directory,
//! segmented and tiled at 0.5 um/px, and the report says where to look at the masks and overlays.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use gigapath_wsi::synth::{self, Metadata, Scene, SlideSpec};
use gigapath_wsi::{outputs, tile_slide, Slide, TilingOptions};

/// The real H&E slide shipped with OpenSlide's test data (Aperio, 2220 x 2967 px, 0.499 um/px).
const BUNDLED_SLIDE: &[u8] = include_bytes!("../../../../tests/data/default.svs");

#[derive(Args)]
pub struct DemoArgs {
    /// Where slides and results are written.
    #[arg(long, default_value = "gigapath-demo")]
    pub data_dir: PathBuf,
    /// Exit after the report instead of serving the results (for scripts and CI).
    #[arg(long)]
    pub no_serve: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let slides_dir = args.data_dir.join("slides");
    std::fs::create_dir_all(&slides_dir)
        .with_context(|| format!("creating {}", slides_dir.display()))?;
    eprintln!(
        "gigapath demo: writing slides into {}",
        slides_dir.display()
    );
    let slides = write_slides(&slides_dir)?;

    println!();
    println!(
        "{:<28} {:>8} {:>7} {:>9} {:>7}  overlay",
        "slide", "mpp", "tile px", "grid", "tiles"
    );
    for path in &slides {
        let slide = Slide::open(path, None)?;
        let tiling = tile_slide(&slide, &TilingOptions::default())?;
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let out = args.data_dir.join("tiles").join(&name);
        let s = outputs::write_tiling(&out, &slide, &tiling)?;
        println!(
            "{:<28} {:>8.4} {:>7} {:>9} {:>7}  {}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            s.mpp,
            s.level0_tile_px,
            format!("{}x{}", s.grid_width, s.grid_height),
            s.tiles,
            out.join("overlay.png").display()
        );
    }
    println!();
    println!(
        "Tiles are 256 px at 0.5 um/px; 'tile px' is their side at level 0 (512 on the 40x slide).\n\
         The synthetic slides are real H&E texture in known shapes (gigapath synth); the first is\n\
         OpenSlide's public CMU-1 crop. Open the overlay pictures to check the tissue masks by eye.\n\
         Embedding, alignment training and search arrive with the next issues (see README)."
    );
    eprintln!(
        "gigapath demo: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if !args.no_serve {
        eprintln!("(nothing to serve yet: the HTTP service is not built; --no-serve is implied)");
    }
    Ok(())
}

fn write_slides(dir: &Path) -> Result<Vec<PathBuf>> {
    let real = dir.join("cmu1-crop-20x.svs");
    if !real.exists() {
        std::fs::write(&real, BUNDLED_SLIDE)
            .with_context(|| format!("writing {}", real.display()))?;
    }
    let mut slides = vec![real];
    // One scene of 3 x 2.4 mm, scanned at 20x (Aperio metadata) and at 40x (TIFF resolution tags).
    let (w_um, h_um) = (3000.0, 2400.0);
    for (name, mpp, downsamples, metadata) in [
        (
            "synthetic-20x.svs",
            0.499,
            vec![1, 4, 16],
            Metadata::Aperio { app_mag: 20 },
        ),
        (
            "synthetic-40x.tiff",
            0.2527,
            vec![1, 4, 16],
            Metadata::TiffResolution,
        ),
    ] {
        let path = dir.join(name);
        if !path.exists() {
            let spec = SlideSpec {
                width: (w_um / mpp) as u64,
                height: (h_um / mpp) as u64,
                mpp,
                downsamples,
                metadata,
                jpeg_quality: 90,
            };
            synth::write_slide(&path, &spec, &Scene::blobs(w_um, h_um))?;
        }
        slides.push(path);
    }
    Ok(slides)
}
