//! The `reports` table: pathology reports tied to slides, and the (slide, report) pairs that
//! alignment training reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{from_json_map, now_ms, on_db, require, to_json, upsert_embedding, Catalog};
use crate::error::{Result, StoreError};

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

impl Catalog {
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
}
