-- Job attempts and operator actions (`gigapath jobs`, `/v1/jobs`). Keep in step with
-- ../sqlite/0002_job_attempts.sql.
--
-- * state `cancelled`: an operator cancelled a queued or running job (`gigapath jobs cancel`).
-- * first_attempt_at / last_attempt_at: database-clock epoch ms of the first and the latest claim.
--   `attempts` counts claims (a crash counts: it is recorded when the job is claimed), `error`
--   holds the last attempt's error.
-- * deferrals: how often an infrastructure error (vector store or catalog unreachable) put the job
--   back in the queue; those attempts are not counted in `attempts`.
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled'));
ALTER TABLE jobs
    ADD COLUMN first_attempt_at BIGINT,
    ADD COLUMN last_attempt_at  BIGINT,
    ADD COLUMN deferrals        BIGINT NOT NULL DEFAULT 0;
UPDATE jobs SET last_attempt_at = updated_at WHERE attempts > 0;
