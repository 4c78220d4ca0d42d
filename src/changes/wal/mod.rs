//! The WAL change feed (feature `wal`): row changes and logical messages
//! from a logical replication slot, in commit order, resumable from the last
//! ack.
//!
//! Rows arrive as JSON (`serde_json::Value`, the default, in the trigger
//! feed's shape) and are decoded per table, since each table has its own
//! type, and per operation: with `REPLICA IDENTITY DEFAULT` a `DELETE`'s
//! `old` row holds only the key columns. An item the consumer does not handle is still acked with its
//! transaction's commit (acks are cumulative), so it is reported, never
//! passed silently.
//!
//! ```no_run
//! # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
//! use futures::StreamExt;
//! use pg_pubsub::changes::wal::WalItem;
//! use pg_pubsub::changes::{ChangeEvent, Op};
//! use serde::Deserialize;
//! use serde_json::Value;
//!
//! #[derive(Debug, Deserialize)]
//! struct Order { id: i64, status: String }
//! #[derive(Debug, Deserialize)]
//! struct Line { order_id: i64, sku: String, qty: i32 }
//! // What a DELETE's `old` holds: the primary key.
//! #[derive(Debug, Deserialize)]
//! struct OrderKey { id: i64 }
//! #[derive(Debug, Deserialize)]
//! struct LineKey { order_id: i64, sku: String }
//!
//! fn apply(event: &ChangeEvent) -> serde_json::Result<()> {
//!     let row = |r: &Option<Value>| r.clone().unwrap_or(Value::Null);
//!     match (event.table.as_str(), event.op) {
//!         ("orders", Op::Insert | Op::Update | Op::Read) => println!("upsert {:?}", Order::deserialize(row(&event.new))?),
//!         ("orders", Op::Delete) => println!("delete {:?}", OrderKey::deserialize(row(&event.old))?),
//!         ("lines", Op::Insert | Op::Update | Op::Read) => println!("upsert {:?}", Line::deserialize(row(&event.new))?),
//!         ("lines", Op::Delete) => println!("delete {:?}", LineKey::deserialize(row(&event.old))?),
//!         (table, Op::Truncate) => println!("truncate {table}"),
//!         (table, op) => eprintln!("{op} on {table}: not handled"),
//!     }
//!     Ok(())
//! }
//!
//! let mut feed = pubsub
//!     .wal_feed("orders_feed")
//!     .publication("orders_pub")
//!     .tables(&["public.orders", "public.lines"])
//!     .messages("outbox.")
//!     .start::<Value>()
//!     .await?;
//! while let Some(item) = feed.next().await {
//!     match &item {
//!         WalItem::Change { event, lsn } => {
//!             if let Err(e) = apply(event) {
//!                 eprintln!("change at {lsn} on {} not applied: {e}", event.table);
//!             }
//!         }
//!         WalItem::Message(m) => println!("{} {} bytes", m.prefix, m.payload.len()),
//!         WalItem::Undecodable { lsn, error, .. } => eprintln!("unreadable change at {lsn}: {error}"),
//!         WalItem::Error(e) => eprintln!("stream lost, resuming from the last ack: {e}"),
//!         _ => {} // Begin, Commit
//!     }
//!     // Cumulative: everything up to this position is done.
//!     if let Some(lsn) = item.ack_lsn() {
//!         feed.ack(lsn);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Delivery
//!
//! At least once, in commit order. Each transaction arrives as
//! [`WalItem::Begin`], its changes and transactional messages, then
//! [`WalItem::Commit`]. The slot's confirmed position moves only on
//! [`WalFeed::ack`] (cumulative: acking a commit's `end_lsn` confirms it
//! and everything before). Acks are sent to the server in batches (every
//! [`ack_interval`](WalFeedBuilder::ack_interval)), and on
//! [`WalFeed::close`]. After a crash, a restart, or a reconnect, the feed
//! streams again from the last ack the server has: transactions after it
//! come again (**duplicates are possible**; dedupe on the commit LSN).
//!
//! A heartbeat (a non-transactional `pg_logical_emit_message` under the
//! prefix `pg-pubsub.heartbeat`, every
//! [`heartbeat`](WalFeedBuilder::heartbeat) interval) lets a feed whose
//! tables are idle, or whose changes are filtered out, confirm past WAL it
//! does not need: when the consumer has acked everything it was given, the
//! feed acks the heartbeat itself. Slot lag (bytes of WAL held:
//! `pg_current_wal_lsn() - confirmed_flush_lsn`) is in [`WalFeed::stats`]
//! and, above [`lag_warning`](WalFeedBuilder::lag_warning), a
//! [`WalEvent::Lag`].
//!
//! # Snapshots and backfill
//!
//! A feed can deliver the rows that already exist, not only the changes
//! from now on: [`WalFeedBuilder::snapshot`] reads every row of the
//! feed's tables once per slot (the initial snapshot), and
//! [`WalFeed::backfill`] (or [`PgPubSub::wal_backfill`] from any process,
//! or `pg-pubsub changes backfill`) reads a table's rows, or those
//! matching a SQL condition, while the feed runs: for a new consumer, or
//! after a lost slot was recreated. Rows arrive as changes with
//! [`Op::Read`](crate::changes::Op::Read) (`new` set; apply as an upsert),
//! in chunks: each chunk is one transaction of xid 0 ([`WalItem::Begin`],
//! its reads, [`WalItem::Commit`] to ack as any other), between the
//! stream's transactions.
//!
//! How (DBLog's watermarks, as Debezium's incremental snapshots): the
//! feed reads a chunk of rows in primary-key order (keyset, `LIMIT`
//! [`snapshot_chunk_rows`](WalFeedBuilder::snapshot_chunk_rows)) in a
//! short `REPEATABLE READ` transaction, and writes a watermark into the
//! WAL (`pg_logical_emit_message`) after the chunk's snapshot was taken.
//! When the stream reaches the watermark, every transaction the chunk's
//! snapshot saw has been streamed; the chunk's rows are handed over there,
//! except those whose key a streamed transaction changed since the
//! previous chunk or that the chunk's snapshot did not see: for those
//! the stream's version wins (it went out already; later changes come
//! after the chunk). So a table of any size is read without one long
//! transaction (vacuum is held back for one chunk at a time), without
//! locks (writers are never blocked), and with nothing missed or doubled
//! between the reads and the changes. Before its first chunk, and after
//! each loss of the stream, a snapshot waits for the transactions running
//! then to end, as creating a slot does (a commit is in the WAL before
//! other sessions see it).
//!
//! Progress is recorded in `<schema>.wal_snapshots` (a row per request,
//! served in order): the feed reads the next chunk only once the
//! consumer acked the previous one ([`WalFeed::ack`] of its commit), and
//! records that ack first. So at most one chunk is in flight, and:
//!
//! * **Within a completed snapshot, each row is read at most once**, and
//!   a row that existed when the request started and was not changed
//!   while it ran is read exactly once. A row changed meanwhile may have
//!   no read: its change event carries it (so `new` must hold the whole
//!   row: an unchanged TOASTed column is left out of an update's `new`,
//!   see below). Rows inserted after the request started (above the
//!   highest key it saw then) come only as changes.
//! * **After a crash** (or a lost stream) the snapshot resumes after the
//!   last chunk recorded as acked: the chunk in flight is read again, from
//!   the table as it is then, under a new watermark. A consumer that had
//!   processed it sees those rows twice (at least once, like the stream's
//!   changes after the last confirmed position): at most one chunk, and
//!   only if the crash came after the consumer took it and before its ack
//!   was recorded. [`WalFeed::close`] records the last ack: a clean
//!   restart reads nothing twice.
//! * A completed snapshot is never read again; a feed started again with
//!   [`snapshot(true)`](WalFeedBuilder::snapshot) on the same slot does
//!   not repeat it.
//!
//! Requirements: a primary key on every table read, and `REPLICA
//! IDENTITY` `DEFAULT` or `FULL` (deletes must carry the key); otherwise
//! [`ErrorKind::Config`](crate::ErrorKind::Config) naming the table. The
//! publication's column list and row filter (PostgreSQL 15+) apply to the
//! reads too. Read rows are PostgreSQL's `to_json` of the published
//! columns, read on a pooled connection (its `TimeZone`): the shape of the
//! stream's rows; a read's [`columns`](crate::changes::ChangeEvent::columns)
//! is `None`. Progress is reported as [`WalEvent::Snapshot`];
//! [`WalFeed::snapshots`] lists the requests.
//!
//! # Values
//!
//! pgoutput sends each column as its text output; `new` and `old` are the
//! JSON objects `to_json(row)` would give (the trigger feed's shape: see
//! [Row shape](crate::changes#row-shape)), built by the column's type read
//! from the catalog when the table's Relation message arrives: numbers
//! (`numeric` too) as JSON numbers, timestamps in `to_json`'s RFC 3339 form,
//! arrays nested, composite types as objects, domains as their base type,
//! enums and ranges as strings. Each event carries the table's
//! [`columns`](ChangeEvent::columns) (name, type name, type oid, part of the
//! replica identity). The stream's session uses `DateStyle=ISO`.
//!
//! An **unchanged TOASTed column** in an update (a large value the update
//! did not touch) is not sent by the server: it is **left out** of `new`
//! (make that field `#[serde(default)]` or `Option`).
//!
//! `old`, by the table's `REPLICA IDENTITY`:
//! * `DEFAULT` (primary key): deletes carry the key columns only; updates
//!   carry them only when the key changed, else `old` is `None`;
//! * `FULL`: deletes and updates carry the whole old row (TOASTed columns
//!   included);
//! * `USING INDEX`: like `DEFAULT`, with the index's columns;
//! * `NOTHING`: `old` is always `None` (and PostgreSQL refuses updates and
//!   deletes on a published table without an identity).
//!
//! Truncates arrive as one [`Op::Truncate`](crate::changes::Op) change per
//! table, `old` and `new` both `None`. `xid` is the 32-bit transaction id of
//! the Begin message, `committed_at` the commit time; `changed_at` is `None`
//! (pgoutput does not send it).
//!
//! # Requirements
//!
//! `wal_level = logical`, a role with `REPLICATION` (and rights to create
//! the publication, or an existing one), `max_replication_slots` and
//! `max_wal_senders` with room for one more. Both problems are reported as
//! errors at [`Stage::Wal`] naming the fix. A slot that is
//! no longer used must be dropped ([`PgPubSub::drop_slot`]) or it keeps WAL
//! forever.
//!
//! # TLS
//!
//! The replication connection follows the handle's `sslmode` (feature
//! `tls`): `prefer` tries TLS and falls back to plain text, `require`,
//! `verify-ca` and `verify-full` need it, with the same rustls set-up
//! (`ring`) and certificate checks as the pool, or the one given with
//! [`Builder::tls_config`](crate::Builder::tls_config). A connector given
//! with [`Builder::tls`](crate::Builder::tls) cannot open it: a feed that
//! needs TLS is then refused with [`ErrorKind::Config`](crate::ErrorKind::Config)
//! before anything is created. Over a Unix socket there is no TLS (as with
//! libpq). A failed handshake or certificate check is
//! [`ErrorKind::Tls`](crate::ErrorKind::Tls).

