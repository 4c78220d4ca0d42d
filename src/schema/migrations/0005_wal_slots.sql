-- WAL feed slots (issue 21): a row per logical slot a WAL feed created or
-- used, so that a feed finding its slot missing (a failover to a server
-- without it: slots are not replicated before PostgreSQL 17, and only
-- failover slots from 17 on) or invalidated (max_slot_wal_keep_size) fails
-- loudly instead of creating a new slot that starts from now. A row in the
-- feed's schema survives a failover as any other row does. Compatible with
-- level 1: a new table, which older builds do not read.
CREATE TABLE IF NOT EXISTS @S@.wal_slots (
    slot_name   text        PRIMARY KEY,
    publication text        NOT NULL,
    -- Created with failover = true (PostgreSQL 17+).
    failover    boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
