-- Queue limits (issue 19): a global concurrency limit, a per-key limit and
-- a rate limit per queue, read by workers and enforced by claim_limited()
-- (functions/limits.sql). Compatible with level 1: a table, a nullable
-- column and an index only; an old build ignores them (and the limits).

-- One row per limited queue; no row: no limits, and workers use the plain
-- claim statement. NULL: that limit is off. window_start / window_count:
-- the rate limit's current fixed window, kept by claim_limited().
CREATE TABLE IF NOT EXISTS @S@.queue_limits (
    queue         text        PRIMARY KEY,
    concurrency   int,
    per_key       int,
    rate_count    int,
    rate_interval interval,
    window_start  timestamptz,
    window_count  int         NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The job's key for the per-key limit (Enqueue::key); NULL: no key.
ALTER TABLE @S@.jobs ADD COLUMN IF NOT EXISTS concurrency_key text;

-- Running jobs per key of a queue, counted by claim_limited() (the running
-- jobs of a queue are counted on jobs_lease).
CREATE INDEX IF NOT EXISTS jobs_running_key ON @S@.jobs (queue, concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;