// The replication connection (for maintainers)
//
// tokio-postgres 0.7 has no replication protocol (CopyBoth). The feed used
// `pgwire-replication` until its lack of TLS without aws-lc-rs (its
// `tls-rustls` feature pulls rustls' default provider: C and cmake) and
// its per-message hand-over (a worker task, then a channel item per
// pgoutput message, then ours) got in the way. `conn.rs` is the crate's
// own client, ~400 lines on what the tree already has: tokio-postgres'
// `postgres-protocol` for the frontend messages, MD5 and SCRAM-SHA-256
// (no channel binding: "n", which a server accepts whatever it offers),
// tokio-postgres-rustls over the handle's rustls config for TLS (the
// SSLRequest is sent by hand). The stream task reads frames in place from
// one buffer, decodes Begin/Commit/Message itself (`decode.rs`) and hands
// items to the feed in batches; status updates carry the acked position
// every ack interval, on request (keepalive), and while the consumer is
// slow (so `wal_sender_timeout` never fires on a slow consumer).
//
// Weighed and not taken: `pg_walstream` (its connection needs libpq or
// aws-lc-rs), and SQL functions (`pg_logical_slot_peek_binary_changes`:
// polling, and every call decodes again from the slot's restart point).

mod conn;
mod decode;
mod slot;
mod snapshot;
mod stream;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::changes::{ChangeEvent, Lsn};
use crate::error::{Error, Origin, Result, Stage};
pub use crate::event::WalEvent;
use crate::exec::Exec;
use crate::PgPubSub;

