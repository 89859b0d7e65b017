//! Helpers shared by the service's integration tests: a minimal HTTP/1.1 client over a plain
//! TCP stream (one request per connection, chunked bodies decoded) and JSON shorthands.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gigapath_models::init::{init_slide_encoder, init_tile_encoder, SlideSize, TileSize};
use gigapath_pipeline::Config;
use gigapath_synth::CohortSpec;
use serde_json::Value;

/// The small BERT fixture (text_pool = cls): fast enough for tests.
pub const TEXT_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/reference/text_bert_mlm"
);

/// A service config over `root`: tiny seeded tile and slide encoders in `root/models`, a
/// synthetic cohort of `slides_per_subtype` x 3 slides in `root/slides-root/cohort` (the slide
/// root), the data dir `root/data`, the small BERT text model, `key` as the admin key, and a
/// random loopback port.
pub fn tiny_service_config(root: &Path, slides_per_subtype: usize, key: &str) -> Config {
    let models = root.join("models");
    init_tile_encoder(
        &models.join("tile"),
        TileSize {
            embed_dim: 48,
            depth: 1,
            num_heads: 3,
        },
        0,
    )
    .unwrap();
    init_slide_encoder(
        &models.join("slide"),
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
        slides_per_subtype,
        slide_um: 700.0,
        ..CohortSpec::default()
    };
    gigapath_synth::generate(&root.join("slides-root/cohort"), &spec, &|_, _| {}).unwrap();
    let mut cfg = Config::load(Some(&root.join("data")), None).unwrap();
    cfg.models.tile_encoder = Some(models.join("tile"));
    cfg.models.slide_encoder = Some(models.join("slide"));
    cfg.models.text_encoder = Some(PathBuf::from(TEXT_MODEL));
    cfg.models.text_pool = "cls".into();
    cfg.ingest.batch_size = 8;
    cfg.serve.bind = "127.0.0.1:0".into();
    cfg.serve.api_keys = vec![key.into()];
    cfg.serve.slide_roots = vec![root.join("slides-root")];
    cfg.serve.prompts_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts");
    cfg
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    /// The header block, one `Name: value` per line.
    pub head: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    /// A response header's value (first occurrence, name case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        })
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One request per connection, through the service's own client ([`gigapath_api::client`]).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let r =
        gigapath_api::client::exchange(addr, method, path, headers, body, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    Reply {
        status: r.status,
        content_type: r.header("content-type").unwrap_or_default(),
        head: r.head,
        body: r.body,
    }
}

pub fn post(addr: SocketAddr, path: &str, body: &Value, key: Option<&str>) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(
        addr,
        "POST",
        path,
        &headers,
        Some(body.to_string().as_bytes()),
    )
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, &[], None)
}

/// The body as text, for assertion messages.
pub fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}
