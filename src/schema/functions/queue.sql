-- pg-pubsub functions of the work queue (enqueue, claim, fail, rescue).
-- Re-applied by the installer whenever this file changes (see
-- src/schema/mod.rs for the rule: a change ships with a new migration).

-- Records a failed attempt: back to ready at now() + p_delay, or, when it
-- was the last attempt, moved to dead_jobs, or, when it was cancelled, to
-- finished_jobs. Returns 'retry', 'dead', 'cancelled', or NULL when the
-- claim is not current (the lease was lost).
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
    -- A cancelled job is never retried, whatever its handler did.
    IF j.cancel_requested THEN
        DELETE FROM @S@.jobs WHERE id = p_id;
        INSERT INTO @S@.finished_jobs (id, queue, state, priority, attempt, max_attempts,
                                       unique_key, last_error, created_at, payload)
        VALUES (j.id, j.queue, 'cancelled', j.priority, j.attempt, j.max_attempts,
                j.unique_key, p_error, j.created_at, j.payload);
        RETURN 'cancelled';
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
-- connection) ready again, or dead if that was their last attempt, or
-- cancelled (into finished_jobs, not returned) if cancel() asked. Returns
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
    ), stopped AS (
        -- Cancelled while running: it ends cancelled, never retried.
        DELETE FROM @S@.jobs j USING expired e
        WHERE j.id = e.id AND j.cancel_requested
        RETURNING j.*
    ), stopped_kept AS (
        INSERT INTO @S@.finished_jobs (id, queue, state, priority, attempt, max_attempts,
                                       unique_key, last_error, created_at, payload)
        SELECT s.id, s.queue, 'cancelled', s.priority, s.attempt, s.max_attempts,
               s.unique_key, 'cancelled; its lease expired', s.created_at, s.payload
        FROM stopped s
    ), gone AS (
        DELETE FROM @S@.jobs j USING expired e
        WHERE j.id = e.id AND j.attempt >= j.max_attempts AND NOT j.cancel_requested
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
        WHERE j.id = e.id AND j.attempt < j.max_attempts AND NOT j.cancel_requested
        RETURNING j.id, j.attempt, j.last_error
    )
    SELECT b.id, b.attempt, true, b.last_error FROM buried b
    UNION ALL
    SELECT k.id, k.attempt, false, k.last_error FROM back k
$$;

-- Moves a dead job back to the queue with a fresh set of attempts.
-- Returns false when there is no such dead job; raises unique_violation
-- (and moves nothing) when its unique key is taken again.
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

