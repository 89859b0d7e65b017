//! The one configuration of gigapath (TOML), with every default printable.
//!
//! Layers, later wins: built-in defaults, `DATA_DIR/gigapath.toml` (written by the first ingest
//! so that workers and the service on that data dir use the same models), `--config FILE`,
//! environment variables (`GIGAPATH_QDRANT_URL`, `GIGAPATH_QDRANT_API_KEY`,
//! `GIGAPATH_CATALOG_URL`, `GIGAPATH_WEIGHTS`, `GIGAPATH_TILE_ENCODER`, `GIGAPATH_SLIDE_ENCODER`,
//! `GIGAPATH_TEXT_ENCODER`, `GIGAPATH_ALIGNMENT`, `GIGAPATH_DEVICE`, `GIGAPATH_DTYPE`), then
//! flags. Tables merge key by key, so a file may set only what it changes. Relative paths are
//! taken from the working directory, except in the data dir's own file, where they are taken
//! from the data dir (so that a data dir can be moved or copied whole).
//!
//! Secrets are never written to the data dir's file: the first ingest saves every other key,
//! the catalog URL without its password, and no Qdrant or service API key. Later commands get
//! them from the environment (`GIGAPATH_QDRANT_API_KEY`, `GIGAPATH_API_KEYS`, `PGPASSWORD` or
//! `~/.pgpass`, `GIGAPATH_CATALOG_URL`) or a `--config FILE`.

use std::path::{Path, PathBuf};

use gigapath_store::{StoreConfig, VectorBackendConfig};
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

/// Name of the config file kept in a data dir.
pub const DATA_DIR_CONFIG: &str = "gigapath.toml";

/// Keys (table, key) that hold a path or a list of paths: in the data dir's own file a relative
/// one is taken from the data dir, and one inside the data dir is saved relative to it.
const PATH_KEYS: [(&str, &str); 7] = [
    ("models", "weights"),
    ("models", "tile_encoder"),
    ("models", "slide_encoder"),
    ("models", "text_encoder"),
    ("models", "alignment"),
    ("serve", "prompts_dir"),
    ("serve", "slide_roots"),
];

/// What `to_toml` shows in place of a secret; never a value that is saved or loaded.
const REDACTED: &str = "<redacted>";

/// The whole configuration: one table per concern, each key with a default (see the module
/// docs for how the layers merge).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    /// `[store]`: data dir, vector store and catalog.
    pub store: StoreConfig,
    /// `[models]`: encoder and alignment folders, device, precision.
    pub models: ModelsConfig,
    /// `[tiling]`: tissue segmentation, tile selection and QC rules.
    pub tiling: TilingConfig,
    /// `[ingest]`: what ingest does besides tiling and embedding.
    pub ingest: IngestConfig,
    /// `[serve]`: the HTTP service.
    pub serve: ServeConfig,
}

/// The HTTP service (`gigapath serve`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on.
    pub bind: String,
    /// Keys accepted on ingest, delete and admin endpoints (`Authorization: Bearer KEY` or
    /// `X-Api-Key: KEY`); also `GIGAPATH_API_KEYS` (comma-separated). None: those endpoints
    /// answer 403.
    pub api_keys: Vec<String>,
    /// Require a key on read endpoints (search, zero-shot, slides) too.
    pub require_key_for_reads: bool,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Largest `k` of a search.
    pub max_k: usize,
    /// Longest query or prompt text, characters.
    pub max_text_chars: usize,
    /// Most slide ids in one zero-shot request.
    pub max_slide_ids: usize,
    /// Work per request (model + store) is cut off after this.
    pub request_timeout_seconds: u64,
    /// A request's head must arrive within this many seconds, and its body again within this
    /// many once the handler reads it; a slower client gets 408 and the connection is closed.
    pub read_timeout_seconds: u64,
    /// Open connections at once, all workers together; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections waiting to be accepted (the listen backlog); more are refused by the OS.
    pub backlog: usize,
    /// Requests being received or worked on at once; more get 503 with `Retry-After`.
    /// `/healthz`, `/readyz` and `/metrics` are not counted and always answer.
    pub max_in_flight: usize,
    /// Slide paths in ingest requests must resolve (symlinks followed) under one of these.
    /// None: ingest over HTTP is refused.
    pub slide_roots: Vec<PathBuf>,
    /// Prompt sets folder.
    pub prompts_dir: PathBuf,
    /// Run an ingest worker inside the service (required with the embedded vector store, which
    /// one process holds alone).
    pub run_worker: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            bind: "127.0.0.1:8080".into(),
            api_keys: Vec::new(),
            require_key_for_reads: false,
            max_body_bytes: 256 * 1024,
            max_k: 100,
            max_text_chars: 2000,
            max_slide_ids: 1000,
            request_timeout_seconds: 30,
            read_timeout_seconds: 10,
            max_connections: 1024,
            backlog: 1024,
            max_in_flight: 256,
            slide_roots: Vec::new(),
            prompts_dir: PathBuf::from("prompts"),
            run_worker: true,
        }
    }
}