/// One item of a [`WalFeed`].
#[derive(Debug)]
#[non_exhaustive]
pub enum WalItem<T = serde_json::Value> {
    /// A transaction starts (sent once it has a change or message for this
    /// feed: transactions with nothing for it are not delivered at all).
    Begin {
        /// Its transaction id (32 bits, as pgoutput sends it).
        xid: u32,
        /// The LSN of its commit record.
        final_lsn: Lsn,
        /// When it committed.
        commit_time: SystemTime,
    },
    /// A row change of the current transaction.
    Change {
        /// Where the change is in the WAL.
        lsn: Lsn,
        /// The change, its rows decoded into `T`.
        event: ChangeEvent<T>,
    },
    /// A `pg_logical_emit_message` under the feed's
    /// [`messages`](WalFeedBuilder::messages) prefix.
    Message(WalMessage),
    /// The current transaction committed.
    Commit {
        /// Its transaction id.
        xid: u32,
        /// The LSN of the commit record.
        lsn: Lsn,
        /// The end of the commit record: what to [`ack`](WalFeed::ack).
        end_lsn: Lsn,
        /// When it committed.
        commit_time: SystemTime,
    },
    /// A change whose rows do not decode into `T` (or a pgoutput message
    /// this crate cannot read). The stream goes on; ack past it to skip it.
    Undecodable {
        /// Where it is in the WAL.
        lsn: Lsn,
        /// Why.
        error: Error,
        /// The change with JSON rows, when it got that far.
        raw: Option<ChangeEvent<serde_json::Value>>,
    },
    /// The replication stream was lost; the feed reconnects (forever, with
    /// the backoff) and streams again from the last ack.
    Error(Error),
}

