//! Snapshots and backfills of the WAL feed against a real server: chunks
//! merged with concurrent writes, resumed after a close, refused tables.
//! (The CLI's `tail --snapshot`, SIGKILLed mid-snapshot, is in cli.rs.)
#![cfg(feature = "wal")]

mod common;

use common::snapshot::{insert_sentinel, Replica, Writer};
use common::*;
use futures::StreamExt;
use pg_pubsub::changes::wal::{WalEvent, WalFeed, WalItem};
use pg_pubsub::{ErrorKind, PgPubSub};
use serde_json::Value;

/// A fresh slot name and table `{slot}_t` (id bigint primary key, v text)
/// holding ids 1..=rows.
async fn table_with_rows(rows: i64) -> (String, String) {
    let slot = channel("snap");
    let table = format!("{slot}_t");
    raw_client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, v text); \
             INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("create the table");
    (slot, table)
}

async fn feed(ps: &PgPubSub, slot: &str, tables: &[&str], snapshot: bool) -> WalFeed {
    ps.wal_feed(slot)
        .tables(tables)
        .snapshot(snapshot)
        .snapshot_chunk_rows(1000)
        .start()
        .await
        .expect("start the feed")
}

/// A consumer of the feed: its replica of the table, and where the
/// snapshot and the sentinel row are.
#[derive(Default)]
struct Model {
    replica: Replica,
    finished: bool,
    sentinel: bool,
}

