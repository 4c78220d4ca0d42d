-- pg-pubsub functions of durable channels (publish, tick, read, retain).
-- Re-applied by the installer whenever this file changes (see
-- src/schema/mod.rs for the rule: a change ships with a new migration).

-- Publishes one message in the caller's transaction. The wake-up payload is
-- the channel name, identical for every message of a transaction, so the
-- server sends one notification per channel per transaction. The partition
-- is read in the statement (as publish_many does): the column default,
-- a function call per row, costs a quarter of an insert's throughput.
--
-- publish and publish_many run as the schema's owner (SECURITY DEFINER,
-- with a fixed search_path and schema-qualified names), so a role that
-- only publishes needs EXECUTE on them and USAGE on the schema, not
-- INSERT on messages: it cannot choose a row's xid, seq or partition.
CREATE OR REPLACE FUNCTION @S@.publish(p_channel text, p_payload text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO @S@.messages (part, channel, payload)
        SELECT r.cur, p_channel, p_payload FROM @S@.rotation r;
    PERFORM @S@.wake(p_channel);
END $$;

-- Publishes many messages (in array order) in one statement, one wake-up.
CREATE OR REPLACE FUNCTION @S@.publish_many(p_channel text, p_payloads text[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    -- A function scan feeding INSERT yields array order, and the seq
    -- default is evaluated row by row in that order (no sort needed).
    -- The partition is read once (an InitPlan), not per row as the
    -- column default would.
    INSERT INTO @S@.messages (part, channel, payload)
        SELECT (SELECT r.cur FROM @S@.rotation r), p_channel, p FROM unnest(p_payloads) AS p;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM @S@.wake(p_channel);
    END IF;
    RETURN n;
END $$;

-- Definer functions are executable by PUBLIC by default: only roles
-- granted EXECUTE may publish.
REVOKE ALL ON FUNCTION @S@.publish(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @S@.publish_many(text, text[]) FROM PUBLIC;

-- Sends the channel's wake-up unless the channel is quiet.
CREATE OR REPLACE FUNCTION @S@.wake(p_channel text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @S@.channels c WHERE c.channel = p_channel AND c.quiet) THEN
        PERFORM pg_notify('@WAKE@', p_channel);
    END IF;
END $$;

-- Takes a tick of the channel when a message became visible since the
-- last one. Ticks of a channel are serialised by the advisory lock, and the
-- snapshot is taken by a statement that starts after the lock is granted,
-- so every tick's snapshot sees at least what the previous one saw.
-- Returns the channel's latest tick id (0: none yet).
-- Only rows whose xid is visible in the new snapshot count: a row with a
-- foreign or future xid (a restore, logical replication from another
-- cluster, an INSERT by hand) is not below its xmax and never makes a
-- tick, so every tick's batch holds a message and ticks stay as few as
-- the transactions that published (retain() reports such rows).
-- enable_seqscan = off: the probes must stay index lookups even when the
-- statistics say one xid holds most rows (a big batch just published).
-- plan_cache_mode = force_generic_plan: plans made once per session (see
-- read()).
CREATE OR REPLACE FUNCTION @S@.tick(p_channel text) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    last_id bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- An older transaction snapshot could be older than the last tick.
        RAISE EXCEPTION '@S@.tick() needs READ COMMITTED isolation';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('@S@.tick:' || p_channel, 0));
    -- One statement, one snapshot: what it sees of the messages is exactly
    -- what pg_current_snapshot() records.
    INSERT INTO @S@.ticks (channel, tick_id, snap)
    SELECT p_channel, coalesce(l.tick_id, 0) + 1, cur.s
    FROM (SELECT pg_current_snapshot() AS s) AS cur
    LEFT JOIN LATERAL (
        SELECT t.tick_id, t.snap FROM @S@.ticks t
        WHERE t.channel = p_channel ORDER BY t.tick_id DESC LIMIT 1
    ) AS l ON true
    -- Each probe is an index lookup on (channel, xid): the range from the
    -- last tick's xmax to this one's (bounded on both sides, so rows past
    -- this snapshot are never walked), and one lookup per transaction that
    -- was in progress at the last tick and has ended since.
    WHERE EXISTS (SELECT 1 FROM @S@.messages m
                  WHERE m.channel = p_channel
                    AND m.xid >= coalesce(pg_snapshot_xmax(l.snap), '0'::xid8)
                    AND m.xid < pg_snapshot_xmax(cur.s)
                    AND pg_visible_in_snapshot(m.xid, cur.s))
       OR EXISTS (SELECT 1 FROM pg_snapshot_xip(l.snap) AS x(xid)
                  CROSS JOIN LATERAL (SELECT 1 FROM @S@.messages m
                                      WHERE m.channel = p_channel AND m.xid = x.xid
                                      LIMIT 1) AS hit
                  WHERE pg_visible_in_snapshot(x.xid, cur.s))
    RETURNING tick_id INTO last_id;
    -- Under the lock, a tick just taken is the latest: look only otherwise.
    IF last_id IS NULL THEN
        SELECT max(t.tick_id) INTO last_id FROM @S@.ticks t WHERE t.channel = p_channel;
    END IF;
    RETURN coalesce(last_id, 0);
END $$;

-- The snapshot of the channel's greatest tick below p_tick; '1:1:' (sees
-- nothing) when there is none.
CREATE OR REPLACE FUNCTION @S@.snap_before(p_channel text, p_tick bigint) RETURNS pg_snapshot
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT t.snap FROM @S@.ticks t
         WHERE t.channel = p_channel AND t.tick_id < p_tick
         ORDER BY t.tick_id DESC LIMIT 1),
        '1:1:'::pg_snapshot)
