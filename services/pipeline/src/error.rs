//! The pipeline's one error type. Slide-level failures (a corrupt slide, no tissue) are recorded
//! in the catalog as the slide's failure reason and do not stop the run; the rest do.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Slide(#[from] gigapath_wsi::WsiError),
    #[error(transparent)]
    Model(#[from] gigapath_models::Error),
    #[error(transparent)]
    Store(#[from] gigapath_store::StoreError),
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    #[error("{0}: no tissue found (no tile above the tissue threshold)")]
    NoTissue(String),
    #[error("{what} is not configured: set models.{key} in the config (or {env})")]
    MissingModel {
        what: &'static str,
        key: &'static str,
        env: &'static str,
    },
    #[error("{0}")]
    Input(String),
    #[error("the job's lease was lost (another worker took it over); its result was discarded")]
    LeaseLost,
}

impl PipelineError {
    /// An infrastructure fault (the vector store or catalog unreachable, store I/O), not a fault
    /// of the slide being processed: retried, and never recorded as the slide's failure.
    pub fn is_transient(&self) -> bool {
        matches!(self, PipelineError::Store(e) if e.is_transient())
    }

    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        PipelineError::Io {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        PipelineError::Model(gigapath_models::Error::from(e))
    }
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
