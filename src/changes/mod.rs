//! Change feeds: row changes of tables as typed [`ChangeEvent`]s.
//!
//! Two sources, one event type:
//! * the **trigger feed**: triggers on a table write each change into a
//!   durable channel (at-least-once, replayable) or send it over NOTIFY;
//! * the **WAL feed** (feature `wal`): logical decoding of the write-ahead
//!   log through a replication slot, in commit order, resumable from the
//!   last ack; it can also start with the rows that already exist, or read
//!   a table again while it runs (snapshots and backfill, in the `wal`
//!   module's docs: rows as [`Op::Read`] changes).
//!   Trigger feeds start from their install, with no snapshot.
//!
//! ## Trigger feed
//!
//! [`Changes::install_change_feed`] (or, from any SQL session,
//! `SELECT pgpubsub.install_change_feed('shop.orders')`) creates `AFTER`
//! triggers on the table that call generic functions of the schema
//! (`change_stmt`, `change_row`), parameterised by the
//! trigger's arguments: installing is only `CREATE TRIGGER`.
//! [`Changes::install_change_feed_sql`] returns the script for a DBA.
//!
//! * **Event**: exactly [`ChangeEvent`]'s JSON: `op`, `schema`, `table`
//!   (the table the feed was installed on, also for rows of its
//!   partitions), `old` (updates and deletes: the whole old row), `new`,
//!   `xid` (`pg_current_xact_id()`), `changed_at` (`clock_timestamp()`);
//!   `committed_at` is null (a trigger cannot know it). Rows are
//!   `to_json(row)` (`to_jsonb` with a column filter or over NOTIFY): see
//!   [Row shape](#row-shape). Column types are not in the events:
//!   [`Changes::columns`] reads them.
//! * **Order**: the durable channel's (see [`Changes::subscribe`]): per
//!   row, commit order by the positions' `(tick, seq)`.
//! * **Target**: a durable channel (default `changes.<schema>.<table>`):
//!   at least once, replayable, any size, in the writer's transaction (a
//!   rollback sends nothing). Or plain NOTIFY ([`FeedOptions::notify`]):
//!   at most once; an event of 8000 bytes or more is sent with `old`/`new`
//!   reduced to the primary key and `"key_only": true`, and when even that
//!   does not fit (a long key, JSON escapes of control characters, an
//!   update carrying the key twice) without rows and with
//!   `"rows_omitted": true`. A feed never fails the writer's statement for
//!   size; [`ChangeEvent::must_reread`] says the row must be read from the
//!   table.
//! * **Triggers**: statement-level with transition tables by default (one
//!   `publish_many` per statement), or row-level ([`TriggerLevel`]).
//!   `UPDATE`'s transition tables do not link a row's old and new
//!   versions, so they are paired on the primary key; on a table without
//!   one the `UPDATE` trigger is row-level. `TRUNCATE` is always a
//!   statement trigger (one event, no rows). Partitioned tables: the
//!   parent's statement triggers see the rows of every partition
//!   (transition tables are allowed on the partitioned root, not on a
//!   partition); row triggers on the parent are cloned onto partitions.
//! * **Column filter**: [`FeedOptions::columns`] / [`FeedOptions::exclude`];
//!   an update that changes no kept column sends nothing. Column lists
//!   (`UPDATE OF a, b`) are not used: PostgreSQL refuses them on triggers
//!   with transition tables.
//! * **Schema changes** need no reinstall and are never blocked (no event
//!   trigger). The triggers hold the filter's columns by attribute number
//!   and read their current names from `pg_attribute` once per statement
//!   (per row for row-level triggers, only with a filter), and the primary
//!   key from `pg_index` once per `UPDATE` statement; so a renamed kept
//!   column is still sent (under its new name), a renamed excluded column
//!   stays out, and a renamed key still pairs updates. A **dropped** kept
//!   column is gone from the filter: the other kept columns are still sent
//!   (all of them dropped: `{}` rows), and a column added later under its
//!   name is a new column, not sent (reinstall to keep it). Excluded
//!   columns are also left out by their names at install, so one dropped
//!   and added again (a type change done that way) never leaks. A
//!   dropped primary key makes a statement's
//!   updates arrive unpaired (only `new`, then only `old`). A **restored
//!   dump** gives tables new oids and attribute numbers: a filtered feed's
//!   trigger whose numbers belong to another table sends events without rows
//!   (`rows_omitted`) and raises a `WARNING`, never leaking a column;
//!   reinstall feeds after a restore. Events name the table as it was
//!   at install: reinstall after renaming the table itself.
//!
//! **Privileges.** The triggers run as the role that writes to the table,
//! which therefore needs what a publish-only role needs
//! ([`schema_sql`](crate::schema::schema_sql) lists it) plus `EXECUTE` on
//! the `change_*` functions; installing needs ownership of the table
//! (`CREATE TRIGGER`) and `INSERT`/`UPDATE` on `change_feeds`. A dropped
//! table loses its triggers with it; its `change_feeds` row stays until
//! `uninstall_change_feed` or a `DELETE`.
//!
//! ## Row shape
//!
//! Both feeds give a row as the JSON object PostgreSQL's `to_json(row)`
//! makes of it (the WAL feed turns pgoutput's text values into that same
//! JSON by the column's type), so one serde type reads a table's rows
//! from either feed:
//!
//! | column type | JSON |
//! | --- | --- |
//! | `boolean` | `true` / `false` |
//! | `smallint`, `integer`, `bigint`, `real`, `double precision`, `numeric` | number (`12.30`, as PostgreSQL prints it); `NaN`, `Infinity`, `-Infinity` are strings |
//! | `json`, `jsonb` | the JSON itself |
//! | `timestamp with time zone` | `"2026-11-22T03:48:36.5+00:00"` (RFC 3339; the offset of the session's `TimeZone`, see below) |
//! | `timestamp` | `"2026-11-22T03:48:36.5"` |
//! | `date` | `"2026-11-22"` |
//! | arrays of any type, any dimensions | JSON arrays (nested), elements by their type; explicit bounds (`[0:2]=`) are dropped |
//! | composite types | objects of their fields, each by its type |
//! | domains | as their base type (a domain over `numeric` is a number) |
//! | enums, ranges, multiranges, `time`, `timetz`, `interval`, `uuid`, `text`, `oid`, `money`, `inet`, everything else | string: the type's text output |
//! | `bytea` | string `"\\x00ff"` (the `bytea_output` hex form) |
//! | `NULL` | `null` |
//!
//! **`numeric` is a JSON number**, with every digit PostgreSQL prints. It is
//! what `to_json` gives, so the trigger feed's SQL (and any non-Rust reader
//! of its channels) is unchanged. In Rust, `serde_json` reads numbers as
//! `f64` (about 15 significant digits) unless the application turns on
//! `serde_json`'s `arbitrary_precision` feature: then both feeds keep every
//! digit, and a decimal type (e.g. `rust_decimal` with its
//! `serde-arbitrary-precision` feature) reads the column exactly.
//!
//! What still differs, per field:
//!
//! | field | trigger feed | WAL feed |
//! | --- | --- | --- |
//! | `old` | the whole old row | with `REPLICA IDENTITY DEFAULT` (or `USING INDEX`): deletes carry the key columns only, updates only when the key changed (else `None`); with `FULL`, the whole old row, as the trigger feed (`ALTER TABLE t REPLICA IDENTITY FULL`) |
//! | unchanged TOASTed columns | in the row | left out of `new` (make such fields `#[serde(default)]`) |
//! | `timestamptz` offset | the writing session's `TimeZone` | the server's default `TimeZone` (the same instant either way) |
//! | column filters | [`FeedOptions::columns`] / `exclude` | the publication's column list (PostgreSQL 15+) |
//! | `xid` | 64-bit `xid8` | 32-bit xid |
//! | `changed_at` / `committed_at` | `changed_at` | `committed_at` |
//! | `columns` (name, type, oid, key) | not in events: [`Changes::columns`] | in every event (from the Relation message) |
//! | a type with a cast to `json` (e.g. `hstore`) | the cast's JSON | the text output |
//!
//! ## Consuming
//!
//! [`Changes::subscribe`] reads the durable channel as a consumer group
//! (`durable().subscribe::<ChangeEvent<Row>>(channel, group)` is the same);
//! [`Changes::listen`] reads a NOTIFY feed. The CLI: `pg-pubsub changes
//! tail --table T --durable GROUP`.

mod event;
mod options;
mod store;
mod trigger;

pub use event::{ChangeEvent, Column, Lsn, Op};
pub use options::{FeedInfo, FeedOptions, TriggerLevel};
pub use trigger::Changes;

#[cfg(feature = "wal")]
#[cfg_attr(docsrs, doc(cfg(feature = "wal")))]
pub mod wal;
