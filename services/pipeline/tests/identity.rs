//! Slide identity (issue 13, item 5 and 6): an id stands for one file's content; a different
//! file under a known id is refused unless replaced; forgetting a slide leaves catalog, jobs,
//! points and files consistent and the id ingestible again; bad file names are refused before
//! anything is registered, never with a panic.

use std::path::{Path, PathBuf};

use gigapath_models::init::{init_slide_encoder, init_tile_encoder, SlideSize, TileSize};
use gigapath_pipeline::identity::{forget_slide, Forgotten};
use gigapath_pipeline::{Config, IngestRequest, Pipeline, Quiet};
use gigapath_store::catalog::{ClaimOptions, NewJob};
use gigapath_store::vector::{PayloadFilter, SLIDE, SLIDES};
use gigapath_synth::CohortSpec;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    slides: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    init_tile_encoder(
        &root.join("models/tile"),
        TileSize {
            embed_dim: 48,
            depth: 1,
            num_heads: 3,
        },
        0,
    )
    .unwrap();
    init_slide_encoder(
        &root.join("models/slide"),
        SlideSize {
            in_chans: 48,
            embed_dim: 64,
            depth: 1,
            num_heads: 16,
        },
        1,
    )
    .unwrap();
    let spec = CohortSpec {
        slides_per_subtype: 1,
        slide_um: 700.0,
        ..CohortSpec::default()
    };
    gigapath_synth::generate(&root.join("cohort"), &spec, &|_, _| {}).unwrap();
    Fixture {
        slides: root.join("cohort/slides"),
        _dir: dir,
        root,
    }
}

impl Fixture {
    fn pipeline(&self) -> Pipeline {
        let mut cfg = Config::load(Some(&self.root.join("data")), None).unwrap();
        cfg.models.tile_encoder = Some(self.root.join("models/tile"));
        cfg.models.slide_encoder = Some(self.root.join("models/slide"));
        cfg.ingest.batch_size = 8;
        Pipeline::open(cfg).unwrap()
    }
}

fn ingest(
    p: &Pipeline,
    inputs: &[PathBuf],
    replace: bool,
) -> gigapath_pipeline::Result<gigapath_pipeline::IngestSummary> {
    p.ingest(
        &IngestRequest {
            inputs: inputs.to_vec(),
            replace,
            ..IngestRequest::default()
        },
        &Quiet,
    )
}

fn slide_vector(p: &Pipeline, id: &str) -> Vec<f32> {
    p.block_on(p.store.vectors.retrieve(SLIDES, &[id.to_string()], true))
        .unwrap()
        .remove(0)
        .vectors[SLIDE]
        .clone()
}

/// Status agrees with the store: every embedded slide has a point, and only those.
fn assert_consistent(p: &Pipeline) {
    let st = p.status().unwrap();
    let points = p
        .block_on(p.store.vectors.count(SLIDES, &PayloadFilter::none()))
        .unwrap();
    assert_eq!(st.slides["embedded"], points, "{st:?}");
    assert_eq!(st.jobs.done, points, "{st:?}");
    let fps: u64 = st.fingerprints[SLIDES].values().sum();
    assert_eq!(fps, points, "{st:?}");
}

#[test]
fn a_different_file_under_a_known_id_is_refused_unless_replaced() {
    let fx = fixture();
    let p = fx.pipeline();
    let first = fx.slides.join("SYN-0001.svs");
    assert_eq!(
        ingest(&p, std::slice::from_ref(&first), false)
            .unwrap()
            .run
            .slides_ok,
        1
    );
    let before = slide_vector(&p, "SYN-0001");
    let tiles_before = p
        .block_on(p.store.catalog.slide("SYN-0001"))
        .unwrap()
        .unwrap()
        .tile_count;

    // Another slide's bytes under the same file name elsewhere.
    let other = fx.root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let impostor = other.join("SYN-0001.svs");
    std::fs::copy(fx.slides.join("SYN-0002.svs"), &impostor).unwrap();
    let err = ingest(&p, std::slice::from_ref(&impostor), false)
        .unwrap_err()
        .to_string();
    let canon_first = first.canonicalize().unwrap();
    let canon_impostor = impostor.canonicalize().unwrap();
    assert!(err.contains("slide id `SYN-0001`"), "{err}");
    assert!(err.contains(&canon_first.display().to_string()), "{err}");
    assert!(err.contains(&canon_impostor.display().to_string()), "{err}");
    assert!(err.contains("--replace"), "{err}");
    // Nothing changed: the catalog still points at the first file, the vector is the same.
    let rec = p
        .block_on(p.store.catalog.slide("SYN-0001"))
        .unwrap()
        .unwrap();
    assert_eq!(Path::new(&rec.path), canon_first);
    assert_eq!(slide_vector(&p, "SYN-0001"), before);

    // The same content at another path (a copy: other mtime) is the same slide.
    let moved = fx.root.join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::copy(&first, moved.join("SYN-0001.svs")).unwrap();
    let again = ingest(&p, &[moved.join("SYN-0001.svs")], false).unwrap();
    assert_eq!((again.already_done, again.run.slides_ok), (1, 0));

    // A job that a killed run left "running" (live lease) does not block replacing with the
    // embedded store: this process holds the data dir alone.
    p.block_on(p.store.catalog.queue_job(&NewJob {
        kind: gigapath_pipeline::EMBED_SLIDE.into(),
        subject: "SYN-0001".into(),
        fingerprint: "weights-of-a-killed-run".into(),
        payload: serde_json::json!({}),
        retry_failed: false,
    }))
    .unwrap();
    let orphan = p
        .block_on(
            p.store
                .catalog
                .claim_job("dead-worker", &ClaimOptions::default()),
        )
        .unwrap()
        .unwrap();
    assert_eq!(orphan.subject, "SYN-0001");

    // Replacing re-embeds the id from the new file: new vector, new tiles, nothing stale.
    let replaced = ingest(&p, std::slice::from_ref(&impostor), true).unwrap();
    assert_eq!(replaced.replaced, vec!["SYN-0001".to_string()]);
    assert_eq!(replaced.run.slides_ok, 1, "{:?}", replaced.run.failures);
    let rec = p
        .block_on(p.store.catalog.slide("SYN-0001"))
        .unwrap()
        .unwrap();
    assert_eq!(Path::new(&rec.path), canon_impostor);
    assert_ne!(slide_vector(&p, "SYN-0001"), before);
    // The replacement is SYN-0002's bytes: the same vector and tiles as SYN-0002 would get.
    assert_eq!(
        ingest(&p, &[fx.slides.join("SYN-0002.svs")], false)
            .unwrap()
            .run
            .slides_ok,
        1
    );
    let (a, b) = (slide_vector(&p, "SYN-0001"), slide_vector(&p, "SYN-0002"));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-4,
        "replaced SYN-0001 is not SYN-0002's slide: {diff}"
    );
    let tiles_after = p
        .block_on(p.store.catalog.slide("SYN-0001"))
        .unwrap()
        .unwrap()
        .tile_count;
    let tiles_0002 = p
        .block_on(p.store.catalog.slide("SYN-0002"))
        .unwrap()
        .unwrap()
        .tile_count;
    assert_eq!(tiles_after, tiles_0002);
    assert!(tiles_before.is_some());
    // Now the first file is the different one.
    let err = ingest(&p, &[first], false).unwrap_err().to_string();
    assert!(err.contains("already stands for"), "{err}");
    assert_consistent(&p);
}

