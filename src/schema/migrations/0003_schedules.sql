-- Periodic jobs (pg_pubsub::cron): one row per schedule. Compatible with
-- level 1: a new table only, which older builds never read.
--
-- A scheduler fires a due schedule and moves next_at past now in one
-- transaction with the enqueue or publish, holding the row (FOR UPDATE
-- SKIP LOCKED), so each slot fires once however many schedulers run or die.
CREATE TABLE IF NOT EXISTS @S@.schedules (
    name          text        PRIMARY KEY,
    -- 'cron' (expr) or 'every' (every_us, counted from the Unix epoch).
    kind          text        NOT NULL,
    expr          text,
    every_us      bigint,
    time_zone     text        NOT NULL DEFAULT 'UTC',
    -- 'skip', 'once' or 'all': what to fire for slots missed while no
    -- scheduler ran.
    catch_up      text        NOT NULL DEFAULT 'skip',
    -- 'queue' (a job on the queue `target`) or 'channel' (a durable
    -- channel message).
    target_kind   text        NOT NULL,
    target        text        NOT NULL,
    payload       text        NOT NULL,
    paused        boolean     NOT NULL DEFAULT false,
    -- The earliest slot not fired yet; NULL when the rule never fires again
    -- (or this build could not read it: see last_error).
    next_at       timestamptz,
    last_slot     timestamptz,
    last_fired_at timestamptz,
    fired         bigint      NOT NULL DEFAULT 0,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS schedules_due ON @S@.schedules (next_at) WHERE NOT paused;