/// Keys never reach logs through `Debug`.
impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("bind", &self.bind)
            .field("api_keys", &format!("<{} keys>", self.api_keys.len()))
            .field("require_key_for_reads", &self.require_key_for_reads)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("slide_roots", &self.slide_roots)
            .field("prompts_dir", &self.prompts_dir)
            .finish_non_exhaustive()
    }
}

/// Model folders and how to run them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// The Prov-GigaPath release in one folder, as `gigapath models fetch prov-gigapath` or
    /// `huggingface-cli download prov-gigapath/prov-gigapath` writes it (timm `config.json`,
    /// `pytorch_model.bin` / `model.safetensors`, `slide_encoder.pth`): both encoders come from
    /// it unless `tile_encoder` / `slide_encoder` name their own folders.
    pub weights: Option<PathBuf>,
    /// Tile encoder folder: timm `config.json` + `pytorch_model.bin` or `model.safetensors`.
    pub tile_encoder: Option<PathBuf>,
    /// Slide encoder folder: `slide_encoder.pth` (+ optional `config.json`).
    pub slide_encoder: Option<PathBuf>,
    /// Text encoder folder (Hugging Face BERT family). Default: the offline all-MiniLM-L6-v2.
    pub text_encoder: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32` (CPU), `bf16` or `f16` (CUDA).
    pub dtype: String,
    /// Slide embedding: `mean` (the release's global_pool, as TRIDENT and fine-tuning use) or
    /// `cls` (the release's default output; its CLS token was not trained in pretraining).
    pub slide_pool: String,
    /// Text embedding: `mean` (sentence-transformers) or `cls` (MI-Zero's PubMedBERT).
    pub text_pool: String,
    /// L2-normalise text embeddings.
    pub text_normalize: bool,
    /// Alignment checkpoint folder (`alignment.json` + `alignment.safetensors`, written by
    /// `gigapath train`). When set, ingest also writes `joint` vectors and every fingerprint
    /// includes the checkpoint's; `gigapath reembed` sets it for the data dir.
    pub alignment: Option<PathBuf>,
}

impl ModelsConfig {
    /// The tile encoder's folder: `tile_encoder`, else the release folder `weights`.
    pub fn tile_dir(&self) -> Option<&Path> {
        self.tile_encoder.as_deref().or(self.weights.as_deref())
    }

    /// The slide encoder's folder: `slide_encoder`, else the release folder `weights`.
    pub fn slide_dir(&self) -> Option<&Path> {
        self.slide_encoder.as_deref().or(self.weights.as_deref())
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            weights: None,
            tile_encoder: None,
            slide_encoder: None,
            text_encoder: Some(default_text_encoder()),
            device: "cpu".into(),
            dtype: "f32".into(),
            slide_pool: "mean".into(),
            text_pool: "mean".into(),
            text_normalize: true,
            alignment: None,
        }
    }
}

/// The offline all-MiniLM-L6-v2 that `scripts/fetch-minilm.sh` puts in `models/weights/`:
/// `GIGAPATH_MINILM_DIR`, else that folder under the working directory, else under this checkout.
pub fn default_text_encoder() -> PathBuf {
    if let Some(dir) = std::env::var_os("GIGAPATH_MINILM_DIR") {
        return PathBuf::from(dir);
    }
    let relative = PathBuf::from("models/weights/all-MiniLM-L6-v2");
    if relative.is_dir() {
        return relative;
    }
    let checkout =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/weights/all-MiniLM-L6-v2");
    if checkout.is_dir() {
        return checkout;
    }
    relative
}

/// Segmentation and tiling (see `gigapath tile --help`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TilingConfig {
    /// `otsu` (the reference's) or `saturation` (CLAM-like).
    pub method: String,
    /// Keep tiles whose tissue fraction is above this.
    pub tissue_threshold: f64,
    /// Level-0 um/px for slides that record none.
    pub mpp: Option<f64>,
    /// A slide whose tile grid (kept or not) has more tiles than this fails before any pixel
    /// is read (a wrong mpp or a forged header, not a real slide).
    pub max_tiles: u64,
    /// Share of a slide's kept tiles that may be unreadable (damaged JPEG tiles): they are
    /// skipped and listed in the slide's `skipped_tiles.csv`; beyond it the slide fails.
    pub max_bad_tile_fraction: f64,
    /// Leave out pen marks, debris and out-of-focus tiles (off: the reference's tiling); each
    /// rule below then runs when true (see the README's QC rules).
    pub artifacts: bool,
    /// With `artifacts`: leave out marker ink.
    pub pen_marks: bool,
    /// With `artifacts`: leave out small dark debris.
    pub debris: bool,
    /// With `artifacts`: drop out-of-focus tiles.
    pub out_of_focus: bool,
    /// Variance of the Laplacian (grey levels^2 at 0.5 um/px) under which a tile is out of focus.
    pub blur_threshold: f64,
    /// A folder of corrected masks, `SLIDE_ID.geojson` (QuPath GeoJSON, level-0 pixels), used
    /// instead of segmentation for their slides; a `SLIDE_ID.geojson` beside a slide is used too.
    pub masks_dir: Option<PathBuf>,
}

impl TilingConfig {
    /// The corrected mask for a slide: `masks_dir/SLIDE_ID.geojson`, else the slide's path
    /// with the extension `.geojson`, when the file exists.
    pub fn mask_for(&self, slide_id: &str, slide_path: &Path) -> Option<PathBuf> {
        let in_dir = self
            .masks_dir
            .as_ref()
            .map(|d| d.join(format!("{slide_id}.geojson")));
        let beside = slide_path.with_extension("geojson");
        in_dir.into_iter().chain([beside]).find(|p| p.is_file())
    }

    /// The artifact rules as the tiler takes them.
    pub fn artifact_options(&self) -> gigapath_wsi::artifacts::ArtifactOptions {
        gigapath_wsi::artifacts::ArtifactOptions {
            enabled: self.artifacts,
            pen: self.pen_marks,
            debris: self.debris,
            blur: self.out_of_focus,
            blur_threshold: self.blur_threshold,
        }
    }
}

impl Default for TilingConfig {
    fn default() -> Self {
        TilingConfig {
            method: "otsu".into(),
            tissue_threshold: 0.1,
            mpp: None,
            max_tiles: gigapath_wsi::grid::DEFAULT_MAX_TILES,
            max_bad_tile_fraction: 0.05,
            artifacts: false,
            pen_marks: true,
            debris: true,
            out_of_focus: true,
            blur_threshold: gigapath_wsi::artifacts::DEFAULT_BLUR_THRESHOLD,
            masks_dir: None,
        }
    }
}

/// Batching, parallelism and job leases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Tiles per tile-encoder batch (the release uses 128 on GPU).
    pub batch_size: usize,
    /// Tile reader threads (0 = all cores).
    pub reader_threads: usize,
    /// Reports per text-encoder batch.
    pub text_batch_size: usize,
    /// A claimed job is renewed every third of this; a dead worker's claim expires after it.
    pub lease_seconds: u64,
    /// Claims of a job before it is failed for good (a slide that kills its worker).
    pub max_attempts: u32,
    /// How long a store or catalog call is retried, with back-off, after an infrastructure
    /// error (server unreachable, connection lost) before its job goes back to the queue
    /// (uncounted) and the run stops; 0: not retried.
    pub store_retry_seconds: u64,
    /// Cohort recorded for slides that do not name one.
    pub cohort: Option<String>,
    /// Write every tile's features to the `tiles` collection (region search) after its slide.
    pub index_tiles: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            batch_size: 32,
            reader_threads: 0,
            text_batch_size: 32,
            lease_seconds: 600,
            max_attempts: 3,
            store_retry_seconds: 120,
            cohort: None,
            index_tiles: true,
        }
    }
}

impl Config {
    /// Loads the layers for `data_dir` (if any) and `file` (if any), then the environment.
    pub fn load(data_dir: Option<&Path>, file: Option<&Path>) -> Result<Config> {
        let mut merged = toml::Table::new();
        if let Some(dir) = data_dir {
            let own = dir.join(DATA_DIR_CONFIG);
            if own.is_file() {
                merge(&mut merged, data_dir_table(read_table(&own)?, &own, dir));
            }
        }
        if let Some(f) = file {
            merge(&mut merged, read_table(f)?);
        }
        let mut cfg = from_table(merged)?;
        cfg.apply_env(|k| std::env::var(k).ok());
        if let Some(dir) = data_dir {
            cfg.store.data_dir = dir.to_path_buf();
        }
        cfg.absolutize();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates the text of one config file as [`Config::load`] reads it: as the
    /// data dir's own `gigapath.toml` when `data_dir` is given (redacted secrets dropped, relative
    /// paths taken from the data dir), else as a `--config` file; without the environment and
    /// without making model paths absolute. `path` only names the file in errors.
    pub fn from_toml(text: &str, path: &Path, data_dir: Option<&Path>) -> Result<Config> {
        let mut table = parse_table(text, path)?;
        if let Some(dir) = data_dir {
            table = data_dir_table(table, path, dir);
        }
        let mut cfg = from_table(table)?;
        if let Some(dir) = data_dir {
            cfg.store.data_dir = dir.to_path_buf();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Model folders that exist become absolute paths, so that what is saved in the data dir
    /// and recorded with jobs means the same from any working directory.
    pub fn absolutize(&mut self) {
        let m = &mut self.models;
        for slot in [
            &mut m.weights,
            &mut m.tile_encoder,
            &mut m.slide_encoder,
            &mut m.text_encoder,
            &mut m.alignment,
        ] {
            if let Some(abs) = slot.as_deref().and_then(|p| std::fs::canonicalize(p).ok()) {
                *slot = Some(abs);
            }
        }
    }

    fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        let qdrant_key = var("GIGAPATH_QDRANT_API_KEY").filter(|v| !v.is_empty());
        if let Some(url) = var("GIGAPATH_QDRANT_URL").filter(|v| !v.is_empty()) {
            // A file's cluster layout stays; the URL and key are the environment's.
            match &mut self.store.vectors {
                VectorBackendConfig::Qdrant {
                    url: u, api_key, ..
                } => {
                    *u = url;
                    *api_key = qdrant_key;
                }
                other => *other = VectorBackendConfig::qdrant(url, qdrant_key),
            }
        } else if let (VectorBackendConfig::Qdrant { api_key, .. }, Some(key)) =
            (&mut self.store.vectors, qdrant_key)
        {
            // The key alone, for a server named in a file (the data dir's never holds the key).
            *api_key = Some(key);
        }
        if let Some(url) = var("GIGAPATH_CATALOG_URL").filter(|v| !v.is_empty()) {
            self.store.catalog_url = Some(url);
        }
        if let VectorBackendConfig::Qdrant {
            shard_number,
            replication_factor,
            write_consistency_factor,
            ..
        } = &mut self.store.vectors
        {
            for (name, slot) in [
                ("GIGAPATH_QDRANT_SHARD_NUMBER", shard_number),
                ("GIGAPATH_QDRANT_REPLICATION_FACTOR", replication_factor),
                (
                    "GIGAPATH_QDRANT_WRITE_CONSISTENCY_FACTOR",
                    write_consistency_factor,
                ),
            ] {
                if let Some(v) = var(name).filter(|v| !v.trim().is_empty()) {
                    // Not a count: 0, which validation refuses with the key's name.
                    *slot = v.trim().parse().unwrap_or_else(|_| {
                        tracing::error!("{name}={v:?} is not a positive whole number");
                        0
                    });
                }
            }
        }
        let m = &mut self.models;
        for (name, slot) in [
            ("GIGAPATH_WEIGHTS", &mut m.weights),
            ("GIGAPATH_TILE_ENCODER", &mut m.tile_encoder),
            ("GIGAPATH_SLIDE_ENCODER", &mut m.slide_encoder),
            ("GIGAPATH_TEXT_ENCODER", &mut m.text_encoder),
            ("GIGAPATH_ALIGNMENT", &mut m.alignment),
        ] {
            if let Some(v) = var(name).filter(|v| !v.is_empty()) {
                *slot = Some(PathBuf::from(v));
            }
        }
        if let Some(keys) = var("GIGAPATH_API_KEYS").filter(|v| !v.is_empty()) {
            self.serve.api_keys = keys
                .split(',')
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect();
        }
        if let Some(v) = var("GIGAPATH_DEVICE").filter(|v| !v.is_empty()) {
            m.device = v;
        }
        if let Some(v) = var("GIGAPATH_DTYPE").filter(|v| !v.is_empty()) {
            m.dtype = v;
        }
    }

    /// Checks every value once, with messages that name the key.
    pub fn validate(&self) -> Result<()> {
        self.store.validate()?;
        let bad = |key: &str, why: String| Err(PipelineError::Config(format!("{key}: {why}")));
        if !["cls", "mean"].contains(&self.models.slide_pool.as_str()) {
            return bad(
                "models.slide_pool",
                format!("`{}` is not cls or mean", self.models.slide_pool),
            );
        }
        if !["cls", "mean"].contains(&self.models.text_pool.as_str()) {
            return bad(
                "models.text_pool",
                format!("`{}` is not cls or mean", self.models.text_pool),
            );
        }
        if self
            .tiling
            .method
            .parse::<gigapath_wsi::TissueMethod>()
            .is_err()
        {
            return bad(
                "tiling.method",
                format!("`{}` is not otsu or saturation", self.tiling.method),
            );
        }
        let t = self.tiling.tissue_threshold;
        if !(t.is_finite() && (0.0..1.0).contains(&t)) {
            return bad("tiling.tissue_threshold", format!("{t} is not in [0, 1)"));
        }
        let max_view_tiles = gigapath_wsi::grid::MAX_VIEW_PX;
        if !(1..=max_view_tiles).contains(&self.tiling.max_tiles) {
            return bad(
                "tiling.max_tiles",
                format!(
                    "{} is not in 1..={max_view_tiles} (the tissue view's pixel cap)",
                    self.tiling.max_tiles
                ),
            );
        }
        let f = self.tiling.max_bad_tile_fraction;
        if !(f.is_finite() && (0.0..1.0).contains(&f)) {
            return bad(
                "tiling.max_bad_tile_fraction",
                format!("{f} is not in [0, 1)"),
            );
        }
        let b = self.tiling.blur_threshold;
        if !(b.is_finite() && b >= 0.0) {
            return bad(
                "tiling.blur_threshold",
                format!("{b} is not a non-negative number"),
            );
        }
        if let Some(mpp) = self.tiling.mpp {
            gigapath_wsi::mpp::validate(mpp)
                .map_err(|e| PipelineError::Config(format!("tiling.mpp: {e}")))?;
        }
        let i = &self.ingest;
        if !(1..=4096).contains(&i.batch_size) {
            return bad(
                "ingest.batch_size",
                format!("{} is not in 1..=4096", i.batch_size),
            );
        }
        if !(1..=4096).contains(&i.text_batch_size) {
            return bad(
                "ingest.text_batch_size",
                format!("{} is not in 1..=4096", i.text_batch_size),
            );
        }
        if i.lease_seconds < 10 {
            return bad(
                "ingest.lease_seconds",
                format!("{} is under 10 s", i.lease_seconds),
            );
        }
        if i.max_attempts == 0 {
            return bad("ingest.max_attempts", "must be at least 1".into());
        }
        if i.store_retry_seconds > 86_400 {
            return bad(
                "ingest.store_retry_seconds",
                format!("{} is over a day (86400)", i.store_retry_seconds),
            );
        }
        let sv = &self.serve;
        if sv.bind.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "serve.bind",
                format!("`{}` is not HOST:PORT (e.g. 127.0.0.1:8080)", sv.bind),
            );
        }
        if sv.api_keys.iter().any(|k| k.len() < 16) {
            return bad(
                "serve.api_keys",
                "keys must be at least 16 characters".into(),
            );
        }
        for (key, v, max) in [
            ("serve.max_body_bytes", sv.max_body_bytes, 64 << 20),
            ("serve.max_k", sv.max_k, 10_000),
            ("serve.max_text_chars", sv.max_text_chars, 1_000_000),
            ("serve.max_slide_ids", sv.max_slide_ids, 1_000_000),
            ("serve.max_connections", sv.max_connections, 1_000_000),
            ("serve.backlog", sv.backlog, 65_535),
            ("serve.max_in_flight", sv.max_in_flight, 1_000_000),
        ] {
            if v == 0 || v > max {
                return bad(key, format!("{v} is not in 1..={max}"));
            }
        }
        if sv.request_timeout_seconds == 0 {
            return bad("serve.request_timeout_seconds", "must be at least 1".into());
        }
        if sv.read_timeout_seconds == 0 {
            return bad("serve.read_timeout_seconds", "must be at least 1".into());
        }
        // Requests over the in-flight cap still need a connection to be answered 503, and the
        // probes one to answer at all.
        if sv.max_connections <= sv.max_in_flight {
            return bad(
                "serve.max_connections",
                format!(
                    "{} must be above serve.max_in_flight ({}), so that refusals and probes find a connection",
                    sv.max_connections, sv.max_in_flight
                ),
            );
        }
        gigapath_models::Precision::parse(&self.models.device, &self.models.dtype)
            .map_err(|e| PipelineError::Config(format!("models.device / models.dtype: {e}")))?;
        Ok(())
    }

    /// TOML with every field spelled out and secrets redacted (`gigapath config --show`).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.serve.api_keys = shown
            .serve
            .api_keys
            .iter()
            .map(|_| REDACTED.to_string())
            .collect();
        shown.store = toml::from_str(&self.store.to_toml()).unwrap_or_else(|_| self.store.clone());
        toml::to_string_pretty(&shown).unwrap_or_default()
    }

    /// Saves this config as the data dir's own, unless one is there already: every key but the
    /// secrets (see the module docs), paths inside the data dir relative to it.
    pub fn save_to_data_dir_if_absent(&self) -> Result<()> {
        let dir = &self.store.data_dir;
        let path = dir.join(DATA_DIR_CONFIG);
        if path.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
        let mut table = toml::Table::try_from(self)
            .map_err(|e| PipelineError::Config(format!("serialising the config: {e}")))?;
        for dropped in remove_secrets(&mut table) {
            tracing::warn!(
                "{dropped} is not saved in {}: give it again to later commands ({})",
                path.display(),
                SECRET_SOURCES
            );
        }
        make_paths_portable(&mut table, dir);
        let text = format!(
            "# Written by the first `gigapath ingest` on this data dir; edit freely.\n\
             # Relative paths are taken from this folder. Secrets are never saved here: {}.\n{}",
            SECRET_SOURCES,
            toml::to_string_pretty(&table).unwrap_or_default()
        );
        write_atomically(&path, &text)
    }
}

/// Where later commands get the secrets that the data dir's file never holds.
const SECRET_SOURCES: &str = "the Qdrant key from GIGAPATH_QDRANT_API_KEY, the service's keys \
     from GIGAPATH_API_KEYS, the catalog password from PGPASSWORD or ~/.pgpass (or the whole URL \
     from GIGAPATH_CATALOG_URL), or any of them from a --config FILE";

/// Removes every secret from a serialised config; returns the keys that held one.
fn remove_secrets(table: &mut toml::Table) -> Vec<&'static str> {
    let mut dropped = Vec::new();
    if let Some(store) = table.get_mut("store").and_then(toml::Value::as_table_mut) {
        // The data dir is wherever the file is found; a saved one would be stale after a move.
        store.remove("data_dir");
        if let Some(vectors) = store.get_mut("vectors").and_then(toml::Value::as_table_mut) {
            if vectors.remove("api_key").is_some() {
                dropped.push("store.vectors.api_key");
            }
        }
        if let Some(toml::Value::String(url)) = store.get_mut("catalog_url") {
            if let Some(bare) = without_password(url) {
                *url = bare;
                dropped.push("the password of store.catalog_url");
            }
        }
    }
    if let Some(serve) = table.get_mut("serve").and_then(toml::Value::as_table_mut) {
        if serve
            .remove("api_keys")
            .and_then(|k| k.as_array().map(|a| !a.is_empty()))
            .unwrap_or(false)
        {
            dropped.push("serve.api_keys");
        }
    }
    dropped
}

/// A data dir file written by an older gigapath holds `<redacted>` / `***` in place of secrets:
/// they are dropped (with a warning), so that the real ones from the environment or `--config`
/// apply instead of a placeholder.
fn drop_redacted_secrets(table: &mut toml::Table, path: &Path) {
    let mut found = Vec::new();
    if let Some(store) = table.get_mut("store").and_then(toml::Value::as_table_mut) {
        if let Some(vectors) = store.get_mut("vectors").and_then(toml::Value::as_table_mut) {
            if vectors.get("api_key").and_then(toml::Value::as_str) == Some(REDACTED) {
                vectors.remove("api_key");
                found.push("store.vectors.api_key");
            }
        }
        if let Some(toml::Value::String(url)) = store.get_mut("catalog_url") {
            if url.contains(":***@") {
                if let Some(bare) = without_password(url) {
                    *url = bare;
                    found.push("store.catalog_url");
                }
            }
        }
    }
    if let Some(serve) = table.get_mut("serve").and_then(toml::Value::as_table_mut) {
        let redacted = |k: &toml::Value| k.as_str() == Some(REDACTED);
        if let Some(toml::Value::Array(keys)) = serve.get_mut("api_keys") {
            if keys.iter().any(redacted) {
                keys.retain(|k| !redacted(k));
                found.push("serve.api_keys");
            }
        }
    }
    if !found.is_empty() {
        tracing::warn!(
            "{}: ignoring the redacted {} (written by an older gigapath): {}",
            path.display(),
            found.join(", "),
            SECRET_SOURCES
        );
    }
}

/// `scheme://user:password@host/...` without `:password`; `None` when there is no password.
fn without_password(url: &str) -> Option<String> {
    let scheme_end = url.find("://")? + 3;
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    let colon = authority[..at].find(':')?;
    Some(format!(
        "{}{}{}",
        &url[..scheme_end],
        &authority[..colon],
        &rest[at..]
    ))
}

