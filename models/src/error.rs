//! The crate's one error type.

use std::path::PathBuf;

/// Errors from loading or running an encoder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of a model folder could not be read.
    // The cause is part of the message and deliberately not a `source()`: `{:#}` chains would
    // print it twice.
    #[error("reading {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A config file is malformed or describes an unsupported model.
    #[error("config {path}: {msg}")]
    Config {
        /// The config file (or the model folder when the config is built in).
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A checkpoint lacks a tensor, has one of the wrong shape, or cannot be parsed.
    #[error("weights {path}: {cause}")]
    Weights {
        /// The checkpoint file.
        path: PathBuf,
        /// The candle error, which names the tensor key and shapes.
        cause: candle_core::Error,
    },
    /// A checkpoint file in a format gigapath does not read (legacy `torch.save`, a plain pickle,
    /// a truncated safetensors file); the message says what the file is and how to convert it.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What the file is and the fix.
        msg: String,
    },
    /// Inputs that do not fit the model (shape, dtype, coordinates off the grid, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An error from candle while running a model.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
