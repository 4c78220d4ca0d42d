//! Snapshots and backfills of a WAL feed: the rows of a table read in
//! chunks by primary key and merged into the stream at watermarks (user
//! docs: [`changes::wal`](crate::changes::wal#snapshots-and-backfill)).
//!
//! * `driver.rs`: the task that serves the slot's requests (recorded in
//!   `<schema>.wal_snapshots`), one chunk at a time, and records progress;
//!   its phases are a pure state machine.
//! * `merge.rs`: which rows of a chunk the stream already carried (pure).
//! * `store.rs`: the statements.
//! * [`Link`] (here): what the driver and the stream task share: the
//!   tracked tables, the chunks waiting for their watermark, the stream's
//!   generation (a reconnect starts the driver's pass over).

mod driver;
mod merge;
mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::{oneshot, watch, Notify};

pub(crate) use driver::Driver;
pub(crate) use store::{forget, initial_tables, request_backfill, request_initial, Table};

use crate::changes::{ChangeEvent, Lsn};
use merge::{Tracker, Visibility};

/// The prefix of the messages snapshots write into the WAL: watermarks
/// (non-transactional, after a chunk's snapshot) and requests
/// (transactional, with the request's row). Never delivered as messages.
pub(crate) const SNAPSHOT_PREFIX: &str = "pg-pubsub.snapshot";

/// A chunk read by the driver, handed to the stream task at its watermark.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// `(schema, table)` as the stream names it.
    pub(crate) table: (String, String),
    pub(crate) snapshot: Visibility,
    pub(crate) rows: Vec<Value>,
}

/// A watermark or request message of this feed, from its content.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Mark {
    /// A request for this slot was committed: the driver should look.
    Request,
    /// The watermark of this process's chunk `n`.
    Chunk(u64),
    /// Another slot's, or an earlier process's: ignored.
    Other,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Payload {
    slot: String,
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    chunk: Option<u64>,
    #[serde(default)]
    request: Option<i64>,
}

pub(crate) fn request_payload(slot: &str, id: i64) -> String {
    serde_json::to_string(&Payload {
        slot: slot.to_owned(),
        run: None,
        chunk: None,
        request: Some(id),
    })
    .unwrap_or_default()
}

#[derive(Default)]
struct State {
    tracker: Tracker,
    chunks: HashMap<u64, oneshot::Receiver<Chunk>>,
}

/// What the driver and the stream task of one feed share.
pub(crate) struct Link {
    slot: String,
    /// This feed's token in watermarks: another process's (or an earlier
    /// run's) watermarks on the same slot are not ours.
    run: String,
    state: Mutex<State>,
    /// Whether any table is tracked (the stream's fast path).
    tracking: AtomicBool,
    /// Wakes an idle driver: a request was committed.
    pub(crate) wake: Notify,
    /// Bumped each time the stream (re)starts: what the stream task
    /// tracked is gone, and chunks in flight will not be handed over.
    generation: watch::Sender<u64>,
    /// The last chunk handed over, and what the consumer must ack for it.
    handed: watch::Sender<Option<(u64, Lsn)>>,
    /// Chunk numbers, increasing across requests.
    chunks: std::sync::atomic::AtomicU64,
}

