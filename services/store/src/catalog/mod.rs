//! The SQL catalog: slides, reports, feature files, model fingerprints, stored embeddings, the
//! ingest job queue and training runs.
//!
//! SQLite (a file in the data dir) by default; Postgres when several machines share the work.
//! Schema: `migrations/sqlite` and `migrations/postgres` (sqlx migrations embedded in the binary,
//! applied on connect). Queries are runtime-checked (`sqlx::query` with binds), so building needs
//! no database.
//!
//! One SQL text serves both dialects: `$N` placeholders (sqlx-sqlite accepts them), times as BIGINT
//! epoch milliseconds, JSON as TEXT. The two places where dialects differ are spelled by
//! `sql!`: the database clock (`NOW`; leases use the database's clock, never a worker's) and
//! `SKIP_LOCKED` (Postgres row locks; SQLite serialises writers with `BEGIN IMMEDIATE` instead).
//!
//! Not here: vectors (see [`crate::vector`]) and feature-file contents (see [`crate::features`]).

mod feature_files;
mod jobs;
mod models;
mod reports;
mod runs;
mod slide_reset;
mod slides;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{redact_url, CatalogUrl, StoreConfig};
use crate::error::{Result, StoreError};

pub use feature_files::FeatureFileRecord;
pub use jobs::{kinds, Claim, ClaimOptions, Job, JobCounts, JobState, NewJob, QueueOutcome};
pub use models::ModelRecord;
pub use reports::{NewReport, ReportRecord, TrainingPair};
pub use runs::{RunStatus, TrainingRun};
pub use slide_reset::{ResetOutcome, SlideReset};
pub use slides::{EmbeddedSlide, NewSlide, SlideRecord, SlideState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Opens a write transaction: SQLite takes the write lock up front so that a read-then-write
    /// (claiming a job) cannot fail half-way with SQLITE_BUSY_SNAPSHOT.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }
}

/// One SQL text per dialect from string literals and two tokens: `NOW` (the database clock in
/// epoch ms) and `SKIP_LOCKED` (Postgres: `FOR UPDATE SKIP LOCKED`; SQLite: nothing).
/// Expands to a `&'static str`.
macro_rules! sql {
    // Internal arms first: a failed `expr` match in the public arm would be a hard error.
    (@sqlite [$($acc:tt)*] NOW $($rest:tt)*) => {
        $crate::catalog::sql!(@sqlite [$($acc)* "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"] $($rest)*)
    };
    (@pg [$($acc:tt)*] NOW $($rest:tt)*) => {
        $crate::catalog::sql!(@pg [$($acc)* "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"] $($rest)*)
    };
    (@sqlite [$($acc:tt)*] SKIP_LOCKED $($rest:tt)*) => { $crate::catalog::sql!(@sqlite [$($acc)*] $($rest)*) };
    (@pg [$($acc:tt)*] SKIP_LOCKED $($rest:tt)*) => {
        $crate::catalog::sql!(@pg [$($acc)* " FOR UPDATE SKIP LOCKED "] $($rest)*)
    };
    (@$d:ident [$($acc:tt)*] $lit:literal $($rest:tt)*) => { $crate::catalog::sql!(@$d [$($acc)* $lit] $($rest)*) };
    (@$d:ident [$($acc:tt)*]) => { concat!($($acc),*) };
    ($dialect:expr, $($part:tt)+) => {
        match $dialect {
            $crate::catalog::Dialect::Sqlite => $crate::catalog::sql!(@sqlite [] $($part)+),
            $crate::catalog::Dialect::Postgres => $crate::catalog::sql!(@pg [] $($part)+),
        }
    };
}

/// Runs `$body` with `$pool` bound to the concrete pool and `$d` to its dialect; the body is
/// compiled once per backend, so it must only use types both drivers encode and decode
/// (`&str`, `String`, `i64`, `f64`, their `Option`s).
macro_rules! on_db {
    ($catalog:expr, |$pool:ident, $d:ident| $body:expr) => {
        match &$catalog.db {
            $crate::catalog::Db::Sqlite($pool) => {
                #[allow(unused_variables)]
                let $d = $crate::catalog::Dialect::Sqlite;
                $body
            }
            $crate::catalog::Db::Postgres($pool) => {
                #[allow(unused_variables)]
                let $d = $crate::catalog::Dialect::Postgres;
                $body
            }
        }
    };
}

/// Inserts or replaces the fingerprint of one stored point. Evaluates to `Result<(), StoreError>`.
macro_rules! upsert_embedding {
    ($conn:expr, $collection:expr, $object_id:expr, $fingerprint:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO embeddings (collection, object_id, fingerprint, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (collection, object_id) DO UPDATE SET \
             fingerprint = excluded.fingerprint, created_at = excluded.created_at",
        )
        .bind($collection)
        .bind($object_id)
        .bind($fingerprint)
        .bind($now)
        .execute($conn)
        .await
        .map(|_| ())
        .map_err($crate::error::StoreError::from)
    };
}

