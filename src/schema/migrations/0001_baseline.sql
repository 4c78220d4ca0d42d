-- pg-pubsub schema migration 0001: the baseline (tables, indexes, data).
-- Functions are not here: they live in ../functions/*.sql, re-applied when
-- their content changes. Applied once, in one transaction, by the installer
-- (src/schema/install.rs), which holds the install lock and records this
-- migration with its checksum. Never edit this file once released: add a
-- new numbered migration instead.

CREATE SCHEMA IF NOT EXISTS @S@;

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
-- between its tick N-1 (or nothing) and tick N. snap_xmax grows with tick_id;
-- its index finds the tick a message's xid became visible in (retain()
-- counts what each group lost with it).
CREATE TABLE IF NOT EXISTS @S@.ticks (
    channel    text        NOT NULL,
    tick_id    bigint      NOT NULL,
    snap       pg_snapshot NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    snap_xmax  xid8        NOT NULL GENERATED ALWAYS AS (pg_snapshot_xmax(snap)) STORED,
    PRIMARY KEY (channel, tick_id)
);

CREATE INDEX IF NOT EXISTS ticks_channel_xmax ON @S@.ticks (channel, snap_xmax, tick_id);

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

-- The hot table: only jobs waiting (ready, possibly scheduled later) or
-- running. Completed jobs are deleted; dead ones move to dead_jobs. So the
-- claim index only ever holds live work, however many jobs went through.
-- fillfactor leaves room for HOT updates (claim, lease, retry).
-- No CHECK constraints: PostgreSQL re-plans them in every statement that
-- writes the table, a fifth of a one-job INSERT. `state` is written only by
-- this schema's functions and the crate's statements; max_attempts is
-- checked where jobs are made (check_max_attempts, and the crate).
CREATE TABLE IF NOT EXISTS @S@.jobs (
    id           bigserial   PRIMARY KEY,
    queue        text        NOT NULL,
    state        text        NOT NULL DEFAULT 'ready',
    priority     smallint    NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    attempt      int         NOT NULL DEFAULT 0,
    max_attempts int         NOT NULL DEFAULT 25,
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

-- One row per installed feed; change_feed_sql() keeps it up to date.
-- columns / exclude: attribute numbers (NULL: all / none), so the row
-- follows column renames like the triggers do.
CREATE TABLE IF NOT EXISTS @S@.change_feeds (
    tbl          regclass    PRIMARY KEY,
    channel      text        NOT NULL,
    target       text        NOT NULL CHECK (target IN ('durable', 'notify')),
    level        text        NOT NULL CHECK (level IN ('statement', 'row')),
    ops          text[]      NOT NULL,
    columns      int2[],
    exclude      int2[],
    installed_at timestamptz NOT NULL DEFAULT now()
);
