//! Every `*_tx` method takes the caller's transaction as it comes, from
//! the crate's own deadpool pool or from tokio-postgres, and commits or
//! rolls back with it.

mod common;

use common::*;
use pg_pubsub::deadpool_postgres;
use pg_pubsub::durable::DurableDelivery;
use pg_pubsub::queue::Job;
use pg_pubsub::Text;

#[tokio::test]
async fn a_pooled_transaction_works_as_it_is_and_rolls_back_with_the_caller() {
    let ps = pubsub().await;
    let durable = ps.durable();
    durable.install().await.expect("install");
    let queue = ps.queue();
    let ch = channel("tx");
    let mut sub = ps.listen::<Text>(&ch).await.expect("listen");
    let mut stream = durable
        .subscribe::<Text>(&ch, "g")
        .await
        .expect("subscribe");

    let mut client = ps.pool().get().await.expect("pooled client");
    // Rolled back: nothing of it is seen.
    let tx = client.transaction().await.expect("begin");
    ps.notify_tx(&tx, &ch, Text("rolled back"))
        .await
        .expect("notify");
    durable
        .publish_tx(&tx, &ch, Text("rolled back"))
        .await
        .expect("publish");
    queue
        .enqueue_tx(&tx, &ch, Text("rolled back"))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    // Committed.
    let tx = client.transaction().await.expect("begin");
    ps.notify_tx(&tx, &ch, Text("committed"))
        .await
        .expect("notify");
    durable
        .publish_tx(&tx, &ch, Text("committed"))
        .await
        .expect("publish");
    let enqueued = queue
        .enqueue_tx(&tx, &ch, Text("committed"))
        .await
        .expect("enqueue");
    assert!(enqueued.id().is_some());
    tx.commit().await.expect("commit");

    let m = next_message(&mut sub).await;
    assert_eq!(m.payload(), "committed");
    let Some(DurableDelivery::Message(m)) = futures::StreamExt::next(&mut stream).await else {
        panic!("expected the committed durable message");
    };
    assert_eq!(m.payload(), "committed");
    // The ack moves the cursor with the caller's transaction, also on a
    // plain tokio-postgres transaction.
    let mut raw = raw_client().await;
    let tx = raw.transaction().await.expect("begin");
    m.ack_tx(&tx).await.expect("ack");
    tx.commit().await.expect("commit");
    let jobs = job_states(&raw, &ch).await;
    assert_eq!(jobs.len(), 1, "only the committed job: {jobs:?}");
    assert_quiet(&mut sub, std::time::Duration::from_millis(200)).await;
    drop(client);
    ps.shutdown().await;
}

/// Compiles only if `complete_tx` and `emit_tx` take deadpool's and
/// tokio-postgres' transactions and clients as they are.
#[allow(dead_code)]
async fn every_executor_is_accepted(
    job: &Job,
    pooled: &deadpool_postgres::Transaction<'_>,
    plain: &tokio_postgres::Transaction<'_>,
    client: &deadpool_postgres::Client,
) -> pg_pubsub::Result<()> {
    job.complete_tx(pooled).await?;
    job.complete_tx(plain).await?;
    job.complete_tx(client).await?;
    #[cfg(feature = "wal")]
    {
        pg_pubsub::changes::wal::emit_tx(pooled, "p", b"x").await?;
        pg_pubsub::changes::wal::emit_tx(plain, "p", b"x").await?;
    }
    Ok(())
}
