//! Durable channels on a real server: the tick cursor under concurrent and
//! out-of-order commits, groups, take-over, acks, retention, install.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use pg_pubsub::durable::{
    ConsumerStats, Durable, DurableDelivery, DurableEvent, DurableSubscription, Position, Start,
};
use pg_pubsub::Text;
use pg_pubsub::{ConnectionEvent, PgPubSub};

async fn durable() -> (PgPubSub, Durable) {
    let ps = pubsub().await;
    let d = ps.durable();
    d.install().await.expect("install");
    (ps, d)
}

/// A durable handle on a schema of its own: rotation empties partitions
/// shared by every channel of a schema, so exact counts need one that
/// other tests' open transactions and unacked messages do not touch.
async fn durable_alone(prefix: &str) -> (PgPubSub, Durable, String) {
    let ps = pubsub().await;
    let schema = channel(prefix);
    let d = ps.durable().with_schema(&schema).expect("schema name");
    d.install().await.expect("install");
    (ps, d, schema)
}

/// Rows stored per partition of `schema`.messages, in partition order.
async fn rows_per_partition(client: &tokio_postgres::Client, schema: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for k in 0..4 {
        let sql = format!("SELECT count(*) FROM {schema}.messages_{k}");
        out.push(client.query_one(&sql, &[]).await.unwrap().get(0));
    }
    out
}

async fn publish_sql(client: &tokio_postgres::Client, channel: &str, payload: &str) {
    client
        .execute("SELECT pgpubsub.publish($1, $2)", &[&channel, &payload])
        .await
        .expect("publish from SQL");
}

#[tokio::test]
async fn a_transaction_opened_first_and_committed_last_is_delivered() {
    let (ps, d) = durable().await;
    let ch = channel("ooo");
    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    let a = raw_client().await;
    let b = raw_client().await;
    a.batch_execute("BEGIN").await.unwrap();
    publish_sql(&a, &ch, "a").await; // takes the lower seq and xid
    b.batch_execute("BEGIN").await.unwrap();
    publish_sql(&b, &ch, "b").await;
    b.batch_execute("COMMIT").await.unwrap();
    let mb = next_durable(&mut sub).await;
    assert_eq!(mb.payload(), "b");
    mb.ack();
    sub.flush().await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    let ma = next_durable(&mut sub).await;
    assert_eq!(ma.payload(), "a");
    assert!(
        ma.position() > mb.position(),
        "delivery order is position order"
    );
    ma.ack();
    sub.close().await.unwrap();
    // A restarted consumer has nothing left: both are acked.
    let mut again = d.subscribe::<Text>(&ch, "g").await.unwrap();
    d.publish(&ch, Text("c")).await.unwrap();
    assert_eq!(next_durable(&mut again).await.payload(), "c");
    ps.shutdown().await;
}

/// A consumer stops after the latest batch its tick saw and counts on the
/// wake-up of whatever commits later. With polls out of the way (an hour),
/// transactions opened first and committed last, interleaved with others,
/// and batches ticked by the other group's consumer all still arrive,
/// once each and in position order, to both groups.
#[tokio::test]
async fn wake_ups_alone_deliver_out_of_order_commits_to_two_groups() {
    let (ps, d) = durable().await;
    let ch = channel("wakeonly");
    let hour = Duration::from_secs(3600);
    let mut subs = Vec::new();
    for g in ["one", "two"] {
        let sub = d
            .subscribe::<Text>(&ch, g)
            .poll_interval(hour)
            .max_poll_interval(Some(hour))
            .await
            .unwrap();
        subs.push(sub);
    }
    let (a, b) = (raw_client().await, raw_client().await);
    const ROUNDS: usize = 20;
    let mut seen = [HashSet::new(), HashSet::new()];
    let mut last: [Option<Position>; 2] = [None, None];
    // Takes group k's next message: positions increase, no repeats.
    async fn take(
        sub: &mut DurableSubscription<Text>,
        seen: &mut HashSet<String>,
        last: &mut Option<Position>,
    ) -> String {
        let m = next_durable(sub).await;
        assert!(last.is_none_or(|l| l < m.position()), "positions increase");
        *last = Some(m.position());
        let p = m.payload().to_string();
        assert!(seen.insert(p.clone()), "{p} twice");
        m.ack();
        p
    }
    for i in 0..ROUNDS {
        a.batch_execute("BEGIN").await.unwrap();
        publish_sql(&a, &ch, &format!("a{i}")).await;
        b.batch_execute("BEGIN").await.unwrap();
        publish_sql(&b, &ch, &format!("b{i}")).await;
        b.batch_execute("COMMIT").await.unwrap();
        if i % 2 == 0 {
            // One group, in turn, reads up to b{i} while `a` is open.
            let k = i % 4 / 2;
            let want = format!("b{i}");
            while take(&mut subs[k], &mut seen[k], &mut last[k]).await != want {}
        }
        a.batch_execute("COMMIT").await.unwrap();
    }
    for k in 0..2 {
        while seen[k].len() < 2 * ROUNDS {
            take(&mut subs[k], &mut seen[k], &mut last[k]).await;
        }
        assert_quiet(&mut subs[k], Duration::from_millis(200)).await;
    }
    ps.shutdown().await;
}

#[tokio::test]
async fn pages_smaller_than_a_batch_deliver_each_message_once_in_order() {
    let (ps, d) = durable().await;
    let ch = channel("pages");
    let five = |p: &str| (0..5).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    // Batch 1: b's rows, while a is in progress (so a is in its snapshot's xip).
    let a = raw_client().await;
    a.batch_execute("BEGIN").await.unwrap();
    for m in five("a") {
        publish_sql(&a, &ch, &m).await;
    }
    d.publish_batch(&ch, five("b").iter().map(Text))
        .await
        .unwrap();
    d.tick(&ch).await.unwrap();
    // Batch 2: a's rows (in progress at tick 1) and c's (newer): pages of
    // two need the general read; then batch 3, a plain range, in pages.
    a.batch_execute("COMMIT").await.unwrap();
    d.publish_batch(&ch, five("c").iter().map(Text))
        .await
        .unwrap();
    d.tick(&ch).await.unwrap();
    d.publish_batch(&ch, five("d").iter().map(Text))
        .await
        .unwrap();
    let mut sub = d.subscribe::<Text>(&ch, "g").batch_size(2).await.unwrap();
    let got = take_acked(&mut sub, 20).await;
    let want: Vec<String> = ["b", "a", "c", "d"].iter().flat_map(|p| five(p)).collect();
    assert_eq!(got, want);
    assert_quiet(&mut sub, Duration::from_millis(200)).await;
    ps.shutdown().await;
}

