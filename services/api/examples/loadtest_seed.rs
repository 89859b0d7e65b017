//! Grows an aligned data dir to N stored slides (one report each) for the load test
//! (`scripts/loadtest.sh`): the data dir must already hold a few real ingested slides with
//! reports, re-embedded with an alignment checkpoint (`gigapath ingest`, `train`, `reembed`).
//!
//! Each synthetic slide `LOAD-<i>` copies a real slide's `joint` / `slide` vectors plus small
//! gaussian noise (so scores spread like real ones), its site and subtype, cohort `loadtest`;
//! its report `R-LOAD-<i>` copies a real report's text, labels and vectors the same way. Points go
//! through the real vector store API under the service's guard fingerprints, and the slides and
//! reports are registered and marked embedded in the catalog, so `gigapath status`,
//! `GET /v1/slides/{id}` and every search see them like ingested ones. Idempotent: ids are fixed,
//! a rerun overwrites the same points.
//!
//! ```text
//! cargo run --release -p gigapath-api --example loadtest_seed -- --data-dir DIR [--slides 10000]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use gigapath_pipeline::encoders::{slide_fingerprints, text_fingerprints};
use gigapath_pipeline::{Config, Pipeline};
use gigapath_store::catalog::{EmbeddedSlide, NewReport, NewSlide, SlideState};
use gigapath_store::vector::{
    combined_fingerprint, Point, ReportPoint, SlidePoint, JOINT, REPORTS, SLIDE, SLIDES, TEXT,
};

const BATCH: usize = 256;
const NOISE: f32 = 0.02;

/// SplitMix64 with Box-Muller gaussians: no dependency, same points for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
    fn jitter(&mut self, v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x + NOISE * self.gauss()).collect()
    }
}

fn vector<'a>(p: &'a Point, name: &str) -> Result<&'a Vec<f32>, String> {
    p.vectors.get(name).ok_or_else(|| {
        format!(
            "point `{}` has no `{name}` vector: re-embed the data dir with an alignment \
             checkpoint first (gigapath reembed)",
            p.id
        )
    })
}

