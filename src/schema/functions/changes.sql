-- pg-pubsub functions of trigger change feeds.
-- Re-applied by the installer whenever this file changes (see
-- src/schema/mod.rs for the rule: a change ships with a new migration).
--
-- Installing a feed is only CREATE TRIGGER: the trigger functions below are
-- generic, parameterised by their arguments (TG_ARGV):
--   [0] target: 'durable' (publish_many into a durable channel) or 'notify'
--   [1] channel
--   [2] schema and [3] table the feed was installed on (events name the
--       partitioned parent, not the partition a row landed in)
--   [4] attribute numbers of the columns to keep ('' = all), [5] of the
--       columns to leave out ('' = none), [6] the oid of the table they
--       belong to, [7] the names of the columns to leave out at install
--       ('' = none): also left out, so a column dropped and added again
--       under that name (a type change done that way) never leaks.
-- Columns are held by number, not name, and names are read from
-- pg_attribute when a statement runs, so a feed follows
-- ALTER TABLE .. RENAME COLUMN (numbers are never reused; a dropped column
-- stays dropped). The primary key is read from pg_index at run time too:
-- it pairs old and new rows of an UPDATE in the statement-level trigger and
-- is what a NOTIFY carries when the whole event would not fit.

-- Functions of earlier development builds whose signature changed.
DROP FUNCTION IF EXISTS @S@.change_json(text, text, text, jsonb, jsonb, boolean);
DROP FUNCTION IF EXISTS @S@.change_notify(text, text, text, text, jsonb, jsonb, text[]);
DROP FUNCTION IF EXISTS @S@.change_argv(text);
DROP FUNCTION IF EXISTS @S@.change_cols(jsonb, text[], text[]);
DROP FUNCTION IF EXISTS @S@.change_filter(oid, oid, text, text);