$$;

-- The snapshot of tick p_tick; '1:1:' when it does not exist.
CREATE OR REPLACE FUNCTION @S@.snap_at(p_channel text, p_tick bigint) RETURNS pg_snapshot
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT t.snap FROM @S@.ticks t WHERE t.channel = p_channel AND t.tick_id = p_tick),
        '1:1:'::pg_snapshot)
$$;

-- For a consumer reading batch p_tick after (p_xid, p_seq): the batch's
-- bounds (the previous tick's xmax and this tick's snapshot) when the rest
-- of the batch is one plain range scan, i.e. no transaction in progress at
-- the previous tick has rows left in it; no row otherwise. The set of such
-- transactions only shrinks as the cursor advances, so the answer holds
-- for the rest of the batch. The rest of the batch is then:
--   WHERE channel = p_channel AND xid >= lo AND xid < pg_snapshot_xmax(snap)
--     AND (xid, seq) > cursor AND pg_visible_in_snapshot(xid, snap)
--   ORDER BY xid, seq
-- which read() also runs, but a plain statement skips the function's
-- result materialisation.
CREATE OR REPLACE FUNCTION @S@.range_of(p_channel text, p_tick bigint, p_xid xid8, p_seq bigint)
RETURNS TABLE (lo xid8, snap pg_snapshot)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    SELECT pg_snapshot_xmax(pv.s), nx.snap
    FROM (SELECT @S@.snap_before(p_channel, p_tick) AS s) AS pv, @S@.ticks nx
    WHERE nx.channel = p_channel AND nx.tick_id = p_tick
      AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(pv.s) AS x(xid)
                      WHERE pg_visible_in_snapshot(x.xid, nx.snap)
                        AND EXISTS (SELECT 1 FROM @S@.messages m
                                    WHERE m.channel = p_channel AND m.xid = x.xid
                                      AND (m.xid, m.seq) > (p_xid, p_seq)));
END $$;

-- Whether a message (xid, seq) is at or before cursor (p_tick, p_xid, p_seq),
-- given the cursor's tick snapshot and the one before it.
CREATE OR REPLACE FUNCTION @S@.passed(m_xid xid8, m_seq bigint, p_xid xid8, p_seq bigint,
                                      pv pg_snapshot, nx pg_snapshot) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT pg_visible_in_snapshot(m_xid, pv)
        OR (pg_visible_in_snapshot(m_xid, nx) AND (m_xid, m_seq) <= (p_xid, p_seq))
$$;

-- Whether partition p_part of messages holds a row (committed or not yet
-- vacuumed away: a TRUNCATEd partition holds none).
CREATE OR REPLACE FUNCTION @S@.part_has_rows(p_part int) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM @S@.messages m WHERE m.part = p_part)
$$;

-- Signatures that changed: dropped so that calls stay unambiguous.
DROP FUNCTION IF EXISTS @S@.rotate();
DROP FUNCTION IF EXISTS @S@.retain(text, interval);
DROP FUNCTION IF EXISTS @S@.verdicts(int);

