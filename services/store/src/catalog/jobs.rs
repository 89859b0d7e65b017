//! The job queue: ingest queues jobs, workers (on one machine or many) claim them with a lease.
//!
//! Protocol for a worker (`worker` is a name unique to the process, e.g. `host-pid-random`):
//! 1. [`Catalog::claim_job`]: atomically takes the oldest claimable job: queued, or running with
//!    an expired lease (its worker died). Postgres: `FOR UPDATE SKIP LOCKED`, so concurrent workers
//!    never wait on each other or take the same job; SQLite: one `UPDATE ... WHERE id = (SELECT
//!    ... LIMIT 1) RETURNING` inside `BEGIN IMMEDIATE`.
//! 2. [`Catalog::renew_lease`] while working (e.g. every lease/3).
//! 3. [`Catalog::complete_job`] / [`Catalog::complete_slide_job`] or [`Catalog::fail_job`].
//!    All three check that this worker still holds the job: a worker whose lease ran out and whose
//!    job was re-claimed gets `LeaseLost` and must drop its result.
//!
//! Attempts are counted when a job is claimed, not when it ends, so an attempt whose process
//! died (killed, out of memory, aborted) counts too. A job whose attempts reach `max_attempts`
//! and whose last lease expired (a slide that kills its worker) is *parked*: failed with the
//! reason, instead of being handed out at every start ([`Claim::parked`] lists them so the
//! caller can record why). Every job records its attempts (`attempts`, the last `error`, the
//! first and latest claim times, and `deferrals`: attempts given back after an infrastructure
//! error, see [`Catalog::defer_job`], which do not count).
//!
//! Operators: [`Catalog::cancel_job`] (queued or running -> cancelled; a worker holding the job
//! loses it at its next lease renewal or completion) and [`Catalog::retry_job`] (failed or
//! cancelled -> queued, attempts reset). Failed jobs are otherwise retried only on request
//! ([`Catalog::retry_failed_jobs`], or `NewJob::retry_failed`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    duration_ms, now_ms, on_db, record_slide_embedded, sql, Catalog, Dialect, EmbeddedSlide,
};
use crate::error::{Result, StoreError};

/// Conventional job kinds (free-form strings; these are the ones the pipeline uses).
pub mod kinds {
    /// Tile features + slide embedding of one slide (`subject` = slide id, `payload` the
    /// pipeline's slide job): the one kind ingest queues and workers claim.
    pub const EMBED_SLIDE: &str = "embed_slide";
}

/// Where a job is in its life; stored as [`JobState::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker to claim it.
    Queued,
    /// Claimed by a worker that holds its lease (or whose lease expired: see
    /// [`JobCounts::stale`]).
    Running,
    /// Finished with a result.
    Done,
    /// Gave up: the last attempt's error is in [`Job::error`].
    Failed,
    /// Cancelled by an operator (`gigapath jobs cancel`); queued again only by a retry.
    Cancelled,
}

impl JobState {
    /// Every state, in the order of a job's life.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name stored in the catalog and shown to users (`queued`, `running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| StoreError::CorruptRow(format!("unknown job state `{s}`")))
    }
}

/// A job to queue. Jobs are unique per (kind, subject, fingerprint): queueing the same work twice
/// is a no-op, and re-running ingest with new weights queues new jobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// What to do; one of [`kinds`] for the pipeline's jobs.
    pub kind: String,
    /// What to do it to: a slide or report id.
    pub subject: String,
    /// Fingerprint of the weights the job embeds with.
    pub fingerprint: String,
    /// Everything else the worker needs (the pipeline's job as JSON), stored as is.
    pub payload: Value,
    /// Put a failed job back in the queue (with a fresh attempt count) instead of reporting it.
    pub retry_failed: bool,
}

