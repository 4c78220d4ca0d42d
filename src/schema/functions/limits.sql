-- pg-pubsub: the claim of a queue with limits (see queue_limits in
-- migration 0002). Workers call it only for a queue with a limits row;
-- other queues keep the plain claim statement and pay nothing.

-- Claims up to p_limit due jobs of p_queue within its limits, as the plain
-- claim does. Claims of the queue are serialised by a transaction advisory
-- lock, taken before the counts: each statement of a PL/pgSQL function
-- takes a new snapshot, so the counts see every claim committed before
-- the lock was granted (a single SQL statement would count from a snapshot
-- older than the lock). Completions, failures and rescues only lower the
-- counts, so they need no lock. The rate limit's window is a fixed one,
-- opened by the first claim after the previous one closed; the clock is
-- read after the lock, so windows and leases follow the order of claims.
CREATE OR REPLACE FUNCTION @S@.claim_limited(p_queue text, p_limit int, p_lease float8)
RETURNS TABLE (job_id bigint, job_attempt int, job_max_attempts int, job_priority smallint,
               job_created_at timestamptz, job_payload text)
LANGUAGE plpgsql AS $$
DECLARE
    l       @S@.queue_limits;
    v_now   timestamptz;
    v_room  int := p_limit;
    v_fresh boolean := false;
    v_ids   bigint[];
    v_n     int;
BEGIN
    PERFORM pg_advisory_xact_lock(1885810801, hashtext('@S@.' || p_queue));
    SELECT * INTO l FROM @S@.queue_limits q WHERE q.queue = p_queue;
    v_now := clock_timestamp();
    IF FOUND THEN
        IF l.concurrency IS NOT NULL THEN
            -- count(attempt), not count(*): an index-only scan would fetch
            -- the heap for every dead entry of a completed job, at every
            -- claim; a plain index scan marks them dead once.
            v_room := least(v_room, l.concurrency - (SELECT count(r.attempt) FROM @S@.jobs r
                WHERE r.queue = p_queue AND r.state = 'running')::int);
        END IF;
        IF l.rate_count IS NOT NULL THEN
            v_fresh := l.window_start IS NULL OR v_now >= l.window_start + l.rate_interval;
            v_room := least(v_room, l.rate_count
                                    - CASE WHEN v_fresh THEN 0 ELSE l.window_count END);
        END IF;
    END IF;
    IF v_room <= 0 THEN
        RETURN;
    END IF;
    IF l.per_key IS NULL THEN
        v_ids := ARRAY(SELECT p.id FROM @S@.jobs p
            WHERE p.queue = p_queue AND p.state = 'ready' AND p.run_at <= now()
            ORDER BY p.priority DESC, p.run_at, p.id LIMIT v_room FOR UPDATE SKIP LOCKED);
    ELSE
        -- Keys at their limit are skipped in the index scan; among the
        -- first candidates, a key's jobs are taken in claim order while it
        -- has room (so per_key = 1 runs each key's jobs one at a time, in
        -- order). Not locked: the UPDATE below re-checks the state. The
        -- scan reads past every ready job of a busy key, so it asks for
        -- few more candidates than it may take: with most keys busy (a
        -- worker's prefetch holds them), 4 * v_room + 32 candidates cost
        -- two to three times as much as v_room + 32 (0.65 against 0.31 ms
        -- with 180 of 256 keys busy, 3.0 against 1.0 ms with 248).
        v_ids := ARRAY(
            WITH busy AS (
                SELECT r.concurrency_key AS k, count(r.attempt)::int AS n FROM @S@.jobs r
                WHERE r.queue = p_queue AND r.state = 'running' AND r.concurrency_key IS NOT NULL
                GROUP BY r.concurrency_key
            ), cand AS (
                SELECT p.id, p.concurrency_key AS k, p.priority, p.run_at FROM @S@.jobs p
                WHERE p.queue = p_queue AND p.state = 'ready' AND p.run_at <= now()
                  AND (p.concurrency_key IS NULL OR p.concurrency_key NOT IN
                       (SELECT b.k FROM busy b WHERE b.n >= l.per_key))
                ORDER BY p.priority DESC, p.run_at, p.id LIMIT v_room + 32
            ), ranked AS (
                SELECT c.id, c.k, c.priority, c.run_at,
                       row_number() OVER (PARTITION BY c.k
                                          ORDER BY c.priority DESC, c.run_at, c.id) AS rn
                FROM cand c
            )
            SELECT x.id FROM ranked x LEFT JOIN busy b ON b.k = x.k
            WHERE x.k IS NULL OR coalesce(b.n, 0) + x.rn <= l.per_key
            ORDER BY x.priority DESC, x.run_at, x.id LIMIT v_room);
    END IF;
    RETURN QUERY
        UPDATE @S@.jobs j SET state = 'running', attempt = j.attempt + 1,
               lease_until = v_now + make_interval(secs => p_lease)
        WHERE j.id = ANY (v_ids) AND j.state = 'ready'
        RETURNING j.id, j.attempt, j.max_attempts, j.priority, j.created_at, j.payload;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF l.rate_count IS NOT NULL AND v_n > 0 THEN
        UPDATE @S@.queue_limits q
        SET window_start = CASE WHEN v_fresh THEN v_now ELSE q.window_start END,
            window_count = CASE WHEN v_fresh THEN 0 ELSE q.window_count END + v_n
        WHERE q.queue = p_queue;
    END IF;
END $$;
