//! The pipeline's one error type. Slide-level failures (a corrupt slide, no tissue) are recorded
//! in the catalog as the slide's failure reason and do not stop the run; the rest do.

use std::path::{Path, PathBuf};

/// What can stop ingest, a worker or a query: the lower crates' errors, configuration and input.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A configuration that does not validate or does not fit the models (wrong dims, ...).
    #[error("configuration: {0}")]
    Config(String),
    /// Reading, segmenting or tiling a slide failed.
    #[error(transparent)]
    Slide(#[from] gigapath_wsi::WsiError),
    /// Loading or running a model failed.
    #[error(transparent)]
    Model(#[from] gigapath_models::Error),
    /// The catalog, the vector store or a feature file failed.
    #[error(transparent)]
    Store(#[from] gigapath_store::StoreError),
    /// An I/O error on a file the pipeline reads or writes itself.
    #[error("{}: {msg}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        msg: String,
    },
    /// The slide (named by its path) has no tile above the tissue threshold.
    #[error("{0}: no tissue found (no tile above the tissue threshold)")]
    NoTissue(String),
    /// A model the command needs has no configured folder.
    #[error("{what} is not configured: set models.{key} in the config (or {env})")]
    MissingModel {
        /// The model, in words (`"the tile encoder"`).
        what: &'static str,
        /// The config key(s) that set it, under `models.`.
        key: &'static str,
        /// The environment variable(s) that set it.
        env: &'static str,
    },
    /// Bad input from the user: a path outside the slide roots, a malformed reports file, a
    /// slide id that clashes, ...
    #[error("{0}")]
    Input(String),
    /// The worker's lease on the job ran out and another worker may have it
    /// ([`gigapath_store::StoreError::LeaseLost`]).
    #[error("the job's lease was lost (another worker took it over); its result was discarded")]
    LeaseLost,
}

impl PipelineError {
    /// An infrastructure fault (the vector store or catalog unreachable, store I/O), not a fault
    /// of the slide being processed: retried, and never recorded as the slide's failure.
    pub fn is_transient(&self) -> bool {
        matches!(self, PipelineError::Store(e) if e.is_transient())
    }

    /// An I/O error on `path`, in the operating system's own words.
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

/// Result with the crate's [`PipelineError`].
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