/// What [`Catalog::queue_job`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum QueueOutcome {
    /// A new job.
    Queued {
        /// The new job's id.
        id: i64,
    },
    /// The same job is already queued or running.
    Pending {
        /// That job's id.
        id: i64,
    },
    /// Already done with these weights: nothing to do.
    AlreadyDone {
        /// The done job's id.
        id: i64,
    },
    /// It failed (or was cancelled) before and `retry_failed` was not set.
    PreviouslyFailed {
        /// The failed job's id.
        id: i64,
        /// Why its last attempt failed, or that it was cancelled; `None` when none was recorded.
        error: Option<String>,
    },
    /// It failed (or was cancelled) before and was queued again (`retry_failed`).
    Requeued {
        /// The job's id (the same row, queued again).
        id: i64,
    },
}

impl QueueOutcome {
    /// The id of the job the outcome is about, whichever the outcome.
    pub fn id(&self) -> i64 {
        match *self {
            QueueOutcome::Queued { id }
            | QueueOutcome::Pending { id }
            | QueueOutcome::AlreadyDone { id }
            | QueueOutcome::PreviouslyFailed { id, .. }
            | QueueOutcome::Requeued { id } => id,
        }
    }
}

/// A job as the catalog holds it: what was queued ([`NewJob`]) and how its attempts went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Catalog id, unique across kinds.
    pub id: i64,
    /// As queued ([`NewJob::kind`]).
    pub kind: String,
    /// As queued ([`NewJob::subject`]).
    pub subject: String,
    /// As queued ([`NewJob::fingerprint`]).
    pub fingerprint: String,
    /// As queued ([`NewJob::payload`]).
    pub payload: Value,
    /// Where the job is now.
    pub state: JobState,
    /// Claims so far, this one included (an attempt whose process died counts).
    pub attempts: u32,
    /// The worker holding the job (running), or the last one that held it.
    pub worker: Option<String>,
    /// Database-clock epoch ms.
    pub lease_expires_at_ms: Option<i64>,
    /// Why the last attempt failed (or ended without a result).
    pub error: Option<String>,
    /// Database-clock epoch ms when it was first queued.
    pub created_at_ms: i64,
    /// Database-clock epoch ms of its last change (claim, lease renewal, completion, ...).
    pub updated_at_ms: i64,
    /// Database-clock epoch ms of the first claim, `None` before any.
    pub first_attempt_at_ms: Option<i64>,
    /// Database-clock epoch ms of the latest claim.
    pub last_attempt_at_ms: Option<i64>,
    /// Attempts given back after an infrastructure error (not counted in `attempts`).
    pub deferrals: u32,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: i64,
    kind: String,
    subject: String,
    fingerprint: String,
    payload: String,
    state: String,
    attempts: i64,
    worker: Option<String>,
    lease_expires_at: Option<i64>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    first_attempt_at: Option<i64>,
    last_attempt_at: Option<i64>,
    deferrals: i64,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;
    fn try_from(r: JobRow) -> Result<Self> {
        Ok(Job {
            payload: serde_json::from_str(&r.payload).map_err(|e| {
                StoreError::CorruptRow(format!("jobs.payload of job {}: {e}", r.id))
            })?,
            state: r.state.parse()?,
            attempts: u32::try_from(r.attempts).unwrap_or(u32::MAX),
            id: r.id,
            kind: r.kind,
            subject: r.subject,
            fingerprint: r.fingerprint,
            worker: r.worker,
            lease_expires_at_ms: r.lease_expires_at,
            error: r.error,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
            first_attempt_at_ms: r.first_attempt_at,
            last_attempt_at_ms: r.last_attempt_at,
            deferrals: u32::try_from(r.deferrals).unwrap_or(u32::MAX),
        })
    }
}

const JOB_COLUMNS: &str = "id, kind, subject, fingerprint, payload, state, attempts, worker, \
                           lease_expires_at, error, created_at, updated_at, first_attempt_at, \
                           last_attempt_at, deferrals";

/// What a worker may claim, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimOptions {
    /// How long the claim holds without renewal.
    pub lease: Duration,
    /// Only jobs of this kind (any kind when `None`).
    pub kind: Option<String>,
    /// A job claimed this many times whose last lease expired is parked (failed) instead of
    /// claimed again.
    pub max_attempts: u32,
}

