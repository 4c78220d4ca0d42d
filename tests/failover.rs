//! Failover: a primary and a streaming standby (`pg_basebackup`), the
//! primary stopped or fenced, the standby promoted. Multi-host URLs with
//! `target_session_attrs=read-write`; every capability must end up on the
//! new primary, listeners with a gap, durable consumers and workers with
//! nothing acknowledged lost (synchronous replication).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ha::Pair;
use common::*;
use futures::StreamExt;
use pg_pubsub::durable::DurableDelivery;
use pg_pubsub::{Backoff, Delivery, ErrorKind, PgPubSub, Text};

/// Health checks every second, reconnects at most a second apart: the
/// bounds the tests below hold the client to.
const HEALTH: Duration = Duration::from_secs(1);

fn ha_builder(url: &str) -> pg_pubsub::Builder {
    PgPubSub::builder(url)
        .expect("url")
        .health_check(HEALTH, HEALTH)
        .backoff(Backoff {
            initial: Duration::from_millis(100),
            max: HEALTH,
            jitter: 0.3,
        })
        .notify_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

/// What the load task got acknowledged, per capability.
#[derive(Default)]
struct Acked {
    notified: Vec<u64>,
    published: Vec<u64>,
    enqueued: Vec<u64>,
}

/// Rounds of notify + durable publish + enqueue until `stop`; each call's
/// error must be a retryable connection error (the round goes on).
fn load(
    ps: PgPubSub,
    ch: String,
    queue: String,
    acked: Arc<Mutex<Acked>>,
    rounds: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (d, q) = (ps.durable(), ps.queue());
        let check = |what: &str, e: pg_pubsub::Error| {
            assert!(e.is_connection(), "{what} failed for good: {e:?}");
        };
        for i in 0u64.. {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let text = i.to_string();
            match ps.notify(&ch, Text(&text)).await {
                Ok(()) => acked.lock().unwrap().notified.push(i),
                Err(e) => check("notify", e),
            }
            match d.publish(&ch, Text(&text)).await {
                Ok(()) => acked.lock().unwrap().published.push(i),
                Err(e) => check("durable publish", e),
            }
            match q.enqueue(&queue, Text(&text)).await {
                Ok(_) => acked.lock().unwrap().enqueued.push(i),
                Err(e) => check("enqueue", e),
            }
            rounds.fetch_add(1, Ordering::AcqRel);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Waits until the load task counted `n` more rounds than `from`.
async fn rounds_reach(rounds: &AtomicUsize, n: usize) {
    tokio::time::timeout(2 * WAIT, async {
        while rounds.load(Ordering::Acquire) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the load made no progress");
}

#[tokio::test]
async fn failover_under_load_loses_nothing_acknowledged() {
    let pair = Pair::start(true).await;
    pair.wait_streaming().await;
    let ps = ha_builder(&pair.url()).connect().await.unwrap();
    let ch = channel("fo");
    let queue = channel("foq");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    let d = ps.durable();
    d.install().await.unwrap();
    let q = ps.queue();
    q.install().await.unwrap();
    let mut consumer = d.subscribe::<Text>(&ch, "g").await.unwrap();
    let (worker, mut ran) = run_reporting(fast(&q, &queue)).await;

    let acked = Arc::new(Mutex::new(Acked::default()));
    let rounds = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let task = load(
        ps.clone(),
        ch.clone(),
        queue.clone(),
        acked.clone(),
        rounds.clone(),
        stop.clone(),
    );
    rounds_reach(&rounds, 30).await;
    pair.crash_primary().await;
    let crashed = Instant::now();
    pair.promote().await;
    let before = rounds.load(Ordering::Acquire);
    rounds_reach(&rounds, before + 30).await;
    stop.store(true, Ordering::Release);
    task.await.unwrap();
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let last_notified = *acked.notified.last().expect("notified");
    eprintln!(
        "after {:?}: {} notified, {} published, {} enqueued",
        crashed.elapsed(),
        acked.notified.len(),
        acked.published.len(),
        acked.enqueued.len()
    );

    // The listener: a gap, then what was sent on the new primary.
    let mut gap = false;
    loop {
        match next(&mut sub).await {
            Delivery::Gap(_) => gap = true,
            Delivery::Message(m) => {
                let n: u64 = m.payload().parse().unwrap();
                if n == last_notified {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(gap, "the listener reported no gap across the failover");

    // The durable consumer: every acknowledged publish, from the last ack on.
    let mut want: BTreeSet<u64> = acked.published.iter().copied().collect();
    while !want.is_empty() {
        match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(DurableDelivery::Message(m))) => {
                want.remove(&m.payload().parse::<u64>().unwrap());
                m.ack();
            }
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("the consumer ended"),
            Err(_) => panic!("acknowledged publishes never delivered: {want:?}"),
        }
    }
    // The worker: every acknowledged enqueue ran.
    let mut want: BTreeSet<u64> = acked.enqueued.iter().copied().collect();
    while !want.is_empty() {
        match tokio::time::timeout(WAIT, ran.recv()).await {
            Ok(Some((_, _, payload))) => {
                want.remove(&payload.parse::<u64>().unwrap());
            }
            _ => panic!("acknowledged enqueues never ran: {want:?}"),
        }
    }
    worker.shutdown().await.unwrap();
    consumer.close().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_listener_moves_to_the_new_primary_when_the_old_one_rejoins_as_standby() {
    let pair = Pair::start(false).await;
    pair.wait_streaming().await;
    let ps = ha_builder(&pair.url()).connect().await.unwrap();
    let ch = channel("rejoin");
    let mut sub = ps.listen::<u64>(&ch).await.unwrap();
    ps.notify(&ch, &1u64).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 1);

    // The old primary comes back as a standby before the new one is
    // promoted (a switchover): reachable, but refusing LISTEN.
    pair.stop_primary().await;
    pair.rejoin_old_primary().await;
    pair.promote().await;
    let promoted = Instant::now();
    expect_gap(
        &mut sub,
        pg_pubsub::GapCause::Reconnect {
            downtime: Duration::ZERO,
        },
    )
    .await;
    let moved = promoted.elapsed();
    let new_primary = raw_client_to(&pair.standby).await;
    new_primary
        .execute("SELECT pg_notify($1, '2')", &[&ch])
        .await
        .unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 2);
    // Reconnect attempts are at most HEALTH apart; each connect tries both hosts.
    assert!(
        moved < 3 * HEALTH + Duration::from_secs(2),
        "the listener took {moved:?} to reach the new primary"
    );
    let pid = ps.listener_pid().expect("connected");
    let on_new: i64 = new_primary
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_new, 1, "the listener session is on the new primary");
    ps.shutdown().await;
}

#[tokio::test]
async fn a_fenced_primary_is_left_and_writes_on_it_fail_as_connection_errors() {
    let pair = Pair::start(false).await;
    pair.wait_streaming().await;
    let ps = ha_builder(&pair.url())
        .pool_size(1)
        .connect()
        .await
        .unwrap();
    // A handle that can only reach the old primary.
    let only_old = ha_builder(pair.primary.url())
        .pool_size(1)
        .connect()
        .await
        .unwrap();
    let ch = channel("fenced");
    let queue = channel("fencedq");
    let mut sub = ps.listen::<u64>(&ch).await.unwrap();
    ps.notify(&ch, &1u64).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 1);
    let (d, q) = (only_old.durable(), only_old.queue());
    d.install().await.unwrap();
    q.install().await.unwrap();
    d.publish(&ch, Text("before")).await.unwrap();
    q.enqueue(&queue, Text("before")).await.unwrap();
    pair.wait_streaming().await;

    // Fenced as failover tooling does: still up, its sessions still open, read-only.
    let old = raw_client_to(&pair.primary).await;
    for sql in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        old.batch_execute(sql).await.unwrap();
    }
    pair.promote().await;
    let promoted = Instant::now();

    // Pooled sessions on the old primary: retryable connection errors, nothing sent.
    let err = ps.notify(&ch, &2u64).await.unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err:?}");
    assert!(!err.may_have_committed(), "{err:?}");
    let err = d.publish(&ch, Text("after")).await.unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
    // That session was dropped; a new one finds no primary among the old one's hosts.
    let err = q.enqueue(&queue, Text("after")).await.unwrap_err();
    assert!(err.is_connection(), "{err:?}");

    // The retry goes to the new primary, and so does the listener.
    ps.notify(&ch, &3u64).await.unwrap();
    let mut gap = false;
    loop {
        match next(&mut sub).await {
            Delivery::Gap(_) => gap = true,
            Delivery::Message(m) if *m.payload() == 3 => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(gap, "no gap when leaving the fenced primary");
    let moved = promoted.elapsed();
    assert!(
        moved < 3 * HEALTH + Duration::from_secs(2),
        "the listener took {moved:?} to leave the fenced primary"
    );
    only_old.shutdown().await;
    ps.shutdown().await;
}

/// The next row change of a WAL feed, acked with its commit.
#[cfg(feature = "wal")]
async fn next_wal_change(feed: &mut pg_pubsub::changes::wal::WalFeed) -> serde_json::Value {
    use pg_pubsub::changes::wal::WalItem;
    let mut row = None;
    loop {
        match next(feed).await {
            WalItem::Change { event, .. } => row = event.new,
            WalItem::Commit { end_lsn, .. } if row.is_some() => {
                feed.ack(end_lsn);
                return row.unwrap_or_default();
            }
            WalItem::Begin { .. } | WalItem::Commit { .. } => {}
            other => panic!("expected a change, got {other:?}"),
        }
    }
}

#[cfg(feature = "wal")]
#[tokio::test]
async fn a_wal_feed_whose_slot_did_not_survive_the_failover_fails_loudly() {
    use pg_pubsub::changes::wal::WalItem;
    let pair = Pair::start(false).await;
    pair.wait_streaming().await;
    let ps = ha_builder(&pair.url()).connect().await.unwrap();
    let slot = channel("fo_wal");
    let table = format!("{slot}_t");
    let old = raw_client_to(&pair.primary).await;
    let mut feed = wal_feed_past_one_change(&ps, &old, &slot, |b| b).await;
    // Recorded, as a failover slot where the server has them (17+).
    let row = old
        .query_one(
            "SELECT failover, current_setting('server_version_num')::int >= 170000 \
             FROM pgpubsub.wal_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, bool>(0), row.get::<_, bool>(1));
    eprintln!("failover slot: {}", row.get::<_, bool>(0));
    pair.wait_streaming().await;

    // Slots are not copied to a standby (before 17; from 17 only failover
    // slots to a standby that syncs them): the new primary has none.
    pair.crash_primary().await;
    pair.promote().await;
    let new = raw_client_to(&pair.standby).await;
    new.batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
        .await
        .unwrap();
    let err = loop {
        match next(&mut feed).await {
            WalItem::Error(e) if e.kind() == ErrorKind::SlotLost => break e,
            WalItem::Error(e) => assert!(e.is_connection(), "{e:?}"),
            other => panic!("expected the slot's loss, got {other:?}"),
        }
    };
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(
        tokio::time::timeout(WAIT, feed.next())
            .await
            .unwrap()
            .is_none(),
        "the feed ends after its slot is lost"
    );

    // A restarted feed refuses too, rather than starting from now...
    let again = ps
        .wal_feed(&slot)
        .tables(&[&table])
        .start::<serde_json::Value>()
        .await;
    let err = again.err().expect("a missing recorded slot is an error");
    assert_eq!(err.kind(), ErrorKind::SlotLost, "{err:?}");
    // ...unless told to accept the loss.
    let mut feed = ps
        .wal_feed(&slot)
        .tables(&[&table])
        .recreate_lost_slot(true)
        .start()
        .await
        .unwrap();
    new.batch_execute(&format!("INSERT INTO {table} VALUES (3)"))
        .await
        .unwrap();
    assert_eq!(next_wal_change(&mut feed).await["id"], 3);
    feed.close().await.unwrap();
    ps.shutdown().await;
}

#[cfg(feature = "wal")]
#[tokio::test]
async fn a_wal_feed_whose_slot_was_invalidated_fails_loudly() {
    let server = own_cluster(pg_pubsub::testing::TestOptions {
        settings: vec!["max_slot_wal_keep_size=1MB".to_owned()],
        ..Default::default()
    })
    .await;
    let ps = ha_builder(server.url()).connect().await.unwrap();
    let slot = channel("lost_wal");
    let feed = ps
        .wal_feed(&slot)
        .tables(&[])
        .start::<serde_json::Value>()
        .await
        .unwrap();
    feed.close().await.unwrap();
    // The slot holds WAL nobody reads: switch segments past the limit and
    // checkpoint, and the server invalidates it.
    let client = raw_client_to(&server).await;
    let deadline = Instant::now() + WAIT;
    loop {
        client
            .batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS filler (x int); INSERT INTO filler VALUES (1)",
            )
            .await
            .unwrap();
        client
            .batch_execute("SELECT pg_switch_wal()")
            .await
            .unwrap();
        client.batch_execute("CHECKPOINT").await.unwrap();
        let status: Option<String> = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never invalidated");
    }
    let err = ps
        .wal_feed(&slot)
        .tables(&[])
        .start::<serde_json::Value>()
        .await
        .err()
        .expect("an invalidated slot is an error");
    assert_eq!(err.kind(), ErrorKind::SlotLost, "{err:?}");
    assert!(err.to_string().contains("invalidated"), "{err}");
    let mut feed = ps
        .wal_feed(&slot)
        .tables(&[])
        .messages("lost.")
        .recreate_lost_slot(true)
        .start::<serde_json::Value>()
        .await
        .unwrap();
    // The new slot streams.
    client
        .batch_execute("SELECT pg_logical_emit_message(false, 'lost.x', 'again')")
        .await
        .unwrap();
    loop {
        match next(&mut feed).await {
            pg_pubsub::changes::wal::WalItem::Message(m) => {
                assert_eq!(&m.payload[..], b"again");
                break;
            }
            pg_pubsub::changes::wal::WalItem::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
    feed.close().await.unwrap();
    ps.shutdown().await;
}

#[cfg(feature = "wal")]
#[tokio::test]
async fn a_wal_feed_streams_from_the_primary_whichever_host_comes_first() {
    let pair = Pair::start(false).await;
    let port = |s: &pg_pubsub::testing::TestServer| s.port().expect("owned");
    // The standby first: the replication connection must skip it.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        port(&pair.standby),
        port(&pair.primary)
    );
    let ps = ha_builder(&url).connect().await.unwrap();
    let slot = channel("first_wal");
    let primary = raw_client_to(&pair.primary).await;
    let feed = wal_feed_past_one_change(&ps, &primary, &slot, |b| b).await;
    feed.close().await.unwrap();
    ps.shutdown().await;
}

#[cfg(feature = "wal")]
#[tokio::test]
async fn an_idle_wal_feed_does_not_hold_up_a_clean_shutdown() {
    let pair = Pair::start(false).await;
    let ps = ha_builder(&pair.url()).connect().await.unwrap();
    let slot = channel("idle_wal");
    let primary = raw_client_to(&pair.primary).await;
    let feed = wal_feed_past_one_change(&ps, &primary, &slot, |b| b).await;
    // A switchover stops the primary cleanly: the server waits for its WAL
    // senders' clients to confirm what was sent (pg_ctl gives up after 60 s).
    let stopping = Instant::now();
    pair.stop_primary().await;
    let took = stopping.elapsed();
    eprintln!("clean shutdown with a WAL feed attached: {took:?}");
    assert!(took < Duration::from_secs(15), "the shutdown took {took:?}");
    drop(feed);
    ps.shutdown().await;
}

/// PostgreSQL 17+: a failover slot copied to the standby survives the
/// promotion, and the feed goes on from its last ack on the new primary.
#[cfg(feature = "wal")]
#[tokio::test]
async fn a_failover_slot_synced_to_the_standby_survives_the_failover() {
    let primary = own_cluster(pg_pubsub::testing::TestOptions::default()).await;
    let version: i32 = raw_client_to(&primary)
        .await
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version < 170_000 {
        eprintln!("skipped: failover slots need PostgreSQL 17+ (server {version}; see PG_BIN_DIR)");
        return;
    }
    let primary = Arc::new(primary);
    let p = primary.clone();
    // Slots synced on demand (pg_sync_replication_slots), not by the worker.
    let standby = tokio::task::spawn_blocking(move || {
        p.start_standby(pg_pubsub::testing::TestOptions {
            settings: vec!["hot_standby_feedback=on".to_owned()],
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let pair = Pair {
        primary,
        standby: Arc::new(standby),
    };
    pair.wait_streaming().await;
    let ps = ha_builder(&pair.url()).connect().await.unwrap();
    let slot = channel("synced_wal");
    let table = format!("{slot}_t");
    let old = raw_client_to(&pair.primary).await;
    let mut feed = wal_feed_past_one_change(&ps, &old, &slot, |b| {
        b.ack_interval(Duration::from_millis(100))
    })
    .await;

    // Copy the slot once the primary has the ack, and the standby its WAL.
    let standby = raw_client_to(&pair.standby).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let acked: bool = old
            .query_one(
                "SELECT confirmed_flush_lsn >= (SELECT replay_lsn FROM pg_stat_replication LIMIT 1) \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
        if acked {
            standby
                .batch_execute("SELECT pg_sync_replication_slots()")
                .await
                .unwrap();
            let synced: i64 = standby
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND synced",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0);
            if synced == 1 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the slot was never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    pair.crash_primary().await;
    pair.promote().await;
    let new = raw_client_to(&pair.standby).await;
    new.batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
        .await
        .unwrap();
    // At least once: a change before the synced position may come again.
    loop {
        match next(&mut feed).await {
            pg_pubsub::changes::wal::WalItem::Change { event, .. } => {
                let id = event.new.unwrap_or_default()["id"].as_i64();
                if id == Some(2) {
                    break;
                }
                assert_eq!(id, Some(1));
            }
            pg_pubsub::changes::wal::WalItem::Error(e) => {
                assert!(e.is_connection(), "{e:?}");
            }
            _ => {}
        }
    }
    feed.close().await.unwrap();
    ps.shutdown().await;
}

/// A WAL feed of `ps` on a new table `{slot}_t` of `primary`,
/// built by `build` from the builder, that has received its first change.
#[cfg(feature = "wal")]
async fn wal_feed_past_one_change(
    ps: &pg_pubsub::PgPubSub,
    primary: &tokio_postgres::Client,
    slot: &str,
    build: impl FnOnce(
        pg_pubsub::changes::wal::WalFeedBuilder,
    ) -> pg_pubsub::changes::wal::WalFeedBuilder,
) -> pg_pubsub::changes::wal::WalFeed {
    let table = format!("{slot}_t");
    primary
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .unwrap();
    let mut feed = build(ps.wal_feed(slot).tables(&[&table]))
        .start()
        .await
        .unwrap();
    primary
        .batch_execute(&format!("INSERT INTO {table} VALUES (1)"))
        .await
        .unwrap();
    assert_eq!(next_wal_change(&mut feed).await["id"], 1);
    feed
}
