//! `filtered`: an instance does not receive what it published itself.

mod common;

use pg_pubsub::GapCause;
use pg_pubsub::Text;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn own_messages_are_filtered_on_every_publishing_path() {
    let me = builder().filtered(true).connect().await.unwrap();
    let other = pubsub().await;
    let ch = channel("filtered");
    let mut mine = me.listen::<Text>(&ch).await.unwrap();
    let mut theirs = other.listen::<Text>(&ch).await.unwrap();

    // Through the pool, in a batch, and inside the caller's transaction.
    me.notify(&ch, Text("pool")).await.unwrap();
    me.notify_batch(&ch, ["batch1", "batch2"].map(Text))
        .await
        .unwrap();
    let mut client = raw_client().await;
    let tx = client.transaction().await.unwrap();
    me.notify_tx(&tx, &ch, Text("tx")).await.unwrap();
    tx.commit().await.unwrap();
    for expected in ["pool", "batch1", "batch2", "tx"] {
        let m = next_message(&mut theirs).await;
        assert_eq!(m.payload(), expected, "others receive it unwrapped");
        assert_eq!(m.origin(), Some(me.origin()));
    }
    // Foreign publishers are never filtered; the first thing `me` sees is this.
    client
        .execute("SELECT pg_notify($1, 'foreign')", &[&ch])
        .await
        .unwrap();
    other.notify(&ch, Text("from other")).await.unwrap();
    assert_eq!(next_message(&mut mine).await.payload(), "foreign");
    assert_eq!(next_message(&mut mine).await.payload(), "from other");
    assert_quiet(&mut mine, Duration::from_millis(200)).await;
    me.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn two_filtered_instances_in_one_process_are_two_publishers() {
    let a = builder().filtered(true).connect().await.unwrap();
    let b = builder().filtered(true).connect().await.unwrap();
    assert_ne!(a.origin(), b.origin());
    let ch = channel("twins");
    let mut sub_a = a.listen::<String>(&ch).await.unwrap();
    let mut sub_b = b.listen::<String>(&ch).await.unwrap();
    a.notify(&ch, "from a").await.unwrap();
    b.notify(&ch, "from b").await.unwrap();
    // Typed subscribers decode the tagged payload like a plain one.
    assert_eq!(next_message(&mut sub_a).await.payload(), "from b");
    assert_eq!(next_message(&mut sub_b).await.payload(), "from a");
    assert_quiet(&mut sub_a, Duration::from_millis(200)).await;
    assert_quiet(&mut sub_b, Duration::from_millis(100)).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn filtered_leader_does_not_see_its_own_messages() {
    let leader = builder()
        .filtered(true)
        .single_listener(true)
        .connect()
        .await
        .unwrap();
    let ch = channel("filtered_leader");
    let mut sub = leader.listen::<Text>(&ch).await.unwrap();
    assert!(leader.is_leader(&ch));
    // The first leader cannot know whether someone led before it.
    expect_gap(&mut sub, GapCause::TakeOver).await;
    leader.notify(&ch, Text("own")).await.unwrap();
    let client = raw_client().await;
    client
        .execute("SELECT pg_notify($1, 'foreign')", &[&ch])
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub).await.payload(), "foreign");
    leader.shutdown().await;
    assert!(!leader.is_leader(&ch));
}
