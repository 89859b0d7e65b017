//! The JSON request bodies of every HTTP endpoint that takes one, through what the server does
//! with them before any store or model is touched.
//!
//! First byte selects the endpoint (modulo 6); the rest is the raw body. Each goes through
//! `serde_json::from_slice::<Value>` (actix-web's `web::Json<Value>`, which the `Body` extractor
//! wraps), `routes::body_from_value` (the `Body` extractor: a JSON object, deserialized with
//! `deny_unknown_fields`, whole-number counts), then the request type's `check`, which the
//! handler calls first (ids, limits, filters, prompt sets / inline classes, paths):
//! - 0: `POST /v1/search/slides` (`SlideSearch`);
//! - 1: `POST /v1/search/reports` (`ReportSearch`);
//! - 2: `POST /v1/ingest` (`IngestRequest`), then `ingest::confine` of every path against a
//!   slide root (a temporary folder);
//! - 3: `POST /v1/slides/{id}/heatmap` (`HeatmapRequest`);
//! - 4: `POST /v1/zero-shot/subtype` (`SubtypeRequest`, with the repository's prompt sets);
//! - 5: `POST /v1/zero-shot/mutation` (`MutationRequest`, the same prompt sets).
//!
//! The limits are `ServeConfig::default()`'s (as `gigapath serve` without a config).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use gigapath_api::error::ApiError;
use gigapath_api::routes::{body_from_value, ingest, search, slides, zeroshot};
use gigapath_pipeline::config::ServeConfig;
use gigapath_zeroshot::PromptLibrary;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

struct Fixture {
    cfg: ServeConfig,
    prompts: PromptLibrary,
    roots: Vec<PathBuf>,
    _root: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let prompts_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts");
        let root = std::env::temp_dir().join(format!("gigapath-fuzz-roots-{}", std::process::id()));
        std::fs::create_dir_all(root.join("cohort")).expect("temporary slide root");
        std::fs::write(root.join("cohort/S1.svs"), b"not a slide").expect("a file under the root");
        Fixture {
            cfg: ServeConfig::default(),
            prompts: PromptLibrary::load(&prompts_dir).expect("the repository's prompt sets load"),
            roots: vec![root.clone()],
            _root: root,
        }
    })
}

/// The extractor's steps; `None` when the body is refused there (always as a 400).
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    match body_from_value::<T>(value) {
        Ok(t) => Some(t),
        Err(e) => {
            assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}");
            None
        }
    }
}

/// A refused request is answered with a client error (4xx), never a 5xx.
fn client_error<T>(r: Result<T, ApiError>) -> Option<T> {
    match r {
        Ok(t) => Some(t),
        Err(e) => {
            assert!(
                matches!(
                    e,
                    ApiError::BadRequest(_) | ApiError::NotFound(_) | ApiError::Forbidden(_)
                ),
                "a bad body gave {e:?}"
            );
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    match selector % 6 {
        0 => {
            if let Some(req) = body::<search::SlideSearch>(rest) {
                if let Some(c) = client_error(req.check(&f.cfg)) {
                    assert!(c.k >= 1 && c.k <= f.cfg.max_k);
                    assert_eq!(c.query.is_some(), req.query.is_some());
                }
            }
        }
        1 => {
            if let Some(req) = body::<search::ReportSearch>(rest) {
                if let Some(c) = client_error(req.check(&f.cfg)) {
                    assert!(c.k >= 1 && c.k <= f.cfg.max_k);
                }
            }
        }
        2 => {
            if let Some(req) = body::<ingest::IngestRequest>(rest) {
                if client_error(req.check(&f.cfg)).is_some() {
                    for p in &req.slides {
                        if let Some(resolved) = client_error(ingest::confine(p, &f.roots)) {
                            let root = std::fs::canonicalize(&f.roots[0]).unwrap();
                            assert!(resolved.starts_with(&root), "{p:?} -> {resolved:?}");
                        }
                    }
                }
            }
        }
        3 => {
            if let Some(req) = body::<slides::HeatmapRequest>(rest) {
                if let Some(q) = client_error(req.check(&f.cfg)) {
                    assert!(!q.is_empty() && q.chars().count() <= f.cfg.max_text_chars);
                }
            }
        }
        4 => {
            if let Some(req) = body::<zeroshot::SubtypeRequest>(rest) {
                if let Some(c) = client_error(req.check(&f.prompts, &f.cfg)) {
                    assert!(c.set.classes.len() >= 2 && !c.set.templates.is_empty());
                    if let Some(labels) = &c.inline_labels {
                        assert_eq!(labels.len(), c.set.classes.len());
                    }
                }
            }
        }
        _ => {
            if let Some(req) = body::<zeroshot::MutationRequest>(rest) {
                if let Some(c) = client_error(req.check(&f.prompts, &f.cfg)) {
                    assert!(!c.genes.is_empty());
                }
            }
        }
    }
});
