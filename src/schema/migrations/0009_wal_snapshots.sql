-- WAL feed snapshots and backfills (issue 22): a row per request to read
-- the rows of a table (all, or those matching `filter`) into a WAL feed,
-- merged with its stream. The feed works through its slot's requests in
-- order, a chunk of rows at a time by primary key, and records here how
-- far its consumer got, so a restart resumes at the unfinished chunk.
-- Compatible with level 1: a new table, which older builds do not read.
CREATE TABLE IF NOT EXISTS @S@.wal_snapshots (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot_name    text        NOT NULL,
    -- The table as regclass printed it when requested.
    tbl          text        NOT NULL,
    -- A SQL condition on the table's rows (backfill), or NULL: all rows.
    filter       text,
    -- Requested by WalFeedBuilder::snapshot (the feed's initial snapshot).
    initial      boolean     NOT NULL DEFAULT false,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    -- Why the request was given up (the table lost its primary key, ...).
    error        text,
    -- The highest primary key (each column's text) when the request was
    -- first served: rows above it were inserted since, and the stream
    -- carries them. NULL until then.
    end_key      text[],
    -- The primary key (each column's text) of the last row of the last
    -- chunk the consumer acked: the next chunk starts after it.
    done_key     text[],
    -- The chunk in flight: its last key and the LSN of its watermark.
    pending_key  text[],
    pending_lsn  pg_lsn,
    rows_read    bigint      NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS wal_snapshots_open
    ON @S@.wal_snapshots (slot_name, id) WHERE finished_at IS NULL;
