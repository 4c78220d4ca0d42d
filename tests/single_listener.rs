//! Single listener within one process: two instances compete like two processes.

mod common;

use std::time::Duration;

use common::*;
use pg_pubsub::election::{LOCK_SEED, WITNESS_SEED};
use pg_pubsub::Text;
use pg_pubsub::{ConnectionEvent, Delivery, ErrorKind, GapCause};

#[tokio::test]
async fn standby_takes_over_when_the_leader_shuts_down() {
    let ch = channel("inproc");
    let a = builder().single_listener(true).connect().await.unwrap();
    let mut sub_a = a.listen::<Text>(&ch).await.unwrap();
    let b = builder().single_listener(true).connect().await.unwrap();
    let mut b_events = b.events();
    let mut sub_b = b.listen::<Text>(&ch).await.unwrap();
    assert!(a.is_leader(&ch) && !b.is_leader(&ch));
    let client = raw_client().await;
    assert_eq!(lock_holder(&client, &ch).await, a.listener_pid());

    // The first leader cannot know whether someone led before it.
    expect_gap(&mut sub_a, GapCause::TakeOver).await;
    a.notify(&ch, Text("one")).await.unwrap();
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
    b.notify(&ch, Text("two")).await.unwrap();
    // A graceful hand-over: no gap, the message comes first.
    assert_eq!(next_message(&mut sub_b).await.payload(), "two");
    b.shutdown().await;
}

#[tokio::test]
async fn dropping_without_shutdown_releases_the_lock() {
    let ch = channel("dropped");
    let a = builder().single_listener(true).connect().await.unwrap();
    let sub = a.listen::<Text>(&ch).await.unwrap();
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

    let sub = a.listen::<Text>(&ch).await.unwrap();
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
    let err = a.listen::<Text>("pg_pubsub_election").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    a.shutdown().await;
}

/// A leader that vanishes without handing over (here a foreign participant
/// following the documented protocol, whose session simply ends): the
/// standby's subscription gets a take-over gap before its first message.
#[tokio::test]
async fn take_over_without_hand_over_gives_a_gap_first() {
    let ch = channel("takeover");
    let leader = raw_client().await;
    leader
        .execute(&take_locks_sql(&[LOCK_SEED, WITNESS_SEED]), &[&ch])
        .await
        .unwrap();
    let b = builder()
        .lock_retry_interval(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let mut b_events = b.events();
    let mut sub_b = b.listen::<Text>(&ch).single_listener(true).await.unwrap();
    assert!(!b.is_leader(&ch));
    drop(leader); // its session ends, and the locks with it
    wait_event(&mut b_events, |e| {
        matches!(e, ConnectionEvent::LockAcquired { .. })
    })
    .await;
    let client = raw_client().await;
    client
        .execute("SELECT pg_notify($1, 'after')", &[&ch])
        .await
        .unwrap();
    expect_gap(&mut sub_b, GapCause::TakeOver).await;
    assert_eq!(next_message(&mut sub_b).await.payload(), "after");
    b.shutdown().await;
}

/// SQL taking the election locks of channel `$1` for the given key seeds.
fn take_locks_sql(seeds: &[i64]) -> String {
    let locks: Vec<String> = seeds
        .iter()
        .map(|seed| {
            format!(
                "pg_advisory_lock((hashtextextended($1::text, {seed}) >> 32)::int4, \
                 hashtextextended($1::text, {seed})::bit(32)::int4)"
            )
        })
        .collect();
    format!("SELECT {}", locks.join(", "))
}

/// One instance, one listener session: an elected channel and a broadcast
/// one side by side; filtering chosen per subscription.
#[tokio::test]
async fn election_and_filtering_per_subscription() {
    let jobs = channel("jobs");
    let cache = channel("cache");
    let a = pubsub().await;
    let b = pubsub().await;
    let mut a_jobs = a.listen::<Text>(&jobs).single_listener(true).await.unwrap();
    let mut b_jobs = b.listen::<Text>(&jobs).single_listener(true).await.unwrap();
    let mut a_cache = a.listen::<Text>(&cache).await.unwrap();
    let mut a_cache_filtered = a.listen::<Text>(&cache).filtered(true).await.unwrap();
    let mut b_cache = b.listen::<Text>(&cache).await.unwrap();
    assert!(a.is_leader(&jobs) != b.is_leader(&jobs), "one leader");
    assert!(!a.is_leader(&cache) && !b.is_leader(&cache));
    let (leader, standby) = if a.is_leader(&jobs) {
        (&mut a_jobs, &mut b_jobs)
    } else {
        (&mut b_jobs, &mut a_jobs)
    };
    expect_gap(leader, GapCause::TakeOver).await;
    b.notify(&jobs, Text("job")).await.unwrap();
    assert_eq!(next_message(leader).await.payload(), "job");
    assert_quiet(standby, Duration::from_millis(100)).await;

    a.notify(&cache, Text("from a")).await.unwrap();
    b.notify(&cache, Text("from b")).await.unwrap();
    assert_eq!(next_message(&mut a_cache).await.payload(), "from a");
    assert_eq!(next_message(&mut a_cache).await.payload(), "from b");
    assert_eq!(next_message(&mut b_cache).await.payload(), "from a");
    // Only the filtered subscription skips a's own message.
    assert_eq!(
        next_message(&mut a_cache_filtered).await.payload(),
        "from b"
    );

    // A channel is elected or not within one instance.
    let err = a.listen::<Text>(&jobs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("single-listener"), "{err}");
    let err = a
        .listen::<Text>(&cache)
        .single_listener(true)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    a.shutdown().await;
    b.shutdown().await;
}

/// `hashtext` put these two in one 32-bit lock key, so leading one kept
/// everyone from leading the other. The 64-bit keys tell them apart.
#[tokio::test]
async fn names_that_collided_in_32_bits_both_get_leaders() {
    let client = raw_client().await;
    let row = client
        .query_one(
            "SELECT hashtext('job_175307') = hashtext('job_230291')",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the 0.1 keys collide");
    let a = builder().single_listener(true).connect().await.unwrap();
    let b = builder().single_listener(true).connect().await.unwrap();
    // Unique to this test run: suffixes would change the hashes.
    let _one = a.listen::<Text>("job_175307").await.unwrap();
    let _two = b.listen::<Text>("job_230291").await.unwrap();
    assert!(a.is_leader("job_175307"));
    assert!(b.is_leader("job_230291"));
    a.shutdown().await;
    b.shutdown().await;
}

/// A lock on the channel's key held by a session that is not a leader (a
/// collision, or the application's own lock): the standby says so.
#[tokio::test]
async fn a_lock_held_by_a_non_leader_is_reported() {
    let ch = channel("blocked");
    let client = raw_client().await;
    client
        .execute(&take_locks_sql(&[LOCK_SEED]), &[&ch])
        .await
        .unwrap();
    let holder: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let a = builder()
        .lock_retry_interval(Duration::from_millis(50))
        .health_check(Duration::from_millis(100), Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut events = a.events();
    let _sub = a.listen::<Text>(&ch).single_listener(true).await.unwrap();
    assert!(!a.is_leader(&ch));
    match wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::ElectionBlocked { .. })
    })
    .await
    {
        ConnectionEvent::ElectionBlocked {
            channel,
            holder_pid,
        } => {
            assert_eq!(channel.as_str(), ch);
            assert_eq!(holder_pid, holder);
        }
        _ => unreachable!(),
    }
    a.shutdown().await;
}