/// What [`Catalog::claim`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claim {
    /// The claimed job, `None` when nothing is claimable.
    pub job: Option<Job>,
    /// Jobs parked by this claim: their attempts reached `max_attempts` and the last one ended
    /// without a result (its worker died). They are failed now, with the reason in `error`.
    pub parked: Vec<Job>,
}

impl Default for ClaimOptions {
    fn default() -> Self {
        ClaimOptions {
            lease: Duration::from_secs(600),
            kind: None,
            max_attempts: 3,
        }
    }
}

/// Jobs per state, for `gigapath status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    /// Waiting for a worker.
    pub queued: u64,
    /// Claimed, stale ones included.
    pub running: u64,
    /// Finished with a result.
    pub done: u64,
    /// Gave up (parked ones included).
    pub failed: u64,
    /// Cancelled by an operator.
    #[serde(default)]
    pub cancelled: u64,
    /// Running jobs whose lease has expired (their worker is presumably dead; they will be
    /// claimed again). Included in `running`.
    pub stale: u64,
}

impl JobCounts {
    /// All jobs, whatever their state (`stale` is part of `running`, so not added again).
    pub fn total(&self) -> u64 {
        self.queued + self.running + self.done + self.failed + self.cancelled
    }
}

fn validate_new_job(job: &NewJob) -> Result<()> {
    for (what, value) in [
        ("job kind", &job.kind),
        ("job subject", &job.subject),
        ("job fingerprint", &job.fingerprint),
    ] {
        if value.trim().is_empty() {
            return Err(StoreError::InvalidRequest(format!("{what} is empty")));
        }
    }
    Ok(())
}

fn validate_worker(worker: &str) -> Result<()> {
    if worker.trim().is_empty() {
        return Err(StoreError::InvalidRequest("worker name is empty".into()));
    }
    Ok(())
}

