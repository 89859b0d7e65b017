//! Catalog records other than jobs: slides, reports, feature files, model fingerprints, stored
//! embeddings and training runs. Typed Rust structs in and out; rows stay private.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    from_json_map, now_ms, on_db, record_slide_embedded, to_json, upsert_embedding, Catalog,
};
use crate::error::{Result, StoreError};

/// Where a slide is in ingest; stored as [`SlideState::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlideState {
    /// Known, not (yet) embedded with any weights.
    Registered,
    /// Its embedding is in the vector store (see `fingerprint`).
    Embedded,
    /// The last attempt failed (see `error`).
    Failed,
}

impl SlideState {
    /// Every state, in the order of a slide's life.
    pub const ALL: [SlideState; 3] = [
        SlideState::Registered,
        SlideState::Embedded,
        SlideState::Failed,
    ];

    /// The name stored in the catalog and shown to users (`registered`, `embedded`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            SlideState::Registered => "registered",
            SlideState::Embedded => "embedded",
            SlideState::Failed => "failed",
        }
    }
}

impl fmt::Display for SlideState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SlideState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        SlideState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| StoreError::CorruptRow(format!("unknown slide state `{s}`")))
    }
}

/// What ingest knows about a slide before embedding it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NewSlide {
    /// The slide id (unique in the catalog).
    pub id: String,
    /// The slide file, as ingest found it.
    pub path: String,
    /// Cohort (study) the slide belongs to; `None` when not given.
    pub cohort: Option<String>,
    /// Site (hospital, lab) it comes from; `None` when not given.
    pub site: Option<String>,
    /// Free-form labels (subtype, ...) for search filters and evaluation; empty when none.
    pub labels: BTreeMap<String, String>,
    /// Level-0 micrometres per pixel: the file's own, or the ingest override; `None` when
    /// neither is known.
    pub mpp: Option<f64>,
}

/// A slide as the catalog holds it: what ingest registered ([`NewSlide`]) and how embedding
/// went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlideRecord {
    /// As registered ([`NewSlide::id`]).
    pub id: String,
    /// As registered ([`NewSlide::path`]).
    pub path: String,
    /// As registered ([`NewSlide::cohort`]).
    pub cohort: Option<String>,
    /// As registered ([`NewSlide::site`]).
    pub site: Option<String>,
    /// As registered ([`NewSlide::labels`]).
    pub labels: BTreeMap<String, String>,
    /// As registered ([`NewSlide::mpp`]).
    pub mpp: Option<f64>,
    /// Tiles in its latest embedding; `None` before the first.
    pub tile_count: Option<u64>,
    /// Where the slide is now.
    pub state: SlideState,
    /// Why the last attempt failed; cleared when an embedding is recorded.
    pub error: Option<String>,
    /// Guard fingerprint of its stored point; `None` before the first embedding.
    pub fingerprint: Option<String>,
    /// Per-role weights of that embedding ([`EmbeddedSlide::fingerprints`]); empty before.
    pub fingerprints: BTreeMap<String, String>,
    /// Epoch ms when it was first registered.
    pub created_at_ms: i64,
    /// Epoch ms of its last change.
    pub updated_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct SlideRow {
    id: String,
    path: String,
    cohort: Option<String>,
    site: Option<String>,
    labels: String,
    mpp: Option<f64>,
    tile_count: Option<i64>,
    state: String,
    error: Option<String>,
    fingerprint: Option<String>,
    fingerprints: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<SlideRow> for SlideRecord {
    type Error = StoreError;
    fn try_from(r: SlideRow) -> Result<Self> {
        Ok(SlideRecord {
            labels: from_json_map(&r.labels, "slides.labels")?,
            fingerprints: from_json_map(&r.fingerprints, "slides.fingerprints")?,
            state: r.state.parse()?,
            tile_count: r.tile_count.map(|n| n.max(0) as u64),
            id: r.id,
            path: r.path,
            cohort: r.cohort,
            site: r.site,
            mpp: r.mpp,
            error: r.error,
            fingerprint: r.fingerprint,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
        })
    }
}

const SLIDE_COLUMNS: &str = "id, path, cohort, site, labels, mpp, tile_count, state, error, \
                             fingerprint, fingerprints, created_at, updated_at";

/// What a worker records once a slide's points are in the vector store.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddedSlide {
    /// The slide.
    pub slide_id: String,
    /// Tiles that went into the embedding.
    pub tile_count: u64,
    /// Guard fingerprint of the stored point (same string as in the vector store).
    pub fingerprint: String,
    /// Per-role weights (`tile`, `slide`, `alignment`, ...).
    pub fingerprints: BTreeMap<String, String>,
    /// Collection the point went to (normally `slides`).
    pub collection: String,
}