impl<T> WalItem<T> {
    /// The position to [`ack`](WalFeed::ack) once this item (and all before
    /// it) is processed: a commit's `end_lsn`, a non-transactional message's
    /// LSN; `None` inside a transaction (ack its commit).
    pub fn ack_lsn(&self) -> Option<Lsn> {
        match self {
            WalItem::Commit { end_lsn, .. } => Some(*end_lsn),
            WalItem::Message(m) if !m.transactional => Some(m.lsn),
            _ => None,
        }
    }
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalMessage {
    /// Its prefix.
    pub prefix: String,
    /// Its content.
    pub payload: bytes::Bytes,
    /// Where it is in the WAL.
    pub lsn: Lsn,
    /// Emitted in a transaction (delivered between its Begin and Commit,
    /// only if it committed) or not (delivered at once).
    pub transactional: bool,
}

/// Slot figures from [`WalFeed::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalStats {
    /// The slot.
    pub slot: String,
    /// The slot's `confirmed_flush_lsn` (what the server has of the acks).
    pub confirmed_lsn: Lsn,
    /// Bytes of WAL the slot holds: `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub lag_bytes: u64,
    /// The highest position acked on this feed (may be ahead of `confirmed_lsn`
    /// until the next status update).
    pub acked_lsn: Lsn,
}

/// Configures a [`WalFeed`]; from [`PgPubSub::wal_feed`].
#[must_use = "a builder does nothing until .start() is awaited"]
#[derive(Clone)]
pub struct WalFeedBuilder {
    pubsub: PgPubSub,
    slot: String,
    publication: Option<String>,
    /// `None`: all tables; `Some(empty)`: none (messages only).
    tables: Option<Vec<String>>,
    messages: Option<String>,
    heartbeat: Option<Duration>,
    lag_warning: Option<u64>,
    ack_interval: Duration,
    capacity: usize,
    standby: bool,
    schema: crate::schema::SchemaName,
    recreate_lost_slot: bool,
    snapshot: bool,
    snapshot_chunk_rows: usize,
}

impl PgPubSub {
    /// A WAL change feed reading the logical replication slot `slot`
    /// (created with `pgoutput` if missing). See [`changes::wal`](crate::changes::wal).
    pub fn wal_feed(&self, slot: &str) -> WalFeedBuilder {
        WalFeedBuilder {
            pubsub: self.clone(),
            slot: slot.to_owned(),
            publication: None,
            tables: None,
            messages: None,
            heartbeat: Some(Duration::from_secs(10)),
            lag_warning: None,
            ack_interval: Duration::from_secs(1),
            capacity: 8192,
            standby: false,
            schema: crate::schema::SchemaName::default(),
            recreate_lost_slot: false,
            snapshot: false,
            snapshot_chunk_rows: 4096,
        }
    }
}