-- Step one of a rotation, in a transaction of its own: when the partition
-- publishers write to holds rows and another one is empty, make the empty
-- one current. Publishers only read rotation, so this never waits for
-- them. Without p_wait, returns at once when a retention runs. Returns
-- whether it switched.
CREATE OR REPLACE FUNCTION @S@.rotate(p_wait boolean DEFAULT true) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    c  int;
    nx int;
BEGIN
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('@S@.rotate', 0));
    ELSIF NOT pg_try_advisory_xact_lock(hashtextextended('@S@.rotate', 0)) THEN
        RETURN false;
    END IF;
    SELECT r.cur INTO c FROM @S@.rotation r;
    IF NOT @S@.part_has_rows(c) THEN
        RETURN false;
    END IF;
    SELECT (c + d) % 4 INTO nx FROM generate_series(1, 3) AS d
    WHERE NOT @S@.part_has_rows((c + d) % 4)
    ORDER BY d LIMIT 1;
    IF nx IS NULL THEN
        RETURN false;
    END IF;
    UPDATE @S@.rotation SET cur = nx, switched_at = now();
    RETURN true;
END $$;

-- How long messages of a channel without any group are kept when the
-- channel has no max_age of its own.
CREATE OR REPLACE FUNCTION @S@.unclaimed_max_age() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '1 day' $$;

-- The slowest cursor of each channel that has groups, with the snapshots
-- passed() needs. Positions are totally ordered and passed() is monotone
-- in the cursor, so "passed by every group" is "passed by the slowest":
-- one comparison per row, whatever the number of groups.
CREATE OR REPLACE FUNCTION @S@.slowest()
RETURNS TABLE (channel text, xid xid8, seq bigint, pv pg_snapshot, nx pg_snapshot)
LANGUAGE sql STABLE AS $$
    SELECT s.channel, s.xid, s.seq, @S@.snap_before(s.channel, s.tick_id),
           @S@.snap_at(s.channel, s.tick_id)
    FROM (SELECT DISTINCT ON (gr.channel) gr.channel, gr.tick_id, gr.xid, gr.seq
          FROM @S@.groups gr ORDER BY gr.channel, gr.tick_id, gr.xid, gr.seq) AS s
$$;

-- The rows of partition p_part with their retention verdict, the first
-- that applies:
--   foreign:   xid not below the snapshot's xmax, so not from a transaction
--              of this cluster (a restore, replication from another
--              cluster, an INSERT by hand): no tick will ever hold it.
--   acked:     every group of its channel has passed it.
--   old:       older than its channel's max_age (a channel without groups
--              and without max_age: unclaimed_max_age()).
--   unclaimed: its channel has no group (kept for groups to come).
--   needed:    some group has not passed it.
CREATE OR REPLACE FUNCTION @S@.verdicts(p_part int)
RETURNS TABLE (row_id tid, channel text, xid xid8, seq bigint, verdict text)
LANGUAGE sql STABLE AS $$
    WITH s AS MATERIALIZED (SELECT * FROM @S@.slowest()),
    k AS MATERIALIZED (SELECT pg_snapshot_xmax(pg_current_snapshot()) AS xmax, now() AS t)
    SELECT m.ctid, m.channel, m.xid, m.seq,
           CASE WHEN m.xid >= k.xmax THEN 'foreign'
                WHEN s.channel IS NOT NULL
                     AND @S@.passed(m.xid, m.seq, s.xid, s.seq, s.pv, s.nx) THEN 'acked'
                WHEN m.published_at < k.t - coalesce(c.max_age, CASE WHEN s.channel IS NULL
                                                          THEN @S@.unclaimed_max_age() END)
                     THEN 'old'
                WHEN s.channel IS NULL THEN 'unclaimed'
                ELSE 'needed' END
    FROM @S@.messages m
    CROSS JOIN k
    LEFT JOIN s ON s.channel = m.channel
    LEFT JOIN @S@.channels c ON c.channel = m.channel
    WHERE m.part = p_part
$$;

