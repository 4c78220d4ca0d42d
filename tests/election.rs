//! Single listener across real processes, with real faults.
#![cfg(feature = "cli")]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::fleet::Fleet;
use common::*;

/// Publishes `from..to` as payloads `m<i>`, one per transaction.
async fn publish(client: &tokio_postgres::Client, channel: &str, range: std::ops::Range<u32>) {
    for i in range {
        client
            .execute("SELECT pg_notify($1, $2)", &[&channel, &format!("m{i}")])
            .await
            .unwrap();
    }
}

/// Asserts each of `expected` was handled exactly once in the fleet.
fn assert_exactly_once(fleet: &Fleet, expected: impl Iterator<Item = u32>) {
    let got = fleet.all_received();
    let mut seen = HashSet::new();
    for (who, p) in &got {
        assert!(
            seen.insert(*p),
            "{p} handled twice (second by {who}): {got:?}"
        );
    }
    for i in expected {
        assert!(
            seen.contains(format!("m{i}").as_str()),
            "m{i} not handled: {got:?}"
        );
    }
}

#[tokio::test]
async fn one_leader_handles_each_message_and_sigkill_hands_over() {
    let ch = channel("jobs");
    let client = raw_client().await;
    let mut fleet = Fleet::new();
    for _ in 0..3 {
        fleet.spawn(&ch, &[]).await;
    }
    assert_eq!(fleet.leaders.len(), 1, "exactly one leader");
    let leader = fleet.leader();
    // The documented lock key finds the leader's session.
    assert!(lock_holder(&client, &ch).await.is_some());

    publish(&client, &ch, 0..20).await;
    fleet.collect(20, Duration::from_millis(300)).await;
    assert_exactly_once(&fleet, 0..20);
    assert_eq!(
        fleet.received[leader].len(),
        20,
        "only the leader handled them"
    );

    let killed = Instant::now();
    fleet.signal(leader, "-KILL").await;
    let next = fleet.wait_err(|_, l| l.contains("leading")).await;
    let took = killed.elapsed();
    assert_ne!(next, leader);
    println!("SIGKILL hand-over took {took:?}");
    // Nobody handed over: the new leader says messages may be missing.
    fleet.wait_for(|f| f.gaps.contains(&next)).await;
    let before = fleet.received[next].len();
    publish(&client, &ch, 20..40).await;
    fleet.collect(40, Duration::from_millis(300)).await;
    assert_exactly_once(&fleet, 0..40);
    assert_eq!(fleet.received[next].len() - before, 20);
}

#[tokio::test]
async fn sigterm_hands_over_with_nothing_lost_or_doubled() {
    let ch = channel("graceful");
    let mut fleet = Fleet::new();
    for _ in 0..3 {
        fleet.spawn(&ch, &[]).await;
    }
    let leader = fleet.leader();
    // A publisher every 20 ms throughout the hand-over.
    let publisher = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let client = raw_client().await;
            for i in 0..60u32 {
                publish(&client, &ch, i..i + 1).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = Instant::now();
    let status = fleet.signal(leader, "-TERM").await;
    assert!(status.success(), "graceful exit: {status:?}");
    let next = fleet.wait_err(|_, l| l.contains("leading")).await;
    println!("SIGTERM hand-over took {:?}", stopped.elapsed());
    assert_ne!(next, leader);
    publisher.await.unwrap();
    fleet.collect(60, Duration::from_millis(300)).await;
    assert_exactly_once(&fleet, 0..60);
    // Only the first leader reported a gap (it could not know whether
    // anyone led before it); the graceful successor did not.
    assert_eq!(fleet.gaps, [leader]);
}

#[tokio::test]
async fn elect_only_some_channels_of_one_listen() {
    let jobs = channel("jobs");
    let cache = channel("cache");
    let client = raw_client().await;
    let mut fleet = Fleet::new();
    for _ in 0..2 {
        fleet.spawn_with(&[&cache, "--elect", &jobs]).await;
    }
    publish(&client, &jobs, 0..10).await;
    publish(&client, &cache, 100..110).await;
    fleet.collect(10 + 2 * 10, Duration::from_millis(300)).await;
    let leader = fleet.leader();
    for (i, got) in fleet.received.iter().enumerate() {
        // Broadcast payloads are m100..m109, elected ones m0..m9.
        let cached = got.iter().filter(|p| p.len() == 4).count();
        assert_eq!(cached, 10, "every process gets the broadcast channel");
        let jobs_got = got.len() - cached;
        assert_eq!(jobs_got, if i == leader { 10 } else { 0 }, "{got:?}");
    }
}

#[tokio::test]
async fn terminated_leader_backend_loses_the_lead_and_someone_leads_again() {
    let ch = channel("terminate");
    let client = raw_client().await;
    let mut fleet = Fleet::new();
    for _ in 0..2 {
        fleet.spawn(&ch, &[]).await;
    }
    let leader = fleet.leader();
    let holder = lock_holder(&client, &ch).await.expect("a lock holder");
    terminate(holder).await;
    // Whoever wins the lock next (the old leader reconnecting, or the
    // standby) is the only one delivering.
    fleet
        .wait_for(|f| f.lost == [leader] && f.leaders.len() == 2)
        .await;
    let new_holder = lock_holder(&client, &ch).await.expect("lock taken again");
    assert_ne!(new_holder, holder);
    publish(&client, &ch, 0..20).await;
    fleet.collect(20, Duration::from_millis(300)).await;
    assert_exactly_once(&fleet, 0..20);
    assert_eq!(fleet.received[fleet.leader()].len(), 20);
}
