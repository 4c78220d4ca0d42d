//! A full server restart: its own test binary, because it stops the shared server.

mod common;

use std::time::Duration;

use common::*;
use pg_pubsub::{ConnectionEvent, Delivery, ErrorKind, GapCause};

#[tokio::test]
async fn server_restart_gives_a_gap_and_delivery_resumes() {
    if !own_server("restart") {
        return;
    }
    let ps = builder()
        .notify_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let ch = channel("restart");
    let mut before = ps.listen::<u64>(&ch).await.unwrap();
    let mut events = ps.events();
    // An elected channel too: the lock goes with the server, and comes back.
    let elected = builder().single_listener(true).connect().await.unwrap();
    let job = channel("restart_job");
    let mut jobs = elected.listen::<u64>(&job).await.unwrap();
    let mut elected_events = elected.events();
    assert!(elected.is_leader(&job));
    expect_gap(&mut jobs, GapCause::TakeOver).await;
    ps.notify(&ch, &1u64).await.unwrap();
    assert_eq!(*next_message(&mut before).await.payload(), 1);

    tokio::task::spawn_blocking(|| server().stop())
        .await
        .unwrap()
        .unwrap();
    wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::ReconnectFailed { .. })
    })
    .await;

    // While down: listen registers at once, notify fails within its timeout.
    let mut during = tokio::time::timeout(WAIT, ps.listen::<u64>(&ch))
        .await
        .unwrap()
        .unwrap();
    let err = tokio::time::timeout(WAIT, ps.notify(&ch, &0u64))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Timeout | ErrorKind::Connect | ErrorKind::Connection
        ),
        "{err:?}"
    );
    assert!(err.is_connection());
    wait_event(&mut elected_events, |e| {
        matches!(e, ConnectionEvent::LockLost { .. })
    })
    .await;
    assert!(!elected.is_leader(&job));

    tokio::task::spawn_blocking(|| server().start_again())
        .await
        .unwrap()
        .unwrap();
    wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Reconnected { .. })
    })
    .await;
    for sub in [&mut before, &mut during] {
        assert!(matches!(next(sub).await, Delivery::Gap(_)));
    }
    wait_event(&mut elected_events, |e| {
        matches!(e, ConnectionEvent::LockAcquired { .. })
    })
    .await;
    assert!(elected.is_leader(&job));
    // Down with the server, then leading again without a hand-over.
    let reconnect = GapCause::Reconnect {
        downtime: Duration::ZERO,
    };
    expect_gap(&mut jobs, reconnect).await;
    expect_gap(&mut jobs, GapCause::TakeOver).await;
    // The pool heals too: its broken connections are replaced.
    let mut sent = false;
    for _ in 0..5 {
        if ps.notify(&ch, &2u64).await.is_ok() {
            sent = true;
            break;
        }
    }
    assert!(sent, "notify works again after the restart");
    for sub in [&mut before, &mut during] {
        assert_eq!(*next_message(sub).await.payload(), 2);
    }
    ps.notify(&job, &3u64).await.unwrap();
    assert_eq!(*next_message(&mut jobs).await.payload(), 3);
    ps.shutdown().await;
    elected.shutdown().await;
}