impl Catalog {
    /// Queues a job unless the same (kind, subject, fingerprint) exists; see [`QueueOutcome`].
    pub async fn queue_job(&self, job: &NewJob) -> Result<QueueOutcome> {
        validate_new_job(job)?;
        let payload = job.payload.to_string();
        let now = now_ms();
        on_db!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await?;
            let inserted: Option<(i64,)> = sqlx::query_as(
                "INSERT INTO jobs (kind, subject, fingerprint, payload, state, attempts, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, 'queued', 0, $5, $5) \
                 ON CONFLICT (kind, subject, fingerprint) DO NOTHING RETURNING id",
            )
            .bind(&job.kind)
            .bind(&job.subject)
            .bind(&job.fingerprint)
            .bind(&payload)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let outcome = if let Some((id,)) = inserted {
                QueueOutcome::Queued { id }
            } else {
                let (id, state, error): (i64, String, Option<String>) = sqlx::query_as(
                    "SELECT id, state, error FROM jobs \
                     WHERE kind = $1 AND subject = $2 AND fingerprint = $3",
                )
                .bind(&job.kind)
                .bind(&job.subject)
                .bind(&job.fingerprint)
                .fetch_one(&mut *tx)
                .await?;
                match state.parse::<JobState>()? {
                    JobState::Queued | JobState::Running => QueueOutcome::Pending { id },
                    JobState::Done => QueueOutcome::AlreadyDone { id },
                    JobState::Failed | JobState::Cancelled if job.retry_failed => {
                        sqlx::query(
                            "UPDATE jobs SET state = 'queued', attempts = 0, deferrals = 0, \
                             worker = NULL, lease_expires_at = NULL, error = NULL, \
                             first_attempt_at = NULL, last_attempt_at = NULL, payload = $2, \
                             updated_at = $3 WHERE id = $1",
                        )
                        .bind(id)
                        .bind(&payload)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        QueueOutcome::Requeued { id }
                    }
                    JobState::Failed => QueueOutcome::PreviouslyFailed { id, error },
                    JobState::Cancelled => QueueOutcome::PreviouslyFailed {
                        id,
                        error: Some(format!(
                            "job {id} is cancelled ({}); `gigapath jobs retry {id}` or \
                             --retry-failed queues it again",
                            error.as_deref().unwrap_or("by an operator")
                        )),
                    },
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
    }

    /// Claims the oldest claimable job for `worker`, or `None` when there is nothing to do
    /// (see [`Catalog::claim`], which also reports the jobs it parked).
    pub async fn claim_job(&self, worker: &str, options: &ClaimOptions) -> Result<Option<Job>> {
        Ok(self.claim(worker, options).await?.job)
    }

    /// Parks the jobs that used up their attempts, then claims the oldest claimable job for
    /// `worker`: queued, or running with an expired lease (its worker died; the dead attempt is
    /// recorded as the job's last error). The claim counts as an attempt at once, so a process
    /// that dies during the job still used one.
    pub async fn claim(&self, worker: &str, options: &ClaimOptions) -> Result<Claim> {
        validate_worker(worker)?;
        if options.lease.is_zero() || options.max_attempts == 0 {
            return Err(StoreError::InvalidRequest(
                "claim needs a non-zero lease and max_attempts".into(),
            ));
        }
        let lease_ms = duration_ms(options.lease);
        let max_attempts = i64::from(options.max_attempts);
        let kind = options.kind.as_deref();
        let (parked, row): (Vec<JobRow>, Option<JobRow>) = on_db!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await?;
            // Jobs that keep killing their workers stop here instead of being handed out again.
            let parked = sqlx::query_as(sql!(d,
                "UPDATE jobs SET state = 'failed', lease_expires_at = NULL, updated_at = " NOW ", \
                 error = 'gave up after ' || CAST(attempts AS TEXT) || ' attempts: attempt ' || \
                 CAST(attempts AS TEXT) || ' (worker ' || COALESCE(worker, '?') || ') ended \
                 without a result: its lease expired (the process died, was killed or hung)' \
                 WHERE state = 'running' AND lease_expires_at < " NOW " AND attempts >= $1 \
                 AND (CAST($2 AS TEXT) IS NULL OR kind = $2) \
                 RETURNING id, kind, subject, fingerprint, payload, state, attempts, worker, \
                 lease_expires_at, error, created_at, updated_at, first_attempt_at, \
                 last_attempt_at, deferrals"
            ))
            .bind(max_attempts)
            .bind(kind)
            .fetch_all(&mut *tx)
            .await?;
            let row = sqlx::query_as(sql!(d,
                "UPDATE jobs SET state = 'running', worker = $1, attempts = attempts + 1, \
                 lease_expires_at = " NOW " + $2, updated_at = " NOW ", \
                 first_attempt_at = COALESCE(first_attempt_at, " NOW "), \
                 last_attempt_at = " NOW ", \
                 error = CASE WHEN state = 'running' THEN 'attempt ' || CAST(attempts AS TEXT) \
                   || ' (worker ' || COALESCE(worker, '?') || ') ended without a result: its \
                   lease expired (the process died, was killed or hung)' ELSE error END \
                 WHERE id = (SELECT id FROM jobs \
                   WHERE (state = 'queued' OR (state = 'running' AND lease_expires_at < " NOW ")) \
                   AND (CAST($3 AS TEXT) IS NULL OR kind = $3) \
                   ORDER BY id LIMIT 1" SKIP_LOCKED ") \
                 RETURNING id, kind, subject, fingerprint, payload, state, attempts, worker, \
                 lease_expires_at, error, created_at, updated_at, first_attempt_at, \
                 last_attempt_at, deferrals"
            ))
            .bind(worker)
            .bind(lease_ms)
            .bind(kind)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            (parked, row)
        });
        Ok(Claim {
            job: row.map(Job::try_from).transpose()?,
            parked: parked
                .into_iter()
                .map(Job::try_from)
                .collect::<Result<_>>()?,
        })
    }