-- Step two of a rotation (run rotate() first, in its own transaction):
-- records p_max_age as the channel's maximum age (one per channel: a
-- different one than recorded raises PGPS2), then empties every partition
-- but the current one whose rows are all acked, old or foreign (see
-- verdicts); the few rows still needed (at most 1000) are carried into the
-- current partition first, unchanged (same xid, seq: same position). A
-- partition is locked NOWAIT, retried for about 100 ms, so this never
-- queues ahead of readers or writers; one still in use stays for the next
-- call. Groups that had not passed an old or foreign row get it counted in
-- lost. Without p_wait, returns at once (zeros) when another retention
-- runs. Returns, for p_channel, the rows removed that every group had
-- acked (acked) and those removed by max-age (expired); for all channels,
-- the partitions emptied, the rows carried, the foreign rows removed, the
-- partitions left because more than 1000 rows were still needed (blocked)
-- and the channels without groups among the rows that kept them.
CREATE OR REPLACE FUNCTION @S@.retain(p_channel text, p_max_age interval,
                                      p_wait boolean DEFAULT true,
                                      OUT acked bigint, OUT expired bigint,
                                      OUT truncated int, OUT carried bigint,
                                      OUT foreign_rows bigint, OUT blocked int,
                                      OUT unclaimed_channels text[])
LANGUAGE plpgsql AS $$
DECLARE
    c        int;
    k        int;
    attempt  int;
    n_needed bigint;
    n_gone   bigint;
    n_foreign    bigint;
    n_mine_old   bigint;
    n_mine_acked bigint;
    recorded interval;
    upgraded boolean;
    chans    text[];
    gone_ch  text[];
    gone_xid xid8[];
    gone_seq bigint[];
    p_ch     text[];
    p_gr     text[];
    tries    int;
    g        record;
