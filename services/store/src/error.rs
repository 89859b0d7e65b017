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

    /// An operator action that the job's state does not allow (retrying a done job, ...).
    #[error("job {job_id} is {state}: {rule}")]
    JobState {
        job_id: i64,
        state: String,
        rule: &'static str,
    },

    /// The vector store server cannot be reached or answers "try later" (connection refused or
    /// lost, timeout, overloaded): an infrastructure fault, worth retrying with back-off.
    #[error("{backend} `{url}` is unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        url: String,
        message: String,
    },

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

    /// A fault of the infrastructure rather than of the data being stored: the vector store
    /// server unreachable or overloaded, the catalog's connection lost or its database busy,
    /// an I/O error on the store's own files (a full disk). Worth retrying with back-off, and
    /// never the fault of the slide or report being written.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } | StoreError::Io { .. } => true,
            StoreError::Catalog(e) | StoreError::CatalogConnect { source: e, .. } => {
                sqlx_is_transient(e)
            }
            _ => false,
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

/// Connection-level and "try again" database errors: I/O (connection refused, reset), pool
/// timeouts, TLS and protocol breaks, and the database codes for the same (Postgres SQLSTATE
/// class 08 connection exceptions, 57P01-57P03 shutdown / cannot connect now, 53300 too many
/// connections, 40001 / 40P01 serialization failure / deadlock; SQLite SQLITE_BUSY,
/// SQLITE_LOCKED, SQLITE_IOERR and SQLITE_FULL, with their extended codes).
fn sqlx_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                code.starts_with("08")
                    || matches!(
                        &*code,
                        "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
                    )
            } else {
                // SQLite: the primary result code is the low byte of the extended one.
                code.parse::<i64>()
                    .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13))
            }
        }
        _ => false,
    }
}
