//! The `models` and `embeddings` tables: the weights that produced stored vectors, and which
//! fingerprint each stored vector came from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{now_ms, on_db, require, Catalog};
use crate::error::{Result, StoreError};

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

impl Catalog {
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
}
