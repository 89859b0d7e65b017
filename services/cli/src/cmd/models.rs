//! `gigapath models init`: small random model folders for tests and the demo.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use gigapath_models::init::{
    init_slide_encoder, init_tile_encoder, SlideSize, TileSize, SMALL, TINY,
};

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Write `DIR/tile` and `DIR/slide`: a small tile encoder (timm ViT) and a matching small
    /// LongNet slide encoder with seeded random weights. They run the real code paths; they are
    /// not trained models (real Prov-GigaPath weights are gated and never downloaded here).
    Init(InitArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// Tile: 96-d, 2 blocks, 3 heads. Slide: 128-d, 2 layers, 16 heads.
    Tiny,
    /// Tile: 192-d, 4 blocks, 3 heads. Slide: 256-d, 4 layers, 16 heads.
    Small,
}

impl Preset {
    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        }
    }

    /// Tile and slide encoder sizes.
    pub fn sizes(self) -> (TileSize, SlideSize) {
        match self {
            Preset::Tiny => TINY,
            Preset::Small => SMALL,
        }
    }
}

#[derive(Args)]
pub struct InitArgs {
    /// Output folder (gets `tile/` and `slide/`).
    #[arg(long, short)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Seed of the weights (same seed, same bytes, same fingerprint).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::Init(a) => init(a),
    }
}

fn init(args: InitArgs) -> Result<()> {
    let (tile, slide) = args.preset.sizes();
    let (tile_dir, slide_dir) = (args.output.join("tile"), args.output.join("slide"));
    init_tile_encoder(&tile_dir, tile, args.seed)?;
    init_slide_encoder(&slide_dir, slide, args.seed.wrapping_add(1))?;
    println!(
        "{}",
        serde_json::json!({"tile_encoder": tile_dir, "slide_encoder": slide_dir, "seed": args.seed})
    );
    Ok(())
}