impl Model {
    /// Takes items (acking each commit) until `done`; returns right after
    /// a commit, so everything taken was acked.
    async fn drain(
        &mut self,
        feed: &mut WalFeed,
        events: &mut pg_pubsub::event::Events<WalEvent>,
        done: impl Fn(&Model) -> bool,
    ) {
        let run = async {
            loop {
                tokio::select! {
                    item = feed.next() => match item.expect("the feed ended") {
                        WalItem::Change { event, .. } => {
                            if event.new.as_ref().is_some_and(|r| r["v"] == "sentinel") {
                                self.sentinel = true;
                            }
                            self.replica.apply(event.op, event.old.as_ref(), event.new.as_ref())
                        }
                        WalItem::Commit { end_lsn, .. } => {
                            feed.ack(end_lsn);
                            if done(self) {
                                return;
                            }
                        }
                        WalItem::Begin { .. } => {}
                        // A lost stream: it resumes from the last ack.
                        WalItem::Error(_) => {}
                        other => panic!("unexpected {other:?}"),
                    },
                    Some(event) = events.next() => {
                        if let WalEvent::Snapshot { finished: true, .. } = event {
                            self.finished = true;
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(6 * WAIT, run).await.is_err() {
            panic!(
                "timed out draining the feed: {} reads, {} rows, finished: {}",
                self.replica.reads.len(),
                self.replica.rows.len(),
                self.finished
            );
        }
    }
}

#[tokio::test]
async fn backfill_with_a_condition_merges_with_writes_and_resumes_after_close() {
    const ROWS: i64 = 20_000;
    let (slot, table) = table_with_rows(ROWS).await;
    let ps = pubsub().await;
    let mut first = feed(&ps, &slot, &[&table], false).await;
    let mut events = first.events();
    // The consumer starts from an empty copy and backfills the even rows.
    let mut model = Model::default();
    let writer = Writer::start(&table, ROWS);
    let id = first
        .backfill(&table, Some("id % 2 = 0"))
        .await
        .expect("request");
    model
        .drain(&mut first, &mut events, |m| m.replica.reads.len() >= 3000)
        .await;
    first.close().await.expect("close mid-backfill");

    // A new feed on the slot resumes the request where the acks left it.
    let mut second = feed(&ps, &slot, &[&table], false).await;
    model.drain(&mut second, &mut events, |m| m.finished).await;
    let touched = writer.stop().await;
    insert_sentinel(&table).await;
    model.drain(&mut second, &mut events, |m| m.sentinel).await;

    // Read once (a clean close leaves nothing to read again), only even ids,
    // every even id nobody touched.
    for (id, n) in &model.replica.reads {
        assert_eq!(*n, 1, "id {id} read {n} times");
        assert_eq!(id % 2, 0, "id {id} does not match the condition");
    }
    for id in (2..=ROWS).step_by(2).filter(|id| !touched.contains(id)) {
        assert!(model.replica.reads.contains_key(&id), "id {id} never read");
    }
    // The even rows, and every row written since (the stream carried
    // them whole), are as in the table; untouched odd rows were never seen.
    model
        .replica
        .assert_is(&table, |id| id % 2 == 0 || touched.contains(&id) || id == 0)
        .await;

    let info = second.snapshots().await.expect("list");
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].id, id);
    assert!(info[0].finished && info[0].error.is_none(), "{info:?}");
    assert_eq!(info[0].filter.as_deref(), Some("id % 2 = 0"));
    second.close().await.expect("close");
    ps.drop_slot(&slot).await.expect("drop slot");
    ps.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_survives_a_lost_stream_reading_only_the_chunk_in_flight_again() {
    const ROWS: i64 = 20_000;
    let (slot, table) = table_with_rows(ROWS).await;
    let ps = pubsub().await;
    let mut feed = feed(&ps, &slot, &[&table], true).await;
    let mut events = feed.events();
    let mut model = Model::default();
    let writer = Writer::start(&table, ROWS);
    model
        .drain(&mut feed, &mut events, |m| m.replica.reads.len() >= 5000)
        .await;
    let walsender: i32 = raw_client()
        .await
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("the slot")
        .get(0);
    terminate(walsender).await;
    model.drain(&mut feed, &mut events, |m| m.finished).await;
    let touched = writer.stop().await;
    insert_sentinel(&table).await;
    model.drain(&mut feed, &mut events, |m| m.sentinel).await;

    let again = model.replica.reads.values().filter(|n| **n > 1).count();
    assert!(
        again <= 1000,
        "{again} rows read twice: more than the one chunk in flight"
    );
    assert!(model.replica.reads.values().all(|n| *n <= 2));
    for id in (1..=ROWS).filter(|id| !touched.contains(id)) {
        assert!(model.replica.reads.contains_key(&id), "id {id} never read");
    }
    model.replica.assert_is(&table, |_| true).await;
    feed.close().await.expect("close");
    ps.drop_slot(&slot).await.expect("drop slot");
    ps.shutdown().await;
}

#[tokio::test]
async fn tables_a_snapshot_cannot_merge_are_refused_naming_them() {
    let (slot, table) = table_with_rows(3).await;
    let bare = format!("{slot}_nokey");
    let client = raw_client().await;
    client
        .batch_execute(&format!("CREATE TABLE {bare} (v text)"))
        .await
        .expect("create");
    let ps = pubsub().await;

    let err = ps
        .wal_feed(&slot)
        .tables(&[&table, &bare])
        .snapshot(true)
        .start::<Value>()
        .await
        .err()
        .expect("a table without a primary key");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(
        err.to_string().contains(&bare) && err.to_string().contains("no primary key"),
        "{err}"
    );
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(
        slots, 0,
        "a slot was created for a feed that could not start"
    );

    let feed = feed(&ps, &format!("{slot}_2"), &[&table], false).await;
    let err = feed
        .backfill(&table, Some("no_such_column > 1"))
        .await
        .expect_err("a bad condition");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let err = feed
        .backfill(&bare, None)
        .await
        .expect_err("not in the publication");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let err = ps
        .wal_backfill("no_such_slot", &table)
        .await
        .expect_err("no feed on that slot");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(feed.snapshots().await.expect("list").is_empty());
    feed.close().await.expect("close");
    for s in [slot.clone(), format!("{slot}_2")] {
        let _ = ps.drop_slot(&s).await;
    }
    ps.shutdown().await;
}
