//! The `slides` table: what ingest registered for each slide and how embedding went.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{from_json_map, now_ms, on_db, record_slide_embedded, require, to_json, Catalog};
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

impl Catalog {
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
}
