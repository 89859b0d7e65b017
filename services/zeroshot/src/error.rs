//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong loading prompt sets or scoring with them.
#[derive(Debug, thiserror::Error)]
pub enum ZeroShotError {
    /// A prompt file could not be read.
    #[error("{}: {msg}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        msg: String,
    },
    /// A prompt file is malformed or inconsistent; `key` is the offending key path.
    #[error("{}: {key}: {msg}", file.display())]
    Prompt {
        /// The prompt file.
        file: PathBuf,
        /// The key path (`classes[2].names`, `templates[0]`).
        key: String,
        /// What is wrong there.
        msg: String,
    },
    /// No prompt set of that name (the message lists the known ones).
    #[error("unknown prompt set `{name}` (known: {known})")]
    UnknownSet {
        /// The name asked for.
        name: String,
        /// The known sets' names, comma-separated.
        known: String,
    },
    /// Inputs that do not fit (empty, mismatched dims, non-finite values, ...).
    #[error("{0}")]
    Input(String),
    /// The text-embedding function failed; the source is the embedder's own error, which the
    /// caller can take back by type (`downcast`), e.g. to answer with the status it meant.
    #[error("embedding prompts: {0}")]
    Embed(#[source] EmbedError),
}

/// An embedder's error, as its own type behind a box ([`ZeroShotError::Embed`]).
pub type EmbedError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with the crate's [`ZeroShotError`].
pub type Result<T, E = ZeroShotError> = std::result::Result<T, E>;

impl ZeroShotError {
    pub(crate) fn prompt(
        file: &std::path::Path,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        ZeroShotError::Prompt {
            file: file.to_path_buf(),
            key: key.into(),
            msg: msg.into(),
        }
    }
}
