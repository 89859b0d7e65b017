//! `gigapath search similar|regions`: image questions on stored slides, answered by the query
//! core (`gigapath-query`) without the HTTP service.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use gigapath_pipeline::Pipeline;
use gigapath_query::{
    similar_regions, similar_slides, Level0Box, SimilarRegionsRequest, SimilarSlidesRequest, Space,
};
use gigapath_store::vector::PayloadFilter;

use crate::cmd::ingest::DataArgs;

#[derive(Subcommand)]
pub enum SearchCommand {
    /// Slide -> slides: the stored slides most similar to a stored slide (never itself).
    Similar(SimilarArgs),
    /// Region -> regions: tiles of other slides most similar to a box on a stored slide (the
    /// mean of the tiles it covers), grouped by slide with their level-0 boxes.
    Regions(RegionsArgs),
}

#[derive(Args)]
pub struct SimilarArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The query slide's id.
    #[arg(long)]
    pub slide: String,
    /// Compare slide-encoder vectors (`slide`) or aligned vectors (`joint`).
    #[arg(long, default_value = "slide", value_parser = ["slide", "joint"])]
    pub space: String,
    /// Number of slides.
    #[arg(short, long, default_value_t = 5)]
    pub k: usize,
    /// Only slides with this payload value, `KEY=VALUE` (e.g. `cohort=TCGA`,
    /// `labels.subtype=LUAD`); repeatable, all must hold.
    #[arg(long = "filter")]
    pub filters: Vec<String>,
    /// Leave out slides of the query slide's patient (`labels.patient_id` or `labels.patient`).
    #[arg(long)]
    pub exclude_patient: bool,
    /// Print one JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RegionsArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The query slide's id.
    #[arg(long)]
    pub slide: String,
    /// The query region, `x,y,w,h` in level-0 pixels.
    #[arg(long = "box")]
    pub region: String,
    /// Number of slides.
    #[arg(short, long, default_value_t = 5)]
    pub k: usize,
    /// Regions per slide.
    #[arg(long, default_value_t = 3)]
    pub per_slide: usize,
    /// Print one JSON array.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: SearchCommand) -> Result<()> {
    match command {
        SearchCommand::Similar(a) => similar(a),
        SearchCommand::Regions(a) => regions(a),
    }
}

fn filter_of(filters: &[String]) -> Result<PayloadFilter> {
    let mut f = PayloadFilter::none();
    for kv in filters {
        let Some((k, v)) = kv
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        else {
            anyhow::bail!("--filter `{kv}`: expected KEY=VALUE");
        };
        f = f.eq(k, v);
    }
    Ok(f)
}

fn similar(args: SimilarArgs) -> Result<()> {
    let request = SimilarSlidesRequest {
        slide_id: args.slide,
        space: args.space.parse::<Space>()?,
        k: args.k,
        filter: filter_of(&args.filters)?,
        exclude_patient: args.exclude_patient,
    };
    let pipeline = Pipeline::open(args.data.load()?).context("opening the data dir")?;
    let hits = pipeline.block_on(similar_slides(&pipeline.store, &request))?;
    if args.json {
        println!("{}", serde_json::to_string(&hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!("no other slide stored");
    }
    for (i, h) in hits.iter().enumerate() {
        let labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:>3}. {:.4}  {}  {}",
            i + 1,
            h.score,
            h.slide_id,
            labels.join(" ")
        );
    }
    Ok(())
}

fn regions(args: RegionsArgs) -> Result<()> {
    let request = SimilarRegionsRequest {
        slide_id: args.slide,
        region: args.region.parse::<Level0Box>()?,
        k_groups: args.k,
        per_group: args.per_slide,
    };
    let pipeline = Pipeline::open(args.data.load()?).context("opening the data dir")?;
    let groups = pipeline.block_on(similar_regions(&pipeline.store, &request))?;
    if args.json {
        println!("{}", serde_json::to_string(&groups)?);
        return Ok(());
    }
    if groups.is_empty() {
        println!("no tile of another slide stored");
    }
    for (i, g) in groups.iter().enumerate() {
        let labels: Vec<String> = g.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:>3}. {:.4}  {}  {}",
            i + 1,
            g.score,
            g.slide_id,
            labels.join(" ")
        );
        for r in &g.regions {
            println!("       {:.4}  box {}", r.score, r.region);
        }
    }
    Ok(())
}
