//! A short vector-store outage during ingest (issue 15): the real Qdrant server from
//! `../shared/qdrant` dies after the store is opened and comes back (same storage, same port)
//! a few seconds later, while a slide is being embedded. The store write is retried with
//! back-off: the slide ends embedded, is never marked failed, and its job used one attempt.
//! Skipped (with a message) where `../shared/qdrant` is absent.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gigapath_models::init::{init_slide_encoder, init_tile_encoder, SlideSize, TileSize};
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use gigapath_store::catalog::{JobState, SlideState};
use gigapath_store::vector::{PayloadFilter, SLIDES};
use gigapath_synth::CohortSpec;

mod common;

/// The Qdrant server binary, unpacked as `../shared/qdrant/start.sh` does.
fn qdrant_binary() -> Option<PathBuf> {
    let shared = common::repo().join("../shared/qdrant");
    let packed = shared.join("qdrant-1.18.3-x86_64-linux-gnu.xz");
    if !packed.is_file() {
        return None;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
        .join("gigapath-qdrant");
    let bin = cache.join("qdrant-1.18.3");
    if !bin.is_file() {
        std::fs::create_dir_all(&cache).unwrap();
        let tmp = cache.join(format!("qdrant.{}.tmp", std::process::id()));
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "xz -dc '{}' > '{}' && chmod +x '{}' && mv '{}' '{}'",
                packed.display(),
                tmp.display(),
                tmp.display(),
                tmp.display(),
                bin.display()
            ))
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
    }
    Some(bin)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One Qdrant node on loopback with its storage in `dir` (kept across restarts).
struct Qdrant {
    bin: PathBuf,
    dir: PathBuf,
    rest: u16,
    grpc: u16,
}

impl Qdrant {
    fn start(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .current_dir(&self.dir)
            .env("QDRANT__SERVICE__HOST", "127.0.0.1")
            .env("QDRANT__SERVICE__HTTP_PORT", self.rest.to_string())
            .env("QDRANT__SERVICE__GRPC_PORT", self.grpc.to_string())
            .env("QDRANT__CLUSTER__ENABLED", "false")
            .env("QDRANT__TELEMETRY_DISABLED", "true")
            .env("QDRANT__STORAGE__STORAGE_PATH", self.dir.join("storage"))
            .env(
                "QDRANT__STORAGE__SNAPSHOTS_PATH",
                self.dir.join("snapshots"),
            )
            .env("QDRANT__LOG_LEVEL", "WARN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !ready(self.rest) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "qdrant did not start: {}",
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }
}

fn ready(rest: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", rest)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200")
}

fn models(dir: &Path) {
    init_tile_encoder(
        &dir.join("tile"),
        TileSize {
            embed_dim: 48,
            depth: 1,
            num_heads: 3,
        },
        0,
    )
    .unwrap();
    init_slide_encoder(
        &dir.join("slide"),
        SlideSize {
            in_chans: 48,
            embed_dim: 64,
            depth: 1,
            num_heads: 16,
        },
        1,
    )
    .unwrap();
}

