//! The one configuration of gigapath (TOML), with every default printable.
//!
//! Layers, later wins: built-in defaults, `DATA_DIR/gigapath.toml` (written by the first ingest
//! so that workers and the service on that data dir use the same models), `--config FILE`,
//! environment variables (`GIGAPATH_QDRANT_URL`, `GIGAPATH_QDRANT_API_KEY`,
//! `GIGAPATH_CATALOG_URL`, `GIGAPATH_WEIGHTS`, `GIGAPATH_TILE_ENCODER`, `GIGAPATH_SLIDE_ENCODER`,
//! `GIGAPATH_TEXT_ENCODER`, `GIGAPATH_ALIGNMENT`, `GIGAPATH_DEVICE`, `GIGAPATH_DTYPE`), then
//! flags. Tables merge key by key, so a file may set only what it changes. Relative paths are
//! taken from the working directory.

use std::path::{Path, PathBuf};

use gigapath_store::{StoreConfig, VectorBackendConfig};
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

/// Name of the config file kept in a data dir.
pub const DATA_DIR_CONFIG: &str = "gigapath.toml";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    pub store: StoreConfig,
    pub models: ModelsConfig,
    pub tiling: TilingConfig,
    pub ingest: IngestConfig,
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
}

impl Default for TilingConfig {
    fn default() -> Self {
        TilingConfig {
            method: "otsu".into(),
            tissue_threshold: 0.1,
            mpp: None,
            max_tiles: gigapath_wsi::grid::DEFAULT_MAX_TILES,
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
    /// Cohort recorded for slides that do not name one.
    pub cohort: Option<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            batch_size: 32,
            reader_threads: 0,
            text_batch_size: 32,
            lease_seconds: 600,
            max_attempts: 3,
            cohort: None,
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
                merge(&mut merged, read_table(&own)?);
            }
        }
        if let Some(f) = file {
            merge(&mut merged, read_table(f)?);
        }
        let mut cfg: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e| PipelineError::Config(format!("{e}")))?;
        cfg.apply_env(|k| std::env::var(k).ok());
        if let Some(dir) = data_dir {
            cfg.store.data_dir = dir.to_path_buf();
        }
        cfg.absolutize();
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
        if let Some(url) = var("GIGAPATH_QDRANT_URL").filter(|v| !v.is_empty()) {
            self.store.vectors = VectorBackendConfig::Qdrant {
                url,
                api_key: var("GIGAPATH_QDRANT_API_KEY").filter(|v| !v.is_empty()),
            };
        }
        if let Some(url) = var("GIGAPATH_CATALOG_URL").filter(|v| !v.is_empty()) {
            self.store.catalog_url = Some(url);
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
            .map(|_| "<redacted>".to_string())
            .collect();
        shown.store = toml::from_str(&self.store.to_toml()).unwrap_or_else(|_| self.store.clone());
        toml::to_string_pretty(&shown).unwrap_or_default()
    }

    /// Saves this config as the data dir's own, unless one is there already.
    pub fn save_to_data_dir_if_absent(&self) -> Result<()> {
        let path = self.store.data_dir.join(DATA_DIR_CONFIG);
        if path.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.store.data_dir)
            .map_err(|e| PipelineError::io(&self.store.data_dir, e))?;
        let tmp = path.with_extension("toml.partial");
        let text = format!(
            "# Written by the first `gigapath ingest` on this data dir; edit freely.\n{}",
            self.to_toml()
        );
        std::fs::write(&tmp, text).map_err(|e| PipelineError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| PipelineError::io(&path, e))
    }
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
    let models = table
        .entry("models")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(models) = models.as_table_mut() else {
        return Err(PipelineError::Config(format!(
            "{}: `models` is not a table",
            path.display()
        )));
    };
    models.insert(
        "alignment".into(),
        toml::Value::String(alignment.display().to_string()),
    );
    let text = format!(
        "# Written by `gigapath ingest` / `gigapath reembed` on this data dir; edit freely.\n{}",
        toml::to_string_pretty(&table).unwrap_or_default()
    );
    let tmp = path.with_extension("toml.partial");
    std::fs::write(&tmp, text).map_err(|e| PipelineError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| PipelineError::io(&path, e))
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    text.parse::<toml::Table>()
        .map_err(|e| PipelineError::Config(format!("{}: {e}", path.display())))
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
}
