//! `gigapath index tiles`: writes the tile points (region search) of slides ingested before
//! tile points existed, or with `[ingest] index_tiles = false`. Reads each slide's feature file
//! once; resumable and idempotent (a slide whose tiles are all there is skipped).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use gigapath_pipeline::tile_points::{index_feature_file, Indexed};
use gigapath_pipeline::Pipeline;
use gigapath_store::vector::SLIDES;
use serde::Serialize;

use crate::cmd::ingest::DataArgs;

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Write the `tiles` collection from the stored feature files (the tile features of the
    /// tile encoder each slide was embedded with).
    Tiles(TilesArgs),
}

#[derive(Args)]
pub struct TilesArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Only this slide (repeatable); default: every slide with a feature file.
    #[arg(long = "slide")]
    pub slides: Vec<String>,
    /// Print one JSON summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default, Serialize)]
struct Summary {
    slides_written: u64,
    slides_already_indexed: u64,
    tile_points_written: u64,
    /// Slides without a stored point or feature file, with the reason.
    skipped: Vec<(String, String)>,
    seconds: f64,
}

pub fn run(command: IndexCommand) -> Result<()> {
    match command {
        IndexCommand::Tiles(a) => tiles(a),
    }
}

fn tiles(args: TilesArgs) -> Result<()> {
    let pipeline = Pipeline::open(args.data.load()?).context("opening the data dir")?;
    let store = &pipeline.store;
    let files = pipeline.block_on(store.catalog.list_feature_files())?;
    let mut slides: Vec<String> = files.iter().map(|f| f.slide_id.clone()).collect();
    slides.dedup();
    if !args.slides.is_empty() {
        if let Some(unknown) = args.slides.iter().find(|s| !slides.contains(s)) {
            anyhow::bail!(
                "slide `{unknown}` has no feature file in this data dir (ingest it first)"
            );
        }
        slides.retain(|s| args.slides.contains(s));
    }
    let start = std::time::Instant::now();
    let bar = crate::progress::bar(slides.len() as u64, "tile points");
    let mut summary = Summary::default();
    for slide in &slides {
        bar.set_message(slide.clone());
        // The feature file of the tile encoder the slide's point was made with.
        let point = pipeline.block_on(store.vectors.retrieve(
            SLIDES,
            std::slice::from_ref(slide),
            false,
        ))?;
        let tile_fp = point
            .first()
            .and_then(|p| p.payload.get("fingerprints"))
            .and_then(|f| f.get("tile"))
            .and_then(|t| t.as_str())
            .map(String::from);
        let Some(tile_fp) = tile_fp else {
            summary
                .skipped
                .push((slide.clone(), "no stored slide point".into()));
            bar.inc(1);
            continue;
        };
        let Some(record) = files
            .iter()
            .find(|f| &f.slide_id == slide && f.tile_fingerprint == tile_fp)
        else {
            summary.skipped.push((
                slide.clone(),
                format!("no feature file of tile encoder {tile_fp}"),
            ));
            bar.inc(1);
            continue;
        };
        let path = store.locate_feature_file(slide, &tile_fp, &record.path);
        match index_feature_file(&pipeline, slide, std::path::Path::new(&path))
            .with_context(|| format!("slide `{slide}`"))?
        {
            Indexed::Written(n) => {
                summary.slides_written += 1;
                summary.tile_points_written += n;
            }
            Indexed::AlreadyThere(_) => summary.slides_already_indexed += 1,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "tile points: {} slides written ({} points), {} already indexed, {} skipped in {:.1} s",
            summary.slides_written,
            summary.tile_points_written,
            summary.slides_already_indexed,
            summary.skipped.len(),
            summary.seconds
        );
        for (slide, why) in &summary.skipped {
            println!("  skipped {slide}: {why}");
        }
    }
    Ok(())
}