/// A fresh schema of the test Postgres as a catalog URL, or `None` (with a message) when
/// `GIGAPATH_TEST_POSTGRES_URL` is not set.
fn postgres_catalog(test: &str) -> Option<String> {
    let Ok(base) = std::env::var("GIGAPATH_TEST_POSTGRES_URL") else {
        eprintln!("SKIPPED postgres {test}: set GIGAPATH_TEST_POSTGRES_URL");
        return None;
    };
    let schema = format!("outage_{test}_{}", std::process::id());
    let out = Command::new("psql")
        .args([
            base.as_str(),
            "-q",
            "-c",
            &format!("CREATE SCHEMA {schema}"),
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

#[test]
fn a_short_qdrant_outage_is_retried_and_never_blamed_on_the_slide_sqlite() {
    qdrant_outage(None);
}

#[test]
fn a_short_qdrant_outage_is_retried_and_never_blamed_on_the_slide_postgres() {
    if let Some(url) = postgres_catalog("qdrant") {
        qdrant_outage(Some(url));
    }
}

/// A generated slide, tiny encoders, a Qdrant server and a pipeline over it (collections
/// created), the server still running.
struct Setup {
    _dir: tempfile::TempDir,
    qdrant: Qdrant,
    server: Child,
    pipeline: Pipeline,
    slide: PathBuf,
    slide_id: String,
}

fn setup(catalog_url: Option<String>, store_retry_seconds: u64) -> Option<Setup> {
    let Some(bin) = qdrant_binary() else {
        eprintln!("SKIPPED: no Qdrant server binary in ../shared/qdrant");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    models(&root.join("models"));
    let cohort = root.join("cohort");
    let spec = CohortSpec {
        slides_per_subtype: 1,
        slide_um: 700.0,
        ..CohortSpec::default()
    };
    gigapath_synth::generate(&cohort, &spec, &|_, _| {}).unwrap();
    let slide = std::fs::read_dir(cohort.join("slides"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "svs"))
        .unwrap();
    let slide_id = slide.file_stem().unwrap().to_string_lossy().into_owned();

    let server_dir = root.join("qdrant");
    std::fs::create_dir_all(&server_dir).unwrap();
    let qdrant = Qdrant {
        bin,
        dir: server_dir,
        rest: free_port(),
        grpc: free_port(),
    };
    let server = qdrant.start();

    let mut cfg = Config::load(Some(&root.join("data")), None).unwrap();
    cfg.models.tile_encoder = Some(root.join("models/tile"));
    cfg.models.slide_encoder = Some(root.join("models/slide"));
    cfg.ingest.batch_size = 8;
    cfg.store.catalog_url = catalog_url;
    cfg.ingest.store_retry_seconds = store_retry_seconds;
    cfg.store.vectors = serde_json::from_value(serde_json::json!({
        "backend": "qdrant",
        "url": format!("http://127.0.0.1:{}", qdrant.grpc),
    }))
    .unwrap();
    // Collections are created on the server here.
    let pipeline = Pipeline::open(cfg).unwrap();

    Some(Setup {
        _dir: dir,
        qdrant,
        server,
        pipeline,
        slide,
        slide_id,
    })
}

fn qdrant_outage(catalog_url: Option<String>) {
    let Some(Setup {
        _dir,
        qdrant,
        mut server,
        pipeline,
        slide,
        slide_id,
    }) = setup(catalog_url, 120)
    else {
        return;
    };
    // The outage: the server dies now and is back 3 s later, while the slide is embedded.
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(!ready(qdrant.rest));
    let restarted = std::thread::scope(|s| {
        let back = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            qdrant.start()
        });
        let started = Instant::now();
        let summary = pipeline
            .ingest(
                &IngestRequest {
                    inputs: vec![slide.clone()],
                    ..IngestRequest::default()
                },
                &Quiet,
            )
            .unwrap();
        let server = back.join().unwrap();
        assert_eq!(summary.run.slides_ok, 1, "{summary:?}");
        assert_eq!(summary.run.slides_failed, 0, "{summary:?}");
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "the write waited for the server"
        );
        server
    });
    let mut server = restarted;

    let catalog = &pipeline.store.catalog;
    let record = pipeline
        .block_on(catalog.slide(&slide_id))
        .unwrap()
        .unwrap();
    assert_eq!(record.state, SlideState::Embedded);
    assert_eq!(record.error, None);
    let jobs = pipeline.block_on(catalog.list_jobs(None, 10)).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].state, jobs[0].attempts, jobs[0].deferrals),
        (JobState::Done, 1, 0)
    );
    let points = pipeline
        .block_on(pipeline.store.vectors.count(SLIDES, &PayloadFilter::none()))
        .unwrap();
    assert_eq!(points, 1);
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn a_long_outage_gives_the_job_back_uncounted_and_the_slide_is_not_failed() {
    let Some(Setup {
        _dir,
        qdrant,
        mut server,
        pipeline,
        slide,
        slide_id,
    }) = setup(None, 2)
    else {
        return;
    };
    let request = IngestRequest {
        inputs: vec![slide],
        ..IngestRequest::default()
    };
    // The server stays down longer than the 2 s of retries: the run stops with the outage.
    server.kill().unwrap();
    server.wait().unwrap();
    let err = pipeline.ingest(&request, &Quiet).unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("unavailable"), "{err}");
    let catalog = &pipeline.store.catalog;
    let record = pipeline
        .block_on(catalog.slide(&slide_id))
        .unwrap()
        .unwrap();
    assert_eq!((record.state, record.error), (SlideState::Registered, None));
    let job = &pipeline.block_on(catalog.list_jobs(None, 10)).unwrap()[0];
    assert_eq!(
        (job.state, job.attempts, job.deferrals),
        (JobState::Queued, 0, 1),
        "given back, the attempt not counted: {job:?}"
    );
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("infrastructure error (not counted as an attempt)"),
        "{job:?}"
    );

    // Once the server is back, the next run embeds it.
    let mut server = qdrant.start();
    let summary = pipeline.ingest(&request, &Quiet).unwrap();
    assert_eq!((summary.run.slides_ok, summary.run.slides_failed), (1, 0));
    let job = &pipeline.block_on(catalog.list_jobs(None, 10)).unwrap()[0];
    assert_eq!(
        (job.state, job.attempts, job.deferrals),
        (JobState::Done, 1, 1)
    );
    assert_eq!(
        pipeline
            .block_on(catalog.slide(&slide_id))
            .unwrap()
            .unwrap()
            .state,
        SlideState::Embedded
    );
    server.kill().unwrap();
    server.wait().unwrap();
}