#[tokio::test]
async fn sessions_idle_in_transaction_do_not_stall_delivery() {
    let (ps, d) = durable().await;
    let ch = channel("idle");
    let published = raw_client().await;
    published.batch_execute("BEGIN").await.unwrap();
    publish_sql(&published, &ch, "held").await;
    // Holds back the xmin horizon without publishing.
    let holder = raw_client().await;
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();

    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    for round in 0..3 {
        let batch: Vec<String> = (0..50).map(|i| format!("{round}-{i}")).collect();
        d.publish_batch(&ch, batch.iter().map(Text)).await.unwrap();
        assert_eq!(take_acked(&mut sub, 50).await, batch);
    }
    published.batch_execute("COMMIT").await.unwrap();
    assert_eq!(next_durable(&mut sub).await.payload(), "held");
    holder.batch_execute("COMMIT").await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn concurrent_publishers_are_delivered_once_in_the_same_order_to_two_groups() {
    let (ps, d) = durable().await;
    let ch = channel("conc");
    const TASKS: usize = 8;
    const EACH: usize = 100;
    let mut g1 = d.subscribe::<Text>(&ch, "one").await.unwrap();
    let mut g2 = d
        .subscribe::<Text>(&ch, "two")
        .batch_size(7) // pages end inside batches and transactions
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let d = d.clone();
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                if i % 10 == 0 {
                    // Three messages in one transaction: contiguous.
                    let batch = [0, 1, 2].map(|k| format!("{t}:{i}:{k}"));
                    d.publish_batch(&ch, batch.iter().map(Text)).await.unwrap();
                } else {
                    d.publish(&ch, Text(&format!("{t}:{i}:0"))).await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = TASKS * EACH + TASKS * (EACH / 10) * 2;
    let mut orders = Vec::new();
    for sub in [&mut g1, &mut g2] {
        let mut seen = HashSet::new();
        let mut last: Option<Position> = None;
        let mut order = Vec::new();
        let mut per_task = [(-1i64, -1i64); TASKS];
        for _ in 0..total {
            let m = next_durable(sub).await;
            assert!(last.is_none_or(|l| l < m.position()), "positions increase");
            last = Some(m.position());
            let p = m.payload().to_string();
            assert!(seen.insert(p.clone()), "{p} delivered twice");
            let parts: Vec<i64> = p.split(':').map(|x| x.parse().unwrap()).collect();
            let (t, i, k) = (parts[0] as usize, parts[1], parts[2]);
            // Each publisher's messages in its commit order, a
            // transaction's messages one after another.
            assert!((i, k) > per_task[t], "{p} after {:?}", per_task[t]);
            if k > 0 {
                assert_eq!(order.last(), Some(&format!("{t}:{i}:{}", k - 1)));
            }
            per_task[t] = (i, k);
            order.push(p);
            m.ack();
        }
        orders.push(order);
    }
    assert_eq!(orders[0], orders[1], "every group sees the same order");
    assert_quiet(&mut g1, Duration::from_millis(200)).await;
    ps.shutdown().await;
}

#[tokio::test]
async fn rollback_publishes_nothing_and_commit_publishes_in_the_transaction() {
    let (ps, d) = durable().await;
    let ch = channel("rb");
    let mut sub = d.subscribe::<serde_json::Value>(&ch, "g").await.unwrap();
    let mut client = raw_client().await;
    let tx = client.transaction().await.unwrap();
    d.publish_tx(&tx, &ch, &serde_json::json!({"n": 1}))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    d.publish_tx(&tx, &ch, &serde_json::json!({"n": 2}))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(next_durable(&mut sub).await.payload()["n"], 2);
    assert_quiet(&mut sub, Duration::from_millis(200)).await;
    ps.shutdown().await;
}

#[tokio::test]
async fn ten_megabyte_payload_round_trips() {
    let (ps, d) = durable().await;
    let ch = channel("big");
    let big: String = (0..10 * 1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    d.publish(&ch, Text(&big)).await.unwrap();
    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    let m = next_durable(&mut sub).await;
    assert_eq!(m.payload().len(), big.len());
    assert!(*m.payload() == big);
    ps.shutdown().await;
}

#[tokio::test]
async fn a_restarted_consumer_continues_after_its_last_ack() {
    let (ps, d) = durable().await;
    let ch = channel("restart");
    let all: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    d.publish_batch(&ch, all.iter().map(Text)).await.unwrap();
    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    let mut got = Vec::new();
    for i in 0..7 {
        let m = next_durable(&mut sub).await;
        if i == 4 {
            m.ack(); // acks 0..=4; 5 and 6 are delivered, not acked
        }
        got.push(m.into_payload());
    }
    assert_eq!(got, all[..7]);
    sub.close().await.unwrap();
    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    assert_eq!(take_acked(&mut sub, 5).await, all[5..]);
    let groups = d.groups(&ch).await.unwrap();
    sub.flush().await.unwrap();
    assert_eq!(groups.len(), 1);
    ps.shutdown().await;
}

#[tokio::test]
async fn a_new_group_can_start_at_the_latest_message_or_a_position() {
    let (ps, d) = durable().await;
    let ch = channel("start");
    d.publish_batch(&ch, ["old1", "old2"].map(Text))
        .await
        .unwrap();
    let mut first = d.subscribe::<Text>(&ch, "first").await.unwrap();
    let old1 = next_durable(&mut first).await;
    let mut latest = d
        .subscribe::<Text>(&ch, "latest")
        .start(Start::Latest)
        .await
        .unwrap();
    let mut after = d
        .subscribe::<Text>(&ch, "after")
        .start(Start::After(old1.position()))
        .await
        .unwrap();
    d.publish(&ch, Text("new")).await.unwrap();
    assert_eq!(next_durable(&mut latest).await.payload(), "new");
    assert_eq!(next_durable(&mut after).await.payload(), "old2");
    assert_eq!(next_durable(&mut after).await.payload(), "new");
    ps.shutdown().await;
}

/// Two instances in one group, `a` active, with "0".."2" acked and "3"
/// delivered but not acked.
async fn group_of_two(
    ch: &str,
) -> (
    PgPubSub,
    DurableSubscription<Text>,
    PgPubSub,
    DurableSubscription<Text>,
) {
    let (a, da) = durable().await;
    let mut sub_a = da.subscribe::<Text>(ch, "g").await.unwrap();
    assert!(sub_a.is_active());
    let b = builder()
        .lock_retry_interval(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let mut sub_b = b.durable().subscribe::<Text>(ch, "g").await.unwrap();
    assert!(!sub_b.is_active());
    da.publish_batch(ch, ["0", "1", "2", "3", "4", "5"].map(Text))
        .await
        .unwrap();
    assert_eq!(take_acked(&mut sub_a, 3).await, ["0", "1", "2"]);
    sub_a.flush().await.unwrap();
    assert_eq!(next_durable(&mut sub_a).await.payload(), "3");
    assert_quiet(&mut sub_b, Duration::from_millis(200)).await;
    (a, sub_a, b, sub_b)
}

/// A new group catching up on many small batches (one tick each) reads
/// them back to back: with an hour-long poll interval and no wake-up for
/// old messages, it would otherwise wait an interval per batch.
#[tokio::test]
async fn a_new_group_reads_many_small_batches_without_waiting_for_polls() {
    let (ps, d) = durable().await;
    let ch = channel("small_batches");
    for i in 0..30 {
        d.publish(&ch, Text(&i.to_string())).await.unwrap();
        d.tick(&ch).await.unwrap();
    }
    let mut sub = d
        .subscribe::<Text>(&ch, "late")
        .poll_interval(Duration::from_secs(3600))
        .await
        .unwrap();
    let got = take_acked(&mut sub, 30).await;
    assert_eq!(got, (0..30).map(|i| i.to_string()).collect::<Vec<_>>());
    ps.shutdown().await;
}

#[tokio::test]
async fn a_new_group_can_start_at_a_time() {
    let (ps, d) = durable().await;
    let ch = channel("time");
    d.publish(&ch, Text("before")).await.unwrap();
    d.tick(&ch).await.unwrap(); // "before" is in a batch ticked before `at`
    let client = raw_client().await;
    // The server's clock, not ours.
    let at: std::time::SystemTime = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    d.publish(&ch, Text("after")).await.unwrap();
    let mut sub = d
        .subscribe::<Text>(&ch, "g")
        .start(Start::Time(at))
        .await
        .unwrap();
    assert_eq!(next_durable(&mut sub).await.payload(), "after");
    ps.shutdown().await;
}

#[tokio::test]
async fn a_quiet_channel_is_delivered_by_polling() {
    let (ps, d) = durable().await;
    let ch = channel("quiet");
    d.set_quiet(&ch, true).await.unwrap();
    let mut wake = ps.listen::<Text>(&d.schema().wake_channel()).await.unwrap();
    let mut sub = d
        .subscribe::<Text>(&ch, "g")
        .poll_interval(Duration::from_millis(50))
        .await
        .unwrap();
    d.publish(&ch, Text("polled")).await.unwrap();
    assert_eq!(next_durable(&mut sub).await.payload(), "polled");
    // Other tests' channels wake up meanwhile; this one never does.
    let own = tokio::time::timeout(Duration::from_millis(100), async {
        loop {
            if let pg_pubsub::Delivery::Message(m) = next(&mut wake).await {
                if m.raw() == ch {
                    return;
                }
            }
        }
    })
    .await;
    assert!(own.is_err(), "a quiet channel sent a wake-up");
    ps.shutdown().await;
}

#[tokio::test]
async fn a_standby_takes_over_the_group_from_the_last_ack_on_shutdown() {
    let ch = channel("takeover");
    let (a, sub_a, b, mut sub_b) = group_of_two(&ch).await;
    let mut b_events = b.events();
    a.shutdown().await;
    drop(sub_a);
    wait_event(&mut b_events, |e| {
        matches!(e, ConnectionEvent::LockAcquired { channel } if channel.as_str() == sub_b.election_channel())
    })
    .await;
    assert!(sub_b.is_active());
    assert_eq!(take_acked(&mut sub_b, 3).await, ["3", "4", "5"]);
    sub_b.close().await.unwrap();
    b.shutdown().await;
}

#[tokio::test]
async fn after_the_active_session_is_killed_the_group_resumes_from_the_last_ack() {
    let ch = channel("killed");
    let (a, mut sub_a, b, mut sub_b) = group_of_two(&ch).await;
    let mut a_events = a.events();
    terminate(a.listener_pid().unwrap()).await;
    wait_event(&mut a_events, |e| {
        matches!(e, ConnectionEvent::LockLost { .. })
    })
    .await;
    // Either instance may win the election again (`a` reconnects at
    // once); whichever does starts over from the last ack, "3". What `a`
    // had buffered before may come first: duplicates, never losses.
    let mut both = futures::stream::select(&mut sub_a, &mut sub_b);
    let mut after_three = Vec::new();
    while after_three.last().map(String::as_str) != Some("5") {
        // Not acked: acks are cumulative, and acking a buffered "4" would
        // pass the "3" this test waits for.
        let m = next_durable(&mut both).await;
        if m.payload() == "3" || !after_three.is_empty() {
            after_three.push(m.into_payload().into_string());
        }
    }
    assert_eq!(after_three, ["3", "4", "5"]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn ack_in_moves_the_cursor_with_the_consumers_transaction() {
    let (ps, d) = durable().await;
    let ch = channel("ackin");
    let mut client = raw_client().await;
    let table = format!("work_{}", &ch);
    client
        .batch_execute(&format!("CREATE TABLE {table} (payload text)"))
        .await
        .unwrap();
    d.publish_batch(&ch, ["x", "y"].map(Text)).await.unwrap();
    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    let x = next_durable(&mut sub).await;
    let tx = client.transaction().await.unwrap();
    tx.execute(
        &format!("INSERT INTO {table} VALUES ($1)"),
        &[&x.payload().as_str()],
    )
    .await
    .unwrap();
    x.ack_tx(&tx).await.unwrap();
    tx.commit().await.unwrap();
    let y = next_durable(&mut sub).await;
    let tx = client.transaction().await.unwrap();
    y.ack_tx(&tx).await.unwrap();
    tx.rollback().await.unwrap();
    sub.close().await.unwrap();

    let groups = d.groups(&ch).await.unwrap();
    assert_eq!(groups[0].position, x.position());
    assert_eq!(groups[0].lag_messages, 1);
    // Rolled back: delivered again.
    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    assert_eq!(next_durable(&mut sub).await.payload(), "y");
    ps.shutdown().await;
}

#[tokio::test]
async fn concurrent_installs_of_a_new_schema_all_succeed() {
    let ps = pubsub().await;
    let schema = format!("dur_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let d = ps.durable().with_schema(&schema).unwrap();
        tasks.push(tokio::spawn(async move { d.install().await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let d = ps.durable().with_schema(&schema).unwrap();
    d.publish("c", Text("works")).await.unwrap();
    let mut sub = d.subscribe::<Text>("c", "g").await.unwrap();
    assert_eq!(next_durable(&mut sub).await.payload(), "works");
    ps.shutdown().await;
}

#[tokio::test]
async fn retention_removes_what_every_group_acked_and_signals_expiry() {
    let (ps, d, schema) = durable_alone("retain").await;
    let client = raw_client().await;
    let ch = channel("retain");
    let all: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let mut g1 = d.subscribe::<Text>(&ch, "g1").await.unwrap();
    let mut g2 = d.subscribe::<Text>(&ch, "g2").await.unwrap();
    d.publish_batch(&ch, all.iter().map(Text)).await.unwrap();
    take_acked(&mut g1, 10).await;
    take_acked(&mut g2, 4).await;
    g1.flush().await.unwrap();
    g2.close().await.unwrap();
    let removed = d.retain(&ch, None).await.unwrap();
    assert_eq!((removed.acked, removed.expired), (4, 0));
    // The partition was emptied; the 6 g2 still needs were carried over.
    assert_eq!((removed.truncated, removed.carried), (1, 6));
    assert_eq!(rows_per_partition(&client, &schema).await, [0, 6, 0, 0]);
    let groups = d.groups(&ch).await.unwrap();
    assert_eq!(
        groups.iter().map(|g| g.lag_messages).collect::<Vec<_>>(),
        [0, 6]
    );

    // Everything older than now: g2 loses the 6 it had not acked.
    let removed = d.retain(&ch, Some(Duration::ZERO)).await.unwrap();
    assert_eq!((removed.acked, removed.expired), (0, 6));
    assert_eq!(rows_per_partition(&client, &schema).await, [0, 0, 0, 0]);
    let mut g2 = d.subscribe::<Text>(&ch, "g2").await.unwrap();
    match next(&mut g2).await {
        DurableDelivery::Truncated { lost } => assert_eq!(lost, 6),
        other => panic!("expected a truncation, got {other:?}"),
    }
    d.publish(&ch, Text("after")).await.unwrap();
    assert_eq!(next_durable(&mut g2).await.payload(), "after");
    assert_eq!(next_durable(&mut g1).await.payload(), "after");
    ps.shutdown().await;
}

#[tokio::test]
async fn a_session_idle_in_transaction_while_partitions_rotate_loses_nothing() {
    let (ps, d, schema) = durable_alone("idlerot").await;
    let ch = channel("idlerot");
    let client = raw_client().await;
    let mut sub = d
        .subscribe::<Text>(&ch, "g")
        .retain_every(None)
        .await
        .unwrap();
    // Publishes into the current partition, then stays open throughout.
    let mut idle_client = raw_client().await;
    let idle = idle_client.transaction().await.unwrap();
    idle.execute(&format!("SELECT {schema}.publish($1, 'idle')"), &[&ch])
        .await
        .unwrap();
    let mut truncated = 0;
    for round in 0..6 {
        let batch: Vec<String> = (0..5).map(|i| format!("{round}.{i}")).collect();
        d.publish_batch(&ch, batch.iter().map(Text)).await.unwrap();
        assert_eq!(take_acked(&mut sub, 5).await, batch);
        sub.flush().await.unwrap();
        truncated += d.retain(&ch, None).await.unwrap().truncated;
    }
    // The partition the open transaction wrote to cannot be emptied (it
    // keeps round 0 too); the others rotated, each emptied once read.
    assert_eq!(truncated, 5);
    assert_eq!(stored(&client, &schema, &ch).await, 5);
    idle.commit().await.unwrap();
    let m = next_durable(&mut sub).await;
    assert_eq!(m.payload(), "idle");
    m.ack();
    sub.flush().await.unwrap();
    d.retain(&ch, None).await.unwrap();
    d.retain(&ch, None).await.unwrap();
    assert_eq!(stored(&client, &schema, &ch).await, 0);
    assert_eq!(rows_per_partition(&client, &schema).await, [0, 0, 0, 0]);
    sub.close().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn messages_of_a_channel_without_groups_survive_rotations() {
    let (ps, d, _schema) = durable_alone("nogroup").await;
    let (lonely, busy) = (channel("lonely"), channel("busy"));
    d.publish(&lonely, Text("kept")).await.unwrap();
    let mut sub = d
        .subscribe::<Text>(&busy, "g")
        .retain_every(None)
        .await
        .unwrap();
    let mut carried = 0;
    for round in 0..5 {
        d.publish(&busy, Text(&round.to_string())).await.unwrap();
        take_acked(&mut sub, 1).await;
        sub.flush().await.unwrap();
        carried += d.retain(&busy, None).await.unwrap().carried;
    }
    assert!(
        carried >= 4,
        "carried from partition to partition: {carried}"
    );
    let mut late = d.subscribe::<Text>(&lonely, "late").await.unwrap();
    assert_eq!(next_durable(&mut late).await.payload(), "kept");
    sub.close().await.unwrap();
    ps.shutdown().await;
}

/// Whether `e` is the durable event `kind` for (`ch`, `group`).
fn durable_event(e: &DurableEvent, kind: &str, ch: &str, group: &str) -> bool {
    let (k, c, g) = match e {
        DurableEvent::Active { channel, group } => ("active", channel, group),
        DurableEvent::Standby { channel, group } => ("standby", channel, group),
        _ => return false,
    };
    k == kind && c.as_str() == ch && &**g == group
}

/// Counts what the events say automatic retention removed from `ch`,
/// until `done(acked, expired)`.
async fn wait_retained(
    events: &mut pg_pubsub::event::Events<DurableEvent>,
    ch: &str,
    done: impl Fn(u64, u64) -> bool,
) {
    let (mut acked, mut expired) = (0, 0);
    wait_event(events, |e| {
        if let DurableEvent::Retained {
            channel,
            acked: a,
            expired: x,
            ..
        } = e
        {
            if channel.as_str() == ch {
                acked += a;
                expired += x;
            }
        }
        done(acked, expired)
    })
    .await;
}

async fn stored(client: &tokio_postgres::Client, schema: &str, ch: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.messages WHERE channel = $1"),
            &[&ch],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn take_over_is_reported_as_durable_active_and_standby_events() {
    let ch = channel("events");
    let (a, da) = durable().await;
    let mut a_events = da.events();
    let sub_a = da.subscribe::<Text>(&ch, "g").await.unwrap();
    wait_event(&mut a_events, |e| durable_event(e, "active", &ch, "g")).await;
    let b = builder()
        .lock_retry_interval(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let mut b_events = b.durable().events();
    let sub_b = b.durable().subscribe::<Text>(&ch, "g").await.unwrap();
    wait_event(&mut b_events, |e| durable_event(e, "standby", &ch, "g")).await;
    sub_a.close().await.unwrap();
    wait_event(&mut b_events, |e| durable_event(e, "active", &ch, "g")).await;
    assert!(sub_b.is_active());
    drop(sub_b);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn the_active_consumer_removes_what_every_group_acked_without_a_retain_call() {
    let (ps, d, schema) = durable_alone("autoretain").await;
    let ch = channel("autoretain");
    let client = raw_client().await;
    let mut events = d.events();
    let mut sub = d
        .subscribe::<Text>(&ch, "g")
        .retain_every(Some(Duration::from_millis(50)))
        .await
        .unwrap();
    let all: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    d.publish_batch(&ch, all.iter().map(Text)).await.unwrap();
    take_acked(&mut sub, 4).await;
    sub.flush().await.unwrap();
    wait_retained(&mut events, &ch, |acked, _| acked >= 4).await;
    assert_eq!(stored(&client, &schema, &ch).await, 6, "unacked ones stay");
    take_acked(&mut sub, 6).await;
    sub.flush().await.unwrap();
    wait_retained(&mut events, &ch, |acked, _| acked >= 6).await;
    assert_eq!(stored(&client, &schema, &ch).await, 0);
    sub.close().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn automatic_max_age_retention_is_signalled_in_stream_and_as_an_event() {
    let (ps, d, _schema) = durable_alone("autoexpire").await;
    let ch = channel("autoexpire");
    let mut events = d.events();
    // "late" exists, at the earliest position, and is not running.
    d.subscribe::<Text>(&ch, "late")
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let all: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    d.publish_batch(&ch, all.iter().map(Text)).await.unwrap();
    // Another group's active consumer expires everything older than now.
    let janitor = d
        .subscribe::<Text>(&ch, "janitor")
        .retain_every(Some(Duration::from_millis(50)))
        .max_age(Some(Duration::ZERO))
        .await
        .unwrap();
    wait_retained(&mut events, &ch, |_, expired| expired >= 10).await;
    let mut late = d.subscribe::<Text>(&ch, "late").await.unwrap();
    match next(&mut late).await {
        DurableDelivery::Truncated { lost } => assert_eq!(lost, 10),
        other => panic!("expected a truncation, got {other:?}"),
    }
    let event = wait_event(&mut events, |e| {
        matches!(e, DurableEvent::Truncated { channel, group, .. }
            if channel.as_str() == ch && &**group == "late")
    })
    .await;
    assert!(matches!(event, DurableEvent::Truncated { lost: 10, .. }));
    drop(janitor);
    ps.shutdown().await;
}

/// `pg-pubsub durable tail` processes, SIGKILLed mid-stream.
#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use common::fleet::Fleet;

    fn tail_ready(line: &str) -> bool {
        line.contains("tailing")
    }

    #[tokio::test]
    async fn a_killed_tail_loses_nothing_and_repeats_only_unacked_lines() {
        let (ps, d) = durable().await;
        let ch = channel("cli_kill");
        let all: Vec<String> = (0..400).map(|i| format!("{i:04}")).collect();
        let args = ["durable", "tail", ch.as_str(), "--group", "g"];
        let mut fleet = Fleet::new();
        let first = fleet.spawn_cmd(&args, tail_ready).await;
        d.publish_batch(&ch, all[..200].iter().map(Text))
            .await
            .unwrap();
        fleet.wait_for(|f| f.received[first].len() >= 50).await;
        fleet.signal(first, "-KILL").await;
        let printed = fleet.received[first].clone();
        assert_eq!(printed, all[..printed.len()], "in order, no gaps");

        let second = fleet.spawn_cmd(&args, tail_ready).await;
        d.publish_batch(&ch, all[200..].iter().map(Text))
            .await
            .unwrap();
        fleet
            .wait_for(|f| f.received[second].last() == all.last())
            .await;
        let again = &fleet.received[second];
        // It starts at or before the first line the killed one printed
        // after its last written ack, and never skips one.
        let start: usize = again[0].parse().unwrap();
        assert!(start <= printed.len(), "{start} > {}", printed.len());
        assert_eq!(again[..], all[start..]);

        // SIGTERM: exits 0 after writing its acks; nothing is repeated.
        let status = fleet.signal(second, "-TERM").await;
        assert!(status.success(), "{status:?}");
        let third = fleet.spawn_cmd(&args, tail_ready).await;
        d.publish(&ch, Text("last")).await.unwrap();
        fleet.wait_for(|f| !f.received[third].is_empty()).await;
        assert_eq!(fleet.received[third], ["last"]);
        fleet.signal(third, "-KILL").await;
        ps.shutdown().await;
    }

    #[tokio::test]
    async fn a_standby_tail_process_takes_over_when_the_active_one_is_killed() {
        let (ps, d) = durable().await;
        let ch = channel("cli_standby");
        let all: Vec<String> = (0..300).map(|i| format!("{i:04}")).collect();
        let args = ["durable", "tail", ch.as_str(), "--group", "g"];
        let mut fleet = Fleet::new();
        let active = fleet.spawn_cmd(&args, |l| l.contains("(active)")).await;
        let standby = fleet.spawn_cmd(&args, |l| l.contains("standing by")).await;
        d.publish_batch(&ch, all[..150].iter().map(Text))
            .await
            .unwrap();
        fleet.wait_for(|f| f.received[active].len() >= 30).await;
        fleet.signal(active, "-KILL").await;
        fleet
            .wait_err(|p, l| p == standby && l.contains("now the group's active consumer"))
            .await;
        d.publish_batch(&ch, all[150..].iter().map(Text))
            .await
            .unwrap();
        fleet
            .wait_for(|f| f.received[standby].last() == all.last())
            .await;
        let (first, second) = (&fleet.received[active], &fleet.received[standby]);
        assert_eq!(first[..], all[..first.len()]);
        let start: usize = second[0].parse().unwrap();
        assert!(start <= first.len(), "{start} > {}", first.len());
        assert_eq!(second[..], all[start..]);
        fleet.signal(standby, "-KILL").await;
        ps.shutdown().await;
    }

    #[tokio::test]
    async fn several_publisher_processes_are_each_delivered_once_in_their_order() {
        use tokio::io::AsyncWriteExt;
        let (ps, d) = durable().await;
        let ch = channel("cli_pub");
        let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
        let mut children = Vec::new();
        for p in 0..4 {
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pg-pubsub"))
                .args(["durable", "publish", &ch, "--stdin"])
                .env("DATABASE_URL", server().url())
                .stdin(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            // Lines one at a time, several batches per process.
            let input: String = (0..2500).map(|i| format!("{p}:{i}\n")).collect();
            tokio::spawn(async move {
                stdin.write_all(input.as_bytes()).await.unwrap();
            });
            children.push(child);
        }
        for mut child in children {
            assert!(child.wait().await.unwrap().success());
        }
        let mut last = [-1i64; 4];
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let m = next_durable(&mut sub).await;
            let (p, i) = m.payload().split_once(':').unwrap();
            let (p, i): (usize, i64) = (p.parse().unwrap(), i.parse().unwrap());
            assert!(seen.insert((p, i)), "{p}:{i} twice");
            assert!(i > last[p], "{p}:{i} after {p}:{}", last[p]);
            last[p] = i;
        }
        assert_quiet(&mut sub, Duration::from_millis(200)).await;
        ps.shutdown().await;
    }
}

#[tokio::test]
async fn publish_wakes_consumers_after_commit_but_not_for_a_quiet_channel() {
    let (_ps, d) = durable().await;
    let (_listener, mut rx) = raw_listener(&d.schema().wake_channel()).await;
    let (loud, quiet, sentinel) = (channel("loud"), channel("quiet"), channel("end"));
    d.set_quiet(&quiet, true).await.expect("quiet");
    let (d2, loud2) = (&d, &loud);
    futures::future::try_join_all((0..5).map(|i| async move { d2.publish(loud2, &i).await }))
        .await
        .expect("publish");
    d.publish(&quiet, &1).await.expect("publish quiet");
    d.publish(&sentinel, &1).await.expect("publish sentinel");
    let woken = recv_until(&mut rx, &sentinel).await;
    assert!(woken.contains(&loud), "no wake-up for {loud}: {woken:?}");
    assert!(
        !woken.contains(&quiet),
        "a quiet channel was woken: {woken:?}"
    );
}

#[tokio::test]
async fn a_retain_without_max_age_keeps_the_channels_max_age() {
    let (ps, d, schema) = durable_alone("keepage").await;
    let ch = channel("aged");
    d.publish(&ch, &1).await.expect("publish");
    let max_age = || async {
        let client = raw_client().await;
        let row = client
            .query_one(
                &format!("SELECT extract(epoch FROM max_age)::float8 FROM {schema}.channels WHERE channel = $1"),
                &[&ch],
            )
            .await
            .expect("max_age");
        row.get::<_, Option<f64>>(0)
    };
    d.retain(&ch, Some(Duration::from_secs(60)))
        .await
        .expect("retain");
    assert_eq!(max_age().await, Some(60.0));
    // A consumer without a max age (the default) retains too: it must not
    // undo what another set.
    d.retain(&ch, None).await.expect("retain");
    assert_eq!(max_age().await, Some(60.0));
    ps.shutdown().await;
}

/// `PgPubSub::shutdown` stops its durable consumers before the pool
/// closes: acks not yet written (a long ack interval) are flushed, so a
/// fresh consumer of the group starts after them.
#[tokio::test]
async fn acks_are_flushed_when_the_pubsub_shuts_down() {
    let ch = channel("shutdown_acks");
    let (ps, d) = durable().await;
    let mut sub = d
        .subscribe::<Text>(&ch, "g")
        .ack_interval(Duration::from_secs(3600))
        .await
        .unwrap();
    d.publish_batch(&ch, ["1", "2", "3"].map(Text))
        .await
        .unwrap();
    assert_eq!(take_acked(&mut sub, 2).await, ["1", "2"]);
    ps.shutdown().await;

    let (ps2, d2) = durable().await;
    let mut fresh = d2.subscribe::<Text>(&ch, "g").await.unwrap();
    assert_eq!(next_durable(&mut fresh).await.payload(), "3");
    drop(sub);
    fresh.close().await.unwrap();
    ps2.shutdown().await;
}

/// Ticks stored for `ch` in `schema`.
async fn tick_count(client: &tokio_postgres::Client, schema: &str, ch: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.ticks WHERE channel = $1"),
            &[&ch],
        )
        .await
        .unwrap()
        .get(0)
}

/// Group "g" of `ch`, polling every 50 ms, without its own retention (the
/// test runs it).
async fn quick_consumer(d: &Durable, ch: &str) -> DurableSubscription<Text> {
    d.subscribe::<Text>(ch, "g")
        .poll_interval(Duration::from_millis(50))
        .retain_every(None)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_row_with_a_future_xid_neither_adds_ticks_nor_stalls_and_is_reported() {
    let (ps, d, schema) = durable_alone("forged").await;
    let client = raw_client().await;
    let ch = channel("forged");
    let mut sub = quick_consumer(&d, &ch).await;
    d.publish(&ch, Text("before")).await.unwrap();
    assert_eq!(take_acked(&mut sub, 1).await, ["before"]);
    // What a restore into another cluster, logical replication or an
    // INSERT by hand leaves: a row whose xid no transaction here has.
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.messages (channel, xid, payload) \
                 VALUES ($1, '1000000000000'::xid8, 'forged')"
            ),
            &[&ch],
        )
        .await
        .unwrap();
    let ticks = tick_count(&client, &schema, &ch).await;
    for _ in 0..50 {
        d.tick(&ch).await.unwrap();
    }
    let added = tick_count(&client, &schema, &ch).await - ticks;
    assert!(added <= 1, "{added} ticks for one foreign row");
    d.publish(&ch, Text("after")).await.unwrap();
    assert_eq!(take_acked(&mut sub, 1).await, ["after"]);
    sub.flush().await.unwrap();
    // Its partition is emptied once rotated away from; the group, which
    // could never read it, is told it lost one message.
    let mut foreign = 0;
    for _ in 0..2 {
        foreign += d.retain(&ch, None).await.unwrap().foreign;
    }
    assert_eq!(foreign, 1);
    assert_eq!(stored(&client, &schema, &ch).await, 0);
    match next(&mut sub).await {
        DurableDelivery::Truncated { lost } => assert_eq!(lost, 1),
        other => panic!("expected a truncation, got {other:?}"),
    }
    sub.close().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_publish_only_role_publishes_through_the_functions_and_cannot_insert() {
    let (ps, d, schema) = durable_alone("pubonly").await;
    let ch = channel("pubonly");
    let role = channel("publisher");
    let admin = raw_client().await;
    // Exactly the grants the docs list for a publish-only role.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA {schema} TO {role};
             GRANT EXECUTE ON FUNCTION {schema}.publish(text, text),
                                       {schema}.publish_many(text, text[]) TO {role};"
        ))
        .await
        .unwrap();
    let mut sub = d.subscribe::<Text>(&ch, "g").await.unwrap();
    let url = server().url().replacen("postgres@", &format!("{role}@"), 1);
    let (publisher, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect as the publish-only role");
    tokio::spawn(conn);
    publisher
        .execute(&format!("SELECT {schema}.publish($1, 'one')"), &[&ch])
        .await
        .expect("publish");
    publisher
        .execute(
            &format!("SELECT {schema}.publish_many($1, ARRAY['two', 'three'])"),
            &[&ch],
        )
        .await
        .expect("publish_many");
    let err = publisher
        .execute(
            &format!(
                "INSERT INTO {schema}.messages (channel, xid, payload) \
                 VALUES ($1, '1000000000000'::xid8, 'forged')"
            ),
            &[&ch],
        )
        .await
        .expect_err("a publish-only role must not insert rows");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    assert_eq!(take_acked(&mut sub, 3).await, ["one", "two", "three"]);
    sub.close().await.unwrap();
    drop(publisher);
    ps.shutdown().await;
}

/// Publishes "1" to `rows` on `ch` in one SQL statement.
async fn publish_numbers(client: &tokio_postgres::Client, schema: &str, ch: &str, rows: i64) {
    client
        .execute(
            &format!(
                "SELECT {schema}.publish_many($1, ARRAY(SELECT i::text FROM generate_series(1, $2::bigint) i))"
            ),
            &[&ch, &rows],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn acks_do_not_wait_for_retention_of_a_large_partition_with_many_groups() {
    const ROWS: i64 = 150_000;
    const GROUPS: i64 = 100;
    let (ps, d, schema) = durable_alone("bigretain").await;
    let client = raw_client().await;
    let ch = channel("bigretain");
    publish_numbers(&client, &schema, &ch, ROWS).await;
    let tick = d.tick(&ch).await.unwrap();
    // Every group has acked everything: the whole partition can go.
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.groups (channel, group_name, tick_id, xid, seq) \
                 SELECT $1, 'g' || i, $2, m.xid, m.seq \
                 FROM generate_series(1, $3::bigint) i, \
                      (SELECT xid, seq FROM {schema}.messages WHERE channel = $1 \
                       ORDER BY xid DESC, seq DESC LIMIT 1) m"
            ),
            &[&ch, &tick, &GROUPS],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let retain = {
        let (d, ch) = (d.clone(), ch.clone());
        tokio::spawn(async move { d.retain(&ch, None).await })
    };
    // A plain ack every 50 ms for as long as retention runs.
    let ack = format!(
        "UPDATE {schema}.groups SET acked_at = now() WHERE channel = $1 AND group_name = 'g1'"
    );
    let mut slowest = Duration::ZERO;
    while !retain.is_finished() {
        let t = std::time::Instant::now();
        client.execute(&ack, &[&ch]).await.unwrap();
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retained = retain.await.unwrap().unwrap();
    eprintln!(
        "retain of {ROWS} acked rows x {GROUPS} groups: {:?}; slowest ack meanwhile: {slowest:?}",
        started.elapsed()
    );
    assert_eq!(retained.acked, ROWS as u64);
    assert!(
        slowest < Duration::from_secs(2),
        "an ack waited {slowest:?} for retention"
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn a_max_age_is_the_channels_and_a_group_asking_for_another_is_refused() {
    let (ps, d, _schema) = durable_alone("maxage").await;
    let ch = channel("maxage");
    let (hour, minute) = (Duration::from_secs(3600), Duration::from_secs(60));
    let a = d
        .subscribe::<Text>(&ch, "a")
        .max_age(Some(hour))
        .retain_every(None)
        .await
        .unwrap();
    // Another group's shorter max age would remove what "a" has not read.
    let err = d
        .subscribe::<Text>(&ch, "b")
        .max_age(Some(minute))
        .await
        .expect_err("a second max age is refused");
    assert_eq!(err.kind(), pg_pubsub::ErrorKind::Config, "{err}");
    let err = d.retain(&ch, Some(minute)).await.expect_err("refused");
    assert_eq!(err.kind(), pg_pubsub::ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("max_age"), "{err}");
    // The same one, or none, is fine.
    d.retain(&ch, Some(hour)).await.unwrap();
    d.retain(&ch, None).await.unwrap();
    // Changed for everyone on purpose: then it is the channel's.
    d.set_max_age(&ch, Some(minute)).await.unwrap();
    let b = d
        .subscribe::<Text>(&ch, "b")
        .max_age(Some(minute))
        .retain_every(None)
        .await
        .unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_channel_without_groups_is_kept_for_a_day_and_reported_while_it_blocks_a_partition() {
    let (ps, d, schema) = durable_alone("unclaimed").await;
    let client = raw_client().await;
    let lonely = channel("lonely");
    // More rows than retention carries forward: their partition stays.
    client
        .execute(
            &format!(
                "SELECT {schema}.publish_many($1, ARRAY(SELECT i::text FROM generate_series(1, 1001) i))"
            ),
            &[&lonely],
        )
        .await
        .unwrap();
    let r = d.retain(&lonely, None).await.unwrap();
    assert_eq!((r.truncated, r.blocked), (0, 1));
    assert_eq!(stored(&client, &schema, &lonely).await, 1001);
    // Two days old: past the one day a channel without groups (and without
    // a max age of its own) keeps its messages.
    client
        .execute(
            &format!(
                "UPDATE {schema}.messages SET published_at = now() - interval '2 days' \
                 WHERE channel = $1"
            ),
            &[&lonely],
        )
        .await
        .unwrap();
    let r = d.retain(&lonely, None).await.unwrap();
    assert_eq!((r.truncated, r.blocked), (1, 0));
    assert_eq!(stored(&client, &schema, &lonely).await, 0);
    ps.shutdown().await;
}

#[tokio::test]
async fn a_message_after_many_empty_batches_is_read_without_walking_them() {
    const EMPTY: i64 = 300_000;
    let (ps, d, schema) = durable_alone("emptyticks").await;
    let client = raw_client().await;
    let ch = channel("emptyticks");
    let mut sub = quick_consumer(&d, &ch).await;
    d.publish(&ch, Text("first")).await.unwrap();
    assert_eq!(take_acked(&mut sub, 1).await, ["first"]);
    sub.flush().await.unwrap();
    // Batches whose rows are gone, as max-age retention leaves them for a
    // group that was away (and as foreign rows made them before ticks
    // ignored those): valid ticks, none holding a message.
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.ticks (channel, tick_id, snap) \
                 SELECT $1, t.last + i, pg_current_snapshot() \
                 FROM (SELECT max(tick_id) AS last FROM {schema}.ticks WHERE channel = $1) t, \
                      generate_series(1, $2::bigint) i"
            ),
            &[&ch, &EMPTY],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    d.publish(&ch, Text("after")).await.unwrap();
    assert_eq!(take_acked(&mut sub, 1).await, ["after"]);
    eprintln!(
        "delivery past {EMPTY} empty batches: {:?}",
        started.elapsed()
    );
    sub.close().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn batches_between_runs_of_empty_ones_are_each_read_once_in_order() {
    let (ps, d, schema) = durable_alone("emptyruns").await;
    let client = raw_client().await;
    let ch = channel("emptyruns");
    let empty_ticks = format!(
        "INSERT INTO {schema}.ticks (channel, tick_id, snap) \
         SELECT $1, coalesce(t.last, 0) + i, pg_current_snapshot() \
         FROM (SELECT max(tick_id) AS last FROM {schema}.ticks WHERE channel = $1) t, \
              generate_series(1, 1000) i"
    );
    // A transaction in progress across a run of empty batches: its message
    // is in the first batch after it commits.
    let mut open_client = raw_client().await;
    let mut open = Some(open_client.transaction().await.unwrap());
    let tx = open.as_ref().unwrap();
    tx.execute(&format!("SELECT {schema}.publish($1, 'slow')"), &[&ch])
        .await
        .unwrap();
    let mut expected = Vec::new();
    for round in 0..4 {
        client.execute(&empty_ticks, &[&ch]).await.unwrap();
        let m = format!("r{round}");
        d.publish(&ch, Text(&m)).await.unwrap();
        d.tick(&ch).await.unwrap();
        expected.push(m);
        if round == 1 {
            let tx = open.take().expect("still open");
            tx.commit().await.unwrap();
            client.execute(&empty_ticks, &[&ch]).await.unwrap();
            d.tick(&ch).await.unwrap();
            expected.push("slow".to_owned());
        }
    }
    client.execute(&empty_ticks, &[&ch]).await.unwrap();
    let mut sub = d
        .subscribe::<Text>(&ch, "g")
        .start(Start::Earliest)
        .batch_size(2)
        .retain_every(None)
        .await
        .unwrap();
    assert_eq!(take_acked(&mut sub, expected.len()).await, expected);
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    sub.close().await.unwrap();
    ps.shutdown().await;
}

/// Each group's `lost` count, by group name.
async fn lost_by_group(
    client: &tokio_postgres::Client,
    schema: &str,
    ch: &str,
) -> Vec<(String, i64)> {
    client
        .query(
            &format!("SELECT group_name, lost FROM {schema}.groups WHERE channel = $1 ORDER BY group_name"),
            &[&ch],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn max_age_expiry_of_many_rows_for_many_groups_fits_in_the_statement_timeout() {
    const ROWS: i64 = 50_000;
    const GROUPS: i64 = 100;
    let (ps, d, schema) = durable_alone("bigexpire").await;
    let client = raw_client().await;
    let ch = channel("bigexpire");
    publish_numbers(&client, &schema, &ch, ROWS).await;
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.groups (channel, group_name, tick_id, xid, seq) \
                 SELECT $1, 'g' || i, 0, '0', 0 FROM generate_series(1, $2::bigint) i"
            ),
            &[&ch, &GROUPS],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = d.retain(&ch, Some(Duration::ZERO)).await.unwrap();
    eprintln!(
        "max-age expiry of {ROWS} rows x {GROUPS} groups: {:?}",
        started.elapsed()
    );
    assert_eq!((r.expired, r.truncated), (ROWS as u64, 1));
    let lost = lost_by_group(&client, &schema, &ch).await;
    assert_eq!(lost.len(), GROUPS as usize);
    assert!(lost.iter().all(|(_, n)| *n == ROWS), "{lost:?}");
    ps.shutdown().await;
}

#[tokio::test]
async fn max_age_expiry_counts_for_each_group_exactly_what_it_had_not_passed() {
    let (ps, d, schema) = durable_alone("lostcount").await;
    let client = raw_client().await;
    let ch = channel("lostcount");
    // Ten batches of five messages, and an open transaction across some.
    let open = raw_client().await;
    for batch in 0..10 {
        if batch == 3 {
            open.batch_execute("BEGIN").await.unwrap();
            open.execute(&format!("SELECT {schema}.publish($1, 'slow')"), &[&ch])
                .await
                .unwrap();
        }
        if batch == 6 {
            open.batch_execute("COMMIT").await.unwrap();
        }
        let msgs: Vec<String> = (0..5).map(|i| format!("{batch}.{i}")).collect();
        d.publish_batch(&ch, msgs.iter().map(Text)).await.unwrap();
        d.tick(&ch).await.unwrap();
    }
    // Cursors everywhere: at each message, at each batch's start and end.
    client
        .execute(
            &format!(
                "WITH ticks AS (SELECT tick_id FROM {schema}.ticks WHERE channel = $1), \
                 pos AS (SELECT 0::bigint AS tick_id, '0'::xid8 AS xid, 0::bigint AS seq \
                         UNION ALL SELECT tick_id, '0', 0 FROM ticks \
                         UNION ALL SELECT tick_id, '18446744073709551615', 9223372036854775807 FROM ticks \
                         UNION ALL SELECT r.tick_id, r.xid, r.seq FROM ticks t, \
                              LATERAL {schema}.read($1, t.tick_id, '0', 0, 100) r) \
                 INSERT INTO {schema}.groups (channel, group_name, tick_id, xid, seq) \
                 SELECT $1, 'g' || lpad(row_number() OVER ()::text, 4, '0'), tick_id, xid, seq FROM pos"
            ),
            &[&ch],
        )
        .await
        .unwrap();
    // What passed() says each group had not passed: the definition.
    let expected: Vec<(String, i64)> = client
        .query(
            &format!(
                "SELECT g.group_name, count(m.*) FILTER (WHERE NOT {schema}.passed(m.xid, m.seq, g.xid, g.seq, \
                        {schema}.snap_before(g.channel, g.tick_id), {schema}.snap_at(g.channel, g.tick_id))) \
                 FROM {schema}.groups g LEFT JOIN {schema}.messages m ON m.channel = g.channel \
                 WHERE g.channel = $1 GROUP BY g.group_name ORDER BY g.group_name"
            ),
            &[&ch],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(expected.len() > 60, "{expected:?}");
    let r = d.retain(&ch, Some(Duration::ZERO)).await.unwrap();
    assert_eq!(r.truncated, 1);
    assert_eq!(lost_by_group(&client, &schema, &ch).await, expected);
    ps.shutdown().await;
}

/// Every consumer's stats, once none changed for half a second (the
/// readers finished what they were woken for).
async fn settled_stats(subs: &[DurableSubscription<Text>]) -> Vec<ConsumerStats> {
    let snapshot = || subs.iter().map(|s| s.stats()).collect::<Vec<_>>();
    let mut last = snapshot();
    tokio::time::timeout(WAIT, async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = snapshot();
            if now == last {
                return;
            }
            last = now;
        }
    })
    .await
    .expect("the consumers settle");
    last
}

#[tokio::test]
async fn many_consumers_in_one_process_are_woken_only_for_their_own_channel() {
    const CHANNELS: usize = 300;
    let (ps, d, _schema) = durable_alone("many").await;
    let prefix = channel("many");
    let names: Vec<String> = (0..CHANNELS).map(|i| format!("{prefix}_{i}")).collect();
    let mut subs = Vec::with_capacity(CHANNELS);
    for name in &names {
        // Only wake-ups make them look: no timer polls, no retention.
        let sub = d
            .subscribe::<Text>(name, "g")
            .poll_interval(Duration::from_secs(3600))
            .retain_every(None)
            .await
            .expect("subscribe");
        subs.push(sub);
    }
    for name in &names {
        d.publish(name, Text(name)).await.expect("publish");
    }
    for (sub, name) in subs.iter_mut().zip(&names) {
        assert_eq!(take_acked(sub, 1).await, std::slice::from_ref(name));
    }
    let before = settled_stats(&subs).await;
    // Separate transactions: one wake-up each.
    for i in 0..20 {
        d.publish(&names[0], Text(&i.to_string()))
            .await
            .expect("publish");
    }
    assert_eq!(take_acked(&mut subs[0], 20).await.len(), 20);
    // Wake-ups are dispatched in order: once channel 1's reader has its
    // message, channel 0's wake-ups were handed out too.
    d.publish(&names[1], Text("last")).await.expect("publish");
    assert_eq!(take_acked(&mut subs[1], 1).await, ["last"]);
    let after: Vec<ConsumerStats> = subs.iter().map(|s| s.stats()).collect();
    assert!(after[0].wakeups > before[0].wakeups && after[0].reads > before[0].reads);
    let disturbed: Vec<usize> = (2..CHANNELS).filter(|&i| after[i] != before[i]).collect();
    assert!(
        disturbed.is_empty(),
        "{} other channels' consumers were woken or read, e.g. #{:?}: {:?} -> {:?}",
        disturbed.len(),
        disturbed.first(),
        disturbed.first().map(|&i| before[i]),
        disturbed.first().map(|&i| after[i]),
    );
    ps.shutdown().await;
}
