//! `gigapath demo`: the main job on the embedded defaults, what the README's first command runs.
//!
//! Everything a user does with real data, on a synthetic cohort and small encoders, with nothing
//! to download and no server to start: a labelled cohort of slides and reports is generated
//! (`synth cohort`), small random tile and slide encoders are written (`models init`), the slides
//! and reports are ingested with the offline all-MiniLM-L6-v2 text encoder (`ingest`), the
//! alignment is trained (`train`), the stores are re-embedded with it (`reembed`) and evaluated on
//! the held-out slides (`eval`); then the HTTP service starts (`serve`) and the demo asks it
//! questions through HTTP, as a user's client would. Each step is the same code as the command of
//! the same name, so the printed commands are exactly how to do the same on real data.
//!
//! Re-running with the same `--data-dir` resumes: finished steps are skipped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

/// The run id of the demo's alignment run (`DATA_DIR/alignment/demo/`).
const RUN_ID: &str = "demo";

#[derive(Args)]
pub struct DemoArgs {
    /// Where everything is written: cohort, models, catalog, vectors, features, runs.
    #[arg(long, default_value = "gigapath-demo")]
    pub data_dir: PathBuf,
    /// Exit after the report instead of serving the results (for scripts and CI).
    #[arg(long)]
    pub no_serve: bool,
    /// Address the service listens on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Slides per subtype in the synthetic cohort (3 renal subtypes).
    #[arg(long, default_value_t = 40)]
    pub slides_per_subtype: usize,
    /// How alike the subtypes look, 0 to 1 (`gigapath synth cohort --closeness`): a harder
    /// cohort for comparing zero-shot with few-shot and supervised heads.
    #[arg(long, default_value_t = 0.0)]
    pub closeness: f64,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let data = &args.data_dir;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let d = |p: &str| data.join(p).display().to_string();
    let text_encoder = gigapath_pipeline::config::default_text_encoder();
    if !text_encoder.join("model.safetensors").is_file() {
        bail!(
            "the offline text encoder all-MiniLM-L6-v2 is not in {}: run scripts/fetch-minilm.sh \
             (scripts/setup.sh does), or set GIGAPATH_MINILM_DIR",
            text_encoder.display()
        );
    }
    eprintln!(
        "gigapath demo: everything goes to {} (synthetic slides, small random encoders, \
         offline MiniLM)",
        data.display()
    );

    step(1, "synthetic cohort: 3 renal subtypes, slides + reports");
    if data.join("cohort/manifest.json").is_file() {
        eprintln!("  already there");
    } else {
        let n = args.slides_per_subtype.to_string();
        let closeness = args.closeness.to_string();
        crate::run_argv(&[
            "synth",
            "cohort",
            "-o",
            &d("cohort"),
            "--slides-per-subtype",
            &n,
            "--closeness",
            &closeness,
        ])?;
    }

    step(2, "small tile and slide encoders (seeded random weights)");
    if data.join("models/slide").is_dir() {
        eprintln!("  already there");
    } else {
        crate::run_argv(&["models", "init", "-o", &d("models"), "--preset", "tiny"])?;
    }
    let config = data.join("gigapath.toml");
    if !config.is_file() {
        // The data dir's own config: every later command on this data dir reads it. Its
        // relative paths are taken from the data dir, so the data dir can be moved or copied.
        std::fs::write(
            &config,
            "# Written by `gigapath demo`. Point these at real Prov-GigaPath folders for real use.\n\
             # Relative paths are taken from this folder.\n\
             [models]\ntile_encoder = \"models/tile\"\nslide_encoder = \"models/slide\"\n",
        )
        .with_context(|| format!("writing {}", config.display()))?;
    }

    step(
        3,
        "ingest: tiles -> tile features -> slide embeddings; reports -> text embeddings",
    );
    crate::run_argv(&[
        "ingest",
        "--data-dir",
        &d(""),
        "--reports",
        &d("cohort/reports.jsonl"),
        &d("cohort/slides"),
    ])?;

    step(
        4,
        "train the slide-report alignment (CLIP loss, 80/20 split by patient)",
    );
    crate::run_argv(&["train", "--data-dir", &d(""), "--run-id", RUN_ID])?;

    step(5, "re-embed slides and reports into the joint space");
    let run_dir = d(&format!("alignment/{RUN_ID}"));
    crate::run_argv(&["reembed", "--data-dir", &d(""), "--alignment", &run_dir])?;

    step(6, "evaluate on the held-out slides");
    println!();
    crate::run_argv(&["eval", "--data-dir", &d(""), "--alignment", &run_dir])?;

