-- Job attempts and operator actions (`gigapath jobs`, `/v1/jobs`). Keep in step with
-- ../postgres/0002_job_attempts.sql.
--
-- * state `cancelled`: an operator cancelled a queued or running job (`gigapath jobs cancel`).
-- * first_attempt_at / last_attempt_at: database-clock epoch ms of the first and the latest claim.
--   `attempts` counts claims (a crash counts: it is recorded when the job is claimed), `error`
--   holds the last attempt's error.
-- * deferrals: how often an infrastructure error (vector store or catalog unreachable) put the job
--   back in the queue; those attempts are not counted in `attempts`.
--
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt (no foreign keys point
-- at it; ids and the AUTOINCREMENT sequence are kept).
CREATE TABLE jobs_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT NOT NULL,
    subject          TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    payload          TEXT NOT NULL DEFAULT '{}',
    state            TEXT NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    worker           TEXT,
    lease_expires_at BIGINT,
    error            TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    first_attempt_at BIGINT,
    last_attempt_at  BIGINT,
    deferrals        BIGINT NOT NULL DEFAULT 0,
    UNIQUE (kind, subject, fingerprint)
);
INSERT INTO jobs_new (id, kind, subject, fingerprint, payload, state, attempts, worker,
                      lease_expires_at, error, created_at, updated_at, last_attempt_at)
SELECT id, kind, subject, fingerprint, payload, state, attempts, worker, lease_expires_at, error,
       created_at, updated_at, CASE WHEN attempts > 0 THEN updated_at END
FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_claim ON jobs (state, id);