/// Applies `f` to every path string under [`PATH_KEYS`] in `table`, except the default
/// `serve.prompts_dir = "prompts"`, which means "the usual place" (see `gigapath serve`).
fn map_paths(table: &mut toml::Table, mut f: impl FnMut(&str) -> String) {
    for (section, key) in PATH_KEYS {
        let Some(value) = table
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
            .and_then(|t| t.get_mut(key))
        else {
            continue;
        };
        match value {
            toml::Value::String(p) if key == "prompts_dir" && p.as_str() == "prompts" => {}
            toml::Value::String(p) => *p = f(p),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::String(p) = item {
                        *p = f(p);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Relative paths of the data dir's own file are taken from the data dir. A file written by an
/// older gigapath may hold paths relative to the working directory it ran in: such a path is
/// kept when it exists there and not under the data dir.
fn resolve_paths_from(table: &mut toml::Table, data_dir: &Path) {
    map_paths(table, |p| {
        let path = Path::new(p);
        if path.is_absolute() {
            return p.to_string();
        }
        let inside = data_dir.join(path);
        if !inside.exists() && path.exists() {
            tracing::warn!(
                "{}: `{p}` is taken from the working directory (written by an older gigapath); \
                 write it relative to the data dir or absolute",
                data_dir.join(DATA_DIR_CONFIG).display()
            );
            return p.to_string();
        }
        inside.display().to_string()
    });
}

/// Paths inside `data_dir` become relative to it, all others absolute.
fn make_paths_portable(table: &mut toml::Table, data_dir: &Path) {
    let absolute = |p: &Path| {
        std::fs::canonicalize(p)
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let root = absolute(data_dir);
    map_paths(table, |p| {
        let abs = absolute(Path::new(p));
        match abs.strip_prefix(&root) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
            _ => abs.display().to_string(),
        }
    });
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("toml.partial");
    std::fs::write(&tmp, text).map_err(|e| PipelineError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PipelineError::io(path, e))
}

/// Points the data dir's own config at an alignment checkpoint (`models.alignment`), keeping
/// its other keys, so that later ingests and the service embed with the same weights as the
/// re-embedded collections.
pub fn set_data_dir_alignment(data_dir: &Path, alignment: &Path) -> Result<()> {
    let path = data_dir.join(DATA_DIR_CONFIG);
    let mut table = if path.is_file() {
        read_table(&path)?
    } else {
        toml::Table::new()
    };
    drop_redacted_secrets(&mut table, &path);
    // Paths already in the file (relative to the data dir or absolute) are written back the same
    // way, with the new alignment.
    resolve_paths_from(&mut table, data_dir);
    let models = table
        .entry("models")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(models) = models.as_table_mut() else {
        return Err(PipelineError::Config(format!(
            "{}: `models` is not a table",
            path.display()
        )));
    };
    let alignment = std::path::absolute(alignment).map_err(|e| PipelineError::io(alignment, e))?;
    models.insert(
        "alignment".into(),
        toml::Value::String(alignment.display().to_string()),
    );
    make_paths_portable(&mut table, data_dir);
    let text = format!(
        "# Written by `gigapath ingest` / `gigapath reembed` on this data dir; edit freely.\n\
         # Relative paths are taken from this folder. Secrets are never saved here: {}.\n{}",
        SECRET_SOURCES,
        toml::to_string_pretty(&table).unwrap_or_default()
    );
    write_atomically(&path, &text)
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    parse_table(&text, path)
}

fn parse_table(text: &str, path: &Path) -> Result<toml::Table> {
    text.parse::<toml::Table>()
        .map_err(|e| PipelineError::Config(format!("{}: {e}", path.display())))
}

/// The data dir's own file, read from `path`: redacted secrets dropped, paths from `dir`.
fn data_dir_table(mut table: toml::Table, path: &Path, dir: &Path) -> toml::Table {
    drop_redacted_secrets(&mut table, path);
    resolve_paths_from(&mut table, dir);
    table
}

/// The merged layers as a [`Config`] (defaults for missing keys), not yet validated.
fn from_table(merged: toml::Table) -> Result<Config> {
    toml::Value::Table(merged)
        .try_into()
        .map_err(|e| PipelineError::Config(format!("{e}")))
}

/// Merges `over` into `base`: tables key by key, everything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() {
        let cfg = Config::default();
        cfg.validate().unwrap();
        let back: Config = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn layers_merge_key_by_key_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            data.join(DATA_DIR_CONFIG),
            "[models]\ntile_encoder = \"/m/tile\"\nslide_pool = \"cls\"\n",
        )
        .unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "[models]\nslide_encoder = \"/m/slide\"\n[ingest]\nbatch_size = 8\n",
        )
        .unwrap();
        let mut cfg = Config::load(Some(&data), Some(&file)).unwrap();
        assert_eq!(
            cfg.models.tile_encoder.as_deref(),
            Some(Path::new("/m/tile"))
        );
        assert_eq!(
            cfg.models.slide_encoder.as_deref(),
            Some(Path::new("/m/slide"))
        );
        assert_eq!(cfg.models.slide_pool, "cls");
        assert_eq!(cfg.ingest.batch_size, 8);
        assert_eq!(
            cfg.ingest.lease_seconds, 600,
            "untouched keys keep their defaults"
        );
        assert_eq!(cfg.store.data_dir, data);
        cfg.apply_env(|k| match k {
            "GIGAPATH_QDRANT_URL" => Some("http://q:6334".into()),
            "GIGAPATH_TILE_ENCODER" => Some("/env/tile".into()),
            _ => None,
        });
        assert!(matches!(
            cfg.store.vectors,
            VectorBackendConfig::Qdrant { .. }
        ));
        assert_eq!(
            cfg.models.tile_encoder.as_deref(),
            Some(Path::new("/env/tile"))
        );
        // The cluster layout from the environment; a later URL keeps it; a bad count is named.
        cfg.apply_env(|k| match k {
            "GIGAPATH_QDRANT_SHARD_NUMBER" => Some("3".into()),
            "GIGAPATH_QDRANT_REPLICATION_FACTOR" => Some(" 2 ".into()),
            _ => None,
        });
        cfg.apply_env(|k| (k == "GIGAPATH_QDRANT_URL").then(|| "http://other:6334".into()));
        assert!(matches!(
            &cfg.store.vectors,
            VectorBackendConfig::Qdrant {
                url,
                shard_number: 3,
                replication_factor: 2,
                write_consistency_factor: 1,
                ..
            } if url == "http://other:6334"
        ));
        cfg.validate().unwrap();
        cfg.apply_env(|k| (k == "GIGAPATH_QDRANT_SHARD_NUMBER").then(|| "three".into()));
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("vectors.shard_number"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        for (text, key) in [
            ("[models]\nslide_pool = \"max\"\n", "models.slide_pool"),
            (
                "[tiling]\ntissue_threshold = 1.5\n",
                "tiling.tissue_threshold",
            ),
            ("[ingest]\nbatch_size = 0\n", "ingest.batch_size"),
            ("[tiling]\nmax_tiles = 0\n", "tiling.max_tiles"),
            ("[models]\ndevice = \"tpu\"\n", "models.device"),
            ("[ingest]\nbogus = 1\n", "bogus"),
        ] {
            let f = dir.path().join("c.toml");
            std::fs::write(&f, text).unwrap();
            let err = Config::load(None, Some(&f)).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    /// Issue 15: the first ingest saved `<redacted>` / `***` in place of the secrets, so every
    /// later command on the data dir failed. Saved now: no secret and no placeholder, and the
    /// data dir loads.
    #[test]
    fn saved_config_holds_no_secret_and_no_placeholder_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut cfg = Config::default();
        cfg.store.data_dir = data.clone();
        cfg.store.vectors =
            VectorBackendConfig::qdrant("http://qdrant:6334", Some("qdrant-secret-k3y".into()));
        cfg.store.catalog_url = Some("postgres://gp:pg-secret-pw@db:5432/g".into());
        cfg.serve.api_keys = vec!["service-secret-key-0123".into()];
        cfg.validate().unwrap();
        cfg.save_to_data_dir_if_absent().unwrap();
        let text = std::fs::read_to_string(data.join(DATA_DIR_CONFIG)).unwrap();
        for secret in [
            "qdrant-secret-k3y",
            "pg-secret-pw",
            "service-secret-key-0123",
            REDACTED,
            "***",
        ] {
            assert!(!text.contains(secret), "`{secret}` saved:\n{text}");
        }
        assert!(text.contains("postgres://gp@db:5432/g"), "{text}");
        assert!(text.contains("http://qdrant:6334"), "{text}");
        assert!(!text.contains("data_dir"), "{text}");

        let table: toml::Table = text.parse().unwrap();
        let mut back: Config = toml::Value::Table(table).try_into().unwrap();
        back.validate().unwrap();
        assert_eq!(
            back.store.vectors,
            VectorBackendConfig::qdrant("http://qdrant:6334", None)
        );
        assert!(back.serve.api_keys.is_empty());
        // The key given again through the environment applies to the saved server.
        back.apply_env(|k| (k == "GIGAPATH_QDRANT_API_KEY").then(|| "again".to_string()));
        assert_eq!(
            back.store.vectors,
            VectorBackendConfig::qdrant("http://qdrant:6334", Some("again".into()))
        );
        Config::load(Some(&data), None).unwrap();
    }

    /// A data dir file written by an older gigapath, placeholders and all, still loads.
    #[test]
    fn placeholders_of_older_files_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(DATA_DIR_CONFIG),
            "[store]\ncatalog_url = \"postgres://gp:***@db/g\"\n\
             [store.vectors]\nbackend = \"qdrant\"\nurl = \"http://q:6334\"\napi_key = \"<redacted>\"\n\
             [serve]\napi_keys = [\"<redacted>\"]\n",
        )
        .unwrap();
        let mut table = read_table(&dir.path().join(DATA_DIR_CONFIG)).unwrap();
        drop_redacted_secrets(&mut table, dir.path());
        let cfg: Config = toml::Value::Table(table).try_into().unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.store.catalog_url.as_deref(), Some("postgres://gp@db/g"));
        assert!(cfg.serve.api_keys.is_empty());
        assert!(matches!(
            cfg.store.vectors,
            VectorBackendConfig::Qdrant { api_key: None, .. }
        ));
    }

    #[test]
    fn passwords_come_out_of_urls() {
        assert_eq!(
            without_password("postgres://me:p@ss@host:5432/db").as_deref(),
            Some("postgres://me@host:5432/db")
        );
        assert_eq!(without_password("postgres://me@host/db"), None);
        assert_eq!(without_password("sqlite:///d/c.sqlite"), None);
    }

    /// Issue 13 item 9: paths in the data dir's file are taken from the data dir, so a data dir
    /// that is renamed still finds the models inside it; paths saved inside it are relative.
    #[test]
    fn data_dir_paths_survive_a_move() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        let outside = dir.path().join("elsewhere/slide");
        std::fs::create_dir_all(first.join("models/tile")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let mut cfg = Config::default();
        cfg.store.data_dir = first.clone();
        cfg.models.tile_encoder = Some(first.join("models/tile"));
        cfg.models.slide_encoder = Some(outside.clone());
        cfg.save_to_data_dir_if_absent().unwrap();
        let text = std::fs::read_to_string(first.join(DATA_DIR_CONFIG)).unwrap();
        assert!(text.contains("tile_encoder = \"models/tile\""), "{text}");
        // The default prompts folder stays "the usual place", not this working directory's.
        assert!(text.contains("prompts_dir = \"prompts\""), "{text}");
        let outside = outside.canonicalize().unwrap();
        assert!(
            text.contains(&format!("slide_encoder = \"{}\"", outside.display())),
            "{text}"
        );

        let moved = dir.path().join("moved");
        std::fs::rename(&first, &moved).unwrap();
        let cfg = Config::load(Some(&moved), None).unwrap();
        assert_eq!(
            cfg.models.tile_encoder.as_deref(),
            Some(moved.join("models/tile").canonicalize().unwrap().as_path())
        );
        assert_eq!(cfg.models.slide_encoder.as_deref(), Some(outside.as_path()));
        assert_eq!(cfg.serve.prompts_dir, Path::new("prompts"));

        // `reembed` records its checkpoint the same way.
        std::fs::create_dir_all(moved.join("alignment/run")).unwrap();
        set_data_dir_alignment(&moved, &moved.join("alignment/run")).unwrap();
        let text = std::fs::read_to_string(moved.join(DATA_DIR_CONFIG)).unwrap();
        assert!(text.contains("alignment = \"alignment/run\""), "{text}");
        assert!(text.contains("tile_encoder = \"models/tile\""), "{text}");
        let again = dir.path().join("again");
        std::fs::rename(&moved, &again).unwrap();
        let cfg = Config::load(Some(&again), None).unwrap();
        assert_eq!(
            cfg.models.alignment.as_deref(),
            Some(
                again
                    .join("alignment/run")
                    .canonicalize()
                    .unwrap()
                    .as_path()
            )
        );
    }
}
