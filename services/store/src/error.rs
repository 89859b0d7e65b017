//! The one error type of this crate.
//!
//! Every variant names the thing that was wrong (collection, vector, job, file) so that a caller can
//! show it to a user as is; the HTTP layer maps variants to status codes in one place.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the store: configuration, files, the vector store, the
/// catalog and the job queue.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A [`StoreConfig`](crate::StoreConfig) that does not validate; the message says which key.
    #[error("invalid store configuration: {0}")]
    Config(String),

    // The I/O error is in the message and deliberately not a `source`: with both, a cause chain
    // (`{:#}`) would print it twice.
    /// A file-system operation on one of the store's own files or folders failed.
    #[error("{op} `{}`: {err}", path.display())]
    Io {
        /// What was being done ("create data dir", "open", "read", ...).
        op: &'static str,
        /// The file or folder it was done to.
        path: PathBuf,
        /// The operating system's error.
        err: std::io::Error,
    },

    /// The store was created with other vector dimensions than the configuration asks for.
    #[error(
        "collection `{collection}`: vector `{vector}` has {found} dimensions in the store but the \
         configuration expects {expected}; use the dims the store was created with or a new data dir"
    )]
    DimensionMismatch {
        /// The collection (`slides`, `reports`).
        collection: String,
        /// The named vector within it.
        vector: String,
        /// Dimensions the configuration asks for.
        expected: usize,
        /// Dimensions the existing store was created with.
        found: usize,
    },

    /// An existing collection whose vectors or settings differ from what this version creates
    /// (other than in dimensions, which is [`StoreError::DimensionMismatch`]).
    #[error("collection `{collection}` does not match its specification: {detail}")]
    SchemaMismatch {
        /// The collection.
        collection: String,
        /// What differs.
        detail: String,
    },

    /// A collection name this store has not opened.
    #[error("unknown collection `{0}` (open it with ensure_collection first)")]
    UnknownCollection(String),

    /// A vector name the collection does not have.
    #[error("collection `{collection}` has no vector named `{vector}`")]
    UnknownVector {
        /// The collection.
        collection: String,
        /// The vector name asked for.
        vector: String,
    },

    /// A point that cannot be stored (empty id or fingerprint, wrong dimensions, non-finite or
    /// all-zero values).
    #[error("invalid point `{id}`: {reason}")]
    InvalidPoint {
        /// The point's external id (slide or report id).
        id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A request that is malformed in itself (an empty id or worker name, a zero lease, an
    /// unknown report); the caller's fault, not the store's.
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
        /// The collection searched.
        collection: String,
        /// Fingerprint of the weights the query was embedded with.
        query: String,
        /// How many stored points carry another fingerprint.
        other_points: u64,
        /// One of those other fingerprints.
        example: String,
    },

    /// The embedded vector store (qdrant-edge) failed.
    #[error("embedded vector store (qdrant-edge) at `{}`: {message}", path.display())]
    Embedded {
        /// Its folder in the data dir.
        path: PathBuf,
        /// qdrant-edge's error, as text.
        message: String,
    },

    /// A Qdrant server answered with an error that is not an outage
    /// ([`StoreError::Unavailable`] is).
    #[error("Qdrant server: {0}")]
    Server(String),

    /// The catalog database could not be opened or connected to.
    #[error("catalog `{url}`: cannot open: {source}")]
    CatalogConnect {
        /// With any password redacted.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A catalog query failed.
    #[error("catalog: {0}")]
    Catalog(#[from] sqlx::Error),

    /// Migrating the catalog to this version's schema failed.
    #[error("catalog migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A catalog row with a value this version cannot read (an unknown state, bad JSON).
    #[error("catalog row is not what this version expects: {0}")]
    CorruptRow(String),

    /// No slide with this id in the catalog.
    #[error("unknown slide `{0}`")]
    UnknownSlide(String),

    /// No job with this id in the catalog.
    #[error("unknown job {0}")]
    UnknownJob(i64),

    /// An operator action that the job's state does not allow (retrying a done job, ...).
    #[error("job {job_id} is {state}: {rule}")]
    JobState {
        /// The job.
        job_id: i64,
        /// Its current state, as stored.
        state: String,
        /// Why that state does not allow the action.
        rule: &'static str,
    },

    /// The vector store server cannot be reached or answers "try later" (connection refused or
    /// lost, timeout, overloaded): an infrastructure fault, worth retrying with back-off.
    #[error("{backend} `{url}` is unavailable: {message}")]
    Unavailable {
        /// Which service ("Qdrant server").
        backend: &'static str,
        /// Its address.
        url: String,
        /// The client's error, as text.
        message: String,
    },

    /// No training run with this id in the catalog.
    #[error("unknown training run `{0}`")]
    UnknownRun(String),

    /// The worker's lease ran out and the job was (or may be) claimed by another worker; the
    /// caller must drop its result instead of recording it.
    #[error(
        "job {job_id} is no longer held by worker `{worker}` (lease expired or job reassigned)"
    )]
    LeaseLost {
        /// The job.
        job_id: i64,
        /// The worker that thought it held it.
        worker: String,
    },

    /// A tile feature file that cannot be read as one (bad header, wrong shapes, missing
    /// metadata).
    #[error("feature file `{}`: {reason}", path.display())]
    FeatureFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A blocking task the store spawned panicked or was cancelled.
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