/// A pathology report to register, tied to one slide.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NewReport {
    /// The report id (unique in the catalog).
    pub id: String,
    /// The slide it describes; that slide must be registered.
    pub slide_id: String,
    /// The report text, as embedded.
    pub text: String,
    /// Free-form labels, merged over the slide's in training pairs; empty when none.
    pub labels: BTreeMap<String, String>,
}

/// A report as the catalog holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportRecord {
    /// As registered ([`NewReport::id`]).
    pub id: String,
    /// As registered ([`NewReport::slide_id`]).
    pub slide_id: String,
    /// As registered ([`NewReport::text`]).
    pub text: String,
    /// As registered ([`NewReport::labels`]).
    pub labels: BTreeMap<String, String>,
    /// Fingerprint of the weights its stored embedding was made with; `None` until embedded.
    pub fingerprint: Option<String>,
    /// Epoch ms when it was first registered.
    pub created_at_ms: i64,
    /// Epoch ms of its last change.
    pub updated_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct ReportRow {
    id: String,
    slide_id: String,
    text: String,
    labels: String,
    fingerprint: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<ReportRow> for ReportRecord {
    type Error = StoreError;
    fn try_from(r: ReportRow) -> Result<Self> {
        Ok(ReportRecord {
            labels: from_json_map(&r.labels, "reports.labels")?,
            id: r.id,
            slide_id: r.slide_id,
            text: r.text,
            fingerprint: r.fingerprint,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
        })
    }
}

/// A (slide, report) pair for alignment training, with the slide's tile features on disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingPair {
    /// The slide.
    pub slide_id: String,
    /// The report that describes it.
    pub report_id: String,
    /// The report text.
    pub text: String,
    /// The slide's cohort, if any.
    pub cohort: Option<String>,
    /// The slide's site, if any.
    pub site: Option<String>,
    /// Slide labels merged with report labels (report wins on a clash).
    pub labels: BTreeMap<String, String>,
    /// The slide's tile feature file, as recorded (see [`crate::Store::training_pairs`]).
    pub feature_path: String,
}

#[derive(sqlx::FromRow)]
struct PairRow {
    slide_id: String,
    report_id: String,
    text: String,
    cohort: Option<String>,
    site: Option<String>,
    slide_labels: String,
    report_labels: String,
    feature_path: String,
}

/// A tile feature file written for one slide and one set of tile weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct FeatureFileRecord {
    /// The slide.
    pub slide_id: String,
    /// Fingerprint of the tile encoder weights that made the features.
    pub tile_fingerprint: String,
    /// Where it was written (see [`crate::Store::locate_feature_file`]).
    pub path: String,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// File size in bytes.
    pub size_bytes: i64,
    /// Tiles (rows) in the file.
    pub tile_count: i64,
    /// Epoch ms when it was recorded; 0 in records serialized before the field existed.
    #[serde(default)]
    pub created_at: i64,
}

/// Weights that produced stored embeddings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The weights' fingerprint, as stored with the points they made.
    pub fingerprint: String,
    /// `tile`, `slide`, `text`, `alignment` or `bundle` (a combination, see `details`).
    pub role: String,
    /// Path or description of the weights.
    pub source: String,
    /// Role-specific facts as a JSON object (architecture, dims, a bundle's parts, ...).
    pub details: Value,
}

#[derive(sqlx::FromRow)]
struct ModelRow {
    fingerprint: String,
    role: String,
    source: String,
    details: String,
}

