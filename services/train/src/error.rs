//! The crate's one error type.

use std::path::PathBuf;

/// What can stop a training run, an evaluation or a re-embedding.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A run config value is out of range or inconsistent; `key` is its TOML path.
    #[error("run config {key}: {msg}")]
    Config {
        /// The key's TOML path (`optim.lr`).
        key: String,
        /// What is wrong with the value.
        msg: String,
    },
    /// The data cannot support the request (no pairs, too few, no labels, ...).
    #[error("{0}")]
    Data(String),
    /// Weights or embeddings from different models (fingerprints that do not match).
    #[error("{0}")]
    Mismatch(String),
    /// A checkpoint folder is missing, incomplete or inconsistent.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An I/O error on a run's own files (metrics, cache, curve).
    #[error("{}: {msg}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        msg: String,
    },
    /// Loading or running a model failed.
    #[error(transparent)]
    Model(#[from] gigapath_models::Error),
    /// The catalog, the vector store or a feature file failed.
    #[error(transparent)]
    Store(#[from] gigapath_store::StoreError),
    /// Opening the pipeline or its encoders failed.
    #[error(transparent)]
    Pipeline(#[from] gigapath_pipeline::PipelineError),
    /// Loading or scoring prompt sets failed.
    #[error(transparent)]
    ZeroShot(#[from] gigapath_zeroshot::ZeroShotError),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(gigapath_models::Error::from(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }

    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        TrainError::Config {
            key: key.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn checkpoint(path: &std::path::Path, msg: impl Into<String>) -> Self {
        TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// Result with the crate's [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
