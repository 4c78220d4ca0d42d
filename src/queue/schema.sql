-- pg-pubsub work queue, schema version 2 (on top of version 1).
-- Safe to run more than once and from several sessions at once.
BEGIN;
SELECT pg_advisory_xact_lock(@LOCK@);
CREATE SCHEMA IF NOT EXISTS @S@;

-- The hot table: only jobs waiting (ready, possibly scheduled later) or
-- running. Completed jobs are deleted; dead ones move to dead_jobs. So the
-- claim index only ever holds live work, however many jobs went through.
-- fillfactor leaves room for HOT updates (claim, lease, retry).
CREATE TABLE IF NOT EXISTS @S@.jobs (
    id           bigserial   PRIMARY KEY,
    queue        text        NOT NULL,
    state        text        NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'running')),
    priority     smallint    NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    attempt      int         NOT NULL DEFAULT 0,
    max_attempts int         NOT NULL DEFAULT 25 CHECK (max_attempts >= 1),
    lease_until  timestamptz,
    unique_key   text,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    payload      text        NOT NULL
) WITH (fillfactor = 80);
-- Every job leaves two dead row versions (claim, completion) and dead
-- entries at the head of the claim index, which each claim walks past
-- until vacuum removes them: vacuum this small, hot table as soon as
-- autovacuum looks at it (every autovacuum_naptime), unthrottled.
ALTER TABLE @S@.jobs SET (autovacuum_vacuum_scale_factor = 0,
                          autovacuum_vacuum_threshold = 5000,
                          autovacuum_vacuum_insert_scale_factor = 0,
                          autovacuum_vacuum_insert_threshold = 5000,
                          autovacuum_vacuum_cost_delay = 0);
-- Claim order: higher priority first, then run_at, then id.
CREATE INDEX IF NOT EXISTS jobs_claim ON @S@.jobs (queue, priority DESC, run_at, id)
    WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS jobs_lease ON @S@.jobs (queue, lease_until) WHERE state = 'running';
-- A unique key is taken while its job is ready or running (dead and
-- finished jobs are not in this table).
CREATE UNIQUE INDEX IF NOT EXISTS jobs_unique ON @S@.jobs (queue, unique_key)
    WHERE unique_key IS NOT NULL;

-- Jobs that failed max_attempts times (or lost their lease on the last
-- attempt), kept for a person to look at, retry or delete.
CREATE TABLE IF NOT EXISTS @S@.dead_jobs (
    id           bigint      PRIMARY KEY,
    queue        text        NOT NULL,
    priority     smallint    NOT NULL,
    attempt      int         NOT NULL,
    max_attempts int         NOT NULL,
    unique_key   text,
    last_error   text,
    created_at   timestamptz NOT NULL,
    died_at      timestamptz NOT NULL DEFAULT now(),
    payload      text        NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_jobs_queue ON @S@.dead_jobs (queue, id);

-- enqueue() and enqueue_many() are defined by version 4.

-- claim() is defined by version 4.

-- Records a failed attempt: back to ready at now() + p_delay, or, when it
-- was the last attempt, moved to dead_jobs. Returns 'retry', 'dead', or
-- NULL when the claim is not current (the lease was lost).
CREATE OR REPLACE FUNCTION @S@.fail(p_id bigint, p_attempt int, p_error text, p_delay interval)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j @S@.jobs;
BEGIN
    SELECT * INTO j FROM @S@.jobs
    WHERE id = p_id AND attempt = p_attempt AND state = 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF j.attempt >= j.max_attempts THEN
        DELETE FROM @S@.jobs WHERE id = p_id;
        INSERT INTO @S@.dead_jobs (id, queue, priority, attempt, max_attempts, unique_key,
                                   last_error, created_at, payload)
        VALUES (j.id, j.queue, j.priority, j.attempt, j.max_attempts, j.unique_key,
                p_error, j.created_at, j.payload);
        RETURN 'dead';
    END IF;
    UPDATE @S@.jobs SET state = 'ready', lease_until = NULL, last_error = p_error,
                        run_at = now() + p_delay
    WHERE id = p_id;
    RETURN 'retry';
END $$;

-- Makes running jobs whose lease expired (their worker died or lost its
-- connection) ready again, or dead if that was their last attempt. Returns
-- each one (its attempt, whether it is now dead, the error kept) so that
-- the worker that ran it can report them. SKIP LOCKED: workers rescuing
-- at once take disjoint rows and never wait on each other.
DROP FUNCTION IF EXISTS @S@.rescue(text);
CREATE FUNCTION @S@.rescue(p_queue text)
RETURNS TABLE (job_id bigint, attempt int, dead boolean, error text)
LANGUAGE sql AS $$
    WITH expired AS MATERIALIZED (
        SELECT j.id FROM @S@.jobs j
        WHERE j.queue = p_queue AND j.state = 'running' AND j.lease_until < now()
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM @S@.jobs j USING expired e
        WHERE j.id = e.id AND j.attempt >= j.max_attempts
        RETURNING j.*
    ), buried AS (
        INSERT INTO @S@.dead_jobs (id, queue, priority, attempt, max_attempts, unique_key,
                                   last_error, created_at, payload)
        SELECT g.id, g.queue, g.priority, g.attempt, g.max_attempts, g.unique_key,
               format('lease expired after %s attempts (the worker stopped or lost its '
                      'connection)', g.attempt),
               g.created_at, g.payload
        FROM gone g
        RETURNING id, attempt, last_error
    ), back AS (
        UPDATE @S@.jobs j SET state = 'ready', lease_until = NULL,
            last_error = format('lease expired on attempt %s (the worker stopped or lost '
                                'its connection)', j.attempt)
        FROM expired e
        WHERE j.id = e.id AND j.attempt < j.max_attempts
        RETURNING j.id, j.attempt, j.last_error
    )
    SELECT b.id, b.attempt, true, b.last_error FROM buried b
    UNION ALL
    SELECT k.id, k.attempt, false, k.last_error FROM back k
$$;

-- Moves a dead job back to the queue with a fresh set of attempts.
-- Returns false when there is no such dead job, or when its unique key
-- is taken again.
CREATE OR REPLACE FUNCTION @S@.retry_dead(p_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    d @S@.dead_jobs;
BEGIN
    DELETE FROM @S@.dead_jobs WHERE id = p_id RETURNING * INTO d;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO @S@.jobs (id, queue, priority, max_attempts, unique_key, last_error,
                          created_at, payload)
    VALUES (d.id, d.queue, d.priority, d.max_attempts, d.unique_key, d.last_error,
            d.created_at, d.payload)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unique key % of queue % is taken by another job', d.unique_key, d.queue
            USING ERRCODE = 'unique_violation';
    END IF;
    PERFORM pg_notify('@JOBS@', d.queue);
    RETURN true;
END $$;

INSERT INTO @S@.schema_version (version) VALUES (2) ON CONFLICT DO NOTHING;
COMMIT;