/// Where a training run is; stored as [`RunStatus::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Training, or killed while training (resumable).
    Running,
    /// Trained every epoch; its checkpoint is final.
    Done,
    /// Ended with an error (see [`TrainingRun::error`]).
    Failed,
    /// Ended early on purpose, without an error.
    Stopped,
}

impl RunStatus {
    /// The name stored in the catalog and shown to users (`running`, `done`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Done => "done",
            RunStatus::Failed => "failed",
            RunStatus::Stopped => "stopped",
        }
    }
}

impl FromStr for RunStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        [
            RunStatus::Running,
            RunStatus::Done,
            RunStatus::Failed,
            RunStatus::Stopped,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| StoreError::CorruptRow(format!("unknown run status `{s}`")))
    }
}

/// A training run of the alignment model, as the catalog holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingRun {
    /// The run id (also its folder name under `<data dir>/alignment`).
    pub id: String,
    /// The run's configuration as JSON, as it was started.
    pub config: Value,
    /// Where the run is.
    pub status: RunStatus,
    /// Run-level metrics as a JSON object (losses, evaluation); `{}` before the first epoch.
    pub metrics: Value,
    /// Folder of its newest checkpoint; `None` before the first.
    pub checkpoint: Option<String>,
    /// Fingerprint of that checkpoint's weights; `None` before the first.
    pub fingerprint: Option<String>,
    /// Why it failed; `None` unless it did.
    pub error: Option<String>,
    /// Epoch ms when it was first started.
    pub created_at_ms: i64,
    /// Epoch ms of its last change.
    pub updated_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: String,
    config: String,
    status: String,
    metrics: String,
    checkpoint: Option<String>,
    fingerprint: Option<String>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<RunRow> for TrainingRun {
    type Error = StoreError;
    fn try_from(r: RunRow) -> Result<Self> {
        let json = |text: &str, what: &str| {
            serde_json::from_str(text)
                .map_err(|e| StoreError::CorruptRow(format!("training_runs.{what}: {e}")))
        };
        Ok(TrainingRun {
            config: json(&r.config, "config")?,
            metrics: json(&r.metrics, "metrics")?,
            status: r.status.parse()?,
            id: r.id,
            checkpoint: r.checkpoint,
            fingerprint: r.fingerprint,
            error: r.error,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
        })
    }
}

fn require(what: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(StoreError::InvalidRequest(format!("{what} is empty")));
    }
    Ok(())
}

impl Catalog {
    // ---- slides ------------------------------------------------------------------------------

