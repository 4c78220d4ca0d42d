//! `pg-pubsub changes tail --wal --slot S`: the WAL change feed from the
//! shell. The `changes` command (its arguments, the trigger feed) lives in
//! `changes.rs`, which calls [`tail`] for `--wal`.

use std::time::Duration;

use futures::StreamExt;
use pg_pubsub::changes::wal::{WalEvent, WalFeed, WalItem};
use pg_pubsub::changes::{ChangeEvent, Lsn};
use pg_pubsub::PgPubSub;
use tokio_postgres::error::SqlState;

use crate::common::{connect, note, write_json_line, ConnOpts, Failure, Result, Stop, Tuning};

/// One printed line: the change plus its position.
#[derive(serde::Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    event: &'a ChangeEvent,
    lsn: Lsn,
}

/// What becomes of the slot when `tail` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnExit {
    /// Kept, so the next run continues after the last ack; said on stderr
    /// with the command that drops it (a kept slot holds WAL).
    KeepSlot,
    /// Dropped (a clean exit only: a killed process keeps it).
    DropSlot,
}

/// `tail --snapshot` and its chunk size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    /// Start with the table's existing rows.
    pub(crate) initial: bool,
    /// Rows per chunk (of backfills too).
    pub(crate) chunk_rows: usize,
}

/// How long an exiting `tail` waits for the server to let go of its slot.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Streams the changes of `tables` (all tables when empty) from slot `slot`
/// (created with its publication, named like the slot, if missing), one
/// JSON line per change with `lsn`; acks each transaction once its lines
/// are written, and makes the acks durable on SIGINT/SIGTERM (exit 0). On
/// exit the slot is free (no stream holds it), then kept or dropped.
pub(crate) async fn tail(
    conn: &ConnOpts,
    tables: &[String],
    slot: &str,
    on_exit: OnExit,
    snapshot: Snapshot,
) -> Result<()> {
    let mut stop = Stop::new()?;
    let ps = match stop.or(connect(conn, Tuning::default())).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    // The server holds a new slot back until every transaction running now
    // has ended: a long one elsewhere makes this start slow; say why.
    match slot_state(&ps, slot).await {
        Ok(SlotState::Missing) => note(&format!(
            "creating slot {slot}: waiting for the transactions running now to end"
        )),
        Ok(_) => {}
        Err(e) => {
            ps.shutdown().await;
            return Err(e);
        }
    }
    let mut builder = ps
        .wal_feed(slot)
        .snapshot(snapshot.initial)
        .snapshot_chunk_rows(snapshot.chunk_rows);
    if !tables.is_empty() {
        let refs: Vec<&str> = tables.iter().map(String::as_str).collect();
        builder = builder.tables(&refs);
    }
    let mut feed: WalFeed = match stop.or(builder.start()).await {
        Some(feed) => feed?,
        None => {
            ps.shutdown().await;
            return Ok(());
        }
    };
    // An existing publication may hold other tables: print only ours.
    let wanted = match resolve(&ps, tables).await {
        Ok(wanted) => wanted,
        Err(e) => {
            let _ = feed.close().await;
            ps.shutdown().await;
            return Err(e);
        }
    };
    note(&format!("tailing the WAL from slot {slot}"));
    let mut events = feed.events();
    let mut out = tokio::io::stdout();
    let result = loop {
        tokio::select! {
            biased;
            _ = stop.recv() => break Ok(()),
            Some(event) = events.next() => match event {
                WalEvent::Snapshot { slot: s, id, table, rows, finished: true } if *s == *slot => {
                    note(&format!("snapshot {id} of {table} finished ({rows} rows read)"));
                }
                WalEvent::SnapshotFailed { slot: s, id, table, reason } if *s == *slot => {
                    note(&format!("snapshot {id} of {table} given up: {reason}"));
                }
                _ => {}
            },
            item = feed.next() => match item {
                Some(WalItem::Change { event, .. })
                    if !wanted.is_empty() && !wanted.contains(&(event.schema.clone(), event.table.clone())) => {}
                Some(WalItem::Change { lsn, event }) => {
                    if !write_json_line(&mut out, &Line { event: &event, lsn }).await? {
                        break Ok(());
                    }
                }
                Some(WalItem::Commit { end_lsn, .. }) => feed.ack(end_lsn),
                Some(WalItem::Undecodable { lsn, error, .. }) => {
                    note(&format!("skipping an undecodable change at {lsn}: {error}"));
                }
                Some(WalItem::Error(e)) => note(&format!("WAL stream lost: {e}; reconnecting")),
                Some(_) => {}
                None => break Ok(()),
            }
        }
    };
    let closed = feed.close().await.map_err(Failure::from);
    let done = match closed {
        Ok(()) => finish(&ps, slot, on_exit).await,
        Err(e) => Err(e),
    };
    if on_exit == OnExit::KeepSlot || done.is_err() {
        note(&format!(
            "slot {slot} is kept and holds WAL until a feed reads it: drop it with \
             pg-pubsub changes drop-slot {slot}"
        ));
    }
    ps.shutdown().await;
    result.and(done)
}

