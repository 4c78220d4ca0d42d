//! Publishing: what is checked before sending, and statement reuse.

mod common;

use common::{channel, pubsub, raw_client, raw_listener, recv_until};
use pg_pubsub::ErrorKind;
use pg_pubsub::Text;

#[tokio::test]
async fn nul_payload_is_refused_by_the_crate() {
    let ps = pubsub().await;
    let ch = channel("nul");
    let err = ps.notify(&ch, Text("ab\0cd")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Limit, "{err:?}");
    let client = raw_client().await;
    let err = ps
        .notify_tx(&client, &ch, Text("ab\0cd"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Limit, "{err:?}");
    ps.shutdown().await;
}

#[tokio::test]
async fn a_bad_payload_anywhere_in_a_batch_sends_nothing() {
    let ps = pubsub().await;
    let ch = channel("batch_bad");
    let (_listener, mut rx) = raw_listener(&ch).await;
    let bad = [
        ("a\0b".to_owned(), ErrorKind::Limit),
        ("x".repeat(8000), ErrorKind::Limit),
    ];
    for (bad, kind) in bad {
        let mut payloads: Vec<String> = (0..2500).map(|i| format!("line {i}")).collect();
        payloads.push(bad);
        let err = ps
            .notify_batch(&ch, payloads.iter().map(Text))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind, "{err:?}");
        assert!(err.to_string().contains("payload #2500"), "{err}");
        // Anything the failed call committed would arrive before this.
        ps.notify(&ch, Text("sentinel")).await.unwrap();
        assert_eq!(recv_until(&mut rx, "sentinel").await, Vec::<String>::new());
    }
    ps.shutdown().await;
}

/// How often the crate's notify statement is prepared on `client`'s session.
async fn prepared_notifies(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
            &[&"SELECT pg_notify($1, $2)"],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn notify_in_prepares_once_per_pooled_connection() {
    let ps = pubsub().await;
    let ch = channel("cached");
    let (_listener, mut rx) = raw_listener(&ch).await;
    let mut pooled = ps.pool().get().await.unwrap();
    for i in 0..3 {
        ps.notify_tx(&pooled, &ch, Text(&i.to_string()))
            .await
            .unwrap();
    }
    let tx = pooled.transaction().await.unwrap();
    ps.notify_tx(&tx, &ch, Text("in tx")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(prepared_notifies(&pooled).await, 1);

    // A bare client has no statement cache: nothing is left prepared on it.
    let mut client = raw_client().await;
    ps.notify_tx(&client, &ch, Text("bare")).await.unwrap();
    let tx = client.transaction().await.unwrap();
    ps.notify_tx(&tx, &ch, Text("bare tx")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(prepared_notifies(&client).await, 0);

    ps.notify(&ch, Text("sentinel")).await.unwrap();
    assert_eq!(
        recv_until(&mut rx, "sentinel").await,
        ["0", "1", "2", "in tx", "bare", "bare tx"]
    );
    ps.shutdown().await;
}