impl WalFeedBuilder {
    /// The publication to stream (created if missing, `FOR TABLE` the
    /// [`tables`](Self::tables) or `FOR ALL TABLES`; an existing one is used
    /// as it is). Default: the slot's name.
    pub fn publication(mut self, name: &str) -> Self {
        self.publication = Some(name.to_owned());
        self
    }

    /// The tables of a new publication: `table`, `schema.table`, or quoted
    /// parts (`"Sales"."Order"`); unquoted names are quoted as given, so case
    /// is kept. An empty list makes a publication without tables (a feed of
    /// logical messages only, like an outbox relay). Not called: all tables.
    pub fn tables(mut self, tables: &[&str]) -> Self {
        self.tables = Some(tables.iter().map(|t| (*t).to_owned()).collect());
        self
    }

    /// Deliver logical messages whose prefix starts with `prefix` (`""`: all
    /// but the feed's heartbeats). Default: none.
    pub fn messages(mut self, prefix: &str) -> Self {
        self.messages = Some(prefix.to_owned());
        self
    }

    /// How often to emit a heartbeat and check the slot's lag; `None` turns
    /// both off. Default 10 s.
    pub fn heartbeat(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Report [`WalEvent::Lag`]
    /// when the slot holds more than `bytes` of WAL (checked at each
    /// heartbeat). Default: off.
    pub fn lag_warning(mut self, bytes: u64) -> Self {
        self.lag_warning = Some(bytes);
        self
    }

    /// How often the acked position is reported to the server (a standby
    /// status update each interval, also while idle or while the consumer
    /// is slow). Default 1 s.
    pub fn ack_interval(mut self, interval: Duration) -> Self {
        self.ack_interval = interval;
        self
    }

    /// When another process streams from the slot (the server allows one
    /// stream per slot), wait for it to go away, retrying with the backoff,
    /// instead of failing: run the same feed in several processes and the
    /// server elects one. Default: fail.
    pub fn standby(mut self, standby: bool) -> Self {
        self.standby = standby;
        self
    }

    /// The schema whose `wal_slots` table records the feed's slot
    /// (installed or migrated on start, as any capability's). Default: `pgpubsub`.
    ///
    /// The record is what makes a lost slot an error: a feed whose recorded
    /// slot is missing (after a failover to a server without it) or
    /// invalidated fails with [`ErrorKind::SlotLost`](crate::ErrorKind::SlotLost)
    /// instead of silently creating a new slot that starts from now.
    pub fn schema(mut self, schema: crate::schema::SchemaName) -> Self {
        self.schema = schema;
        self
    }

    /// Accept the loss of a recorded slot that is missing or invalidated:
    /// drop it if invalid, create a new one starting from now, and go on
    /// (logged as a warning). The changes between the last ack and now are
    /// not delivered. Default: `false`, fail with
    /// [`ErrorKind::SlotLost`](crate::ErrorKind::SlotLost).
    pub fn recreate_lost_slot(mut self, recreate: bool) -> Self {
        self.recreate_lost_slot = recreate;
        self
    }

    /// Start with every existing row of the feed's tables: an initial
    /// snapshot, delivered as [`Op::Read`](crate::changes::Op::Read)
    /// changes merged with the stream (see [Snapshots and
    /// backfill](self#snapshots-and-backfill)). Requested once per slot:
    /// when the slot is created, or on the first start with this option
    /// of a slot that never had one; a restart resumes an unfinished one.
    /// Every table must have a primary key ([`ErrorKind::Config`](crate::ErrorKind::Config)
    /// otherwise, naming it). Default: `false`.
    pub fn snapshot(mut self, snapshot: bool) -> Self {
        self.snapshot = snapshot;
        self
    }

    /// Rows per chunk of a snapshot or backfill: one short `REPEATABLE
    /// READ` transaction each, held in memory until the consumer acks
    /// it. Default 4096.
    pub fn snapshot_chunk_rows(mut self, rows: usize) -> Self {
        self.snapshot_chunk_rows = rows.max(1);
        self
    }

    /// The slot's name.
    pub fn slot_name(&self) -> &str {
        &self.slot
    }

    /// Items buffered ahead of the consumer, about (they are handed over in
    /// batches of up to 256). Default 8192.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Creates or reuses the publication and the slot, starts streaming
    /// from the slot's confirmed position, and returns the feed. Fails
    /// (without retrying) when the server refuses: `wal_level`,
    /// `REPLICATION`, no free slot or WAL sender.
    pub async fn start<T: DeserializeOwned>(self) -> Result<WalFeed<T>> {
        let publication = self
            .publication
            .clone()
            .unwrap_or_else(|| self.slot.clone());
        let exec = self.pubsub.exec().clone();
        // A `sslmode` the feed cannot honour is refused before anything is made.
        let settings = stream::replication_settings(&self.pubsub, &self.slot, &publication)?;
        slot::ensure_publication(&exec, &publication, self.tables.as_deref()).await?;
        let installed = tokio::sync::OnceCell::new();
        crate::schema::ensure(&self.pubsub, &self.schema, &installed).await?;
        // Checked before a slot is created for a feed that cannot start.
        let initial = match self.snapshot {
            true => Some(snapshot::initial_tables(&exec, &publication).await?),
            false => None,
        };
        let created = slot::prepare_slot(
            &exec,
            &self.schema,
            &self.slot,
            &publication,
            self.recreate_lost_slot,
        )
        .await?;
        if created {
            // A new slot: requests left by an old one of its name are void.
            snapshot::forget(&exec, &self.schema, &self.slot).await?;
        }
        if let Some(tables) = &initial {
            snapshot::request_initial(&exec, &self.schema, &self.slot, tables).await?;
        }
        let events = self.pubsub.inner.buses.wal.clone();
        let shared = Arc::new(Shared {
            acked: AtomicU64::new(0),
            ack_watch: watch::Sender::new(0),
        });
        let link = Arc::new(snapshot::Link::new(&self.slot));
        let stop_tx = Arc::new(watch::Sender::new(false));
        let stop_rx = stop_tx.subscribe();
        // Batches of up to 256 items: about `capacity` items in flight.
        let batch = self.capacity.clamp(1, 256);
        let (tx, rx) = mpsc::channel((self.capacity / batch).max(1));
        let task = stream::StreamTask {
            exec: exec.clone(),
            events: events.clone(),
            slot: Arc::from(self.slot.as_str()),
            settings,
            messages: self.messages,
            shared: shared.clone(),
            out: tx,
            batch,
            status_interval: self.ack_interval,
            stop: stop_rx.clone(),
            changes: crate::record::Count::wal_changes(&self.slot),
            schema: self.schema.clone(),
            pg: self.pubsub.config().clone(),
            connect_timeout: self.pubsub.inner.opts.connect_timeout,
            link: link.clone(),
        };
        let first = task.connect_first(self.standby).await?;
        // Stopped by the handle's shutdown too, which waits until the
        // stream has ended and the slot is moved to the last ack.
        let services = &self.pubsub.inner.services;
        let stopper = |stop: &Arc<watch::Sender<bool>>| {
            let stop = stop.clone();
            move |_| {
                stop.send_replace(true);
            }
        };
        let registration = services.register("WAL feed", stopper(&stop_tx))?;
        let handle = tokio::spawn(async move {
            let res = task.run(first).await;
            drop(registration);
            res
        });
        let driver = snapshot::Driver {
            exec: exec.clone(),
            schema: self.schema.clone(),
            slot: self.slot.clone(),
            publication: publication.clone(),
            shared: shared.clone(),
            link: link.clone(),
            events: events.clone(),
            chunk_rows: self.snapshot_chunk_rows,
            stop: stop_rx.clone(),
        };
        let registration = services.register("WAL feed snapshots", stopper(&stop_tx))?;
        let driver = tokio::spawn(async move {
            driver.run().await;
            drop(registration);
        });
        if let Some(every) = self.heartbeat {
            let registration = services.register("WAL feed heartbeat", stopper(&stop_tx))?;
            let beat = stream::heartbeat(
                exec.clone(),
                events.clone(),
                self.slot.clone(),
                every,
                self.lag_warning,
                stop_rx,
            );
            tokio::spawn(async move {
                beat.await;
                drop(registration);
            });
        }
        Ok(WalFeed {
            events,
            exec,
            schema: self.schema,
            publication,
            link,
            slot: self.slot,
            rx,
            ready: Vec::new().into_iter(),
            shared,
            stop: stop_tx,
            task: Some(handle),
            driver: Some(driver),
            _t: std::marker::PhantomData,
        })
    }
}

pub(crate) struct Shared {
    /// The highest acked position (cumulative): the stream task reads it
    /// at each status update (every ack interval), so acking wakes nobody.
    pub(crate) acked: AtomicU64,
    /// The same position, for the snapshot driver to wait on.
    pub(crate) ack_watch: watch::Sender<u64>,
}

impl Shared {
    /// Moves the acked position up to `lsn` (never down).
    pub(crate) fn advance(&self, lsn: u64) {
        self.acked.fetch_max(lsn, Ordering::AcqRel);
        self.ack_watch.send_if_modified(|v| {
            let moved = lsn > *v;
            if moved {
                *v = lsn;
            }
            moved
        });
    }
}

/// What the stream task hands the feed: rows still JSON.
pub(crate) type RawItem = WalItem<serde_json::Value>;

pub use snapshot::{Backfill, SnapshotInfo};

/// A running WAL change feed: a [`Stream`] of [`WalItem`]s. Dropping it
/// stops the stream; [`close`](Self::close) also makes the last acks
/// durable first.
pub struct WalFeed<T = serde_json::Value> {
    exec: Exec,
    schema: crate::schema::SchemaName,
    publication: String,
    link: Arc<snapshot::Link>,
    slot: String,
    rx: mpsc::Receiver<Vec<RawItem>>,
    /// The rest of the batch being read.
    ready: std::vec::IntoIter<RawItem>,
    shared: Arc<Shared>,
    stop: Arc<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
    /// The snapshot driver: stopped with the stream, awaited by `close`
    /// so it records the last chunk the consumer acked.
    driver: Option<tokio::task::JoinHandle<()>>,
    events: crate::event::Bus<WalEvent>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> WalFeed<T> {
    /// Confirms everything up to `lsn` (cumulative; a lower `lsn` than
    /// before is ignored). Use [`WalItem::ack_lsn`]. Sent to the server within
    /// the ack interval.
    pub fn ack(&self, lsn: Lsn) {
        self.shared.advance(lsn.0);
    }

    /// Requests a backfill of `table` into this feed: its rows (those
    /// matching `filter`, a SQL condition on the table's columns, run as
    /// written: pass only trusted text) are read while the feed runs and
    /// delivered as [`Op::Read`](crate::changes::Op::Read) changes merged
    /// with the stream (see [Snapshots and backfill](self#snapshots-and-backfill)).
    /// Requests are served in order, after any unfinished one. The table
    /// must be in the feed's publication and have a primary key, and the
    /// condition must be valid ([`ErrorKind::Config`](crate::ErrorKind::Config)
    /// otherwise). Returns the request's id. The same from another
    /// process: [`PgPubSub::wal_backfill`].
    pub async fn backfill(&self, table: &str, filter: Option<&str>) -> Result<i64> {
        let id = snapshot::request_backfill(
            &self.exec,
            &self.schema,
            &self.slot,
            table,
            filter,
            &self.publication,
        )
        .await?;
        self.link.wake.notify_one();
        Ok(id)
    }

    /// The snapshots and backfills of this feed's slot, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        snapshot::list(&self.exec, &self.schema, &self.slot).await
    }