-- Raises invalid_parameter_value unless n >= 1.
CREATE OR REPLACE FUNCTION @S@.check_max_attempts(n int) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF n IS NULL OR n < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1, got %', n
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- Enqueues one job in the caller's transaction. Returns its id, or NULL
-- when p_unique_key is already taken by a ready or running job of the
-- queue (nothing is inserted then). The wake-up payload is the queue name,
-- the same for every job of a transaction, so the server sends one
-- notification per queue per transaction. Jobs scheduled later send none
-- (workers poll). Queue::enqueue runs the same insert as a statement and
-- sends the wake-up after commit, merged with other enqueuers'.
CREATE OR REPLACE FUNCTION @S@.enqueue(p_queue text, p_payload text,
                                       p_run_at timestamptz DEFAULT NULL,
                                       p_priority smallint DEFAULT 0,
                                       p_max_attempts int DEFAULT 25,
                                       p_unique_key text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM @S@.check_max_attempts(p_max_attempts);
    -- ON CONFLICT (a speculative insertion) only when there is a key.
    IF p_unique_key IS NULL THEN
        INSERT INTO @S@.jobs (queue, payload, run_at, priority, max_attempts)
        VALUES (p_queue, p_payload, coalesce(p_run_at, now()), p_priority, p_max_attempts)
        RETURNING id INTO new_id;
    ELSE
        INSERT INTO @S@.jobs (queue, payload, run_at, priority, max_attempts, unique_key)
        VALUES (p_queue, p_payload, coalesce(p_run_at, now()), p_priority, p_max_attempts,
                p_unique_key)
        ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
        RETURNING id INTO new_id;
    END IF;
    IF new_id IS NOT NULL AND (p_run_at IS NULL OR p_run_at <= now()) THEN
        PERFORM pg_notify('@JOBS@', p_queue);
    END IF;
    RETURN new_id;
END $$;

-- Enqueues many jobs (no unique keys) in one statement; one wake-up.
CREATE OR REPLACE FUNCTION @S@.enqueue_many(p_queue text, p_payloads text[],
                                            p_run_at timestamptz DEFAULT NULL,
                                            p_priority smallint DEFAULT 0,
                                            p_max_attempts int DEFAULT 25) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM @S@.check_max_attempts(p_max_attempts);
    INSERT INTO @S@.jobs (queue, payload, run_at, priority, max_attempts)
    SELECT p_queue, p, coalesce(p_run_at, now()), p_priority, p_max_attempts
    FROM unnest(p_payloads) AS p;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND (p_run_at IS NULL OR p_run_at <= now()) THEN
        PERFORM pg_notify('@JOBS@', p_queue);
    END IF;
    RETURN n;
END $$;

-- Claims up to p_limit due jobs of a queue in one statement: SKIP LOCKED
-- lets concurrent workers take disjoint sets without waiting on each other.
-- (id, attempt) is the claim's token for completing, failing and extending.
-- The picked ids are updated through `id = ANY (ARRAY(...))`, an index
-- lookup whatever the statistics say: joining the pick to the table let the
-- planner choose a hash join over a sequential scan once the table had
-- grown and emptied again (3x slower claims after a few million jobs).
CREATE OR REPLACE FUNCTION @S@.claim(p_queue text, p_limit int, p_lease interval)
RETURNS TABLE (id bigint, attempt int, max_attempts int, priority smallint,
               created_at timestamptz, payload text)
LANGUAGE sql AS $$
    UPDATE @S@.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_until = now() + p_lease
    WHERE j.id = ANY (ARRAY(
        SELECT p.id FROM @S@.jobs p
        WHERE p.queue = p_queue AND p.state = 'ready' AND p.run_at <= now()
        ORDER BY p.priority DESC, p.run_at, p.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED))
    RETURNING j.id, j.attempt, j.max_attempts, j.priority, j.created_at, j.payload
$$;

-- Cancels job p_id. A waiting job (ready or scheduled) moves to
-- finished_jobs as cancelled: 'removed', it never runs. A running one is
-- marked and its worker told on <schema>_queue_ctl ('cancel <id>'):
-- 'signalled'. 'finished' when it is already in finished_jobs or
-- dead_jobs, 'unknown' when there is no such job.
CREATE OR REPLACE FUNCTION @S@.cancel(p_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    j @S@.jobs;
BEGIN
    SELECT * INTO j FROM @S@.jobs WHERE id = p_id FOR UPDATE;
    IF FOUND THEN
        IF j.state = 'ready' THEN
            DELETE FROM @S@.jobs WHERE id = p_id;
            INSERT INTO @S@.finished_jobs (id, queue, state, priority, attempt, max_attempts,
                                           unique_key, last_error, created_at, payload)
            VALUES (j.id, j.queue, 'cancelled', j.priority, j.attempt, j.max_attempts,
                    j.unique_key, j.last_error, j.created_at, j.payload);
            RETURN 'removed';
        END IF;
        IF NOT j.cancel_requested THEN
            UPDATE @S@.jobs SET cancel_requested = true WHERE id = p_id;
        END IF;
        PERFORM pg_notify('@S@_queue_ctl', 'cancel ' || p_id);
        RETURN 'signalled';
    END IF;
    IF EXISTS (SELECT 1 FROM @S@.finished_jobs WHERE id = p_id)
       OR EXISTS (SELECT 1 FROM @S@.dead_jobs WHERE id = p_id) THEN
        RETURN 'finished';
    END IF;
    RETURN 'unknown';
END $$;
