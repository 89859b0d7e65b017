//! [`Pipeline`]: an opened store plus the encoders (loaded on first use), shared by ingest, the
//! worker loop and re-embedding.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use gigapath_store::{Dims, Store};
use serde_json::Value;

use crate::config::Config;
use crate::encoders::{AlignmentModel, SlideModels, TextModel};
use crate::error::{PipelineError, Result};

/// Callbacks for long work; the CLI draws progress bars with them.
pub trait Progress: Sync {
    /// A run of `slides` slide jobs starts.
    fn run_started(&self, _slides: usize) {}
    /// Slide `slide_id` has `tiles` kept tiles to encode.
    fn slide_started(&self, _slide_id: &str, _tiles: usize) {}
    /// `n` more tiles of the current slide are encoded.
    fn tiles_done(&self, _n: usize) {}
    /// A slide job ended (`error` is `None` on success).
    fn slide_finished(&self, _slide_id: &str, _error: Option<&str>) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// The opened store and lazily loaded encoders.
pub struct Pipeline {
    /// The configuration it was opened with.
    pub config: Config,
    /// The opened catalog and vector store.
    pub store: Store,
    /// Shared with [`Pipeline::with_models`] copies: the store's clients live on it.
    pub(crate) rt: Arc<tokio::runtime::Runtime>,
    slide_models: OnceLock<SlideModels>,
    text_model: OnceLock<TextModel>,
    alignment: OnceLock<Option<AlignmentModel>>,
    load_lock: Mutex<()>,
    /// This process's name in job claims: host, pid and a random suffix.
    pub worker_id: String,
}

impl Pipeline {
    /// Opens the store of `config` (collections sized from the configured models' config files,
    /// so that a mismatch with an existing store is reported before any work).
    pub fn open(mut config: Config) -> Result<Pipeline> {
        config.store.dims = dims_from_models(&config)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| PipelineError::Input(format!("cannot start the async runtime: {e}")))?;
        let store = rt.block_on(Store::open(config.store.clone()))?;
        Ok(Pipeline {
            config,
            store,
            rt: Arc::new(rt),
            slide_models: OnceLock::new(),
            text_model: OnceLock::new(),
            alignment: OnceLock::new(),
            load_lock: Mutex::new(()),
            worker_id: worker_id(),
        })
    }

    /// The same opened store (and runtime, and worker id) with other model settings, whose
    /// encoders load anew on first use: how the service takes up a new alignment checkpoint
    /// without reopening the data dir. Refused when the new models need other collection dims.
    pub fn with_models(&self, models: crate::config::ModelsConfig) -> Result<Pipeline> {
        let mut config = self.config.clone();
        config.models = models;
        config.store.dims = dims_from_models(&config)?;
        if config.store.dims != self.config.store.dims {
            return Err(PipelineError::Config(format!(
                "the new models need collection dims {:?}, the open store has {:?}: restart",
                config.store.dims, self.config.store.dims
            )));
        }
        Ok(Pipeline {
            config,
            store: self.store.clone(),
            rt: self.rt.clone(),
            slide_models: OnceLock::new(),
            text_model: OnceLock::new(),
            alignment: OnceLock::new(),
            load_lock: Mutex::new(()),
            worker_id: self.worker_id.clone(),
        })
    }

    /// Runs a store future to completion from synchronous code (not from an async task).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Runs a store future on the pipeline's runtime; await the handle from any other runtime
    /// (the HTTP service's handlers do: every store call happens on this one runtime).
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(f)
    }

    /// The tile and slide encoders, loaded on first use.
    pub fn slide_models(&self) -> Result<&SlideModels> {
        if let Some(m) = self.slide_models.get() {
            return Ok(m);
        }
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.slide_models.get().is_none() {
            let m = SlideModels::load(&self.config.models)?;
            tracing::info!(
                "slide models: tile {} ({}-d), slide {} ({}-d, {} pooling)",
                m.fingerprints["tile"],
                m.tile_dim(),
                m.fingerprints["slide"],
                m.slide_dim(),
                self.config.models.slide_pool
            );
            let _ = self.slide_models.set(m);
        }
        Ok(self.slide_models.get().expect("set above"))
    }

    /// The text encoder, loaded on first use.
    pub fn text_model(&self) -> Result<&TextModel> {
        if let Some(m) = self.text_model.get() {
            return Ok(m);
        }
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.text_model.get().is_none() {
            let m = TextModel::load(&self.config.models)?;
            tracing::info!("text model: {} ({}-d)", m.fingerprint, m.dim());
            let _ = self.text_model.set(m);
        }
        Ok(self.text_model.get().expect("set above"))
    }

    /// The configured alignment checkpoint (`models.alignment`), loaded on first use; `None`
    /// when none is configured.
    pub fn alignment(&self) -> Result<Option<&AlignmentModel>> {
        if let Some(m) = self.alignment.get() {
            return Ok(m.as_ref());
        }
        let _guard = self.load_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.alignment.get().is_none() {
            let m = AlignmentModel::load(&self.config.models)?;
            if let Some(a) = &m {
                tracing::info!(
                    "alignment: {} ({}, {}-d joint)",
                    a.dir.display(),
                    a.fingerprint,
                    a.alignment.joint_dim()
                );
            }
            let _ = self.alignment.set(m);
        }
        Ok(self.alignment.get().expect("set above").as_ref())
    }

    /// Where the tiling pictures and grid of a slide go (`DATA_DIR/tiles/<slide_id>/`).
    pub fn tiles_dir(&self, slide_id: &str) -> std::path::PathBuf {
        self.config.store.data_dir.join("tiles").join(slide_id)
    }
}

fn worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{nanos:08x}", std::process::id())
}

/// Collection dims from the model folders' config files (cheap: no weights are read).
fn dims_from_models(config: &Config) -> Result<Dims> {
    let mut dims = config.store.dims;
    let m = &config.models;
    if let Some(dir) = m.slide_dir() {
        // `slide_config.json` in a release folder shared with the tile encoder (whose timm
        // `config.json` has no top-level embed_dim), else the slide folder's own config.
        let cfg = ["slide_config.json", "config.json"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file());
        dims.slide = match cfg {
            Some(cfg) => json_usize(&cfg, "embed_dim")?.unwrap_or(768),
            None => 768, // the official gigapath_slide_enc12l768d
        };
    }
    if let Some(dir) = m.tile_dir() {
        dims.tile = crate::tile_points::tile_dim_from_config(dir)?;
    }
    if let Some(dir) = &m.alignment {
        let cfg = dir.join(gigapath_models::align::CONFIG_FILE);
        dims.joint = json_usize(&cfg, "joint_dim")?
            .ok_or_else(|| PipelineError::io(&cfg, "no joint_dim (not an alignment checkpoint)"))?;
    }
    if let Some(dir) = &m.text_encoder {
        let cfg = dir.join("config.json");
        if cfg.is_file() {
            if let Some(h) = json_usize(&cfg, "hidden_size")? {
                dims.text = h;
            }
        }
    }
    Ok(dims)
}

fn json_usize(path: &Path, key: &str) -> Result<Option<usize>> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| PipelineError::io(path, format!("malformed JSON: {e}")))?;
    Ok(v.get(key).and_then(Value::as_u64).map(|n| n as usize))
}
