//! The one error type of this crate.
//!
//! Every variant names the thing that was wrong (collection, vector, job, file) so that a caller can
//! show it to a user as is; the HTTP layer maps variants to status codes in one place.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store configuration: {0}")]
    Config(String),

    // The I/O error is in the message and deliberately not a `source`: with both, a cause chain
    // (`{:#}`) would print it twice.
    #[error("{op} `{}`: {err}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },

    #[error(
        "collection `{collection}`: vector `{vector}` has {found} dimensions in the store but the \
         configuration expects {expected}; use the dims the store was created with or a new data dir"
    )]
    DimensionMismatch {
        collection: String,
        vector: String,
        expected: usize,
        found: usize,
    },

    #[error("collection `{collection}` does not match its specification: {detail}")]
    SchemaMismatch { collection: String, detail: String },

    #[error("unknown collection `{0}` (open it with ensure_collection first)")]
    UnknownCollection(String),

    #[error("collection `{collection}` has no vector named `{vector}`")]
    UnknownVector { collection: String, vector: String },

    #[error("invalid point `{id}`: {reason}")]
    InvalidPoint { id: String, reason: String },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// A search was asked with embeddings from other weights than the stored ones. Results would
    /// be meaningless (or silently partial), so this is an error, never a mix.
    #[error(
        "fingerprint mismatch in `{collection}`: the query was embedded with `{query}` but \
         {other_points} stored point(s) carry another fingerprint (e.g. `{example}`); re-embed \
         the collection or query with the matching weights"
    )]
    FingerprintMismatch {
        collection: String,
        query: String,
        other_points: u64,
        example: String,
    },

    #[error("embedded vector store (qdrant-edge) at `{}`: {message}", path.display())]
    Embedded { path: PathBuf, message: String },

    #[error("Qdrant server: {0}")]
    Server(String),

    #[error("catalog `{url}`: cannot open: {source}")]
    CatalogConnect {
        /// With any password redacted.
        url: String,
        #[source]
        source: sqlx::Error,
    },

    #[error("catalog: {0}")]
    Catalog(#[from] sqlx::Error),

    #[error("catalog migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("catalog row is not what this version expects: {0}")]
    CorruptRow(String),

    #[error("unknown slide `{0}`")]
    UnknownSlide(String),

    #[error("unknown job {0}")]
    UnknownJob(i64),

    #[error("unknown training run `{0}`")]
    UnknownRun(String),

    /// The worker's lease ran out and the job was (or may be) claimed by another worker; the
    /// caller must drop its result instead of recording it.
    #[error(
        "job {job_id} is no longer held by worker `{worker}` (lease expired or job reassigned)"
    )]
    LeaseLost { job_id: i64, worker: String },

    #[error("feature file `{}`: {reason}", path.display())]
    FeatureFile { path: PathBuf, reason: String },

    #[error("background task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            err: source,
        }
    }

    pub(crate) fn feature_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        StoreError::FeatureFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl From<tokio::task::JoinError> for StoreError {
    fn from(err: tokio::task::JoinError) -> Self {
        StoreError::Task(err.to_string())
    }
}
