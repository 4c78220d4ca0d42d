//! Through a real PgBouncer (Debian's 1.18, no prepared-statement support)
//! in session and in transaction pooling mode.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::pgbouncer::{PgBouncer, PoolMode};
use common::*;
use futures::future::join_all;
use futures::StreamExt;
use pg_pubsub::cron::CatchUp;
use pg_pubsub::durable::{DurableDelivery, DurableEvent, DurableSubscription, Start};
use pg_pubsub::event::QueueEvent;
use pg_pubsub::queue::{Cancelled, FinishedState, Job};
use pg_pubsub::{ErrorKind, PgPubSub, Text};
use tokio::sync::mpsc;

async fn bouncer(mode: PoolMode, pool_size: usize) -> PgBouncer {
    tokio::task::spawn_blocking(move || PgBouncer::start(server(), mode, pool_size))
        .await
        .expect("bouncer task")
}

/// A handle through `url` (a transaction-pooling bouncer), declared so (no
/// probe to wait for), with short leases and lease retries.
async fn pooled(url: &str) -> PgPubSub {
    PgPubSub::builder(url)
        .expect("url")
        .transaction_pooling(true)
        // Renewed every second: generous for a busy machine.
        .lease_duration(Duration::from_secs(3))
        .lock_retry_interval(Duration::from_millis(100))
        .connect()
        .await
        .expect("connect through the bouncer")
}

/// Nothing failed on the way and was retried: no statement of ours looked
/// for a prepared statement on the wrong server connection.
fn assert_no_prepared_statement_errors() {
    if let Some(data) = server().data_dir() {
        let log = std::fs::read_to_string(data.with_file_name("log")).unwrap_or_default();
        assert!(
            !log.contains("prepared statement"),
            "the server log has prepared-statement errors:\n{log}"
        );
    }
}

/// Waits for `event` about `group` among a handle's durable events.
async fn wait_role(events: &mut pg_pubsub::event::Events<DurableEvent>, group: &str, active: bool) {
    wait_event(events, |e| match e {
        DurableEvent::Active { group: g, .. } => active && &**g == group,
        DurableEvent::Standby { group: g, .. } => !active && &**g == group,
        _ => false,
    })
    .await;
}

/// Every capability through session pooling: each client has a server
/// connection of its own, as with a direct connection.
#[tokio::test]
async fn session_pooling_supports_everything() {
    let pgb = bouncer(PoolMode::Session, 40).await;
    let ps = PgPubSub::connect(pgb.url()).await.unwrap();
    assert!(!ps.is_transaction_pooled());
    let ch = channel("pgb_session");
    let mut sub = ps.listen::<u64>(&ch).await.unwrap();
    ps.notify(&ch, &1u64).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 1);
    // An elected channel: a session advisory lock on the listener session.
    let elected = channel("pgb_elected");
    let _lead = ps
        .listen::<u64>(&elected)
        .single_listener(true)
        .await
        .unwrap();
    assert!(ps.is_leader(&elected));

    let d = ps.durable();
    d.install().await.unwrap();
    let mut consumer = d.subscribe::<Text>(&ch, "g").await.unwrap();
    d.publish(&ch, Text("durable")).await.unwrap();
    let m = next_durable(&mut consumer).await;
    assert_eq!(m.payload(), "durable");
    m.ack();

    let q = ps.queue();
    q.install().await.unwrap();
    let queue = channel("pgb_session_q");
    let (worker, mut ran) = run_reporting(fast(&q, &queue)).await;
    q.enqueue(&queue, Text("job")).await.unwrap();
    assert_eq!(recv(&mut ran).await.2, "job");
    worker.shutdown().await.unwrap();
    consumer.close().await.unwrap();
    ps.shutdown().await;
}

