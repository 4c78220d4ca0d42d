//! `shutdown_on_signal` without sending signals (they would reach every test
//! in this binary; the CLI tests send real ones to real processes).

mod common;

use common::{channel, next_message, pubsub, raw_client, wait_backend_gone, WAIT};
use pg_pubsub::Text;

#[tokio::test]
async fn signal_task_does_not_keep_the_instance_alive() {
    let ps = pubsub().await;
    let pid = ps.listener_pid().expect("connected");
    let on_signal = ps.shutdown_on_signal();
    drop(ps);
    wait_backend_gone(pid).await;
    tokio::time::timeout(WAIT, on_signal)
        .await
        .expect("the signal task outlived its instance")
        .expect("the signal task panicked");
}

#[tokio::test]
async fn signal_task_ends_with_shutdown() {
    let ps = pubsub().await;
    let on_signal = ps.shutdown_on_signal();
    assert!(!on_signal.is_finished());
    ps.shutdown().await;
    tokio::time::timeout(WAIT, on_signal)
        .await
        .expect("the signal task outlived the shutdown")
        .expect("the signal task panicked");
}

#[tokio::test]
async fn subscriptions_outliving_handles_keep_the_listener() {
    let ps = pubsub().await;
    let ch = channel("sig");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    let pid = ps.listener_pid().expect("connected");
    let on_signal = ps.shutdown_on_signal();
    drop(ps);
    raw_client()
        .await
        .execute("SELECT pg_notify($1, 'still here')", &[&ch])
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.payload(), "still here");
    assert!(!on_signal.is_finished());
    drop(sub);
    wait_backend_gone(pid).await;
    tokio::time::timeout(WAIT, on_signal)
        .await
        .expect("the signal task outlived its instance")
        .expect("the signal task panicked");
}