-- The event, exactly ChangeEvent's JSON shape. mark: NULL, or the flag to
-- set: 'key_only' (old/new hold the primary key only) or 'rows_omitted'
-- (old/new left out).
CREATE OR REPLACE FUNCTION @S@.change_json(op text, sch text, tbl text, o jsonb, n jsonb,
                                           mark text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT (jsonb_build_object(
        'op', op, 'schema', sch, 'table', tbl, 'old', o, 'new', n,
        'xid', pg_current_xact_id()::text::bigint,
        'changed_at', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                              'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'committed_at', NULL)
        || CASE WHEN mark IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(mark, true) END)::text
$$;

-- The event for a durable channel: json (not jsonb: no key sorting, no
-- binary round trip, columns in table order), with the transaction id and
-- time computed once per statement by the caller.
CREATE OR REPLACE FUNCTION @S@.change_text(op text, sch text, tbl text, o json, n json,
                                           xid bigint, ts text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_object('op', op, 'schema', sch, 'table', tbl, 'old', o, 'new', n,
                             'xid', xid, 'changed_at', ts, 'committed_at', NULL)::text
$$;

-- Now, as ChangeEvent writes times: RFC 3339 in UTC, microseconds.
CREATE OR REPLACE FUNCTION @S@.change_now() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- The primary key's column names of a table, in key order, as they are now.
-- PL/pgSQL, not SQL, so the plans are cached for the session; one name
-- lookup per key column is about 4x cheaper than a join over unnest(indkey).
CREATE OR REPLACE FUNCTION @S@.change_pk(rel oid) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    key   int2[];
    nkey  int;
    num   int2;
    names text[] := '{}';
BEGIN
    SELECT i.indkey::int2[], i.indnkeyatts INTO key, nkey
    FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary;
    FOREACH num IN ARRAY coalesce(key, '{}') LOOP
        EXIT WHEN cardinality(names) >= nkey;  -- INCLUDE columns are not the key
        names := names || (SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = rel AND a.attnum = num);
    END LOOP;
    RETURN names;
END $$;

-- The column filter of a trigger (TG_ARGV[4..6]) as the names, as they are
-- now, of the columns to remove from a row image (`jsonb - dropped`):
-- those not kept and those left out; a dropped column is simply gone.
-- stale: the trigger fires on a table that is neither the one its numbers
-- belong to nor one of its partitions (a restored dump, where oids and
-- numbers change, or a copied trigger); its numbers then mean nothing.
-- PL/pgSQL, not SQL, so the plans are cached for the session.
CREATE OR REPLACE FUNCTION @S@.change_filter(rel oid, trg oid, p_keep text, p_drop text,
                                             p_names text, OUT dropped text[],
                                             OUT stale boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    keep int2[] := nullif(p_keep, '')::int2[];
    drp  int2[] := coalesce(nullif(p_drop, '')::int2[], '{}');
BEGIN
    dropped := ARRAY(SELECT a.attname::text FROM pg_attribute a
                     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                       AND (a.attnum = ANY (drp) OR a.attnum <> ALL (coalesce(keep, ARRAY[a.attnum]))))
               || coalesce(nullif(p_names, '')::text[], '{}');
    stale := trg <> rel AND NOT EXISTS (SELECT FROM pg_partition_ancestors(trg) AS p
                                        WHERE p.relid = rel);
END $$;

-- Says, once per statement or row, that a feed's trigger no longer matches
-- its table; its events carry no rows ("rows_omitted") until reinstalled.
CREATE OR REPLACE FUNCTION @S@.change_stale(rel text, tbl text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE WARNING 'pg-pubsub: the change feed trigger on % was made for another table (oid %): '
                  'events carry no rows until the feed is reinstalled', tbl, rel;
END $$;

-- Sends one event over NOTIFY, never failing the writer: when it is 8000
-- bytes or more (the server's limit), old/new reduced to the primary key
-- ("key_only"); when even that does not fit (a long key, JSON escapes, an
-- update sending it twice), no rows at all ("rows_omitted"), which always
-- fits (names are at most 63 bytes). rel: the table, for its key.
CREATE OR REPLACE FUNCTION @S@.change_notify(ch text, op text, sch text, tbl text,
                                             o jsonb, n jsonb, rel oid,
                                             omitted boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    pk text[];
    ko jsonb;
    kn jsonb;
BEGIN
    IF NOT omitted THEN
        payload := @S@.change_json(op, sch, tbl, o, n);
        IF octet_length(payload) >= 8000 THEN
            pk := @S@.change_pk(rel);
            ko := (SELECT jsonb_object_agg(k, o -> k) FROM unnest(pk) AS k WHERE o ? k);
            kn := (SELECT jsonb_object_agg(k, n -> k) FROM unnest(pk) AS k WHERE n ? k);
            payload := CASE WHEN ko IS NOT NULL OR kn IS NOT NULL
                            THEN @S@.change_json(op, sch, tbl, ko, kn, 'key_only') END;
            omitted := payload IS NULL OR octet_length(payload) >= 8000;
        END IF;
    END IF;
    IF omitted THEN
        payload := @S@.change_json(op, sch, tbl, NULL, NULL, 'rows_omitted');
    END IF;
    PERFORM pg_notify(ch, payload);
END $$;

-- Row-level trigger function: one event per row (AFTER ... FOR EACH ROW).
CREATE OR REPLACE FUNCTION @S@.change_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    filtered boolean := TG_ARGV[4] <> '' OR TG_ARGV[5] <> '';
    dropped text[] := '{}';
    stale boolean := false;
    o     jsonb;
    n     jsonb;
BEGIN
    IF TG_ARGV[0] = 'durable' AND NOT filtered THEN
        -- The common case, without a jsonb round trip.
        PERFORM @S@.publish(TG_ARGV[1], @S@.change_text(lower(TG_OP), TG_ARGV[2], TG_ARGV[3],
            CASE WHEN TG_OP <> 'INSERT' THEN to_json(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_json(NEW) END,
            pg_current_xact_id()::text::bigint, @S@.change_now()));
        RETURN NULL;
    END IF;
    IF filtered THEN
        SELECT f.dropped, f.stale INTO dropped, stale
        FROM @S@.change_filter(TG_ARGV[6]::oid, TG_RELID, TG_ARGV[4], TG_ARGV[5], TG_ARGV[7]) AS f;
    END IF;
    IF stale THEN
        -- Never leak a column the filter meant to leave out.
        PERFORM @S@.change_stale(TG_ARGV[6], TG_RELID::regclass::text);
        IF TG_ARGV[0] = 'notify' THEN
            PERFORM @S@.change_notify(TG_ARGV[1], lower(TG_OP), TG_ARGV[2], TG_ARGV[3],
                                      NULL, NULL, TG_RELID, true);
        ELSE
            PERFORM @S@.publish(TG_ARGV[1], @S@.change_json(lower(TG_OP), TG_ARGV[2], TG_ARGV[3],
                                                            NULL, NULL, 'rows_omitted'));
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        o := to_jsonb(OLD) - dropped;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        n := to_jsonb(NEW) - dropped;
    END IF;
    -- With a column filter, an update of other columns only is no change.
    IF TG_OP = 'UPDATE' AND filtered AND o = n THEN
        RETURN NULL;
    END IF;
    IF TG_ARGV[0] = 'notify' THEN
        PERFORM @S@.change_notify(TG_ARGV[1], lower(TG_OP), TG_ARGV[2], TG_ARGV[3], o, n,
                                  TG_RELID);
    ELSE
        PERFORM @S@.publish(TG_ARGV[1], @S@.change_json(lower(TG_OP), TG_ARGV[2], TG_ARGV[3], o, n));
    END IF;
    RETURN NULL;
END $$;

-- Statement-level trigger function: the statement's rows from its
-- transition tables (pgps_old, pgps_new), published with one publish_many
-- in statement order. Also TRUNCATE (one event, no rows). UPDATE pairs old
-- and new rows on the primary key (installed only on tables that have
-- one): transition tables hold no link between a row's old and new
-- version. An update that changed the key gives an update with only
-- "new" and, after the paired ones, one with only "old"; so does every
-- row if the key was dropped since (pairing on nothing would be a cross
-- product).
CREATE OR REPLACE FUNCTION @S@.change_stmt() RETURNS trigger
LANGUAGE plpgsql AS $$
-- The queries below read the user's columns: a column named like a
-- variable (op, xid, ts, ...) must not make them ambiguous, and the row
-- is r.* (a bare r would be a column named r, if there is one).
#variable_conflict use_variable
DECLARE
    op  text := lower(TG_OP);
    ch  text := TG_ARGV[1];
    sch text := TG_ARGV[2];
    tbl text := TG_ARGV[3];
    dropped text[] := '{}';
    pk  text[];
    stale boolean := false;
    nrows bigint;
    filtered boolean := TG_ARGV[4] <> '' OR TG_ARGV[5] <> '';
    -- One transaction id and one time for the statement's changes.
    xid bigint := pg_current_xact_id()::text::bigint;
    ts  text := @S@.change_now();
    os  jsonb[];
    ns  jsonb[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF TG_ARGV[0] = 'notify' THEN
            PERFORM @S@.change_notify(ch, op, sch, tbl, NULL, NULL, TG_RELID);
        ELSE
            PERFORM @S@.publish(ch, @S@.change_text(op, sch, tbl, NULL, NULL, xid, ts));
        END IF;
        RETURN NULL;
    END IF;
    IF filtered THEN
        SELECT f.dropped, f.stale INTO dropped, stale
        FROM @S@.change_filter(TG_ARGV[6]::oid, TG_RELID, TG_ARGV[4], TG_ARGV[5], TG_ARGV[7]) AS f;
    END IF;
    IF stale THEN
        -- Never leak a column the filter meant to leave out: one event per
        -- row, without rows.
        PERFORM @S@.change_stale(TG_ARGV[6], TG_RELID::regclass::text);
        IF TG_OP = 'DELETE' THEN
            SELECT count(*) INTO nrows FROM pgps_old;
        ELSE
            SELECT count(*) INTO nrows FROM pgps_new;
        END IF;
        IF TG_ARGV[0] = 'notify' THEN
            PERFORM @S@.change_notify(ch, op, sch, tbl, NULL, NULL, TG_RELID, true)
            FROM generate_series(1, nrows);
        ELSE
            PERFORM @S@.publish_many(ch, ARRAY(
                SELECT @S@.change_json(op, sch, tbl, NULL, NULL, 'rows_omitted')
                FROM generate_series(1, nrows)));
        END IF;
        RETURN NULL;
    END IF;
    IF TG_ARGV[0] = 'durable' AND TG_OP <> 'UPDATE' THEN
        -- Inserts and deletes straight from the transition table to text.
        IF TG_OP = 'INSERT' THEN
            PERFORM @S@.publish_many(ch, ARRAY(
                SELECT @S@.change_text(op, sch, tbl, NULL,
                    CASE WHEN filtered THEN (to_jsonb(r.*) - dropped)::json
                         ELSE to_json(r.*) END, xid, ts)
                FROM pgps_new AS r));
        ELSE
            PERFORM @S@.publish_many(ch, ARRAY(
                SELECT @S@.change_text(op, sch, tbl,
                    CASE WHEN filtered THEN (to_jsonb(r.*) - dropped)::json
                         ELSE to_json(r.*) END, NULL, xid, ts)
                FROM pgps_old AS r));
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(NULL::jsonb), array_agg(to_jsonb(r.*) - dropped)
        INTO os, ns FROM pgps_new AS r;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(to_jsonb(r.*) - dropped), array_agg(NULL::jsonb)
        INTO os, ns FROM pgps_old AS r;
    ELSE
        pk := @S@.change_pk(TG_RELID);
        SELECT array_agg(p.o ORDER BY p.rn), array_agg(p.n ORDER BY p.rn) INTO os, ns
        FROM (
            SELECT po.j - dropped AS o, pn.j - dropped AS n,
                   coalesce(pn.rn, 4611686018427387904 + po.rn) AS rn
            FROM (SELECT x.j, x.rn,
                         ARRAY(SELECT x.j ->> k FROM unnest(pk) WITH ORDINALITY AS u(k, i)
                               ORDER BY u.i) AS key
                  FROM (SELECT to_jsonb(r.*) AS j, row_number() OVER () AS rn
                        FROM pgps_new AS r) AS x) AS pn
            FULL JOIN
                 (SELECT x.j, x.rn,
                         ARRAY(SELECT x.j ->> k FROM unnest(pk) WITH ORDINALITY AS u(k, i)
                               ORDER BY u.i) AS key
                  FROM (SELECT to_jsonb(r.*) AS j, row_number() OVER () AS rn
                        FROM pgps_old AS r) AS x) AS po
            ON cardinality(pk) > 0 AND pn.key = po.key
        ) AS p
        -- With a column filter, an update of other columns only is no change.
        WHERE NOT (filtered AND p.o IS NOT DISTINCT FROM p.n);
    END IF;
    IF ns IS NULL THEN
        RETURN NULL;  -- no rows
    END IF;
    IF TG_ARGV[0] = 'notify' THEN
        PERFORM @S@.change_notify(ch, op, sch, tbl, u.o, u.n, TG_RELID)
        FROM unnest(os, ns) WITH ORDINALITY AS u(o, n, i) ORDER BY u.i;
    ELSE
        PERFORM @S@.publish_many(ch, ARRAY(
            SELECT @S@.change_text(op, sch, tbl, u.o::json, u.n::json, xid, ts)
            FROM unnest(os, ns) WITH ORDINALITY AS u(o, n, i) ORDER BY u.i));
    END IF;
    RETURN NULL;
END $$;

-- The trigger name for one operation of a feed.
CREATE OR REPLACE FUNCTION @S@.change_trigger_name(op text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '@S@_changes_' || op $$;

-- The script that installs (or re-installs, replacing the options) a feed
-- on p_table, for a DBA to read or run; install_change_feed() runs it.
--   p_channel: durable channel or NOTIFY channel; default
--              'changes.<schema>.<table>' (must stay under 64 bytes)
--   p_notify:  plain NOTIFY instead of a durable channel
--   p_columns / p_exclude: column filter (NULL: all / none)
--   p_ops:     subset of {insert,update,delete,truncate} (NULL: all)
--   p_level:   'statement' (transition tables) or 'row'; UPDATE on a table
--              without a primary key is always row-level
CREATE OR REPLACE FUNCTION @S@.change_feed_sql(p_table regclass, p_channel text DEFAULT NULL,
                                               p_notify boolean DEFAULT false,
                                               p_columns text[] DEFAULT NULL,
                                               p_exclude text[] DEFAULT NULL,
                                               p_ops text[] DEFAULT NULL,
                                               p_level text DEFAULT 'statement') RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    sch  text;
    tbl  text;
    kind "char";
    ch   text;
    pk   text[];
    ops  text[] := coalesce(p_ops, ARRAY['insert', 'update', 'delete', 'truncate']);
    cols text[];
    incn int2[];
    excn int2[];
    bad  text;
    op   text;
    lvl  text;
    args text;
    sql  text := '';
BEGIN
    SELECT n.nspname, c.relname, c.relkind INTO sch, tbl, kind
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', p_table;
    END IF;
    IF p_level NOT IN ('statement', 'row') THEN
        RAISE EXCEPTION 'level must be statement or row, not %', p_level;
    END IF;
    ch := coalesce(p_channel, 'changes.' || sch || '.' || tbl);
    IF ch = '' OR octet_length(ch) > 63 THEN
        RAISE EXCEPTION 'channel name % must be 1 to 63 bytes; give one for table %', ch, p_table;
    END IF;
    SELECT bad_op INTO bad FROM unnest(ops) AS bad_op
    WHERE bad_op NOT IN ('insert', 'update', 'delete', 'truncate') LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown operation % (insert, update, delete, truncate)', bad;
    END IF;
    cols := ARRAY(SELECT a.attname::text FROM pg_attribute a
                  WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped);
    SELECT c INTO bad FROM unnest(coalesce(p_columns, '{}') || coalesce(p_exclude, '{}')) AS c
    WHERE c <> ALL (cols) LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'table % has no column %', p_table, bad;
    END IF;
    pk := @S@.change_pk(p_table);
    -- Columns by number (see the top of this file).
    incn := CASE WHEN p_columns IS NOT NULL THEN ARRAY(
                SELECT a.attnum FROM unnest(p_columns) WITH ORDINALITY AS c(name, ord)
                JOIN pg_attribute a ON a.attrelid = p_table AND a.attname = c.name
                     AND NOT a.attisdropped
                ORDER BY c.ord) END;
    excn := CASE WHEN p_exclude IS NOT NULL THEN ARRAY(
                SELECT a.attnum FROM unnest(p_exclude) WITH ORDINALITY AS c(name, ord)
                JOIN pg_attribute a ON a.attrelid = p_table AND a.attname = c.name
                     AND NOT a.attisdropped
                ORDER BY c.ord) END;
    args := format('%L, %L, %L, %L, %L, %L, %L, %L',
                   CASE WHEN p_notify THEN 'notify' ELSE 'durable' END, ch, sch, tbl,
                   coalesce(incn::text, ''), coalesce(excn::text, ''), p_table::oid::text,
                   coalesce(p_exclude::text, ''));
    sql := format(E'-- pg-pubsub change feed on %s -> %s %s\n',
                  p_table, CASE WHEN p_notify THEN 'NOTIFY' ELSE 'durable channel' END, ch);
    sql := sql || format(E'SELECT pg_advisory_xact_lock(%s);\n', @LOCK@);
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        sql := sql || format(E'DROP TRIGGER IF EXISTS %I ON %s;\n',
                             @S@.change_trigger_name(op), p_table);
    END LOOP;
    FOREACH op IN ARRAY ops LOOP
        lvl := p_level;
        IF op = 'truncate' OR (op = 'update' AND cardinality(pk) = 0) THEN
            lvl := CASE WHEN op = 'truncate' THEN 'statement' ELSE 'row' END;
        END IF;
        sql := sql || format(E'CREATE TRIGGER %I AFTER %s ON %s\n    %sFOR EACH %s EXECUTE FUNCTION @S@.%s(%s);\n',
            @S@.change_trigger_name(op), upper(op), p_table,
            CASE WHEN lvl = 'statement' AND op <> 'truncate'
                 THEN format('REFERENCING %s TABLE AS %s ',
                             CASE op WHEN 'insert' THEN 'NEW' WHEN 'delete' THEN 'OLD'
                                     ELSE 'OLD TABLE AS pgps_old NEW' END,
                             CASE op WHEN 'delete' THEN 'pgps_old' ELSE 'pgps_new' END)
                 ELSE '' END,
            upper(lvl), CASE WHEN lvl = 'statement' THEN 'change_stmt' ELSE 'change_row' END,
            args);
    END LOOP;
    sql := sql || format(E'INSERT INTO @S@.change_feeds (tbl, channel, target, level, ops, columns, exclude)\n'
                         '    VALUES (%L::regclass, %L, %L, %L, %L, %L, %L)\n'
                         '    ON CONFLICT (tbl) DO UPDATE SET channel = EXCLUDED.channel, target = EXCLUDED.target,\n'
                         '        level = EXCLUDED.level, ops = EXCLUDED.ops, columns = EXCLUDED.columns,\n'
                         '        exclude = EXCLUDED.exclude, installed_at = now();\n',
                         p_table::text, ch, CASE WHEN p_notify THEN 'notify' ELSE 'durable' END,
                         p_level, ops, incn, excn);
    RETURN sql;
END $$;

-- Installs a feed (runs change_feed_sql) and returns its channel.
-- SELECT @S@.install_change_feed('"Weird Schema"."Order Items"');
CREATE OR REPLACE FUNCTION @S@.install_change_feed(p_table regclass, p_channel text DEFAULT NULL,
                                                   p_notify boolean DEFAULT false,
                                                   p_columns text[] DEFAULT NULL,
                                                   p_exclude text[] DEFAULT NULL,
                                                   p_ops text[] DEFAULT NULL,
                                                   p_level text DEFAULT 'statement') RETURNS text
LANGUAGE plpgsql SET client_min_messages = warning AS $$
BEGIN
    EXECUTE @S@.change_feed_sql(p_table, p_channel, p_notify, p_columns, p_exclude, p_ops, p_level);
    RETURN (SELECT f.channel FROM @S@.change_feeds f WHERE f.tbl = p_table);
END $$;

-- The script that removes a feed's triggers and its change_feeds row.
CREATE OR REPLACE FUNCTION @S@.uninstall_change_feed_sql(p_table regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format(E'-- pg-pubsub: remove the change feed on %s\n', p_table)
        || string_agg(format(E'DROP TRIGGER IF EXISTS %I ON %s;\n',
                             @S@.change_trigger_name(op), p_table), '' ORDER BY ord)
        || format(E'DELETE FROM @S@.change_feeds WHERE tbl = %L::regclass;\n', p_table::text)
    FROM unnest(ARRAY['insert', 'update', 'delete', 'truncate']) WITH ORDINALITY AS o(op, ord)
$$;

-- Removes a feed; its durable channel and its messages stay.
CREATE OR REPLACE FUNCTION @S@.uninstall_change_feed(p_table regclass) RETURNS void
LANGUAGE plpgsql SET client_min_messages = warning AS $$
BEGIN
    EXECUTE @S@.uninstall_change_feed_sql(p_table);
END $$;

-- Attribute numbers of rel as the columns' current names, in the given
-- order; dropped columns left out. NULL stays NULL.
CREATE OR REPLACE FUNCTION @S@.change_feed_names(rel regclass, nums int2[]) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN nums IS NOT NULL THEN ARRAY(
        SELECT a.attname::text FROM unnest(nums) WITH ORDINALITY AS u(num, ord)
        JOIN pg_attribute a ON a.attrelid = rel AND a.attnum = u.num AND NOT a.attisdropped
        ORDER BY u.ord) END
$$;