/// Transaction pooling: detected at connect; what needs a session fails
/// with ErrorKind::Pooler; notify, durable publish and enqueue work,
/// concurrently, and a worker runs the jobs (poll-only), all on two server
/// connections shared by every client (named prepared statements would
/// land on the wrong one).
#[tokio::test]
async fn transaction_pooling_is_detected_and_publishing_works() {
    let pgb = bouncer(PoolMode::Transaction, 2).await;
    let ps = PgPubSub::connect(pgb.url()).await.unwrap();
    assert!(ps.is_transaction_pooled(), "{}", pgb.log());
    let ch = channel("pgb_tx");
    let queue = channel("pgb_tx_q");

    let err = ps.listen::<u64>(&ch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pooler, "{err:?}");
    assert!(err.to_string().contains("transaction mode"), "{err}");
    let d = ps.durable();
    d.install().await.unwrap();
    let q = ps.queue();
    q.install().await.unwrap();
    // Workers run poll-only (no LISTEN), with unnamed statements.
    let (worker, mut ran) = run_reporting(fast(&q, &queue)).await;

    // Received on a direct connection.
    let direct = pubsub().await;
    let mut sub = direct.listen::<u64>(&ch).await.unwrap();
    let dd = direct.durable();
    let mut consumer = dd.subscribe::<Text>(&ch, "g").await.unwrap();

    const N: u64 = 40;
    let sends = (0..N).map(|i| {
        let (ps, d, q, ch, queue) = (&ps, &d, &q, &ch, &queue);
        async move {
            ps.notify(ch, &i).await.unwrap();
            d.publish(ch, Text(&i.to_string())).await.unwrap();
            q.enqueue(queue, Text(&i.to_string())).await.unwrap();
        }
    });
    join_all(sends).await;

    let mut notified = BTreeSet::new();
    while notified.len() < N as usize {
        notified.insert(*next_message(&mut sub).await.payload());
    }
    let mut published = BTreeSet::new();
    while published.len() < N as usize {
        match next(&mut consumer).await {
            DurableDelivery::Message(m) => {
                published.insert(m.payload().to_owned());
                m.ack();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut done = BTreeSet::new();
    while done.len() < N as usize {
        done.insert(recv(&mut ran).await.2);
    }
    worker.shutdown().await.unwrap();
    assert!(job_states(&raw_client().await, &queue).await.is_empty());
    assert_no_prepared_statement_errors();
    consumer.close().await.unwrap();
    direct.shutdown().await;
    ps.shutdown().await;
}

/// Durable consumers behind transaction pooling: poll-only reading, and one
/// active consumer per group on a lease row. A consumer whose process dies
/// (its runtime dropped: no release, no more renewals) is replaced once its
/// lease expires, from the group's last ack; a closed one hands over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_consumers_poll_and_hand_over_on_leases_through_transaction_pooling() {
    let pgb = bouncer(PoolMode::Transaction, 2).await;
    let ps = pooled(&pgb.url()).await;
    let d = ps.durable();
    d.install().await.unwrap();
    let ch = channel("pgb_durable");
    let poll = Duration::from_millis(50);

    // A group of one.
    let mut solo = d
        .subscribe::<Text>(&ch, "solo")
        .poll_interval(poll)
        .await
        .unwrap();
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for m in &sent {
        d.publish(&ch, Text(m)).await.unwrap();
    }
    assert_eq!(take_acked(&mut solo, sent.len()).await, sent);
    assert!(solo.is_active());
    solo.close().await.unwrap();

    // Two consumers of "pair": A in a runtime of its own, which dies.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let (die_tx, die_rx) = tokio::sync::oneshot::channel::<()>();
    let (url, a_ch) = (pgb.url(), ch.clone());
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let alive = rt.block_on(async move {
            let ps = pooled(&url).await;
            let d = ps.durable();
            let mut events = d.events();
            let mut sub: DurableSubscription<Text> = d
                .subscribe(&a_ch, "pair")
                .start(Start::Latest)
                .poll_interval(poll)
                .await
                .unwrap();
            wait_role(&mut events, "pair", true).await;
            seen_tx.send("active".into()).unwrap();
            let mut die = die_rx;
            loop {
                tokio::select! {
                    _ = &mut die => break,
                    m = sub.next() => match m {
                        Some(DurableDelivery::Message(m)) => {
                            let text = m.payload().to_string();
                            // The first is acked (and written), the second not.
                            if text == "a1" {
                                m.ack();
                                sub.flush().await.unwrap();
                            }
                            seen_tx.send(text).unwrap();
                        }
                        other => panic!("unexpected {other:?}"),
                    },
                }
            }
            (ps, sub)
        });
        // Dies: its tasks stop where they are, nothing is released.
        drop(rt);
        std::mem::forget(alive);
    });
    assert_eq!(recv(&mut seen).await, "active");
    let b_ps = pooled(&pgb.url()).await;
    let b_d = b_ps.durable();
    let mut b_events = b_d.events();
    let mut b = b_d
        .subscribe::<Text>(&ch, "pair")
        .poll_interval(poll)
        .await
        .unwrap();
    wait_role(&mut b_events, "pair", false).await;
    assert!(!b.is_active());
    b_d.publish(&ch, Text("a1")).await.unwrap();
    b_d.publish(&ch, Text("a2")).await.unwrap();
    assert_eq!(recv(&mut seen).await, "a1");
    assert_eq!(recv(&mut seen).await, "a2");
    die_tx.send(()).unwrap();
    a.join().expect("consumer A's thread");
    b_d.publish(&ch, Text("a3")).await.unwrap();
    wait_role(&mut b_events, "pair", true).await;
    assert!(b.is_active());
    // From the last ack: a2 again (never acked), then what came next.
    assert_eq!(take_acked(&mut b, 2).await, ["a2", "a3"]);

    // A graceful close hands over without waiting for the lease to expire.
    let mut events = d.events();
    let mut c = d
        .subscribe::<Text>(&ch, "pair")
        .poll_interval(poll)
        .await
        .unwrap();
    wait_role(&mut events, "pair", false).await;
    b.close().await.unwrap();
    wait_role(&mut events, "pair", true).await;
    d.publish(&ch, Text("a4")).await.unwrap();
    assert_eq!(take_acked(&mut c, 1).await, ["a4"]);
    c.close().await.unwrap();

    // Removing a group removes its lease (released when "solo" closed).
    let solo_lease = pg_pubsub::schema::election_channel(d.schema(), &ch, "solo");
    let db = raw_client().await;
    let lease = |released: bool| {
        let (db, name) = (&db, &solo_lease);
        async move {
            db.query(
                "SELECT 1 FROM pgpubsub.leases WHERE name = $1 \
                 AND ($2 OR expires_at = '-infinity')",
                &[name, &!released],
            )
            .await
            .unwrap()
            .len()
        }
    };
    tokio::time::timeout(WAIT, async {
        while lease(true).await == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the closed consumer released its lease");
    assert!(d.remove_group(&ch, "solo").await.unwrap());
    assert_eq!(lease(false).await, 0, "the lease went with the group");
    assert_no_prepared_statement_errors();
    b_ps.shutdown().await;
    ps.shutdown().await;
}

/// Queue control and schedules behind transaction pooling: a running job
/// is cancelled (found at the lease extension: no LISTEN), a pause is seen
/// at the next poll, and two schedulers fire each slot of a schedule once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_control_and_schedules_through_transaction_pooling() {
    let pgb = bouncer(PoolMode::Transaction, 2).await;
    let ps = pooled(&pgb.url()).await;
    let q = ps.queue();
    q.install().await.unwrap();
    let name = channel("pgb_ctl");
    let mut events = q.events();
    let (tx, started) = mpsc::unbounded_channel();
    let worker = fast(&q, &name)
        .lease(Duration::from_millis(900))
        .run(move |job: Job| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(job.id());
                if job.payload() == "long" {
                    job.cancelled().await;
                }
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    let mut started = tokio_stream::wrappers::UnboundedReceiverStream::new(started);
    let id = q.enqueue(&name, Text("long")).await.unwrap().id().unwrap();
    assert_eq!(next(&mut started).await, id);
    assert_eq!(q.cancel(id).await.unwrap(), Cancelled::Signalled);
    wait_event(
        &mut events,
        |e| matches!(e, QueueEvent::JobCancelled { job_id, .. } if *job_id == id),
    )
    .await;
    let finished = q.finished_job(id).await.unwrap().expect("kept");
    assert_eq!(finished.state, FinishedState::Cancelled);
    let listed = q.finished_jobs(Some(&name), 10).await.unwrap();
    assert!(listed.iter().any(|f| f.id == id), "{listed:?}");

    assert!(q.pause(&name).await.unwrap());
    assert!(q.is_paused(&name).await.unwrap());
    wait_event(
        &mut events,
        |e| matches!(e, QueueEvent::PauseChanged { paused: true, queue } if **queue == *name),
    )
    .await;
    let later = q.enqueue(&name, Text("later")).await.unwrap().id().unwrap();
    assert_quiet(&mut started, Duration::from_millis(300)).await;
    assert!(q.resume(&name).await.unwrap());
    assert_eq!(next(&mut started).await, later);

    // Every second into a queue nobody works, by two schedulers: the
    // worker's, and another handle's.
    let s = q.schedules();
    let (sched, target) = (channel("pgb_every"), channel("pgb_slots"));
    // Every slot, even one a busy machine fires late: a gap or a double
    // would be the schedulers' doing.
    s.schedule(&sched)
        .every(Duration::from_secs(1))
        .catch_up(CatchUp::All)
        .queue(&target)
        .payload(Text("tick"))
        .upsert()
        .await
        .unwrap();
    let other = pooled(&pgb.url()).await;
    let other_q = other.queue();
    let scheduler = other_q.schedules().run_scheduler().await.unwrap();
    tokio::time::timeout(WAIT, async {
        while s.get(&sched).await.unwrap().expect("exists").fired < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("three slots fired");
    assert!(s.pause(&sched).await.unwrap());
    let slots: Vec<i64> = raw_client()
        .await
        .query(
            "SELECT (extract(epoch FROM run_at) * 1000000)::int8 FROM pgpubsub.jobs \
             WHERE queue = $1 ORDER BY run_at",
            &[&target],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(slots.len() >= 3, "{slots:?}");
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], 1_000_000, "each slot once: {slots:?}");
    }
    assert!(s.list().await.unwrap().iter().any(|i| i.name == sched));
    assert!(s.resume(&sched).await.unwrap());
    assert!(s.remove(&sched).await.unwrap());
    assert!(s.get(&sched).await.unwrap().is_none());
    scheduler.shutdown().await.unwrap();
    worker.shutdown().await.unwrap();
    assert_no_prepared_statement_errors();
    other.shutdown().await;
    ps.shutdown().await;
}
