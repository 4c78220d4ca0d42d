-- pg-pubsub durable channels, schema version 1.
-- Safe to run more than once and from several sessions at once: the
-- advisory lock serialises installers, every object is IF NOT EXISTS or
-- CREATE OR REPLACE.
BEGIN;
SELECT pg_advisory_xact_lock(@LOCK@);
CREATE SCHEMA IF NOT EXISTS @S@;

CREATE TABLE IF NOT EXISTS @S@.schema_version (
    version      int PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE IF NOT EXISTS @S@.messages_seq;

-- Rotation (see the module docs): messages is a ring of four list
-- partitions; publishers write to rotation.cur, and retain() empties the
-- others with TRUNCATE once nothing in them is needed. Nothing else ever
-- runs DDL on messages after install.
CREATE TABLE IF NOT EXISTS @S@.rotation (
    one         boolean     PRIMARY KEY DEFAULT true CHECK (one),
    cur         int         NOT NULL DEFAULT 0,
    switched_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO @S@.rotation DEFAULT VALUES ON CONFLICT DO NOTHING;

-- The partition publishers write to now (the default of messages.part).
CREATE OR REPLACE FUNCTION @S@.current_part() RETURNS int
LANGUAGE sql STABLE AS $$ SELECT r.cur FROM @S@.rotation r $$;

-- One row per message. xid is the publishing transaction (top level, also
-- inside savepoints); text has no size limit short of 1 GB. part only
-- says where the row is stored: positions and order never depend on it.
CREATE TABLE IF NOT EXISTS @S@.messages (
    channel      text        NOT NULL,
    xid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    seq          bigint      NOT NULL DEFAULT nextval('@S@.messages_seq'),
    published_at timestamptz NOT NULL DEFAULT now(),
    payload      text        NOT NULL,
    part         int         NOT NULL DEFAULT @S@.current_part()
) PARTITION BY LIST (part);
CREATE TABLE IF NOT EXISTS @S@.messages_0 PARTITION OF @S@.messages FOR VALUES IN (0);
CREATE TABLE IF NOT EXISTS @S@.messages_1 PARTITION OF @S@.messages FOR VALUES IN (1);
CREATE TABLE IF NOT EXISTS @S@.messages_2 PARTITION OF @S@.messages FOR VALUES IN (2);
CREATE TABLE IF NOT EXISTS @S@.messages_3 PARTITION OF @S@.messages FOR VALUES IN (3);
CREATE INDEX IF NOT EXISTS messages_channel_xid_seq ON @S@.messages (channel, xid, seq);

-- Snapshots taken by tick(): batch N of a channel is what became visible
-- between its tick N-1 (or nothing) and tick N.
CREATE TABLE IF NOT EXISTS @S@.ticks (
    channel    text        NOT NULL,
    tick_id    bigint      NOT NULL,
    snap       pg_snapshot NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, tick_id)
);

-- One cursor per consumer group: the position (tick_id, xid, seq) of the
-- last acked message. lost counts messages removed by max-age retention
-- before the group read them, until its consumer reports them.
CREATE TABLE IF NOT EXISTS @S@.groups (
    channel    text        NOT NULL,
    group_name text        NOT NULL,
    tick_id    bigint      NOT NULL,
    xid        xid8        NOT NULL,
    seq        bigint      NOT NULL,
    lost       bigint      NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    acked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, group_name)
);

-- Per-channel settings. quiet: publish without NOTIFY (consumers poll).
-- max_age: the maximum age its last retain() call asked for, which every
-- rotation applies to the channel's messages.
CREATE TABLE IF NOT EXISTS @S@.channels (
    channel text PRIMARY KEY,
    quiet   boolean NOT NULL DEFAULT false,
    max_age interval
);

