//! Single listener within one process: two instances compete like two processes.

mod common;

use std::time::Duration;

use common::*;
use pg_pubsub::{ConnectionEvent, ErrorKind};

#[tokio::test]
async fn standby_takes_over_when_the_leader_shuts_down() {
    let ch = channel("inproc");
    let a = builder().single_listener(true).connect().await.unwrap();
    let mut sub_a = a.listen_raw(&ch).await.unwrap();
    let b = builder().single_listener(true).connect().await.unwrap();
    let mut b_events = b.events();
    let mut sub_b = b.listen_raw(&ch).await.unwrap();
    assert!(a.is_leader(&ch) && !b.is_leader(&ch));
    let client = raw_client().await;
    assert_eq!(lock_holder(&client, &ch).await, a.listener_pid());

    a.notify_raw(&ch, "one").await.unwrap();
    assert_eq!(next_message(&mut sub_a).await.payload(), "one");
    assert_quiet(&mut sub_b, Duration::from_millis(100)).await;

    a.shutdown().await;
    assert!(sub_a.recv().await.is_none());
    wait_event(&mut b_events, |e| {
        matches!(e, ConnectionEvent::LockAcquired { .. })
    })
    .await;
    assert!(b.is_leader(&ch));
    assert_eq!(lock_holder(&client, &ch).await, b.listener_pid());
    b.notify_raw(&ch, "two").await.unwrap();
    assert_eq!(next_message(&mut sub_b).await.payload(), "two");
    b.shutdown().await;
}

#[tokio::test]
async fn dropping_without_shutdown_releases_the_lock() {
    let ch = channel("dropped");
    let a = builder().single_listener(true).connect().await.unwrap();
    let sub = a.listen_raw(&ch).await.unwrap();
    let client = raw_client().await;
    assert!(lock_holder(&client, &ch).await.is_some());
    let mut events = a.events();
    drop(sub);
    wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::LockReleased { .. })
    })
    .await;
    assert_eq!(
        lock_holder(&client, &ch).await,
        None,
        "released with the last subscriber"
    );

    let sub = a.listen_raw(&ch).await.unwrap();
    assert!(a.is_leader(&ch));
    let pid = a.listener_pid().unwrap();
    drop(sub);
    drop(a);
    // With every handle gone the listener session closes, and the lock with it
    // (the server has no event for that, so poll).
    tokio::time::timeout(WAIT, async {
        while lock_holder(&client, &ch).await.is_some()
            || client
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .is_some()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("lock and session gone");
}

#[tokio::test]
async fn the_control_channel_is_reserved() {
    let a = builder().single_listener(true).connect().await.unwrap();
    let err = a.listen_raw("pg_pubsub_election").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    a.shutdown().await;
}
