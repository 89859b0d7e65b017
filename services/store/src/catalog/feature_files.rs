//! The `feature_files` table: one tile feature file per slide and set of tile weights.

use serde::{Deserialize, Serialize};

use super::{now_ms, on_db, require, Catalog};
use crate::error::{Result, StoreError};

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

impl Catalog {
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
}