fn labels_of(p: &Point) -> BTreeMap<String, String> {
    p.payload
        .get("labels")
        .and_then(|l| l.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut data_dir: Option<PathBuf> = None;
    let mut total = 10_000usize;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--data-dir" => data_dir = args.next().map(PathBuf::from),
            "--slides" => total = args.next().ok_or("--slides N")?.parse()?,
            "--seed" => seed = args.next().ok_or("--seed N")?.parse()?,
            "-h" | "--help" => {
                println!("loadtest_seed --data-dir DIR [--slides 10000] [--seed 1]");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let data_dir = data_dir.ok_or("--data-dir DIR is required")?;
    let start = Instant::now();
    let mut config = Config::load(Some(&data_dir), None)?;
    config.absolutize();
    let models = config.models.clone();
    let pipeline = Pipeline::open(config)?;
    let (catalog, vectors) = (&pipeline.store.catalog, &pipeline.store.vectors);
    let slide_fps = slide_fingerprints(&models)?;
    let text_fps = text_fingerprints(&models)?;
    if !slide_fps.contains_key("alignment") {
        return Err("the data dir has no alignment checkpoint (models.alignment): run gigapath train and reembed first".into());
    }
    let (slide_fp, report_fp) = (
        combined_fingerprint(&slide_fps),
        combined_fingerprint(&text_fps),
    );

    // The real slides and reports the synthetic ones are drawn around.
    let real: Vec<String> = pipeline
        .block_on(catalog.list_slides(Some(SlideState::Embedded)))?
        .into_iter()
        .map(|s| s.id)
        .filter(|id| !id.starts_with("LOAD-"))
        .collect();
    let bases = pipeline.block_on(vectors.retrieve(SLIDES, &real, true))?;
    let reports: Vec<String> = pipeline
        .block_on(catalog.list_reports(None))?
        .into_iter()
        .map(|r| r.id)
        .filter(|id| !id.starts_with("R-LOAD-"))
        .collect();
    let report_bases = pipeline.block_on(vectors.retrieve(REPORTS, &reports, true))?;
    if bases.is_empty() || report_bases.is_empty() {
        return Err("no embedded slides with reports in the data dir: ingest a few first".into());
    }
    for p in &bases {
        if p.fingerprint != slide_fp {
            return Err(format!(
                "slide `{}` carries fingerprint {} but the configured models give {slide_fp}: reembed first",
                p.id, p.fingerprint
            )
            .into());
        }
    }
    let synthetic = total.saturating_sub(bases.len());
    let mut rng = Rng(seed);
    let ids: Vec<usize> = (0..synthetic).collect();
    for chunk in ids.chunks(BATCH) {
        let mut slide_points = Vec::with_capacity(chunk.len());
        let mut report_points = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let base = &bases[i % bases.len()];
            let rbase = &report_bases[i % report_bases.len()];
            let slide_id = format!("LOAD-{i:05}");
            let mut labels = labels_of(base);
            labels.insert("patient_id".into(), format!("LP{i:05}"));
            let site = base
                .payload
                .get("site")
                .and_then(|s| s.as_str())
                .map(String::from);
            let new = NewSlide {
                id: slide_id.clone(),
                path: format!("synthetic/{slide_id}.svs"),
                cohort: Some("loadtest".into()),
                site: site.clone(),
                labels: labels.clone(),
                mpp: None,
            };
            pipeline.block_on(catalog.upsert_slide(&new))?;
            let tile_count = base
                .payload
                .get("tile_count")
                .and_then(|t| t.as_u64())
                .unwrap_or(1);
            slide_points.push(
                SlidePoint {
                    slide_id: slide_id.clone(),
                    cohort: new.cohort.clone(),
                    site,
                    labels,
                    mpp: None,
                    tile_count,
                    fingerprints: slide_fps.clone(),
                    fingerprint: slide_fp.clone(),
                    joint: Some(rng.jitter(vector(base, JOINT)?)),
                    slide: rng.jitter(vector(base, SLIDE)?),
                }
                .into_point(),
            );
            let mut rlabels = labels_of(rbase);
            rlabels.insert("cohort".into(), "loadtest".into());
            let text = rbase
                .payload
                .get("text")
                .and_then(|t| t.as_str())
                .unwrap_or("synthetic report")
                .to_string();
            let report = NewReport {
                id: format!("R-{slide_id}"),
                slide_id: slide_id.clone(),
                text: text.clone(),
                labels: rlabels.clone(),
            };
            pipeline.block_on(catalog.upsert_report(&report))?;
            report_points.push(
                ReportPoint {
                    report_id: report.id,
                    slide_id,
                    text,
                    labels: rlabels,
                    fingerprint: report_fp.clone(),
                    joint: Some(rng.jitter(vector(rbase, JOINT)?)),
                    text_embedding: rng.jitter(vector(rbase, TEXT)?),
                }
                .into_point(),
            );
        }
        pipeline.block_on(vectors.upsert(SLIDES, slide_points))?;
        pipeline.block_on(vectors.upsert(REPORTS, report_points))?;
        for &i in chunk {
            let slide_id = format!("LOAD-{i:05}");
            pipeline.block_on(catalog.mark_slide_embedded(&EmbeddedSlide {
                slide_id: slide_id.clone(),
                tile_count: 1,
                fingerprint: slide_fp.clone(),
                fingerprints: slide_fps.clone(),
                collection: SLIDES.into(),
            }))?;
            pipeline.block_on(catalog.mark_report_embedded(
                &format!("R-{slide_id}"),
                REPORTS,
                &report_fp,
            ))?;
        }
        eprint!(
            "\r{} / {synthetic} synthetic slides",
            chunk[chunk.len() - 1] + 1
        );
    }
    eprintln!();
    let seeded = start.elapsed().as_secs_f64();
    // Build the search indexes now, as a long-running service would have by the time of a load.
    pipeline.block_on(vectors.optimize())?;
    let slides = pipeline.block_on(vectors.stats(SLIDES))?;
    let reports = pipeline.block_on(vectors.stats(REPORTS))?;
    println!(
        "{}",
        serde_json::json!({
            "real_slides": bases.len(),
            "synthetic_slides": synthetic,
            "slide_points": slides.points,
            "report_points": reports.points,
            "slides_indexed_vectors": slides.indexed_vectors,
            "seed_seconds": seeded,
            "total_seconds": start.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