/// A `ready:` from a session that does not hold the lock does not end a
/// hand-over: the leader keeps delivering until the hand-over timeout.
#[tokio::test]
async fn a_forged_ready_does_not_end_a_hand_over() {
    let ch = channel("forged");
    let a = builder()
        .single_listener(true)
        .handover_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let mut sub = a.listen::<Text>(&ch).await.unwrap();
    expect_gap(&mut sub, GapCause::TakeOver).await;
    let mut events = a.events();
    let shutdown = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown().await }
    });
    wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::LockReleased { .. })
    })
    .await;
    let client = raw_client().await;
    client
        .execute(
            "SELECT pg_notify('pg_pubsub_election', 'ready:' || $1)",
            &[&ch],
        )
        .await
        .unwrap();
    client
        .execute("SELECT pg_notify($1, 'after the forged ready')", &[&ch])
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut sub).await.payload(),
        "after the forged ready"
    );
    shutdown.await.unwrap();
    assert!(sub.recv().await.is_none());
}

/// The gap of a half-open connection counts from the last moment it was
/// known to work, not from when the loss was noticed.
#[tokio::test]
async fn gap_downtime_counts_from_the_last_good_moment() {
    if !own_server("stop the backend of") {
        return;
    }
    let timeout = Duration::from_millis(800);
    let ps = builder()
        .health_check(Duration::from_millis(200), timeout)
        .connect()
        .await
        .unwrap();
    let ch = channel("halfopen");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    let pid = ps.listener_pid().unwrap();
    send_signal(pid, "-STOP");
    let gap = match next(&mut sub).await {
        Delivery::Gap(gap) => gap,
        other => panic!("expected a gap, got {other:?}"),
    };
    send_signal(pid, "-CONT");
    // The health check that found the loss was sent after the last good
    // moment and went unanswered for the whole timeout.
    let downtime = gap.downtime().expect("a reconnect gap");
    assert!(downtime >= timeout, "{gap:?}");
    ps.shutdown().await;
}