#[test]
fn forgetting_a_slide_leaves_everything_consistent_and_it_can_come_back() {
    let fx = fixture();
    let p = fx.pipeline();
    let all = ingest(&p, std::slice::from_ref(&fx.slides), false).unwrap();
    assert_eq!(all.run.slides_ok, 3);
    let fp = p.slide_models().unwrap().fingerprints["tile"].clone();
    let features = p.store.feature_path("SYN-0002", &fp);
    assert!(features.is_file());
    assert!(p.tiles_dir("SYN-0002").join("thumbnail.png").is_file());

    assert_eq!(
        p.block_on(forget_slide(&p.store, "SYN-0002", true))
            .unwrap(),
        Forgotten::Done { reports: 0 }
    );
    assert_eq!(
        p.block_on(forget_slide(&p.store, "NOPE", true)).unwrap(),
        Forgotten::Unknown
    );
    assert!(p.block_on(forget_slide(&p.store, "..", true)).is_err());
    let rec = p
        .block_on(p.store.catalog.slide("SYN-0002"))
        .unwrap()
        .unwrap();
    assert_eq!(rec.state.as_str(), "registered");
    assert_eq!((rec.fingerprint, rec.tile_count), (None, None));
    assert!(!features.exists(), "feature file left behind");
    assert!(
        !p.tiles_dir("SYN-0002").exists(),
        "tiling pictures left behind"
    );
    let st = p.status().unwrap();
    assert_eq!(st.slides["embedded"], 2);
    assert_eq!(st.points[SLIDES], 2);
    assert_consistent(&p);

    // Ingesting it again embeds it again (the old code answered "already done").
    let back = ingest(&p, std::slice::from_ref(&fx.slides), false).unwrap();
    assert_eq!((back.run.slides_ok, back.already_done), (1, 2));
    assert!(features.is_file());
    assert_eq!(p.status().unwrap().points[SLIDES], 3);
    assert_consistent(&p);
}

#[test]
fn bad_file_names_are_refused_before_anything_is_registered() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let fx = fixture();
    let p = fx.pipeline();
    let bad = fx.root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let slide = fx.slides.join("SYN-0003.svs");
    std::fs::copy(&slide, bad.join("good.svs")).unwrap();
    for name in [&b"..svs"[..], b"...svs", b"caf\xe9.svs", b"caf\xe8.svs"] {
        std::fs::copy(&slide, bad.join(OsStr::from_bytes(name))).unwrap();
    }
    let err = ingest(&p, std::slice::from_ref(&bad), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("4 slide file(s) cannot be ingested"),
        "{err}"
    );
    assert!(err.contains("/bad/..svs: the slide id `.`"), "{err}");
    assert!(err.contains("/bad/...svs: the slide id `..`"), "{err}");
    assert_eq!(err.matches("not valid UTF-8").count(), 2, "{err}");
    // Nothing registered, queued or written (the old code panicked on the non-UTF-8 name, or
    // wrote pictures into the data dir's root for `.` and `..`).
    let st = p.status().unwrap();
    assert_eq!(st.slides.values().sum::<u64>(), 0, "{st:?}");
    assert_eq!(st.jobs.total(), 0);
    assert!(!fx.root.join("data/thumbnail.png").exists());
    assert!(!fx.root.join("data/tiles/thumbnail.png").exists());
    // A non-UTF-8 file given directly: the same clear error, no panic.
    let direct = bad.join(OsStr::from_bytes(b"caf\xe9.svs"));
    let err = ingest(&p, &[direct], false).unwrap_err().to_string();
    assert!(
        err.contains("caf\u{fffd}.svs: the path is not valid UTF-8"),
        "{err}"
    );
    // No slide at all is an error, not an empty success.
    let empty = fx.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = ingest(&p, &[empty], false).unwrap_err().to_string();
    assert!(err.contains("no slide files"), "{err}");
}