impl Link {
    pub(crate) fn new(slot: &str) -> Link {
        Link {
            slot: slot.to_owned(),
            run: format!("{:016x}", fastrand::u64(..)),
            state: Mutex::new(State::default()),
            tracking: AtomicBool::new(false),
            wake: Notify::new(),
            generation: watch::Sender::new(0),
            handed: watch::Sender::new(None),
            chunks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A new chunk number.
    pub(crate) fn next_chunk(&self) -> u64 {
        self.chunks.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it leaves plain data: carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream (re)starts: forget what was tracked and in flight.
    pub(crate) fn restarted(&self) {
        *self.lock() = State::default();
        self.tracking.store(false, Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }

    pub(crate) fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Starts tracking `table` if the stream is still at `generation`.
    pub(crate) fn begin(&self, table: &Table, generation: u64) -> bool {
        let mut state = self.lock();
        if *self.generation.borrow() != generation {
            return false;
        }
        state
            .tracker
            .begin(table.stream_name(), table.key_columns.clone());
        self.tracking.store(true, Ordering::Release);
        true
    }

    pub(crate) fn end(&self, table: &Table) {
        let mut state = self.lock();
        state.tracker.end(&table.stream_name());
        self.tracking
            .store(!state.tracker.is_empty(), Ordering::Release);
    }

    /// Records the changes of transaction `xid` the stream delivers.
    pub(crate) fn observe(&self, xid: u32, events: &[ChangeEvent<Value>]) {
        if !self.tracking.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        for event in events {
            state.tracker.observe(xid, event);
        }
    }

    /// Registers chunk `n` before its watermark is written; the driver
    /// sends the rows once its transaction committed (dropping the sender
    /// voids the chunk).
    pub(crate) fn expect(&self, n: u64) -> oneshot::Sender<Chunk> {
        let (tx, rx) = oneshot::channel();
        self.lock().chunks.insert(n, rx);
        tx
    }

    /// The watermark's content for chunk `n`.
    pub(crate) fn watermark(&self, n: u64) -> String {
        serde_json::to_string(&Payload {
            slot: self.slot.clone(),
            run: Some(self.run.clone()),
            chunk: Some(n),
            request: None,
        })
        .unwrap_or_default()
    }

    /// What a message under [`SNAPSHOT_PREFIX`] means for this feed.
    pub(crate) fn mark(&self, content: &[u8]) -> Mark {
        let Ok(p) = serde_json::from_slice::<Payload>(content) else {
            return Mark::Other;
        };
        match p {
            Payload { slot, .. } if slot != self.slot => Mark::Other,
            Payload {
                request: Some(_), ..
            } => Mark::Request,
            Payload {
                run: Some(run),
                chunk: Some(n),
                ..
            } if run == self.run => Mark::Chunk(n),
            _ => Mark::Other,
        }
    }

    /// The chunk waiting for watermark `n`, if this stream expects it.
    pub(crate) fn take(&self, n: u64) -> Option<oneshot::Receiver<Chunk>> {
        self.lock().chunks.remove(&n)
    }

    /// The rows of `chunk` to hand over (see `merge.rs`).
    pub(crate) fn merge(&self, chunk: Chunk) -> Vec<Value> {
        self.lock()
            .tracker
            .merge(&chunk.table, &chunk.snapshot, chunk.rows)
    }

    /// Chunk `n` went out; the consumer has it all once it acked `ack`.
    pub(crate) fn handed(&self, n: u64, ack: Lsn) {
        self.handed.send_replace(Some((n, ack)));
    }

    pub(crate) fn handed_rx(&self) -> watch::Receiver<Option<(u64, Lsn)>> {
        self.handed.subscribe()
    }
}

/// A snapshot or backfill of a WAL feed's slot, from
/// [`WalFeed::snapshots`](super::WalFeed::snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// The request's id.
    pub id: i64,
    /// The table, as `regclass` printed it when requested.
    pub table: String,
    /// The backfill's condition, if any.
    pub filter: Option<String>,
    /// The feed's initial snapshot ([`WalFeedBuilder::snapshot`](super::WalFeedBuilder::snapshot)).
    pub initial: bool,
    /// Rows read so far (the merge drops those the stream carried).
    pub rows_read: i64,
    /// Every row was read and acked.
    pub finished: bool,
    /// Why it was given up, if it was.
    pub error: Option<String>,
}

pub(crate) async fn list(
    exec: &crate::exec::Exec,
    schema: &crate::schema::SchemaName,
    slot: &str,
) -> crate::Result<Vec<SnapshotInfo>> {
    const STAGE: &str = "WAL snapshot: list";
    let sql = store::Sql::new(schema).list;
    let rows = exec
        .run_with(STAGE, |client| async move {
            client
                .query(&sql, &[&slot])
                .await
                .map_err(|e| crate::Error::pg(crate::error::Origin::Wal, STAGE, e))
        })
        .await?;
    Ok(rows
        .iter()
        .map(|r| SnapshotInfo {
            id: r.get(0),
            table: r.get(1),
            filter: r.get(2),
            initial: r.get(3),
            rows_read: r.get(4),
            finished: r.get(5),
            error: r.get(6),
        })
        .collect())
}

/// A backfill request for a WAL feed's slot from any process; from
/// [`PgPubSub::wal_backfill`](crate::PgPubSub::wal_backfill). Sent when
/// awaited; resolves to the request's id.
#[must_use = "a backfill request does nothing until awaited"]
pub struct Backfill {
    pubsub: crate::PgPubSub,
    slot: String,
    table: String,
    filter: Option<String>,
    schema: crate::schema::SchemaName,
}

impl Backfill {
    /// Only the rows matching this SQL condition on the table's columns
    /// (run as written: pass only trusted text).
    pub fn filter(mut self, condition: &str) -> Self {
        self.filter = Some(condition.to_owned());
        self
    }

    /// The schema of the feed's `wal_slots` and `wal_snapshots`
    /// (its [`WalFeedBuilder::schema`](super::WalFeedBuilder::schema)). Default: `pgpubsub`.
    pub fn schema(mut self, schema: crate::schema::SchemaName) -> Self {
        self.schema = schema;
        self
    }

    async fn send(self) -> crate::Result<i64> {
        use crate::error::{Error, Origin};
        const STAGE: &str = "WAL backfill: find the slot";
        let installed = tokio::sync::OnceCell::new();
        crate::schema::ensure(&self.pubsub, &self.schema, &installed).await?;
        let exec = self.pubsub.exec().clone();
        let sql = format!(
            "SELECT publication FROM {}.wal_slots WHERE slot_name = $1",
            self.schema
        );
        let slot = &self.slot;
        let publication: String = exec
            .run_with(STAGE, |client| async move {
                client
                    .query_opt(&sql, &[slot])
                    .await
                    .map_err(|e| Error::pg(Origin::Wal, STAGE, e))
            })
            .await?
            .ok_or_else(|| {
                Error::new(
                    Origin::Config,
                    format!(
                        "WAL backfill: no WAL feed uses slot {slot:?} (none is recorded in \
                         {}.wal_slots): start the feed first",
                        self.schema
                    ),
                )
            })?
            .get(0);
        request_backfill(
            &exec,
            &self.schema,
            &self.slot,
            &self.table,
            self.filter.as_deref(),
            &publication,
        )
        .await
    }
}

impl std::future::IntoFuture for Backfill {
    type Output = crate::Result<i64>;
    type IntoFuture =
        std::pin::Pin<Box<dyn std::future::Future<Output = crate::Result<i64>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

impl crate::PgPubSub {
    /// Requests a backfill of `table` into the WAL feed of `slot`, which
    /// may run in another process: it serves the request (now if it runs,
    /// else when it starts), as [`WalFeed::backfill`](super::WalFeed::backfill)
    /// describes.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
    /// let id = pubsub.wal_backfill("orders_feed", "public.orders")
    ///     .filter("created_at > now() - interval '1 day'")
    ///     .await?;
    /// # let _ = id; Ok(()) }
    /// ```
    pub fn wal_backfill(&self, slot: &str, table: &str) -> Backfill {
        Backfill {
            pubsub: self.clone(),
            slot: slot.to_owned(),
            table: table.to_owned(),
            filter: None,
            schema: crate::schema::SchemaName::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_told_apart_by_slot_and_run() {
        let link = Link::new("s1");
        let other = Link::new("s1");
        assert_eq!(link.mark(link.watermark(3).as_bytes()), Mark::Chunk(3));
        assert_eq!(link.mark(other.watermark(3).as_bytes()), Mark::Other);
        assert_eq!(
            link.mark(request_payload("s1", 9).as_bytes()),
            Mark::Request
        );
        assert_eq!(link.mark(request_payload("s2", 9).as_bytes()), Mark::Other);
        assert_eq!(link.mark(b"not json"), Mark::Other);
    }
}
