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
    /// How often answers share the query's label: every embedded slide asks slide -> slides
    /// (top k) and region -> regions (a 2 x 2-tile box on its most tissue-rich tile, top
    /// `--regions` slides); prints the fractions.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The label compared (`labels.<KEY>` of the slides).
    #[arg(long, default_value = "subtype")]
    pub label: String,
    /// Slides per slide question.
    #[arg(short, long, default_value_t = 5)]
    pub k: usize,
    /// Slides per region question.
    #[arg(long, default_value_t = 20)]
    pub regions: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
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
        SearchCommand::Eval(a) => eval(a),
    }
}

#[derive(serde::Serialize)]
struct Eval {
    label: String,
    queries: usize,
    k: usize,
    /// Fraction of slide -> slides hits sharing the query's label.
    slides_same_label: f64,
    /// Fraction of queries whose top k has at least k - 1 hits with the query's label.
    slides_queries_k_minus_1: f64,
    regions: usize,
    /// Region queries asked (slides with a tissue tile).
    region_queries: usize,
    /// Fraction of region -> regions hit slides sharing the query's label.
    regions_same_label: f64,
    /// Fraction expected by chance: other slides with the query's label / other slides.
    chance: f64,
}

fn eval(args: EvalArgs) -> Result<()> {
    use gigapath_store::catalog::SlideState;
    if args.k == 0 || args.regions == 0 {
        anyhow::bail!("-k and --regions must be at least 1");
    }
    let pipeline = Pipeline::open(args.data.load()?).context("opening the data dir")?;
    let slides = pipeline.block_on(
        pipeline
            .store
            .catalog
            .list_slides(Some(SlideState::Embedded)),
    )?;
    let label =
        |labels: &std::collections::BTreeMap<String, String>| labels.get(&args.label).cloned();
    let labelled: Vec<(String, String)> = slides
        .iter()
        .filter_map(|s| Some((s.id.clone(), label(&s.labels)?)))
        .collect();
    if labelled.len() < 2 {
        anyhow::bail!(
            "{} embedded slides carry `labels.{}`: nothing to compare",
            labelled.len(),
            args.label
        );
    }
    let (mut same, mut all, mut good) = (0usize, 0usize, 0usize);
    let (mut rsame, mut rall, mut rqueries) = (0usize, 0usize, 0usize);
    let mut chance = 0.0;
    let bar = crate::progress::bar(labelled.len() as u64, "queries");
    for (id, want) in &labelled {
        let peers = labelled
            .iter()
            .filter(|(o, l)| o != id && l == want)
            .count();
        chance += peers as f64 / (labelled.len() - 1) as f64;
        let hits = pipeline.block_on(similar_slides(
            &pipeline.store,
            &SimilarSlidesRequest {
                slide_id: id.clone(),
                space: Space::Slide,
                k: args.k,
                filter: PayloadFilter::none(),
                exclude_patient: false,
            },
        ))?;
        let n = hits
            .iter()
            .filter(|h| label(&h.labels).as_ref() == Some(want))
            .count();
        same += n;
        all += hits.len();
        good += usize::from(n + 1 >= args.k);
        if let Some(region) = tissue_box(&pipeline, id) {
            let groups = pipeline.block_on(similar_regions(
                &pipeline.store,
                &SimilarRegionsRequest {
                    slide_id: id.clone(),
                    region,
                    k_groups: args.regions,
                    per_group: 1,
                },
            ))?;
            rqueries += 1;
            rall += groups.len();
            rsame += groups
                .iter()
                .filter(|g| label(&g.labels).as_ref() == Some(want))
                .count();
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let out = Eval {
        label: args.label,
        queries: labelled.len(),
        k: args.k,
        slides_same_label: frac(same, all),
        slides_queries_k_minus_1: frac(good, labelled.len()),
        regions: args.regions,
        region_queries: rqueries,
        regions_same_label: frac(rsame, rall),
        chance: chance / labelled.len() as f64,
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "{} queries by `{}`: slide -> slides top {}: {:.1}% share the label, {:.1}% of \
             queries have >= {} of {}; region -> regions top {} slides ({} queries): {:.1}% \
             share the label; chance {:.1}%",
            out.queries,
            out.label,
            out.k,
            100.0 * out.slides_same_label,
            100.0 * out.slides_queries_k_minus_1,
            out.k.saturating_sub(1),
            out.k,
            out.regions,
            out.region_queries,
            100.0 * out.regions_same_label,
            100.0 * out.chance
        );
    }
    Ok(())
}

/// A 2 x 2-tile box at the slide's most tissue-rich tile (from its tiling's `tiles.csv`).
fn tissue_box(pipeline: &Pipeline, slide_id: &str) -> Option<Level0Box> {
    let dir = pipeline.tiles_dir(slide_id);
    let tissue = gigapath_pipeline::tile_points::tissue_from_csv(&dir.join("tiles.csv"));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).ok()?).ok()?;
    let px = summary.get("level0_tile_px")?.as_i64()?;
    // Most tissue; ties to the first cell in row-major order (deterministic).
    let (&(gx, gy), _) = tissue.iter().max_by(|a, b| {
        a.1.total_cmp(b.1)
            .then((b.0 .1, b.0 .0).cmp(&(a.0 .1, a.0 .0)))
    })?;
    Some(Level0Box {
        x: i64::from(gx) * px,
        y: i64::from(gy) * px,
        w: 2 * px,
        h: 2 * px,
    })
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