    /// Expires the lease of every running job (of `kind`), so the next claim takes them over.
    /// For a store one process holds alone (the embedded vector store locks its data dir): at
    /// start, any job still marked running belongs to a process that died. Attempts are kept,
    /// so a slide that keeps killing its worker still fails after `max_attempts`.
    pub async fn expire_running_leases(&self, kind: Option<&str>) -> Result<u64> {
        let n = on_db!(self, |pool, d| {
            sqlx::query(sql!(d,
                "UPDATE jobs SET lease_expires_at = " NOW " - 1, updated_at = " NOW " \
                 WHERE state = 'running' AND (CAST($1 AS TEXT) IS NULL OR kind = $1)"
            ))
            .bind(kind)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n)
    }

    /// Extends the lease of a job this worker holds.
    pub async fn renew_lease(&self, job_id: i64, worker: &str, lease: Duration) -> Result<()> {
        let lease_ms = duration_ms(lease);
        self.update_held(job_id, worker, Some(Extra::Int(lease_ms)), |d| {
            sql!(d,
                "UPDATE jobs SET lease_expires_at = " NOW " + $3, updated_at = " NOW " \
                 WHERE id = $1 AND worker = $2 AND state = 'running'"
            )
        })
        .await
    }

    /// Marks a held job done.
    pub async fn complete_job(&self, job_id: i64, worker: &str) -> Result<()> {
        self.update_held(job_id, worker, None, |d| {
            sql!(d,
                "UPDATE jobs SET state = 'done', lease_expires_at = NULL, error = NULL, \
                 updated_at = " NOW " WHERE id = $1 AND worker = $2 AND state = 'running'"
            )
        })
        .await
    }

    /// In one transaction: marks the slide embedded, records its point's fingerprint and marks
    /// the job done. Nothing is recorded if the lease was lost (`LeaseLost`), so a kill at any
    /// point leaves the catalog consistent and the job claimable again.
    pub async fn complete_slide_job(
        &self,
        job_id: i64,
        worker: &str,
        embedded: &EmbeddedSlide,
    ) -> Result<()> {
        let held = on_db!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await?;
            let n = sqlx::query(sql!(d,
                "UPDATE jobs SET state = 'done', lease_expires_at = NULL, error = NULL, \
                 updated_at = " NOW " WHERE id = $1 AND worker = $2 AND state = 'running'"
            ))
            .bind(job_id)
            .bind(worker)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                record_slide_embedded!(&mut *tx, embedded)?;
                tx.commit().await?;
            }
            n
        });
        self.held_or_why(held, job_id, worker).await
    }

    /// Marks a held job failed with `reason` (retried only on request).
    pub async fn fail_job(&self, job_id: i64, worker: &str, reason: &str) -> Result<()> {
        self.update_held(job_id, worker, Some(Extra::Text(reason)), |d| {
            sql!(d,
                "UPDATE jobs SET state = 'failed', lease_expires_at = NULL, error = $3, \
                 updated_at = " NOW " WHERE id = $1 AND worker = $2 AND state = 'running'"
            )
        })
        .await
    }

    /// Gives a held job back to the queue untouched (a worker shutting down cleanly); the claim
    /// does not count as an attempt.
    pub async fn release_job(&self, job_id: i64, worker: &str) -> Result<()> {
        self.update_held(job_id, worker, None, |d| {
            sql!(d,
                "UPDATE jobs SET state = 'queued', worker = NULL, lease_expires_at = NULL, \
                 attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                 updated_at = " NOW " WHERE id = $1 AND worker = $2 AND state = 'running'"
            )
        })
        .await
    }

    /// Gives a held job back to the queue after an infrastructure error (the vector store or
    /// the catalog unreachable): the claim is not counted as an attempt (`deferrals` counts it
    /// instead) and `reason` is kept as the job's last error. The slide is not to blame.
    pub async fn defer_job(&self, job_id: i64, worker: &str, reason: &str) -> Result<()> {
        self.update_held(job_id, worker, Some(Extra::Text(reason)), |d| {
            sql!(d,
                "UPDATE jobs SET state = 'queued', worker = NULL, lease_expires_at = NULL, \
                 attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                 deferrals = deferrals + 1, error = $3, updated_at = " NOW " \
                 WHERE id = $1 AND worker = $2 AND state = 'running'"
            )
        })
        .await
    }

    /// Ends a held job's attempt without a result (the work panicked): the attempt counts; the
    /// job is queued again, or parked (failed) once its attempts reach `max_attempts`. Returns
    /// the job's new state.
    pub async fn abandon_job(
        &self,
        job_id: i64,
        worker: &str,
        reason: &str,
        max_attempts: u32,
    ) -> Result<JobState> {
        let state: Option<(String,)> = on_db!(self, |pool, d| {
            sqlx::query_as(sql!(d,
                "UPDATE jobs SET worker = $2, lease_expires_at = NULL, updated_at = " NOW ", \
                 state = CASE WHEN attempts >= $4 THEN 'failed' ELSE 'queued' END, \
                 error = CASE WHEN attempts >= $4 \
                   THEN 'gave up after ' || CAST(attempts AS TEXT) || ' attempts: ' || $3 \
                   ELSE $3 END \
                 WHERE id = $1 AND worker = $2 AND state = 'running' RETURNING state"
            ))
            .bind(job_id)
            .bind(worker)
            .bind(reason)
            .bind(i64::from(max_attempts))
            .fetch_optional(pool)
            .await?
        });
        match state {
            Some((s,)) => s.parse(),
            None => self
                .held_or_why(0, job_id, worker)
                .await
                .map(|_| JobState::Running),
        }
    }

    /// Cancels a queued or running job (operators). A worker holding it finds out at its next
    /// lease renewal or when it tries to record its result, and records nothing. Done, failed
    /// or already cancelled jobs answer [`StoreError::JobState`].
    pub async fn cancel_job(&self, job_id: i64) -> Result<Job> {
        let row: Option<JobRow> = on_db!(self, |pool, d| {
            sqlx::query_as(sql!(d,
                "UPDATE jobs SET lease_expires_at = NULL, updated_at = " NOW ", \
                 error = CASE WHEN state = 'running' \
                   THEN 'cancelled by an operator while worker ' || COALESCE(worker, '?') || \
                   ' held it' ELSE 'cancelled by an operator' END, \
                 state = 'cancelled' \
                 WHERE id = $1 AND state IN ('queued', 'running') \
                 RETURNING id, kind, subject, fingerprint, payload, state, attempts, worker, \
                 lease_expires_at, error, created_at, updated_at, first_attempt_at, \
                 last_attempt_at, deferrals"
            ))
            .bind(job_id)
            .fetch_optional(pool)
            .await?
        });
        match row {
            Some(r) => Job::try_from(r),
            None => Err(self
                .state_conflict(job_id, "only queued or running jobs can be cancelled")
                .await),
        }
    }

    /// Queues a failed (parked) or cancelled job again with its attempts reset (operators).
    /// Other states answer [`StoreError::JobState`].
    pub async fn retry_job(&self, job_id: i64) -> Result<Job> {
        let row: Option<JobRow> = on_db!(self, |pool, d| {
            sqlx::query_as(sql!(d,
                "UPDATE jobs SET state = 'queued', attempts = 0, deferrals = 0, worker = NULL, \
                 lease_expires_at = NULL, error = NULL, first_attempt_at = NULL, \
                 last_attempt_at = NULL, updated_at = " NOW " \
                 WHERE id = $1 AND state IN ('failed', 'cancelled') \
                 RETURNING id, kind, subject, fingerprint, payload, state, attempts, worker, \
                 lease_expires_at, error, created_at, updated_at, first_attempt_at, \
                 last_attempt_at, deferrals"
            ))
            .bind(job_id)
            .fetch_optional(pool)
            .await?
        });
        match row {
            Some(r) => Job::try_from(r),
            None => Err(self
                .state_conflict(job_id, "only failed or cancelled jobs can be retried")
                .await),
        }
    }

    /// Why an operator action found no job to change: unknown id, or the job's state.
    async fn state_conflict(&self, job_id: i64, rule: &'static str) -> StoreError {
        match self.job(job_id).await {
            Ok(Some(job)) => StoreError::JobState {
                job_id,
                state: job.state.to_string(),
                rule,
            },
            Ok(None) => StoreError::UnknownJob(job_id),
            Err(e) => e,
        }
    }

    /// Puts failed jobs (of `kind`, or all) back in the queue with a fresh attempt count;
    /// returns how many.
    pub async fn retry_failed_jobs(&self, kind: Option<&str>) -> Result<u64> {
        Ok(on_db!(self, |pool, d| {
            sqlx::query(sql!(d,
                "UPDATE jobs SET state = 'queued', attempts = 0, deferrals = 0, worker = NULL, \
                 lease_expires_at = NULL, error = NULL, first_attempt_at = NULL, \
                 last_attempt_at = NULL, updated_at = " NOW " \
                 WHERE state = 'failed' AND (CAST($1 AS TEXT) IS NULL OR kind = $1)"
            ))
            .bind(kind)
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// The job with this id, `None` when there is none.
    pub async fn job(&self, job_id: i64) -> Result<Option<Job>> {
        let row: Option<JobRow> = on_db!(self, |pool, d| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
            )))
            .bind(job_id)
            .fetch_optional(pool)
            .await?
        });
        row.map(Job::try_from).transpose()
    }

    /// Jobs in id order, optionally only those in `state`, at most `limit`.
    pub async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> Result<Vec<Job>> {
        let state = state.map(JobState::as_str);
        let rows: Vec<JobRow> = on_db!(self, |pool, d| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE CAST($1 AS TEXT) IS NULL OR state = $1 \
                 ORDER BY id LIMIT $2"
            )))
            .bind(state)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Jobs per state; `stale` counts running jobs whose lease has expired.
    pub async fn job_counts(&self) -> Result<JobCounts> {
        let (rows, stale): (Vec<(String, i64)>, i64) = on_db!(self, |pool, d| {
            let rows = sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(pool)
                .await?;
            let (stale,): (i64,) = sqlx::query_as(sql!(d,
                "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND lease_expires_at < " NOW
            ))
            .fetch_one(pool)
            .await?;
            (rows, stale)
        });
        let mut by_state: BTreeMap<JobState, u64> = BTreeMap::new();
        for (state, n) in rows {
            by_state.insert(state.parse()?, n as u64);
        }
        let get = |s| by_state.get(&s).copied().unwrap_or(0);
        Ok(JobCounts {
            queued: get(JobState::Queued),
            running: get(JobState::Running),
            done: get(JobState::Done),
            failed: get(JobState::Failed),
            cancelled: get(JobState::Cancelled),
            stale: stale as u64,
        })
    }

    /// Turns "no row updated" into the reason: unknown job, or not held by this worker.
    /// Runs one state change of a job this worker holds: `sql(dialect)` is an `UPDATE` whose
    /// `$1` is the job id, `$2` the worker and `$3` (if any) `extra`; no row changed means the
    /// job is unknown or its lease was lost, and the error says which.
    async fn update_held(
        &self,
        job_id: i64,
        worker: &str,
        extra: Option<Extra<'_>>,
        sql: impl Fn(Dialect) -> &'static str,
    ) -> Result<()> {
        let n = on_db!(self, |pool, d| {
            let query = sqlx::query(sql(d)).bind(job_id).bind(worker);
            let query = match extra {
                Some(Extra::Text(t)) => query.bind(t),
                Some(Extra::Int(i)) => query.bind(i),
                None => query,
            };
            query.execute(pool).await?.rows_affected()
        });
        self.held_or_why(n, job_id, worker).await
    }

    async fn held_or_why(&self, rows_updated: u64, job_id: i64, worker: &str) -> Result<()> {
        if rows_updated > 0 {
            return Ok(());
        }
        match self.job(job_id).await? {
            None => Err(StoreError::UnknownJob(job_id)),
            Some(_) => Err(StoreError::LeaseLost {
                job_id,
                worker: worker.to_string(),
            }),
        }
    }
}

/// The third parameter of a held job's state change ([`Catalog::update_held`]).
#[derive(Clone, Copy)]
enum Extra<'a> {
    /// A reason or error text.
    Text(&'a str),
    /// A duration in ms.
    Int(i64),
}