    /// A handle to ack from elsewhere (another task).
    pub fn acker(&self) -> WalAcker {
        WalAcker {
            shared: self.shared.clone(),
        }
    }

    /// Events of the WAL feeds of this feed's [`PgPubSub`] from now on
    /// (stream up, lost, slot lag). Bounded and lossy (see
    /// [`Events`](crate::event::Events)).
    pub fn events(&self) -> crate::event::Events<WalEvent> {
        self.events.subscribe()
    }

    /// The slot's name.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The slot's confirmed position and lag, read from the server.
    pub async fn stats(&self) -> Result<WalStats> {
        let (confirmed_lsn, lag_bytes) = slot::slot_position(&self.exec, &self.slot)
            .await?
            .ok_or_else(|| {
                Error::new(Origin::Conflict, format!("slot {:?} is gone", self.slot)).at(Stage::Wal)
            })?;
        Ok(WalStats {
            slot: self.slot.clone(),
            confirmed_lsn,
            lag_bytes,
            acked_lsn: Lsn(self.shared.acked.load(Ordering::Acquire)),
        })
    }

    /// Stops streaming and moves the slot to the last ack, so a new feed
    /// starts right after it.
    pub async fn close(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        // Nobody reads any more: a task blocked on a full buffer gets an
        // error at once instead of waiting forever.
        self.rx.close();
        if let Some(driver) = self.driver.take() {
            let _ = driver.await;
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        // The task moves the slot to the last ack as it ends.
        task.await.map_err(|e| {
            Error::new(Origin::Wal, format!("the WAL feed task failed: {e}")).with_source(e)
        })?
    }
}

impl<T> Drop for WalFeed<T> {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl<T: DeserializeOwned> Stream for WalFeed<T> {
    type Item = WalItem<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WalItem<T>>> {
        let this = &mut *self;
        loop {
            if let Some(item) = this.ready.next() {
                return Poll::Ready(Some(typed(item)));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => this.ready = batch.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A cloneable handle that acks for a [`WalFeed`].
#[derive(Clone)]
pub struct WalAcker {
    shared: Arc<Shared>,
}

impl WalAcker {
    /// Like [`WalFeed::ack`].
    pub fn ack(&self, lsn: Lsn) {
        self.shared.advance(lsn.0);
    }
}

/// Emits `payload` under `prefix` into the WAL as part of `tx`'s
/// transaction (`pg_logical_emit_message(true, ...)`): a WAL feed with a
/// matching [`messages`](WalFeedBuilder::messages) prefix receives it after
/// the commit, and never if the transaction rolls back. Any size (it is not
/// a NOTIFY). Returns the message's LSN.
///
/// ```no_run
/// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), Box<dyn std::error::Error>> {
/// let mut client = pubsub.pool().get().await?;
/// let tx = client.transaction().await?;
/// tx.execute("UPDATE orders SET status = 'paid' WHERE id = 7", &[]).await?;
/// pg_pubsub::changes::wal::emit_tx(&tx, "outbox.orders", br#"{"id":7}"#).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn emit_tx<E: crate::Executor + ?Sized>(
    tx: &E,
    prefix: &str,
    payload: &[u8],
) -> Result<Lsn> {
    use tokio_postgres::types::Type;
    let rows = crate::tx::query(
        tx,
        "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)::text",
        &[(&prefix, Type::TEXT), (&payload, Type::BYTEA)],
    )
    .await
    .map_err(|e| slot::setup_error("WAL feed: emit message", e))?;
    let text: String = rows
        .first()
        .map(|row| row.get(0))
        .ok_or_else(|| Error::new(Origin::Wal, "WAL feed: emit message returned no row"))?;
    text.parse()
}

/// A change whose rows were decoded, or why they were not (with the raw
/// event).
fn decoded<T>(
    lsn: Lsn,
    event: ChangeEvent<serde_json::Value>,
    old: serde_json::Result<Option<T>>,
    new: serde_json::Result<Option<T>>,
) -> WalItem<T> {
    match (old, new) {
        (Ok(old), Ok(new)) => WalItem::Change {
            lsn,
            event: event.with_rows(old, new),
        },
        (Err(e), _) | (_, Err(e)) => WalItem::Undecodable {
            lsn,
            error: Error::new(
                Origin::Wal,
                format!(
                    "a change of {}.{} does not decode into the feed's type: {e}",
                    event.schema, event.table
                ),
            )
            .with_source(e),
            raw: Some(event),
        },
    }
}

fn typed<T: DeserializeOwned>(item: RawItem) -> WalItem<T> {
    match item {
        // JSON rows into JSON: moved, not copied (a `Value` never fails to
        // decode, so there is no raw event to keep). `type_name` works for
        // any `T`; were another type ever to share the name, moving would
        // only lose the raw copy of an undecodable change.
        WalItem::Change { lsn, mut event }
            if std::any::type_name::<T>() == std::any::type_name::<serde_json::Value>() =>
        {
            let old = event.old.take().map(T::deserialize).transpose();
            let new = event.new.take().map(T::deserialize).transpose();
            decoded(lsn, event, old, new)
        }
        WalItem::Change { lsn, event } => {
            let old = event.old.as_ref().map(T::deserialize).transpose();
            let new = event.new.as_ref().map(T::deserialize).transpose();
            decoded(lsn, event, old, new)
        }
        WalItem::Begin {
            xid,
            final_lsn,
            commit_time,
        } => WalItem::Begin {
            xid,
            final_lsn,
            commit_time,
        },
        WalItem::Message(m) => WalItem::Message(m),
        WalItem::Commit {
            xid,
            lsn,
            end_lsn,
            commit_time,
        } => WalItem::Commit {
            xid,
            lsn,
            end_lsn,
            commit_time,
        },
        WalItem::Undecodable { lsn, error, raw } => WalItem::Undecodable { lsn, error, raw },
        WalItem::Error(e) => WalItem::Error(e),
    }
}