    step(7, "serve, and ask the service");
    let mut config = gigapath_pipeline::Config::load(Some(data), None)?;
    config.serve.bind = args.bind.clone();
    config.validate()?;
    let service = gigapath_api::Service::start(config)
        .with_context(|| format!("starting the service on {}", args.bind))?;
    let addr = service.addr;
    let report = ask(addr);
    let url = format!("http://{addr}/");
    match report {
        Ok(()) => {}
        Err(e) => {
            service.stop();
            return Err(e.context("querying the demo service"));
        }
    }
    println!();
    println!(
        "This demo ran on synthetic slides (real H&E texture, generated tissue) with small encoders\n\
         that were never trained on pathology, and the offline all-MiniLM-L6-v2 as text encoder;\n\
         its numbers show that the pipeline works, not what Prov-GigaPath can do. For real data,\n\
         run the same commands on your slides and reports with real weights in the data dir's\n\
         gigapath.toml ([models] tile_encoder / slide_encoder = the Prov-GigaPath folders,\n\
         text_encoder = a PubMedBERT-family folder): `gigapath ingest`, `gigapath train`,\n\
         `gigapath reembed`, `gigapath eval`, `gigapath serve` (see README)."
    );
    eprintln!(
        "gigapath demo: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if args.no_serve {
        service.stop();
        return Ok(());
    }
    println!();
    println!("Open {url} (web page; OpenAPI at {url}v1/openapi.json). Ctrl-C stops.");
    service.wait();
    Ok(())
}

fn step(n: usize, what: &str) {
    eprintln!("\n[{n}/7] {what}");
}

/// Three text-to-slide searches, one report search and one mutation prompt, through HTTP.
fn ask(addr: SocketAddr) -> Result<()> {
    println!("\nText-to-slide search (POST /v1/search/slides), top 5 of the whole cohort:");
    let queries = [
        (
            "clear cell renal cell carcinoma with a delicate branching vascular network",
            "CCRCC",
        ),
        (
            "papillary renal cell carcinoma with foamy macrophages",
            "PRCC",
        ),
        (
            "chromophobe renal cell carcinoma, pale cells with perinuclear halos",
            "CHRCC",
        ),
    ];
    for (query, subtype) in queries {
        let reply = post(addr, "/v1/search/slides", &json!({"query": query, "k": 5}))?;
        let hits = reply["results"].as_array().cloned().unwrap_or_default();
        let matching = hits
            .iter()
            .filter(|h| label(h, "subtype") == subtype)
            .count();
        println!("  \"{query}\"  ({matching}/{} are {subtype})", hits.len());
        for h in hits.iter().take(3) {
            println!(
                "    {:<10} {:<6} score {:.3}",
                h["id"].as_str().unwrap_or("?"),
                label(h, "subtype"),
                h["score"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }

    let query = "tumor with papillary architecture";
    println!("\nReport search (POST /v1/search/reports): \"{query}\", top 3:");
    let reply = post(addr, "/v1/search/reports", &json!({"query": query, "k": 3}))?;
    for h in reply["results"].as_array().cloned().unwrap_or_default() {
        let text = h["payload"]["text"].as_str().unwrap_or("");
        let excerpt = diagnosis_line(text);
        println!(
            "  {:<12} score {:.3}  {}",
            h["id"].as_str().unwrap_or("?"),
            h["score"].as_f64().unwrap_or(f64::NAN),
            excerpt
        );
    }

    // One slide from the top of the first search, asked the mutation prompts.
    let reply = post(
        addr,
        "/v1/search/slides",
        &json!({"query": queries[0].0, "k": 1}),
    )?;
    let slide = reply["results"][0]["id"]
        .as_str()
        .context("the search found no slide")?
        .to_string();
    let reply = post(
        addr,
        "/v1/zero-shot/mutation",
        &json!({"slide_ids": [slide], "genes": ["TP53", "KRAS"]}),
    )?;
    println!(
        "\nMutation prompts (POST /v1/zero-shot/mutation, set `{}`): slide {slide}",
        reply["prompt_set"].as_str().unwrap_or("?")
    );
    if let Some(p) = reply["results"][0]["probability_mutated"].as_object() {
        for (gene, prob) in p {
            println!(
                "  P({gene} mutated) = {:.2}  (mutated vs wild-type phrasing; synthetic slides carry no mutations)",
                prob.as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

/// A label from a search hit's payload (`labels.subtype` or a top-level field).
fn label(hit: &Value, key: &str) -> String {
    let p = &hit["payload"];
    p["labels"][key]
        .as_str()
        .or_else(|| p[key].as_str())
        .unwrap_or("-")
        .to_string()
}

/// The report's diagnosis line (or its start), on one line.
fn diagnosis_line(text: &str) -> String {
    let line = text
        .split(['\n', '.'])
        .find(|l| l.to_ascii_lowercase().contains("diagnosis"))
        .unwrap_or(text)
        .trim();
    let mut s: String = line.chars().take(110).collect();
    if line.chars().count() > 110 {
        s.push_str("...");
    }
    s
}

/// POST a JSON body over HTTP/1.1 and parse the JSON reply; a non-2xx status is an error.
fn post(addr: SocketAddr, path: &str, body: &Value) -> Result<Value> {
    let body = body.to_string();
    let reply = gigapath_api::client::exchange(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        Some(body.as_bytes()),
        Duration::from_secs(60),
    )
    .with_context(|| format!("{path}: no HTTP reply"))?;
    let payload = reply.text();
    if !(200..300).contains(&reply.status) {
        bail!("{path}: HTTP {}: {payload}", reply.status);
    }
    serde_json::from_str(&payload).with_context(|| format!("{path}: reply is not JSON"))
}