    /// Inserts a slide or updates its metadata (path, cohort, site, labels, mpp). Its state,
    /// error and fingerprints are left as they are: re-registering never forgets an embedding.
    pub async fn upsert_slide(&self, slide: &NewSlide) -> Result<()> {
        require("slide id", &slide.id)?;
        require("slide path", &slide.path)?;
        let now = now_ms();
        let labels = to_json(&slide.labels);
        on_db!(self, |pool, d| {
            sqlx::query(
                "INSERT INTO slides (id, path, cohort, site, labels, mpp, state, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'registered', $7, $7) \
                 ON CONFLICT (id) DO UPDATE SET path = excluded.path, cohort = excluded.cohort, \
                 site = excluded.site, labels = excluded.labels, mpp = excluded.mpp, \
                 updated_at = excluded.updated_at",
            )
            .bind(&slide.id)
            .bind(&slide.path)
            .bind(&slide.cohort)
            .bind(&slide.site)
            .bind(&labels)
            .bind(slide.mpp)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The slide with this id, `None` when there is none.
    pub async fn slide(&self, id: &str) -> Result<Option<SlideRecord>> {
        let row: Option<SlideRow> = on_db!(self, |pool, d| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {SLIDE_COLUMNS} FROM slides WHERE id = $1"
            )))
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        row.map(SlideRecord::try_from).transpose()
    }

    /// Slides in id order, optionally only those in `state`.
    pub async fn list_slides(&self, state: Option<SlideState>) -> Result<Vec<SlideRecord>> {
        let state = state.map(SlideState::as_str);
        let rows: Vec<SlideRow> = on_db!(self, |pool, d| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {SLIDE_COLUMNS} FROM slides \
                 WHERE CAST($1 AS TEXT) IS NULL OR state = $1 ORDER BY id"
            )))
            .bind(state)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(SlideRecord::try_from).collect()
    }

    /// Number of slides per state (every state present, zeros included).
    pub async fn slide_counts(&self) -> Result<BTreeMap<SlideState, u64>> {
        let rows: Vec<(String, i64)> = on_db!(self, |pool, d| {
            sqlx::query_as("SELECT state, COUNT(*) FROM slides GROUP BY state")
                .fetch_all(pool)
                .await?
        });
        let mut counts: BTreeMap<SlideState, u64> =
            SlideState::ALL.into_iter().map(|s| (s, 0)).collect();
        for (state, n) in rows {
            counts.insert(state.parse()?, n as u64);
        }
        Ok(counts)
    }

    /// Marks a slide embedded and records which fingerprint its point carries, in one
    /// transaction. Prefer [`Catalog::complete_slide_job`] inside a worker (it also closes the job).
    pub async fn mark_slide_embedded(&self, embedded: &EmbeddedSlide) -> Result<()> {
        on_db!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await?;
            record_slide_embedded!(&mut *tx, embedded)?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Records why a slide failed; the slide keeps any earlier embedding's fingerprint.
    pub async fn mark_slide_failed(&self, slide_id: &str, error: &str) -> Result<()> {
        let now = now_ms();
        let n = on_db!(self, |pool, d| {
            sqlx::query(
                "UPDATE slides SET state = 'failed', error = $2, updated_at = $3 WHERE id = $1",
            )
            .bind(slide_id)
            .bind(error)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if n == 0 {
            return Err(StoreError::UnknownSlide(slide_id.into()));
        }
        Ok(())
    }

    // ---- reports -----------------------------------------------------------------------------

    /// Inserts or updates a report. Its slide must be registered (`UnknownSlide` otherwise), so
    /// a reports file with unknown ids can be reported per row. Changing the text clears the
    /// report's embedding fingerprint (it must be re-embedded).
    pub async fn upsert_report(&self, report: &NewReport) -> Result<()> {
        require("report id", &report.id)?;
        require("report text", &report.text)?;
        let now = now_ms();
        let labels = to_json(&report.labels);
        let inserted = on_db!(self, |pool, d| {
            sqlx::query(
                "INSERT INTO reports (id, slide_id, text, labels, created_at, updated_at) \
                 SELECT $1, $2, $3, $4, $5, $5 WHERE EXISTS (SELECT 1 FROM slides WHERE id = $2) \
                 ON CONFLICT (id) DO UPDATE SET slide_id = excluded.slide_id, \
                 labels = excluded.labels, updated_at = excluded.updated_at, \
                 fingerprint = CASE WHEN reports.text = excluded.text THEN reports.fingerprint END, \
                 text = excluded.text",
            )
            .bind(&report.id)
            .bind(&report.slide_id)
            .bind(&report.text)
            .bind(&labels)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if inserted == 0 {
            return Err(StoreError::UnknownSlide(report.slide_id.clone()));
        }
        Ok(())
    }

    /// The report with this id, `None` when there is none.
    pub async fn report(&self, id: &str) -> Result<Option<ReportRecord>> {
        let row: Option<ReportRow> = on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT id, slide_id, text, labels, fingerprint, created_at, updated_at \
                 FROM reports WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        row.map(ReportRecord::try_from).transpose()
    }

    /// Reports in id order; only those of `slide_id` when given.
    pub async fn list_reports(&self, slide_id: Option<&str>) -> Result<Vec<ReportRecord>> {
        let rows: Vec<ReportRow> = on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT id, slide_id, text, labels, fingerprint, created_at, updated_at \
                 FROM reports WHERE CAST($1 AS TEXT) IS NULL OR slide_id = $1 ORDER BY id",
            )
            .bind(slide_id)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(ReportRecord::try_from).collect()
    }

    /// Records that a report's text embedding is stored with `fingerprint` (in `collection`).
    pub async fn mark_report_embedded(
        &self,
        report_id: &str,
        collection: &str,
        fingerprint: &str,
    ) -> Result<()> {
        require("fingerprint", fingerprint)?;
        let now = now_ms();
        on_db!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await?;
            let n =
                sqlx::query("UPDATE reports SET fingerprint = $2, updated_at = $3 WHERE id = $1")
                    .bind(report_id)
                    .bind(fingerprint)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            if n == 0 {
                return Err(StoreError::InvalidRequest(format!(
                    "unknown report `{report_id}`"
                )));
            }
            upsert_embedding!(&mut *tx, collection, report_id, fingerprint, now)?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Training pairs: every report whose slide has a feature file from `tile_fingerprint`,
    /// ordered by slide then report.
    pub async fn training_pairs(&self, tile_fingerprint: &str) -> Result<Vec<TrainingPair>> {
        let rows: Vec<PairRow> = on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT s.id AS slide_id, r.id AS report_id, r.text, s.cohort, s.site, \
                 s.labels AS slide_labels, r.labels AS report_labels, f.path AS feature_path \
                 FROM reports r JOIN slides s ON s.id = r.slide_id \
                 JOIN feature_files f ON f.slide_id = s.id AND f.tile_fingerprint = $1 \
                 ORDER BY s.id, r.id",
            )
            .bind(tile_fingerprint)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|r| {
                let mut labels = from_json_map(&r.slide_labels, "slides.labels")?;
                labels.extend(from_json_map(&r.report_labels, "reports.labels")?);
                Ok(TrainingPair {
                    slide_id: r.slide_id,
                    report_id: r.report_id,
                    text: r.text,
                    cohort: r.cohort,
                    site: r.site,
                    labels,
                    feature_path: r.feature_path,
                })
            })
            .collect()
    }

    // ---- feature files -----------------------------------------------------------------------

    /// Records (or replaces) the feature file of a slide for one tile encoder.
    pub async fn record_feature_file(&self, file: &FeatureFileRecord) -> Result<()> {
        require("tile fingerprint", &file.tile_fingerprint)?;
        let now = now_ms();
        let n = on_db!(self, |pool, d| {
            sqlx::query(
                "INSERT INTO feature_files \
                 (slide_id, tile_fingerprint, path, sha256, size_bytes, tile_count, created_at) \
                 SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM slides WHERE id = $1) \
                 ON CONFLICT (slide_id, tile_fingerprint) DO UPDATE SET path = excluded.path, \
                 sha256 = excluded.sha256, size_bytes = excluded.size_bytes, \
                 tile_count = excluded.tile_count, created_at = excluded.created_at",
            )
            .bind(&file.slide_id)
            .bind(&file.tile_fingerprint)
            .bind(&file.path)
            .bind(&file.sha256)
            .bind(file.size_bytes)
            .bind(file.tile_count)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if n == 0 {
            return Err(StoreError::UnknownSlide(file.slide_id.clone()));
        }
        Ok(())
    }

    /// The feature file recorded for `slide_id` with tile weights `tile_fingerprint`, `None` when
    /// there is none.
    pub async fn feature_file(
        &self,
        slide_id: &str,
        tile_fingerprint: &str,
    ) -> Result<Option<FeatureFileRecord>> {
        Ok(on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT slide_id, tile_fingerprint, path, sha256, size_bytes, tile_count, created_at \
                 FROM feature_files WHERE slide_id = $1 AND tile_fingerprint = $2",
            )
            .bind(slide_id)
            .bind(tile_fingerprint)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// All recorded feature files (to find orphans on disk, or files missing from disk).
    pub async fn list_feature_files(&self) -> Result<Vec<FeatureFileRecord>> {
        Ok(on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT slide_id, tile_fingerprint, path, sha256, size_bytes, tile_count, created_at \
                 FROM feature_files ORDER BY slide_id, tile_fingerprint",
            )
            .fetch_all(pool)
            .await?
        }))
    }

    // ---- fingerprints ------------------------------------------------------------------------

    /// Records the weights behind a fingerprint (idempotent; the first description wins, since
    /// a fingerprint names one set of weights forever).
    pub async fn record_model(&self, model: &ModelRecord) -> Result<()> {
        require("fingerprint", &model.fingerprint)?;
        let details = model.details.to_string();
        let now = now_ms();
        on_db!(self, |pool, d| {
            sqlx::query(
                "INSERT INTO models (fingerprint, role, source, details, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (fingerprint) DO NOTHING",
            )
            .bind(&model.fingerprint)
            .bind(&model.role)
            .bind(&model.source)
            .bind(&details)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every recorded set of weights, oldest first.
    pub async fn models(&self) -> Result<Vec<ModelRecord>> {
        let rows: Vec<ModelRow> = on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT fingerprint, role, source, details FROM models ORDER BY created_at, fingerprint",
            )
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|r| {
                Ok(ModelRecord {
                    details: serde_json::from_str(&r.details)
                        .map_err(|e| StoreError::CorruptRow(format!("models.details: {e}")))?,
                    fingerprint: r.fingerprint,
                    role: r.role,
                    source: r.source,
                })
            })
            .collect()
    }

    /// Number of stored embeddings per fingerprint in `collection` (more than one key means the
    /// collection is mixed and searches will be refused until it is re-embedded).
    pub async fn embedding_fingerprints(&self, collection: &str) -> Result<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> = on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT fingerprint, COUNT(*) FROM embeddings WHERE collection = $1 \
                 GROUP BY fingerprint",
            )
            .bind(collection)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(|(f, n)| (f, n as u64)).collect())
    }

    /// Forgets a stored embedding (after deleting its point).
    pub async fn forget_embedding(&self, collection: &str, object_id: &str) -> Result<()> {
        on_db!(self, |pool, d| {
            sqlx::query("DELETE FROM embeddings WHERE collection = $1 AND object_id = $2")
                .bind(collection)
                .bind(object_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    // ---- training runs -----------------------------------------------------------------------

    /// Starts a run, or marks an existing one running again (resume after a kill keeps its id,
    /// config and metrics).
    pub async fn start_run(&self, id: &str, config: &Value) -> Result<TrainingRun> {
        require("run id", id)?;
        let now = now_ms();
        let config = config.to_string();
        on_db!(self, |pool, d| {
            sqlx::query(
                "INSERT INTO training_runs (id, config, status, metrics, created_at, updated_at) \
                 VALUES ($1, $2, 'running', '{}', $3, $3) \
                 ON CONFLICT (id) DO UPDATE SET status = 'running', error = NULL, \
                 updated_at = excluded.updated_at",
            )
            .bind(id)
            .bind(&config)
            .bind(now)
            .execute(pool)
            .await?;
        });
        self.run(id)
            .await?
            .ok_or_else(|| StoreError::UnknownRun(id.into()))
    }

    /// Updates a run's status and run-level metrics; `checkpoint`, `fingerprint` and `error`
    /// overwrite only when given.
    pub async fn update_run(
        &self,
        id: &str,
        status: RunStatus,
        metrics: &Value,
        checkpoint: Option<&str>,
        fingerprint: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        let now = now_ms();
        let metrics = metrics.to_string();
        let n = on_db!(self, |pool, d| {
            sqlx::query(
                "UPDATE training_runs SET status = $2, metrics = $3, \
                 checkpoint = COALESCE($4, checkpoint), fingerprint = COALESCE($5, fingerprint), \
                 error = COALESCE($6, error), updated_at = $7 WHERE id = $1",
            )
            .bind(id)
            .bind(status.as_str())
            .bind(&metrics)
            .bind(checkpoint)
            .bind(fingerprint)
            .bind(error)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if n == 0 {
            return Err(StoreError::UnknownRun(id.into()));
        }
        Ok(())
    }

    /// The training run with this id, `None` when there is none.
    pub async fn run(&self, id: &str) -> Result<Option<TrainingRun>> {
        let row: Option<RunRow> = on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT id, config, status, metrics, checkpoint, fingerprint, error, created_at, \
                 updated_at FROM training_runs WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        row.map(TrainingRun::try_from).transpose()
    }

    /// Runs, newest first.
    pub async fn list_runs(&self) -> Result<Vec<TrainingRun>> {
        let rows: Vec<RunRow> = on_db!(self, |pool, d| {
            sqlx::query_as(
                "SELECT id, config, status, metrics, checkpoint, fingerprint, error, created_at, \
                 updated_at FROM training_runs ORDER BY created_at DESC, id",
            )
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(TrainingRun::try_from).collect()
    }
}