/// Waits until the server has let go of the slot (its walsender ends after
/// the stream does), so a drop right after this process exits works, then
/// drops it if asked.
async fn finish(ps: &PgPubSub, slot: &str, on_exit: OnExit) -> Result<()> {
    let released = tokio::time::timeout(RELEASE_WAIT, async {
        let mut pause = Duration::from_millis(10);
        loop {
            match slot_state(ps, slot).await? {
                SlotState::Missing | SlotState::Free => return Ok(()),
                SlotState::Streaming(_) => {
                    // The server has no event for it: poll, briefly.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    })
    .await;
    match (released, on_exit) {
        (Ok(Ok(())), OnExit::KeepSlot) => Ok(()),
        (Ok(Ok(())), OnExit::DropSlot) => drop_slot(ps, slot).await,
        (Ok(Err(e)), _) => Err(e),
        // Another feed (e.g. a library one on standby) may have taken the
        // slot over: not this run's failure, unless it was to drop it.
        (Err(_), OnExit::KeepSlot) => {
            note(&format!(
                "slot {slot} is still streamed {RELEASE_WAIT:?} after this feed ended \
                 (another feed took it over?)"
            ));
            Ok(())
        }
        (Err(_), OnExit::DropSlot) => Err(Failure(format!(
            "cannot drop slot {slot}: still streamed {RELEASE_WAIT:?} after this feed ended"
        ))),
    }
}

/// A replication slot as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Missing,
    /// Exists, no stream holds it.
    Free,
    /// A walsender (this backend pid) streams from it.
    Streaming(i32),
}

async fn slot_state(ps: &PgPubSub, slot: &str) -> Result<SlotState> {
    let failed = |e: &dyn std::fmt::Display| Failure(format!("checking slot {slot}: {e}"));
    let client = ps.pool().get().await.map_err(|e| failed(&e))?;
    let row = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| failed(&e))?;
    Ok(match row.map(|r| r.get::<_, Option<i32>>(0)) {
        None => SlotState::Missing,
        Some(None) => SlotState::Free,
        Some(Some(pid)) => SlotState::Streaming(pid),
    })
}

/// `pg-pubsub changes drop-slot S`, and `tail --drop-slot-on-exit`.
pub(crate) async fn drop_slot(ps: &PgPubSub, slot: &str) -> Result<()> {
    match ps.drop_slot(slot).await {
        Ok(true) => {
            note(&format!("dropped slot {slot}"));
            Ok(())
        }
        Ok(false) => Err(Failure(format!("no replication slot {slot}"))),
        Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => Err(Failure(format!(
            "{e} (a feed streams from it, e.g. a running changes tail --wal: stop it first)"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// `(schema, table)` of each of `tables` (any name `regclass` accepts).
async fn resolve(
    ps: &pg_pubsub::PgPubSub,
    tables: &[String],
) -> Result<std::collections::HashSet<(String, String)>> {
    if tables.is_empty() {
        return Ok(Default::default());
    }
    let failed = |e: &dyn std::fmt::Display| Failure(format!("looking up {tables:?}: {e}"));
    let client = ps.pool().get().await.map_err(|e| failed(&e))?;
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM unnest($1::text[]) AS t \
             JOIN pg_class c ON c.oid = t::regclass JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[&tables],
        )
        .await
        .map_err(|e| failed(&e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