-- Publishes one message in the caller's transaction. The wake-up payload is
-- the channel name, identical for every message of a transaction, so the
-- server sends one notification per channel per transaction. The partition
-- is read in the statement (as publish_many does): the column default,
-- a function call per row, costs a quarter of an insert's throughput.
CREATE OR REPLACE FUNCTION @S@.publish(p_channel text, p_payload text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO @S@.messages (part, channel, payload)
        SELECT r.cur, p_channel, p_payload FROM @S@.rotation r;
    PERFORM @S@.wake(p_channel);
END $$;

-- Publishes many messages (in array order) in one statement, one wake-up.
CREATE OR REPLACE FUNCTION @S@.publish_many(p_channel text, p_payloads text[]) RETURNS bigint
LANGUAGE plpgsql AS $$
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

-- Sends the channel's wake-up unless the channel is quiet.
CREATE OR REPLACE FUNCTION @S@.wake(p_channel text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @S@.channels c WHERE c.channel = p_channel AND c.quiet) THEN
        PERFORM pg_notify('@WAKE@', p_channel);
    END IF;
END $$;

-- Takes a tick of the channel when something became visible since the last
-- one. Ticks of a channel are serialised by the advisory lock, and the
-- snapshot is taken by a statement that starts after the lock is granted,
-- so every tick's snapshot sees at least what the previous one saw.
-- Returns the channel's latest tick id (0: none yet).
-- enable_seqscan = off: the probes must stay index lookups even when the
-- statistics say one xid holds most rows (a big batch just published).
CREATE OR REPLACE FUNCTION @S@.tick(p_channel text) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off AS $$
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
    SELECT p_channel, coalesce(l.tick_id, 0) + 1, pg_current_snapshot()
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT t.tick_id, t.snap FROM @S@.ticks t
        WHERE t.channel = p_channel ORDER BY t.tick_id DESC LIMIT 1
    ) AS l ON true
    -- Each probe is an index lookup on (channel, xid): the newest xid
    -- (min/max optimisation), and one lookup per transaction that was in
    -- progress at the last tick. A plain predicate with OR, or a range on
    -- a value the planner cannot see, gets a sequential scan.
    WHERE (l.snap IS NULL
           AND EXISTS (SELECT 1 FROM @S@.messages m WHERE m.channel = p_channel))
       OR (SELECT max(m.xid) FROM @S@.messages m WHERE m.channel = p_channel)
          >= pg_snapshot_xmax(l.snap)
       OR EXISTS (SELECT 1 FROM pg_snapshot_xip(l.snap) AS x(xid)
                  CROSS JOIN LATERAL (SELECT 1 FROM @S@.messages m
                                      WHERE m.channel = p_channel AND m.xid = x.xid
                                      LIMIT 1) AS hit);
    SELECT max(t.tick_id) INTO last_id FROM @S@.ticks t WHERE t.channel = p_channel;
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

-- read() is defined by version 5.

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

-- Step one of a rotation, in a transaction of its own: when the partition
-- publishers write to holds rows and another one is empty, make the empty
-- one current. Publishers only read rotation, so this never waits for
-- them. Returns whether it switched.
CREATE OR REPLACE FUNCTION @S@.rotate() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    c  int;
    nx int;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('@S@.rotate', 0));
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

-- The rows of partition p_part with their retention verdict. old: older
-- than its channel's max_age. needed: not old, and some group of its
-- channel has not passed it, or its channel has no group (kept for
-- groups to come).
CREATE OR REPLACE FUNCTION @S@.verdicts(p_part int)
RETURNS TABLE (row_id tid, channel text, old boolean, needed boolean)
LANGUAGE sql STABLE AS $$
    WITH g AS MATERIALIZED (
        SELECT gr.channel, gr.xid, gr.seq,
               @S@.snap_before(gr.channel, gr.tick_id) AS pv,
               @S@.snap_at(gr.channel, gr.tick_id) AS nx
        FROM @S@.groups gr
    )
    SELECT m.ctid, m.channel, o.old,
           NOT o.old AND (NOT EXISTS (SELECT 1 FROM g WHERE g.channel = m.channel)
                          OR EXISTS (SELECT 1 FROM g WHERE g.channel = m.channel
                                     AND NOT @S@.passed(m.xid, m.seq, g.xid, g.seq, g.pv, g.nx)))
    FROM @S@.messages m
    LEFT JOIN @S@.channels c ON c.channel = m.channel
    CROSS JOIN LATERAL (SELECT coalesce(m.published_at < now() - c.max_age, false) AS old) AS o
    WHERE m.part = p_part
$$;

-- Step two of a rotation (run rotate() first, in its own transaction):
-- records p_max_age as the channel's maximum age, then empties every
-- partition but the current one whose rows are all passed by every group
-- of their channel or older than their channel's max_age; the few rows
-- still needed (at most 1000) are carried into the current partition
-- first, unchanged (same xid, seq: same position). A partition is locked
-- NOWAIT, retried for about 100 ms, so this never queues ahead of readers
-- or writers; one still in use stays for the next call. Groups that had not read an expired row get it
-- counted in lost. Returns, for p_channel, the rows removed that every
-- group had acked (acked) and those removed by max-age (expired); and, for
-- all channels, the partitions emptied and the rows carried.
CREATE OR REPLACE FUNCTION @S@.retain(p_channel text, p_max_age interval,
                                      OUT acked bigint, OUT expired bigint,
                                      OUT truncated int, OUT carried bigint)
LANGUAGE plpgsql AS $$
DECLARE
    c        int;
    k        int;
    attempt  int;
    n_total  bigint;
    n_needed bigint;
    n_old    bigint;
    n_mine_old   bigint;
    n_mine_acked bigint;
    upgraded boolean;
    g        record;
