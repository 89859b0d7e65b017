//! `gigapath slide info`: what a slide file holds and how its resolution was found.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use gigapath_wsi::Slide;

#[derive(Subcommand)]
pub enum SlideCommand {
    /// Print vendor, pyramid levels (size, downsample), mpp (x, y) and where it came from,
    /// objective power and associated images.
    Info(InfoArgs),
}

#[derive(Args)]
pub struct InfoArgs {
    /// The slide file (SVS, NDPI, MRXS, SCN, tiled TIFF, ...).
    pub slide: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Level-0 microns per pixel, used only when the slide records none.
    #[arg(long, allow_negative_numbers = true)]
    pub mpp: Option<f64>,
}

pub fn run(cmd: SlideCommand) -> Result<()> {
    match cmd {
        SlideCommand::Info(args) => info(args),
    }
}

fn info(args: InfoArgs) -> Result<()> {
    let slide = Slide::open(&args.slide, args.mpp)?;
    let info = slide.info();
    if args.json {
        println!("{}", serde_json::to_string(info)?);
        return Ok(());
    }
    println!("slide:      {}", info.path.display());
    println!("vendor:     {}", info.vendor);
    println!("levels:     {}", info.levels.len());
    for (i, l) in info.levels.iter().enumerate() {
        println!(
            "  level {i}: {} x {} px, downsample {}",
            l.width, l.height, l.downsample
        );
    }
    match &info.mpp {
        Some(m) => println!("mpp:        {} x {} um/px (from {})", m.x, m.y, m.source),
        None => println!(
            "mpp:        unknown (no OpenSlide mpp property, no TIFF resolution tags; pass --mpp)"
        ),
    }
    match info.objective_power {
        Some(p) => println!("objective:  {p}x"),
        None => println!("objective:  unknown"),
    }
    if info.associated_images.is_empty() {
        println!("associated: none");
    } else {
        let list: Vec<String> = info
            .associated_images
            .iter()
            .map(|a| format!("{} {}x{}", a.name, a.width, a.height))
            .collect();
        println!("associated: {}", list.join(", "));
    }
    Ok(())
}