BEGIN
    acked := 0; expired := 0; truncated := 0; carried := 0;
    foreign_rows := 0; blocked := 0; unclaimed_channels := '{}';
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- The verdicts must see every row committed before the lock.
        RAISE EXCEPTION '@S@.retain() needs READ COMMITTED isolation';
    END IF;
    -- One max age per channel: it removes rows for every group, so a group
    -- asking for another one would cost the others their unread messages.
    -- A call without one keeps the channel's. Change it with
    -- UPDATE channels (Durable::set_max_age).
    IF p_max_age IS NOT NULL THEN
        SELECT ch.max_age INTO recorded FROM @S@.channels ch WHERE ch.channel = p_channel;
        IF recorded IS NULL THEN
            INSERT INTO @S@.channels AS ch (channel, max_age) VALUES (p_channel, p_max_age)
            ON CONFLICT (channel) DO UPDATE SET max_age = EXCLUDED.max_age
                WHERE ch.max_age IS NULL;
            SELECT ch.max_age INTO recorded FROM @S@.channels ch WHERE ch.channel = p_channel;
        END IF;
        IF recorded IS DISTINCT FROM p_max_age THEN
            RAISE EXCEPTION USING ERRCODE = 'PGPS2',
                MESSAGE = format('durable channel %s has max_age %s, not %s', p_channel,
                                 recorded, p_max_age),
                HINT = 'a max age is per channel and removes messages for every group; '
                       'change it for all with set_max_age';
        END IF;
    END IF;
    -- Serialised with rotate(): the current partition stays current. A
    -- consumer (p_wait false) leaves it to whoever runs it now.
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('@S@.rotate', 0));
    ELSIF NOT pg_try_advisory_xact_lock(hashtextextended('@S@.rotate', 0)) THEN
        RETURN;
    END IF;
    SELECT r.cur INTO c FROM @S@.rotation r;
    FOR k IN 0 .. 3 LOOP
        CONTINUE WHEN k = c OR NOT @S@.part_has_rows(k);
        -- A first look without any lock: a partition a group is still
        -- reading is left alone at the cost of a short scan.
        SELECT count(*), array_agg(DISTINCT x.channel) FILTER (WHERE x.verdict = 'unclaimed')
        INTO n_needed, chans
        FROM (SELECT v.channel, v.verdict FROM @S@.verdicts(k) v
              WHERE v.verdict IN ('needed', 'unclaimed') LIMIT 1001) AS x;
        IF n_needed > 1000 THEN
            blocked := blocked + 1;
            unclaimed_channels := ARRAY(SELECT DISTINCT u FROM
                unnest(unclaimed_channels || coalesce(chans, '{}')) AS u ORDER BY u);
            CONTINUE;
        END IF;
        FOR attempt IN 1 .. 50 LOOP
            BEGIN
                -- SHARE: conflicts with the ROW EXCLUSIVE lock every
                -- transaction that wrote to the partition holds until it
                -- ends, not with readers. Once granted, every row in it is
                -- committed (or aborted), the statements below see them
                -- all, and no row can be added until we commit.
                EXECUTE format('LOCK TABLE @S@.messages_%s IN SHARE MODE NOWAIT', k);
                SELECT count(*) FILTER (WHERE v.verdict IN ('needed', 'unclaimed')),
                       count(*) FILTER (WHERE v.verdict = 'foreign'),
                       count(*) FILTER (WHERE v.verdict = 'old' AND v.channel = p_channel),
                       count(*) FILTER (WHERE v.verdict = 'acked' AND v.channel = p_channel),
                       array_agg(v.channel) FILTER (WHERE v.verdict IN ('old', 'foreign')),
                       array_agg(v.xid) FILTER (WHERE v.verdict IN ('old', 'foreign')),
                       array_agg(v.seq) FILTER (WHERE v.verdict IN ('old', 'foreign'))
                INTO n_needed, n_foreign, n_mine_old, n_mine_acked, gone_ch, gone_xid, gone_seq
                FROM @S@.verdicts(k) v;
                IF n_needed > 1000 THEN
                    -- Too much still needed: wait for the groups (or the
                    -- max age) rather than copy it. Releases the locks.
                    RAISE EXCEPTION USING ERRCODE = 'PGPS1';
                END IF;
                n_gone := coalesce(cardinality(gone_ch), 0);
                IF n_gone > 0 THEN
                    -- Each group gets, in lost, the removed rows it had not
                    -- passed. No cursor is locked to count: the count is
                    -- written only if the cursor is still the one counted
                    -- against (an ack in between moved it: count again).
                    -- Only the rows of groups that lose messages are
                    -- locked (by the UPDATE, until commit); acks of every
                    -- other group never wait for retention.
                    SELECT array_agg(gr.channel), array_agg(gr.group_name) INTO p_ch, p_gr
                    FROM @S@.groups gr WHERE gr.channel = ANY (gone_ch);
                    tries := 0;
                    WHILE coalesce(cardinality(p_ch), 0) > 0 LOOP
                        tries := tries + 1;
                        IF tries > 3 THEN
                            -- Acked again and again: hold these cursors
                            -- still (an ack is one short statement).
                            PERFORM 1 FROM @S@.groups gr
                            JOIN unnest(p_ch, p_gr) AS p(channel, group_name)
                              ON gr.channel = p.channel AND gr.group_name = p.group_name
                            FOR UPDATE OF gr;
                        END IF;
                        -- A row's position is (the first tick that sees its
                        -- xid, xid, seq), and a group has passed it iff
                        -- its cursor is at or after that position. So one
                        -- sort of rows and cursors per channel counts, for
                        -- every group, the rows after its cursor: no
                        -- row-by-group comparison.
                        WITH gone AS MATERIALIZED (
                            SELECT * FROM unnest(gone_ch, gone_xid, gone_seq) AS r(channel, xid, seq)
                        ), xt AS MATERIALIZED (
                            SELECT d.channel, d.xid,
                                   (SELECT t.tick_id FROM @S@.ticks t
                                    WHERE t.channel = d.channel AND t.snap_xmax > d.xid
                                      AND pg_visible_in_snapshot(d.xid, t.snap)
                                    ORDER BY t.snap_xmax, t.tick_id LIMIT 1) AS tick
                            FROM (SELECT DISTINCT gone.channel, gone.xid FROM gone) AS d
                        ), ev AS (
                            -- kind 0: a removed row (no tick sees it: after
                            -- every cursor); kind 1: a cursor, sorted after
                            -- a row at its own position (it passed that one).
                            SELECT gone.channel, coalesce(xt.tick, 9223372036854775807) AS tick,
                                   gone.xid, gone.seq, 0 AS kind, NULL::text AS group_name
                            FROM gone JOIN xt ON xt.channel = gone.channel AND xt.xid = gone.xid
                            UNION ALL
                            SELECT gr.channel, gr.tick_id, gr.xid, gr.seq, 1, gr.group_name
                            FROM @S@.groups gr
                            JOIN unnest(p_ch, p_gr) AS p(channel, group_name)
                              ON gr.channel = p.channel AND gr.group_name = p.group_name
                        ), run AS (
                            SELECT ev.*,
                                   count(*) FILTER (WHERE ev.kind = 0)
                                       OVER (PARTITION BY ev.channel) AS total,
                                   count(*) FILTER (WHERE ev.kind = 0)
                                       OVER (PARTITION BY ev.channel
                                             ORDER BY ev.tick, ev.xid, ev.seq, ev.kind) AS passed
                            FROM ev
                        ), n AS MATERIALIZED (
                            SELECT run.channel, run.group_name, run.tick AS tick_id, run.xid, run.seq,
                                   run.total - run.passed AS n
                            FROM run WHERE run.kind = 1 AND run.total > run.passed
                        ), upd AS (
                            UPDATE @S@.groups gr SET lost = gr.lost + n.n
                            FROM n
                            WHERE gr.channel = n.channel AND gr.group_name = n.group_name
                              AND (gr.tick_id, gr.xid, gr.seq) = (n.tick_id, n.xid, n.seq)
                            RETURNING gr.channel, gr.group_name
                        ), missed AS (
                            SELECT n.channel, n.group_name FROM n
                            EXCEPT ALL
                            SELECT upd.channel, upd.group_name FROM upd
                        )
                        SELECT array_agg(missed.channel), array_agg(missed.group_name)
                        INTO p_ch, p_gr FROM missed;
                    END LOOP;
                END IF;
                IF n_needed > 0 THEN
                    INSERT INTO @S@.messages (part, channel, xid, seq, published_at, payload)
                    SELECT c, m.channel, m.xid, m.seq, m.published_at, m.payload
                    FROM @S@.messages m
                    WHERE m.part = k
                      AND m.ctid IN (SELECT v.row_id FROM @S@.verdicts(k) v
                                     WHERE v.verdict IN ('needed', 'unclaimed'));
                END IF;
                -- TRUNCATE needs ACCESS EXCLUSIVE: taken only now, NOWAIT,
                -- between readers' statements, so none ever waits long.
                upgraded := false;
                FOR i IN 1 .. 100 LOOP
                    BEGIN
                        EXECUTE format('LOCK TABLE @S@.messages_%s IN ACCESS EXCLUSIVE MODE NOWAIT', k);
                        upgraded := true;
                        EXIT;
                    EXCEPTION WHEN lock_not_available THEN
                        PERFORM pg_sleep(0.001);
                    END;
                END LOOP;
                IF NOT upgraded THEN
                    -- Busy with readers: left for the next call.
                    RAISE EXCEPTION USING ERRCODE = 'PGPS3';
                END IF;
                EXECUTE format('TRUNCATE @S@.messages_%s', k);
                IF n_foreign > 0 THEN
                    RAISE WARNING 'pg-pubsub: removed % message(s) with an xid from no transaction of this cluster (restored or replicated rows?); groups that had not passed them count them as lost', n_foreign;
                END IF;
                truncated := truncated + 1;
                carried := carried + n_needed;
                foreign_rows := foreign_rows + n_foreign;
                expired := expired + n_mine_old;
                acked := acked + n_mine_acked;
                EXIT;
            EXCEPTION
                WHEN lock_not_available THEN
                    PERFORM pg_sleep(0.002);
                WHEN SQLSTATE 'PGPS1' THEN
                    blocked := blocked + 1;
                    EXIT;
                WHEN SQLSTATE 'PGPS3' THEN
                    EXIT;
            END;
        END LOOP;
    END LOOP;
    -- Keep the slowest group's tick and the one before it (its batch's
    -- lower bound); older ticks bound nothing anyone will read.
    SELECT * INTO g FROM @S@.groups WHERE channel = p_channel
    ORDER BY tick_id, xid, seq LIMIT 1;
    IF FOUND THEN
        DELETE FROM @S@.ticks t WHERE t.channel = p_channel AND t.tick_id < (
            SELECT coalesce(max(t2.tick_id), 0) FROM @S@.ticks t2
            WHERE t2.channel = p_channel AND t2.tick_id < g.tick_id);
    END IF;
