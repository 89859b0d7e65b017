//! The `training_runs` table: alignment training runs and their status.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{now_ms, on_db, require, Catalog};
use crate::error::{Result, StoreError};

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

impl Catalog {
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
