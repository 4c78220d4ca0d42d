-- pg-pubsub schema version 5 (on top of version 4): read() whose index scan
-- starts at the batch it reads, whatever the cursor.
-- Safe to run more than once and from several sessions at once.
BEGIN;
SELECT pg_advisory_xact_lock(@LOCK@);

-- Up to p_limit messages after position (p_tick, p_xid, p_seq), in
-- delivery order, all from one batch: the rest of batch p_tick, else the
-- first non-empty later batch.
CREATE OR REPLACE FUNCTION @S@.read(p_channel text, p_tick bigint, p_xid xid8, p_seq bigint, p_limit int)
RETURNS TABLE (tick_id bigint, xid xid8, seq bigint, published_at timestamptz, payload text)
-- VOLATILE on purpose, like range_of: each statement then takes its
-- snapshot after locking the partitions, so a rotation that committed
-- meanwhile is seen whole (TRUNCATE is not MVCC-safe for older snapshots).
LANGUAGE plpgsql VOLATILE SET enable_seqscan = off AS $$
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
        pv := @S@.snap_before(p_channel, nx_id);
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
        p_tick := nx_id;
        exact := false;
    END LOOP;
END $$;

INSERT INTO @S@.schema_version (version) VALUES (5) ON CONFLICT DO NOTHING;
COMMIT;
