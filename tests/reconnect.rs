//! Real faults on the listener connection: terminated backend, stalled backend.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pg_pubsub::GapCause;
use pg_pubsub::Text;
use pg_pubsub::{ConnectionEvent, Delivery};

#[tokio::test]
async fn terminated_backend_gives_a_gap_then_delivery_resumes() {
    let ps = pubsub().await;
    let ch = channel("kill");
    let mut sub = ps.listen::<u64>(&ch).await.unwrap();
    let mut other = ps.listen::<u64>(&channel("kill_other")).await.unwrap();
    let mut events = ps.events();
    ps.notify(&ch, &1u64).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 1);

    let old_pid = ps.listener_pid().unwrap();
    terminate(old_pid).await;
    let killed_at = Instant::now();

    let reason = match wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await
    {
        ConnectionEvent::Disconnected { reason } => reason,
        _ => unreachable!(),
    };
    assert!(
        reason.contains("terminating connection due to administrator command"),
        "{reason}"
    );
    let new_pid = match wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Reconnected { .. })
    })
    .await
    {
        ConnectionEvent::Reconnected { process_id, .. } => process_id,
        _ => unreachable!(),
    };
    assert_ne!(new_pid, old_pid);
    assert_eq!(ps.listener_pid(), Some(new_pid));

    // Every subscriber learns of the gap, and it comes before new messages.
    for s in [&mut sub, &mut other] {
        match next(s).await {
            Delivery::Gap(gap) => {
                assert!(gap.reason().contains("administrator command"), "{gap:?}")
            }
            d => panic!("expected a gap, got {d:?}"),
        }
    }
    ps.notify(&ch, &2u64).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 2);
    println!(
        "listening again {:?} after pg_terminate_backend",
        killed_at.elapsed()
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn stream_survives_repeated_kills_with_gaps_accounting_for_every_loss() {
    let ps = pubsub().await;
    let ch = channel("stream");
    let mut sub = ps.listen::<u64>(&ch).await.unwrap();
    let publisher = {
        let ps = ps.clone();
        let ch = ch.clone();
        tokio::spawn(async move {
            for i in 0..600u64 {
                ps.notify(&ch, &i).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let killer = {
        let ps = ps.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(pid) = ps.listener_pid() {
                    terminate(pid).await;
                }
            }
        })
    };
    // Messages arrive in order; any hole in the sequence is preceded by a gap.
    let mut expected = 0u64;
    let mut gaps = 0;
    let mut gap_seen = false;
    while expected < 600 {
        match next(&mut sub).await {
            Delivery::Message(m) => {
                let n = *m.payload();
                assert!(n >= expected, "out of order: {n} after {expected}");
                assert!(
                    n == expected || gap_seen,
                    "lost {expected}..{n} without a gap"
                );
                gap_seen = false;
                expected = n + 1;
            }
            Delivery::Gap(_) => {
                gaps += 1;
                gap_seen = true;
            }
            d => panic!("unexpected {d:?}"),
        }
    }
    killer.await.unwrap();
    publisher.await.unwrap();
    assert!(gaps >= 1, "three kills produced no gap");
    ps.shutdown().await;
}

/// A backend that stops answering (SIGSTOP: like a half-open connection) is
/// detected by the health check and replaced.
#[tokio::test]
async fn stalled_connection_is_replaced() {
    if !own_server("stop the backend of") {
        return;
    }
    let ps = builder()
        .health_check(Duration::from_millis(200), Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let ch = channel("stall");
    let mut sub = ps.listen::<u64>(&ch).await.unwrap();
    let mut events = ps.events();
    let pid = ps.listener_pid().unwrap();
    send_signal(pid, "-STOP");
    let reason = match wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await
    {
        ConnectionEvent::Disconnected { reason } => reason,
        _ => unreachable!(),
    };
    send_signal(pid, "-CONT");
    assert!(reason.contains("health check"), "{reason}");
    wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Reconnected { .. })
    })
    .await;
    assert!(matches!(next(&mut sub).await, Delivery::Gap(_)));
    ps.notify(&ch, &9u64).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 9);
    ps.shutdown().await;
}

/// Prints the time from `pg_terminate_backend` to the first message received
/// afterwards, with a publisher sending every millisecond (no threshold: the
/// figure is for the README; the assertions are that delivery resumes after a gap).
#[tokio::test]
async fn first_message_after_kill() {
    let ps = pubsub().await;
    let ch = channel("first_after_kill");
    let mut sub = ps.listen::<u64>(&ch).await.unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let publisher = {
        let ps = ps.clone();
        let ch = ch.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while stop_rx.try_recv().is_err() {
                tick.tick().await;
                let _ = ps.notify(&ch, &i).await;
                i += 1;
            }
        })
    };
    next_message(&mut sub).await;
    terminate(ps.listener_pid().unwrap()).await;
    let killed_at = Instant::now();
    let mut gap = false;
    let first = loop {
        match next(&mut sub).await {
            Delivery::Gap(_) => gap = true,
            Delivery::Message(_) if gap => break killed_at.elapsed(),
            Delivery::Message(_) => {}
            d => panic!("unexpected {d:?}"),
        }
    };
    let _ = stop_tx.send(());
    publisher.await.unwrap();
    println!("first message {first:?} after pg_terminate_backend");
    ps.shutdown().await;
}

/// `shutdown` returns within its bound even when the server stops answering
/// (a SIGSTOPped backend: the connection is open but nothing comes back).
#[tokio::test]
async fn shutdown_is_bounded_when_the_server_does_not_answer() {
    if !own_server("stop the backend of") {
        return;
    }
    let ps = builder()
        .single_listener(true)
        .shutdown_timeout(Duration::from_millis(500))
        .handover_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let ch = channel("stuck");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    assert!(ps.is_leader(&ch));
    expect_gap(&mut sub, GapCause::TakeOver).await;
    let pid = ps.listener_pid().unwrap();
    send_signal(pid, "-STOP");
    let started = std::time::Instant::now();
    let done = tokio::time::timeout(WAIT, ps.shutdown()).await;
    send_signal(pid, "-CONT");
    assert!(done.is_ok(), "shutdown hung");
    // One timeout bounds the whole shutdown (0.1 took up to twice as long).
    println!(
        "shutdown took {:?} with a 500 ms shutdown timeout",
        started.elapsed()
    );
    assert!(sub.recv().await.is_none(), "the subscription ended");
}
