-- pg-pubsub schema version 4 (on top of version 3): the jobs table without
-- CHECK constraints, and a claim whose plan does not depend on statistics. PostgreSQL re-reads and re-plans a table's CHECK
-- expressions in every statement that writes it, which cost a fifth of a
-- one-job INSERT. `state` is written only by this schema's functions and
-- the crate's statements; max_attempts is checked where jobs are made (the
-- functions below, and Queue::enqueue* before sending).
-- Safe to run more than once and from several sessions at once.
BEGIN;
SELECT pg_advisory_xact_lock(@LOCK@);

ALTER TABLE @S@.jobs DROP CONSTRAINT IF EXISTS jobs_state_check,
                     DROP CONSTRAINT IF EXISTS jobs_max_attempts_check;

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

INSERT INTO @S@.schema_version (version) VALUES (4) ON CONFLICT DO NOTHING;
COMMIT;
