-- pg-pubsub schema migration 0002: queue control (cancel, pause, finished
-- job history). Compatible with level 1: it only adds a column with a
-- default and new tables; a level-1 build keeps claiming, completing
-- (its DELETE leaves no history) and failing jobs as before, and ignores
-- pauses and cancel requests.

-- Set by cancel() on a running job: its worker tells the handler, and the
-- job ends as cancelled (never retried) however the attempt ends.
ALTER TABLE @S@.jobs ADD COLUMN IF NOT EXISTS cancel_requested boolean NOT NULL DEFAULT false;

-- A row per paused queue: workers claim nothing from it (they learn of a
-- pause by a notification on <schema>_queue_ctl, and poll this table).
CREATE TABLE IF NOT EXISTS @S@.paused_queues (
    queue     text        PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- Jobs that ended (completed or cancelled), kept for a retention period
-- (workers delete older rows in batches). A separate table: the claim
-- index of jobs never holds finished work. Dead jobs stay in dead_jobs.
CREATE TABLE IF NOT EXISTS @S@.finished_jobs (
    id           bigint      PRIMARY KEY,
    queue        text        NOT NULL,
    state        text        NOT NULL,
    priority     smallint    NOT NULL,
    attempt      int         NOT NULL,
    max_attempts int         NOT NULL,
    unique_key   text,
    output       text,
    last_error   text,
    created_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    payload      text        NOT NULL
);

CREATE INDEX IF NOT EXISTS finished_jobs_queue_at ON @S@.finished_jobs (queue, finished_at);
