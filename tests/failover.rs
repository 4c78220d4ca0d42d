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