END $$;

-- The first tick after p_after whose batch holds a message (NULL: none
-- yet), when the batches up to p_after are read. "Some message is visible
-- in tick t's snapshot and not in p_after's" only turns from false to true
-- as t grows (snapshots are monotone), so bisection finds it: a few index
-- probes, however many empty batches lie between. A tick id that
-- retention deleted stands for the greatest tick below it. VOLATILE, like
-- read(): each statement locks the partitions before taking its snapshot.
CREATE OR REPLACE FUNCTION @S@.next_batch(p_channel text, p_after bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET enable_seqscan = off AS $$
DECLARE
    base pg_snapshot;
    snap pg_snapshot;
    lo   bigint := p_after;
    hi   bigint;
    mid  bigint;
    hit  boolean;
BEGIN
    base := @S@.snap_before(p_channel, p_after + 1);
    SELECT max(t.tick_id) INTO hi FROM @S@.ticks t WHERE t.channel = p_channel;
    IF hi IS NULL OR hi <= lo THEN
        RETURN NULL;
    END IF;
    mid := hi;
    LOOP
        snap := @S@.snap_before(p_channel, mid + 1);
        SELECT EXISTS (SELECT 1 FROM @S@.messages m
                       WHERE m.channel = p_channel
                         AND m.xid >= pg_snapshot_xmax(base) AND m.xid < pg_snapshot_xmax(snap)
                         AND pg_visible_in_snapshot(m.xid, snap))
            OR EXISTS (SELECT 1 FROM pg_snapshot_xip(base) AS x(xid)
                       WHERE pg_visible_in_snapshot(x.xid, snap)
                         AND EXISTS (SELECT 1 FROM @S@.messages m
                                     WHERE m.channel = p_channel AND m.xid = x.xid))
        INTO hit;
        IF mid = hi AND NOT hit THEN
            RETURN NULL;
        END IF;
        IF hit THEN
            hi := mid;
        ELSE
            lo := mid;
        END IF;
        EXIT WHEN hi - lo <= 1;
        mid := lo + (hi - lo) / 2;
    END LOOP;
    SELECT max(t.tick_id) INTO hi FROM @S@.ticks t
    WHERE t.channel = p_channel AND t.tick_id <= hi;
    RETURN hi;
END $$;

-- Up to p_limit messages after position (p_tick, p_xid, p_seq), in
-- delivery order, all from one batch: the rest of batch p_tick, else the
-- first non-empty later batch.
CREATE OR REPLACE FUNCTION @S@.read(p_channel text, p_tick bigint, p_xid xid8, p_seq bigint, p_limit int)
RETURNS TABLE (tick_id bigint, xid xid8, seq bigint, published_at timestamptz, payload text)
-- VOLATILE on purpose, like range_of: each statement then takes its
-- snapshot after locking the partitions, so a rotation that committed
-- meanwhile is seen whole (TRUNCATE is not MVCC-safe for older snapshots).
-- plan_cache_mode = force_generic_plan: once one channel holds most rows
-- (a backlog), the generic plan's estimate for the others looks worse than
-- a custom one, so every call was planned again (about 250 us over the
-- four partitions, four fifths of a one-message read). The generic plan
-- is the same ordered index scan per partition, merged.
LANGUAGE plpgsql VOLATILE SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    nx_id   bigint;
    nx_snap pg_snapshot;
    pv      pg_snapshot;
    xips    xid8[];
    n       bigint;
    exact   boolean := true;
    lo_xid  xid8;
    lo_seq  bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '@S@.read() needs READ COMMITTED isolation';
    END IF;
    LOOP
        nx_id := NULL;
        IF exact THEN
            SELECT t.tick_id, t.snap INTO nx_id, nx_snap FROM @S@.ticks t
            WHERE t.channel = p_channel AND t.tick_id = p_tick;
        END IF;
        IF nx_id IS NULL THEN
            SELECT t.tick_id, t.snap INTO nx_id, nx_snap FROM @S@.ticks t
            WHERE t.channel = p_channel AND t.tick_id > p_tick
            ORDER BY t.tick_id LIMIT 1;
            IF nx_id IS NULL THEN
                RETURN;
            END IF;
            p_xid := '0'; p_seq := 0;
        END IF;
        -- snap_before() inlined: a SQL function called from PL/pgSQL is
        -- parsed and planned again in every transaction (its cache lives
        -- in the transaction's expression state), which cost a consumer
        -- more CPU than the rest of the read; this statement's plan is
        -- kept for the session.
        SELECT t.snap INTO pv FROM @S@.ticks t
        WHERE t.channel = p_channel AND t.tick_id < nx_id
        ORDER BY t.tick_id DESC LIMIT 1;
        pv := coalesce(pv, '1:1:'::pg_snapshot);
        -- Only the in-progress transactions that have something left to
        -- read here (one index probe each): usually none, and then the
        -- page is a single ordered range scan, without union or sort.
        xips := ARRAY(SELECT x.xid FROM pg_snapshot_xip(pv) AS x(xid)
                      WHERE pg_visible_in_snapshot(x.xid, nx_snap)
                        AND EXISTS (SELECT 1 FROM @S@.messages m
                                    WHERE m.channel = p_channel AND m.xid = x.xid
                                      AND (m.xid, m.seq) > (p_xid, p_seq)));
        -- The range half starts at the later of the cursor and the batch's
        -- lower bound (messages have seq >= 1, so (xmax, 0) is before the
        -- first message of xid xmax). With the cursor alone, the start of
        -- a batch ('0', 0) made the index scan begin at the channel's first
        -- message and walk every earlier one: reads slowed down as the
        -- channel grew.
        IF (p_xid, p_seq) < (pg_snapshot_xmax(pv), 0::bigint) THEN
            lo_xid := pg_snapshot_xmax(pv); lo_seq := 0;
        ELSE
            lo_xid := p_xid; lo_seq := p_seq;
        END IF;
        IF cardinality(xips) = 0 THEN
            RETURN QUERY
            SELECT nx_id, m1.xid, m1.seq, m1.published_at, m1.payload FROM @S@.messages m1
            WHERE m1.channel = p_channel
              AND m1.xid >= pg_snapshot_xmax(pv) AND m1.xid < pg_snapshot_xmax(nx_snap)
              AND (m1.xid, m1.seq) > (lo_xid, lo_seq)
              AND pg_visible_in_snapshot(m1.xid, nx_snap)
            ORDER BY m1.xid, m1.seq LIMIT p_limit;
        ELSE
            -- Not visible in pv means: xid >= xmax(pv), or xid in progress in pv.
            -- Each half is ordered and limited on its own so that a page reads
            -- at most p_limit index entries per half, whatever the batch size:
            -- an index range scan, and one index lookup per transaction that
            -- was in progress at the previous tick.
            RETURN QUERY
            SELECT nx_id, m.xid, m.seq, m.published_at, m.payload FROM (
                (SELECT m1.xid, m1.seq, m1.published_at, m1.payload FROM @S@.messages m1
                 WHERE m1.channel = p_channel
                   AND m1.xid >= pg_snapshot_xmax(pv) AND m1.xid < pg_snapshot_xmax(nx_snap)
                   AND (m1.xid, m1.seq) > (lo_xid, lo_seq)
                   AND pg_visible_in_snapshot(m1.xid, nx_snap)
                 ORDER BY m1.xid, m1.seq LIMIT p_limit)
                UNION ALL
                (SELECT m2.xid, m2.seq, m2.published_at, m2.payload
                 FROM unnest(xips) AS x(xid)
                 CROSS JOIN LATERAL (
                     SELECT m3.xid, m3.seq, m3.published_at, m3.payload FROM @S@.messages m3
                     WHERE m3.channel = p_channel AND m3.xid = x.xid
                       AND (m3.xid, m3.seq) > (p_xid, p_seq)
                       AND pg_visible_in_snapshot(m3.xid, nx_snap)
                     ORDER BY m3.seq LIMIT p_limit) AS m2
                 ORDER BY m2.xid, m2.seq LIMIT p_limit)
            ) AS m
            ORDER BY m.xid, m.seq
            LIMIT p_limit;
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            RETURN;
        END IF;
        IF NOT exact THEN
            -- A later batch without rows (retention removed them): find
            -- the next one that holds a message by bisection over the
            -- ticks, not one tick at a time, so many of them cost a few
            -- probes instead of a read each.
            nx_id := @S@.next_batch(p_channel, nx_id);
            IF nx_id IS NULL THEN
                RETURN;
            END IF;
            nx_id := nx_id - 1;
        END IF;
        p_tick := nx_id;
        exact := false;
    END LOOP;
END $$;