/// Marks a slide embedded and records its point's fingerprint, on a connection inside the
/// caller's transaction. Evaluates to `Result<(), StoreError>`.
macro_rules! record_slide_embedded {
    ($conn:expr, $embedded:expr) => {
        async {
            let embedded: &$crate::catalog::EmbeddedSlide = $embedded;
            if embedded.fingerprint.trim().is_empty() {
                return Err($crate::error::StoreError::InvalidRequest(
                    "embedded slide without a fingerprint".into(),
                ));
            }
            let now = $crate::catalog::now_ms();
            let n = sqlx::query(
                "UPDATE slides SET state = 'embedded', error = NULL, tile_count = $2, \
                 fingerprint = $3, fingerprints = $4, updated_at = $5 WHERE id = $1",
            )
            .bind(&embedded.slide_id)
            .bind(i64::try_from(embedded.tile_count).unwrap_or(i64::MAX))
            .bind(&embedded.fingerprint)
            .bind($crate::catalog::to_json(&embedded.fingerprints))
            .bind(now)
            .execute(&mut *$conn)
            .await?
            .rows_affected();
            if n == 0 {
                return Err($crate::error::StoreError::UnknownSlide(
                    embedded.slide_id.clone(),
                ));
            }
            $crate::catalog::upsert_embedding!(
                &mut *$conn,
                embedded.collection.as_str(),
                embedded.slide_id.as_str(),
                embedded.fingerprint.as_str(),
                now
            )
        }
        .await
    };
}

pub(crate) use {on_db, record_slide_embedded, sql, upsert_embedding};

#[derive(Clone, Debug)]
pub(crate) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Handle to the catalog database (a connection pool; cheap to clone).
#[derive(Clone, Debug)]
pub struct Catalog {
    pub(crate) db: Db,
    url: String,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// An exclusive advisory lock on `<catalog>.lock` (released when the file is dropped); `None`
/// where it cannot be had (an in-memory catalog, a read-only folder): opening goes on unlocked.
fn sqlite_open_lock(db: &std::path::Path) -> Option<std::fs::File> {
    if db.as_os_str().is_empty() || db.as_os_str() == ":memory:" {
        return None;
    }
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&name)
        .ok()?;
    file.lock().ok()?;
    Some(file)
}

/// How long a SQLite writer waits for another (ingest + worker on one machine) before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

impl Catalog {
    /// Opens the configured catalog, creating the data dir (and the SQLite file) if needed.
    pub async fn open(config: &StoreConfig) -> Result<Catalog> {
        config.validate()?;
        if config.catalog_url.is_none() {
            std::fs::create_dir_all(&config.data_dir)
                .map_err(|e| StoreError::io("create data dir", &config.data_dir, e))?;
        }
        Catalog::connect(&config.catalog_url()).await
    }

    /// Connects to `sqlite://PATH` or `postgres://...` and applies pending migrations.
    pub async fn connect(url: &str) -> Result<Catalog> {
        let shown = redact_url(url);
        let connect_err = |source| StoreError::CatalogConnect {
            url: shown.clone(),
            source,
        };
        match CatalogUrl::parse(url)? {
            CatalogUrl::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(connect_err)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: a committed claim or completion survives a power cut, not just a kill.
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true);
                if let Some(parent) = options.get_filename().parent() {
                    if !parent.as_os_str().is_empty() {
                        std::fs::create_dir_all(parent)
                            .map_err(|e| StoreError::io("create catalog dir", parent, e))?;
                    }
                }
                // Processes opening a new catalog at the same moment (an ingest and a `jobs
                // list`) would race to create it and apply the migrations (SQLite has no
                // migration lock): opening is serialised by an advisory lock on a file next to
                // it, held until the migrations are applied.
                let db = options.get_filename().to_path_buf();
                // Waiting for the lock blocks: off the async workers.
                let _opening = tokio::task::spawn_blocking(move || sqlite_open_lock(&db))
                    .await
                    .ok()
                    .flatten();
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options)
                    .await
                    .map_err(connect_err)?;
                SQLITE_MIGRATIONS.run(&pool).await?;
                Ok(Catalog {
                    db: Db::Sqlite(pool),
                    url: shown,
                })
            }
            CatalogUrl::Postgres => {
                let options = PgConnectOptions::from_str(url).map_err(connect_err)?;
                Catalog::connect_postgres(options, shown).await
            }
        }
    }

    pub(crate) async fn connect_postgres(
        options: PgConnectOptions,
        shown: String,
    ) -> Result<Catalog> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.application_name("gigapath"))
            .await
            .map_err(|source| StoreError::CatalogConnect {
                url: shown.clone(),
                source,
            })?;
        // sqlx takes an advisory lock, so workers starting together migrate once.
        POSTGRES_MIGRATIONS.run(&pool).await?;
        Ok(Catalog {
            db: Db::Postgres(pool),
            url: shown,
        })
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// The URL it was opened with, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes the connection pool, waiting for queries in flight; later queries fail.
    pub async fn close(&self) {
        match &self.db {
            Db::Sqlite(pool) => pool.close().await,
            Db::Postgres(pool) => pool.close().await,
        }
    }

    /// Round trip to the database (readiness probes).
    pub async fn health(&self) -> Result<()> {
        on_db!(self, |pool, d| {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }
}

/// Wall-clock epoch ms for informational timestamps (created / updated). Lease arithmetic uses
/// the database clock instead (`NOW` in [`sql!`]).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn to_json(map: &BTreeMap<String, String>) -> String {
    serde_json::to_string(map).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn from_json_map(text: &str, what: &str) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::CorruptRow(format!("{what} is not a JSON object of strings: {e}")))
}

/// Refuses an empty (or all-blank) required text field, naming it.
pub(crate) fn require(what: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(StoreError::InvalidRequest(format!("{what} is empty")));
    }
    Ok(())
}

pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
