//! A real SIGTERM to this test process, so this binary holds one test only.
#![cfg(unix)]

mod common;

use std::time::Duration;

use common::{channel, pubsub, WAIT};
use futures::StreamExt;
use pg_pubsub::Text;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::test]
async fn signal_ends_subscriptions_that_outlived_every_handle() {
    // Ours keeps SIGTERM from killing the process whatever the crate's task does.
    let mut ours = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
    let ps = pubsub().await;
    let mut sub = ps.listen::<Text>(&channel("sigterm")).await.unwrap();
    let on_signal = ps.shutdown_on_signal();
    drop(ps);
    let ended = async {
        // The crate's task may not have installed its handler yet: signal
        // again until the subscription ends.
        loop {
            common::send_signal(std::process::id(), "-TERM");
            ours.recv().await;
            match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                Ok(None) => return,
                Ok(Some(d)) => panic!("expected the end, got {d:?}"),
                Err(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, ended)
        .await
        .expect("the subscription did not end after SIGTERM");
    tokio::time::timeout(WAIT, on_signal)
        .await
        .expect("the signal task did not end")
        .expect("the signal task panicked");
}