BEGIN
    acked := 0; expired := 0; truncated := 0; carried := 0;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- The verdicts must see every row committed before the lock.
        RAISE EXCEPTION '@S@.retain() needs READ COMMITTED isolation';
    END IF;
    -- A call without a max age keeps the channel's (a consumer without one
    -- must not undo another's); clear it with UPDATE channels.
    INSERT INTO @S@.channels AS ch (channel, max_age) VALUES (p_channel, p_max_age)
    ON CONFLICT (channel) DO UPDATE SET max_age = EXCLUDED.max_age
        WHERE EXCLUDED.max_age IS NOT NULL AND ch.max_age IS DISTINCT FROM EXCLUDED.max_age;
    -- Serialised with rotate(): the current partition stays current.
    PERFORM pg_advisory_xact_lock(hashtextextended('@S@.rotate', 0));
    SELECT r.cur INTO c FROM @S@.rotation r;
    FOR k IN 0 .. 3 LOOP
        CONTINUE WHEN k = c OR NOT @S@.part_has_rows(k);
        -- A first look without any lock: a partition a group is still
        -- reading is left alone at the cost of a short scan.
        CONTINUE WHEN (SELECT count(*) FROM (SELECT 1 FROM @S@.verdicts(k) v
                                             WHERE v.needed LIMIT 1001) AS x) > 1000;
        FOR attempt IN 1 .. 50 LOOP
            BEGIN
                -- SHARE: conflicts with the ROW EXCLUSIVE lock every
                -- transaction that wrote to the partition holds until it
                -- ends, not with readers. Once granted, every row in it is
                -- committed (or aborted), the statements below see them
                -- all, and no row can be added until we commit.
                EXECUTE format('LOCK TABLE @S@.messages_%s IN SHARE MODE NOWAIT', k);
                -- Cursors stay put while lost is counted against them.
                PERFORM 1 FROM @S@.groups gr
                WHERE gr.channel IN (SELECT DISTINCT m.channel FROM @S@.messages m WHERE m.part = k)
                FOR UPDATE NOWAIT;
                SELECT count(*), count(*) FILTER (WHERE v.needed), count(*) FILTER (WHERE v.old),
                       count(*) FILTER (WHERE v.old AND v.channel = p_channel),
                       count(*) FILTER (WHERE NOT v.old AND NOT v.needed AND v.channel = p_channel)
                INTO n_total, n_needed, n_old, n_mine_old, n_mine_acked
                FROM @S@.verdicts(k) v;
                IF n_needed > 1000 THEN
                    -- Too much still needed: wait for the groups (or the
                    -- max age) rather than copy it. Releases the locks.
                    RAISE EXCEPTION USING ERRCODE = 'PGPS1';
                END IF;
                IF n_needed > 0 THEN
                    INSERT INTO @S@.messages (part, channel, xid, seq, published_at, payload)
                    SELECT c, m.channel, m.xid, m.seq, m.published_at, m.payload
                    FROM @S@.messages m
                    WHERE m.part = k
                      AND m.ctid IN (SELECT v.row_id FROM @S@.verdicts(k) v WHERE v.needed);
                END IF;
                IF n_old > 0 THEN
                    UPDATE @S@.groups gr SET lost = gr.lost + l.n
                    FROM (SELECT gg.channel, gg.group_name, count(*) AS n
                          FROM @S@.messages m
                          JOIN @S@.channels ch ON ch.channel = m.channel
                          JOIN @S@.groups gg ON gg.channel = m.channel
                          CROSS JOIN LATERAL (
                              SELECT @S@.snap_before(gg.channel, gg.tick_id) AS pv,
                                     @S@.snap_at(gg.channel, gg.tick_id) AS nx) AS sn
                          WHERE m.part = k AND m.published_at < now() - ch.max_age
                            AND NOT @S@.passed(m.xid, m.seq, gg.xid, gg.seq, sn.pv, sn.nx)
                          GROUP BY gg.channel, gg.group_name) AS l
                    WHERE gr.channel = l.channel AND gr.group_name = l.group_name;
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
                    RAISE EXCEPTION USING ERRCODE = 'PGPS1';
                END IF;
                EXECUTE format('TRUNCATE @S@.messages_%s', k);
                truncated := truncated + 1;
                carried := carried + n_needed;
                expired := expired + n_mine_old;
                acked := acked + n_mine_acked;
                EXIT;
            EXCEPTION
                WHEN lock_not_available THEN
                    PERFORM pg_sleep(0.002);
                WHEN SQLSTATE 'PGPS1' THEN
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

INSERT INTO @S@.schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;
COMMIT;
