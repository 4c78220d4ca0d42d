//! Metrics (feature `metrics`) against a real server: each family appears
//! in the Prometheus text with its labels after the work that makes it.
#![cfg(feature = "metrics")]

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use pg_pubsub::durable::Start;
use pg_pubsub::metrics::{names, PrometheusHandle};
use pg_pubsub::queue::{Job, QueueEvent};
use pg_pubsub::{Delivery, GapCause};
use serde_json::{json, Value};

/// The process's recorder: installed once per test binary, before any
/// test makes a handle (each test calls this first).
fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| pg_pubsub::metrics::install_prometheus().expect("install the recorder"))
}

/// One sample of the Prometheus text: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the exposition text (the subset the recorder writes: no escapes
/// in our label values, one sample per line).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let value: f64 = value.parse().expect("a number");
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of `name` with exactly `labels` (other samples of the name
/// may exist: other tests' channels and queues).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| *v)
}

fn must(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels)
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in the rendered text"))
}

/// Renders in-process metrics only (no collect).
fn scrape() -> Vec<Sample> {
    parse(&prometheus().render())
}

#[tokio::test]
async fn listener_counts_notifications_gaps_reconnects_and_drops() {
    prometheus();
    let ps = builder().queue_capacity(2).connect().await.unwrap();
    let ch = channel("m_listen");
    let mut sub = ps.listen::<Value>(&ch).await.unwrap();
    ps.notify(&ch, &json!({"n": 1})).await.unwrap();
    next_message(&mut sub).await;
    let s = scrape();
    assert_eq!(
        must(&s, names::NOTIFICATIONS_RECEIVED, &[("channel", &ch)]),
        1.0
    );
    assert!(must(&s, names::LISTENER_CONNECTED, &[]) >= 1.0);

    // A lost listener session: a reconnect, and a gap for the subscription.
    let pid = ps.listener_pid().expect("connected");
    terminate(pid).await;
    expect_gap(
        &mut sub,
        GapCause::Reconnect {
            downtime: Duration::ZERO,
        },
    )
    .await;
    let s = scrape();
    assert!(must(&s, names::GAPS, &[("channel", &ch)]) >= 1.0);
    assert!(must(&s, names::LISTENER_RECONNECTS, &[]) >= 1.0);
    assert!(must(&s, names::LISTENER_CONNECTED, &[]) >= 1.0);

    // A full queue (capacity 2): ten sent in one transaction, the rest dropped.
    let client = raw_client().await;
    let sql: String = (0..10)
        .map(|i| format!("SELECT pg_notify('{ch}', '{{\"n\": {i}}}');"))
        .collect();
    client
        .batch_execute(&format!("BEGIN; {sql} COMMIT;"))
        .await
        .unwrap();
    let dropped = loop {
        match next(&mut sub).await {
            Delivery::Lagged(n) => break n,
            Delivery::Message(_) => {}
            other => panic!("expected messages then a lag, got {other:?}"),
        }
    };
    let s = scrape();
    assert!(must(&s, names::LAGGED, &[("channel", &ch)]) >= dropped as f64);
    // All ten usually came in the batch that overflowed; if the socket
    // split them, the rest follows: wait for the count (no event for it).
    let received = || {
        value(
            &scrape(),
            names::NOTIFICATIONS_RECEIVED,
            &[("channel", &ch)],
        )
    };
    tokio::time::timeout(WAIT, async {
        while received() != Some(11.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("received {:?} of 11", received()));
    ps.shutdown().await;
}

#[tokio::test]
async fn durable_publish_delivery_and_group_lag() {
    prometheus();
    let ps = pubsub().await;
    let d = ps.durable();
    d.install().await.unwrap();
    let ch = channel("m_durable");
    for n in 0..3 {
        d.publish(&ch, &json!({ "n": n })).await.unwrap();
    }
    let mut reader = d.subscribe::<Value>(&ch, "reader").await.unwrap();
    for _ in 0..3 {
        next_durable(&mut reader).await.ack();
    }
    // A group that joined and left: its cursor stays before all three.
    drop(d.subscribe::<Value>(&ch, "idle").await.unwrap());
    // One that joined at the end and left: it misses the next two.
    let late = d.subscribe::<Value>(&ch, "late").start(Start::Latest);
    drop(late.await.unwrap());
    for n in 3..5 {
        d.publish(&ch, &json!({ "n": n })).await.unwrap();
    }
    for _ in 3..5 {
        next_durable(&mut reader).await.ack();
    }

    let text = pg_pubsub::metrics::render(&ps, prometheus()).await.unwrap();
    let s = parse(&text);
    assert_eq!(must(&s, names::DURABLE_PUBLISHED, &[("channel", &ch)]), 5.0);
    assert_eq!(
        must(
            &s,
            names::DURABLE_DELIVERED,
            &[("channel", &ch), ("group", "reader")]
        ),
        5.0
    );
    let idle = [("channel", ch.as_str()), ("group", "idle")];
    assert_eq!(must(&s, names::DURABLE_GROUP_LAG_MESSAGES, &idle), 5.0);
    let late = [("channel", ch.as_str()), ("group", "late")];
    assert_eq!(must(&s, names::DURABLE_GROUP_LAG_MESSAGES, &late), 2.0);
    assert!(must(&s, names::DURABLE_GROUP_LAG_SECONDS, &idle) > 0.0);
    let reader = [("channel", ch.as_str()), ("group", "reader")];
    assert!(value(&s, names::DURABLE_GROUP_LAG_MESSAGES, &reader).is_some());

    // The group removed: its gauges go to zero rather than keep 5.
    assert!(d.remove_group(&ch, "idle").await.unwrap());
    let s = parse(&pg_pubsub::metrics::render(&ps, prometheus()).await.unwrap());
    assert_eq!(must(&s, names::DURABLE_GROUP_LAG_MESSAGES, &idle), 0.0);
    ps.shutdown().await;
}

#[tokio::test]
async fn queue_outcomes_durations_and_depths() {
    prometheus();
    let (ps, q) = queue().await;
    let name = channel("m_queue");
    let mut events = ps.queue().events();
    q.enqueue(&name, &json!("ok")).await.unwrap();
    q.enqueue(&name, &json!("fail")).await.unwrap();
    let (tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let worker = q
        .worker(&name)
        .poll_interval(Duration::from_millis(50))
        .retry_backoff(Duration::from_secs(600), Duration::from_secs(600))
        .run(move |job: Job| {
            let tx = tx.clone();
            async move {
                if job.payload() == "\"fail\"" {
                    return Err("refused".to_owned());
                }
                let _ = tx.send(());
                Ok(())
            }
        })
        .await
        .unwrap();
    recv(&mut done).await;
    wait_event(&mut events, |e| matches!(e, QueueEvent::JobRetried { .. })).await;
    worker.shutdown().await.unwrap();

    // Waiting (later), due now, and dead jobs of a second queue.
    let other = channel("m_depth");
    q.enqueue(&other, &json!(1)).await.unwrap();
    q.enqueue(&other, &json!(2)).await.unwrap();
    let admin = raw_client().await;
    admin
        .execute(
            "INSERT INTO pgpubsub.dead_jobs (id, queue, priority, attempt, max_attempts, \
             created_at, payload) SELECT least(min(id), 0) - 1, $1, 0, 1, 1, now(), '{}' FROM pgpubsub.dead_jobs",
            &[&other],
        )
        .await
        .unwrap();

    let s = parse(&pg_pubsub::metrics::render(&ps, prometheus()).await.unwrap());
    let q1 = [("queue", name.as_str())];
    assert_eq!(must(&s, names::QUEUE_JOBS_COMPLETED, &q1), 1.0);
    assert!(must(&s, names::QUEUE_JOBS_FAILED, &q1) >= 1.0);
    let count = format!("{}_count", names::QUEUE_JOB_DURATION);
    assert!(must(&s, &count, &q1) >= 2.0);
    let bucket = format!("{}_bucket", names::QUEUE_JOB_DURATION);
    assert!(must(&s, &bucket, &[("queue", &name), ("le", "+Inf")]) >= 2.0);
    // The failed job waits for its (long) retry.
    let st = |state| [("queue", name.as_str()), ("state", state)];
    assert_eq!(must(&s, names::QUEUE_JOBS, &st("scheduled")), 1.0);
    assert_eq!(must(&s, names::QUEUE_JOBS, &st("ready")), 0.0);
    assert_eq!(must(&s, names::QUEUE_JOBS, &st("running")), 0.0);
    let st = |state| [("queue", other.as_str()), ("state", state)];
    assert_eq!(must(&s, names::QUEUE_JOBS, &st("ready")), 2.0);
    assert_eq!(must(&s, names::QUEUE_JOBS, &st("dead")), 1.0);
    let q2 = [("queue", other.as_str())];
    assert!(must(&s, names::QUEUE_OLDEST_READY, &q2) > 0.0);

    // The queue emptied: its gauges go to zero.
    admin
        .execute("DELETE FROM pgpubsub.jobs WHERE queue = $1", &[&other])
        .await
        .unwrap();
    admin
        .execute("DELETE FROM pgpubsub.dead_jobs WHERE queue = $1", &[&other])
        .await
        .unwrap();
    let s = parse(&pg_pubsub::metrics::render(&ps, prometheus()).await.unwrap());
    assert_eq!(must(&s, names::QUEUE_JOBS, &st("ready")), 0.0);
    assert_eq!(must(&s, names::QUEUE_JOBS, &st("dead")), 0.0);
    assert_eq!(must(&s, names::QUEUE_OLDEST_READY, &q2), 0.0);
    ps.shutdown().await;
}

#[tokio::test]
async fn oldest_xmin_sees_an_open_transaction() {
    prometheus();
    let ps = pubsub().await;
    let holder = raw_client().await;
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    let s = parse(&pg_pubsub::metrics::render(&ps, prometheus()).await.unwrap());
    assert!(must(&s, names::OLDEST_XMIN, &[]) > 0.0);
    holder.batch_execute("COMMIT").await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn collect_without_the_schema_installed_is_empty_not_an_error() {
    prometheus();
    let ps = pubsub().await;
    let schema = channel("m_none").to_lowercase();
    ps.metrics()
        .with_schema(&schema)
        .unwrap()
        .collect()
        .await
        .unwrap();
    ps.shutdown().await;
}

#[cfg(feature = "wal")]
#[tokio::test]
async fn wal_feed_counts_changes_and_its_slot_is_reported() {
    use pg_pubsub::changes::wal::{WalFeed, WalItem};
    prometheus();
    let slot = channel("m_wal");
    let client = raw_client().await;
    let table = format!("{slot}_t");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, v text)"
        ))
        .await
        .unwrap();
    let ps = pubsub().await;
    let mut feed: WalFeed = ps.wal_feed(&slot).tables(&[&table]).start().await.unwrap();
    client
        .batch_execute(&format!("INSERT INTO {table} VALUES (1, 'a'), (2, 'b')"))
        .await
        .unwrap();
    let mut changes = 0;
    while changes < 2 {
        if let WalItem::Change { .. } = next(&mut feed).await {
            changes += 1;
        }
    }
    let s = parse(&pg_pubsub::metrics::render(&ps, prometheus()).await.unwrap());
    let l = [("slot", slot.as_str())];
    assert!(must(&s, names::WAL_CHANGES, &l) >= 2.0);
    assert!(must(&s, names::WAL_SLOT_LAG_BYTES, &l) >= 0.0);
    assert_eq!(must(&s, names::WAL_SLOT_ACTIVE, &l), 1.0);
    feed.close().await.unwrap();
    drop_slot_when_free(&ps, &slot).await;
    ps.shutdown().await;
}

/// Drops `slot` once its stream let go of it (the server has no event for
/// a slot's release: polls).
#[cfg(feature = "wal")]
async fn drop_slot_when_free(ps: &pg_pubsub::PgPubSub, slot: &str) {
    use pg_pubsub::tokio_postgres::error::SqlState;
    let dropped = async {
        loop {
            match ps.drop_slot(slot).await {
                Ok(_) => return,
                Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("drop slot: {e:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, dropped)
        .await
        .expect("the slot stayed in use");
}
