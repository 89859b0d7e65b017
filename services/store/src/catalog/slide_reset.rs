//! A slide's content identity (which file an id stands for) and forgetting a slide's embedding
//! (`DELETE /v1/slides/{id}`, `gigapath ingest --replace`), kept apart from the job queue.

use serde::{Deserialize, Serialize};

use super::{now_ms, on_db, sql, Catalog};
use crate::error::{Result, StoreError};

/// What [`Catalog::reset_slide`] should clear besides the slide's own rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlideReset<'a> {
    /// The slide to reset.
    pub slide_id: &'a str,
    /// Job kind of the slide's embedding jobs (their `subject` is the slide id).
    pub job_kind: &'a str,
    /// Collection of the slide's point (its `embeddings` row goes).
    pub slide_collection: &'a str,
    /// Collection of its reports' points: their `embeddings` rows go and their fingerprints are
    /// cleared (`None`: reports keep their embeddings).
    pub report_collection: Option<&'a str>,
}

/// What [`Catalog::reset_slide`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum ResetOutcome {
    /// No such slide.
    Unknown,
    /// A worker holds a live lease on one of its jobs: nothing was changed.
    Busy {
        /// That job.
        job_id: i64,
    },
    /// The slide is `registered` again with no embedding, no jobs and no feature-file rows.
    Reset {
        /// Paths of the feature-file rows removed (the caller deletes the files).
        feature_files: Vec<String>,
        /// Ids of its reports (whose points the caller deletes, when reports were reset).
        reports: Vec<String>,
    },
}

impl Catalog {
    /// Records the content identity of a slide's file (an opaque string chosen by the caller).
    pub async fn set_slide_content(&self, slide_id: &str, content: &str) -> Result<()> {
        let now = now_ms();
        let n = on_db!(self, |pool, d| {
            sqlx::query("UPDATE slides SET content = $2, updated_at = $3 WHERE id = $1")
                .bind(slide_id)
                .bind(content)
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

    /// The content identity recorded for a slide (`None`: unknown slide, or registered before
    /// identities were recorded).
    pub async fn slide_content(&self, slide_id: &str) -> Result<Option<String>> {
        let row: Option<(Option<String>,)> = on_db!(self, |pool, d| {
            sqlx::query_as("SELECT content FROM slides WHERE id = $1")
                .bind(slide_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.and_then(|(c,)| c))
    }

    /// Forgets what the catalog knows of a slide's embedding, in one transaction: its jobs
    /// (unless one is running under a live lease: then nothing changes), its `embeddings` row,
    /// its feature-file rows, its state (back to `registered`, no fingerprint, no tile count, no
    /// error) and, when asked, its reports' embeddings. The record itself (path, content
    /// identity, labels, reports) stays. The caller then deletes the points and files.
    pub async fn reset_slide(&self, reset: &SlideReset<'_>) -> Result<ResetOutcome> {
        let now = now_ms();
        let id = reset.slide_id;
        on_db!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await?;
            let known: Option<(String,)> = sqlx::query_as("SELECT id FROM slides WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if known.is_none() {
                tx.rollback().await?;
                return Ok(ResetOutcome::Unknown);
            }
            let busy: Option<(i64,)> = sqlx::query_as(sql!(d,
                "SELECT id FROM jobs WHERE kind = $1 AND subject = $2 AND state = 'running' \
                 AND lease_expires_at >= " NOW " ORDER BY id LIMIT 1"
            ))
            .bind(reset.job_kind)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((job_id,)) = busy {
                tx.rollback().await?;
                return Ok(ResetOutcome::Busy { job_id });
            }
            sqlx::query("DELETE FROM jobs WHERE kind = $1 AND subject = $2")
                .bind(reset.job_kind)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM embeddings WHERE collection = $1 AND object_id = $2")
                .bind(reset.slide_collection)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let feature_files: Vec<(String,)> =
                sqlx::query_as("SELECT path FROM feature_files WHERE slide_id = $1 ORDER BY path")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            sqlx::query("DELETE FROM feature_files WHERE slide_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let reports: Vec<(String,)> =
                sqlx::query_as("SELECT id FROM reports WHERE slide_id = $1 ORDER BY id")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            if let Some(collection) = reset.report_collection {
                for (report,) in &reports {
                    sqlx::query("DELETE FROM embeddings WHERE collection = $1 AND object_id = $2")
                        .bind(collection)
                        .bind(report)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "UPDATE reports SET fingerprint = NULL, updated_at = $2 WHERE slide_id = $1",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "UPDATE slides SET state = 'registered', error = NULL, tile_count = NULL, \
                 fingerprint = NULL, fingerprints = '{}', updated_at = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(ResetOutcome::Reset {
                feature_files: feature_files.into_iter().map(|(p,)| p).collect(),
                reports: reports.into_iter().map(|(r,)| r).collect(),
            })
        })
    }
}
