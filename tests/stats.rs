//! `PgPubSub::stats()`: counters against a real server.

mod common;

use common::*;
use futures::StreamExt;
use pg_pubsub::Text;
use pg_pubsub::{ConnectionEvent, Delivery};

#[tokio::test]
async fn counts_deliveries_per_subscription() {
    let ps = pubsub().await;
    let ch = channel("stats_delivered");
    let mut one = ps.listen::<Text>(&ch).await.unwrap();
    let mut two = ps.listen::<Text>(&ch).await.unwrap();
    let stats = ps.stats();
    let counted = stats.channel(&ch).expect("channel listed");
    assert_eq!((counted.delivered, counted.subscribers), (0, 2));
    assert!(stats.connected());
    assert_eq!(stats.listener_pid, ps.listener_pid());

    let payloads: Vec<String> = (0..5).map(|i| i.to_string()).collect();
    ps.notify_batch(&ch, payloads.iter().map(Text))
        .await
        .unwrap();
    for sub in [&mut one, &mut two] {
        for expected in &payloads {
            assert_eq!(next_message(sub).await.payload(), expected);
        }
    }
    let counted = ps.stats().channel(&ch).cloned().expect("channel listed");
    // Five notifications, each queued to two subscriptions.
    assert_eq!(counted.delivered, 10);
    assert_eq!((counted.lagged, counted.gaps), (0, 0));

    drop(two);
    assert_eq!(ps.stats().channel(&ch).map(|c| c.subscribers), Some(1));
    drop(one);
    assert!(
        ps.stats().channel(&ch).is_none(),
        "gone with its last subscription"
    );
    assert_eq!(ps.stats().reconnects, 0);
    ps.shutdown().await;
}

#[tokio::test]
async fn counts_messages_dropped_for_a_full_queue() {
    let ps = builder().queue_capacity(2).connect().await.unwrap();
    let ch = channel("stats_lagged");
    let done = channel("stats_done");
    let mut slow = ps.listen::<Text>(&ch).await.unwrap();
    let mut sentinel = ps.listen::<Text>(&done).await.unwrap();
    ps.notify_batch(&ch, ["1", "2", "3", "4", "5"].map(Text))
        .await
        .unwrap();
    // Committed after the batch: once it is here, the batch was fanned out.
    ps.notify_batch(&done, ["done"].map(Text)).await.unwrap();
    next_message(&mut sentinel).await;

    let counted = ps.stats().channel(&ch).cloned().expect("channel listed");
    assert_eq!((counted.delivered, counted.lagged), (2, 3));
    assert_eq!(next_message(&mut slow).await.payload(), "1");
    assert_eq!(next_message(&mut slow).await.payload(), "2");
    assert!(matches!(next(&mut slow).await, Delivery::Lagged(3)));
    ps.shutdown().await;
}

#[tokio::test]
async fn counts_gaps_and_reconnects() {
    let ps = pubsub().await;
    let mut events = ps.events();
    let ch = channel("stats_gaps");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    let old_pid = ps.listener_pid().unwrap();
    terminate(old_pid).await;
    assert!(matches!(next(&mut sub).await, Delivery::Gap(_)));
    let stats = ps.stats();
    assert_eq!(stats.reconnects, 1);
    assert_eq!(stats.channel(&ch).map(|c| c.gaps), Some(1));
    wait_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Reconnected { .. })
    })
    .await;
    assert_ne!(ps.stats().listener_pid, Some(old_pid));
    ps.shutdown().await;
    assert_eq!(sub.next().await.map(|d| format!("{d:?}")), None);
}

#[tokio::test]
async fn lists_led_channels() {
    let ps = builder().single_listener(true).connect().await.unwrap();
    let ch = channel("stats_leader");
    let _sub = ps.listen::<Text>(&ch).await.unwrap();
    assert!(ps.is_leader(&ch), "alone, so it leads");
    let leading: Vec<String> = ps.stats().leading.iter().map(|c| c.to_string()).collect();
    assert_eq!(leading, [ch]);
    ps.shutdown().await;
}
