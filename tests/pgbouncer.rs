//! Through a real PgBouncer (Debian's 1.18, no prepared-statement support)
//! in session and in transaction pooling mode.

mod common;

use std::collections::BTreeSet;

use common::pgbouncer::{PgBouncer, PoolMode};
use common::*;
use futures::future::join_all;
use pg_pubsub::durable::DurableDelivery;
use pg_pubsub::{ErrorKind, PgPubSub, Text};

async fn bouncer(mode: PoolMode, pool_size: usize) -> PgBouncer {
    tokio::task::spawn_blocking(move || PgBouncer::start(server(), mode, pool_size))
        .await
        .expect("bouncer task")
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
    let err = d.subscribe::<Text>(&ch, "g").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pooler, "{err:?}");
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
    // Nothing failed on the way and was retried: no statement of ours
    // looked for a prepared statement on the wrong server connection.
    if let Some(data) = server().data_dir() {
        let log = std::fs::read_to_string(data.with_file_name("log")).unwrap_or_default();
        assert!(
            !log.contains("prepared statement"),
            "the server log has prepared-statement errors:\n{log}"
        );
    }
    consumer.close().await.unwrap();
    direct.shutdown().await;
    ps.shutdown().await;
}
