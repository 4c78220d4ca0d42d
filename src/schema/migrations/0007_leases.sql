-- Leases (issue 21): elections that work behind a pooler in transaction
-- mode, where no session is ours to hold an advisory lock on. A lease is
-- a row: its holder keeps it by renewing expires_at; anyone takes it once
-- it has expired (the server's clock decides, in one statement). term
-- grows on every change of holder, so a holder that lost the lease and
-- won it back knows. Releasing sets expires_at to -infinity (the row and
-- its term stay). Durable consumer groups behind transaction pooling use
-- one each, named by their election channel. Compatible with level 1: a
-- new table, which older builds do not read.
CREATE TABLE IF NOT EXISTS @S@.leases (
    name        text        PRIMARY KEY,
    holder      text        NOT NULL,
    term        bigint      NOT NULL DEFAULT 1,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now()
);
