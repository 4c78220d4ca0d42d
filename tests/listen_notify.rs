//! Publishing and subscribing against a real server.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use pg_pubsub::Text;
use pg_pubsub::{ConnectionEvent, Delivery, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
struct Order {
    id: u64,
    item: String,
}

#[tokio::test]
async fn typed_message_round_trip() {
    let ps = pubsub().await;
    let ch = channel("typed");
    let mut sub = ps.listen::<Order>(&ch).await.unwrap();
    let order = Order {
        id: 7,
        item: "pen".into(),
    };
    ps.notify(&ch, &order).await.unwrap();
    let m = next_message(&mut sub).await;
    assert_eq!(m.payload(), &order);
    assert_eq!(m.channel(), ch);
    assert_eq!(m.raw(), r#"{"id":7,"item":"pen"}"#);
    assert!(m.process_id() > 0);
    assert_ne!(
        Some(m.process_id()),
        ps.listener_pid(),
        "sent through the pool"
    );
    assert_eq!(m.origin(), None, "untagged unless filtered");
    ps.shutdown().await;
}

#[tokio::test]
async fn foreign_publishers_reach_subscribers_unchanged() {
    let ps = pubsub().await;
    let ch = channel("foreign");
    let mut typed = ps.listen::<Order>(&ch).await.unwrap();
    let mut raw = ps.listen::<Text>(&ch).await.unwrap();
    let client = raw_client().await;
    let payload = r#"{"id":1,"item":"from psql"}"#;
    client
        .batch_execute(&format!("NOTIFY \"{ch}\", '{payload}'"))
        .await
        .unwrap();
    let m = next_message(&mut typed).await;
    assert_eq!(m.payload().item, "from psql");
    assert_eq!(next_message(&mut raw).await.payload(), payload);
    // A trigger-like pg_notify with text that merely looks like our header.
    client
        .execute("SELECT pg_notify($1, 'pgps:1:not-a-header')", &[&ch])
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut raw).await.payload(),
        "pgps:1:not-a-header"
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn case_is_preserved_and_hostile_names_are_just_channels() {
    let ps = pubsub().await;
    let upper = format!("Orders_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut sub_upper = ps.listen::<Text>(&upper).await.unwrap();
    let mut sub_lower = ps.listen::<Text>(&upper.to_lowercase()).await.unwrap();
    let client = raw_client().await;
    client
        .execute("SELECT pg_notify($1, 'upper')", &[&upper])
        .await
        .unwrap();
    assert_eq!(next_message(&mut sub_upper).await.payload(), "upper");
    assert_quiet(&mut sub_lower, Duration::from_millis(200)).await;

    let hostile = format!(
        r#"a"; DROP TABLE x; -- {}"#,
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let mut sub = ps.listen::<Text>(&hostile).await.unwrap();
    ps.notify(&hostile, Text("still a channel")).await.unwrap();
    assert_eq!(next_message(&mut sub).await.payload(), "still a channel");
    let with_quote = "it's \"quoted\" \\ and 'odd'";
    let mut sub2 = ps.listen::<Text>(with_quote).await.unwrap();
    ps.notify(with_quote, Text("ok")).await.unwrap();
    assert_eq!(next_message(&mut sub2).await.channel(), with_quote);
    ps.shutdown().await;
}

#[tokio::test]
async fn fan_out_shares_one_listen() {
    let ps = pubsub().await;
    let ch = channel("fanout");
    let mut events = ps.events();
    let mut subs = Vec::new();
    for _ in 0..10 {
        subs.push(ps.listen::<u32>(&ch).await.unwrap());
    }
    ps.notify_batch(&ch, (0..100).map(|i| i.to_string()).map(Text))
        .await
        .unwrap();
    for sub in &mut subs {
        for i in 0..100u32 {
            assert_eq!(*next_message(sub).await.payload(), i);
        }
    }
    // Exactly one LISTEN for ten subscribers, one UNLISTEN after the last drop.
    drop(subs);
    let mut listens = 0;
    loop {
        match next(&mut events).await {
            ConnectionEvent::Listening { channel } if channel.as_str() == ch => listens += 1,
            ConnectionEvent::Unlistened { channel } if channel.as_str() == ch => break,
            _ => {}
        }
    }
    assert_eq!(listens, 1);
    ps.shutdown().await;
}

#[tokio::test]
async fn subscribe_and_drop_while_messages_flow() {
    let ps = pubsub().await;
    let ch = channel("churn");
    let mut steady = ps.listen::<u64>(&ch).await.unwrap();
    let publisher = {
        let ps = ps.clone();
        let ch = ch.clone();
        tokio::spawn(async move {
            for i in 0..400u64 {
                ps.notify(&ch, &i).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Subscribe and drop from other tasks while the stream runs.
    let mut churners = Vec::new();
    for _ in 0..4 {
        let ps = ps.clone();
        let ch = ch.clone();
        churners.push(tokio::spawn(async move {
            for _ in 0..10 {
                let mut sub = ps.listen::<u64>(&ch).await.unwrap();
                // Whatever arrives after listen returned is in order.
                let a = *next_message(&mut sub).await.payload();
                let b = *next_message(&mut sub).await.payload();
                assert!(b > a);
                drop(sub);
            }
        }));
    }
    for c in churners {
        c.await.unwrap();
    }
    publisher.await.unwrap();
    for i in 0..400u64 {
        assert_eq!(
            *next_message(&mut steady).await.payload(),
            i,
            "steady subscriber lost nothing"
        );
    }
    ps.shutdown().await;
}

#[tokio::test]
async fn slow_subscriber_does_not_delay_a_fast_one() {
    let ps = builder().queue_capacity(100).connect().await.unwrap();
    let ch = channel("slow");
    let mut events = ps.events();
    let mut slow = ps.listen::<u32>(&ch).await.unwrap();
    let mut fast = ps.listen::<u32>(&ch).await.unwrap();
    let (progress, mut fast_got) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        for i in 0..1000u32 {
            assert_eq!(*next_message(&mut fast).await.payload(), i);
            if (i + 1) % 100 == 0 {
                progress.send(i + 1).await.unwrap();
            }
        }
    });
    // Ten bursts of 100; the fast one takes each burst while the slow one never reads.
    for burst in 0..10u32 {
        let from = burst * 100;
        ps.notify_batch(&ch, (from..from + 100).map(|i| i.to_string()).map(Text))
            .await
            .unwrap();
        let got = tokio::time::timeout(WAIT, fast_got.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, from + 100, "fast subscriber got every message");
    }
    wait_event(
        &mut events,
        |e| matches!(e, ConnectionEvent::SlowConsumer { channel } if channel.as_str() == ch),
    )
    .await;
    // The slow one: the first 100 it had room for, then the count it lost.
    for i in 0..100u32 {
        assert_eq!(*next_message(&mut slow).await.payload(), i);
    }
    match next(&mut slow).await {
        Delivery::Lagged(n) => assert_eq!(n, 900),
        other => panic!("expected Lagged, got {other:?}"),
    }
    // And it keeps receiving afterwards.
    ps.notify(&ch, &5000u32).await.unwrap();
    assert_eq!(*next_message(&mut slow).await.payload(), 5000);
    ps.shutdown().await;
}

#[tokio::test]
async fn undecodable_payload_is_reported_and_stream_goes_on() {
    let ps = pubsub().await;
    let ch = channel("decode");
    let mut sub = ps.listen::<Order>(&ch).await.unwrap();
    let mut other = ps.listen::<Order>(&ch).await.unwrap();
    ps.notify(&ch, Text("not json")).await.unwrap();
    ps.notify(&ch, &serde_json::json!({"id": "wrong type"}))
        .await
        .unwrap();
    let good = Order {
        id: 2,
        item: "ok".into(),
    };
    ps.notify(&ch, &good).await.unwrap();
    for s in [&mut sub, &mut other] {
        match next(s).await {
            Delivery::Undecodable(e) => {
                assert_eq!(e.raw(), "not json");
                assert_eq!(e.channel(), ch);
                assert!(e.to_string().contains("did not decode"), "{e}");
            }
            other => panic!("expected Undecodable, got {other:?}"),
        }
        assert!(matches!(next(s).await, Delivery::Undecodable(_)));
        assert_eq!(next_message(s).await.payload(), &good);
    }
    ps.shutdown().await;
}

#[tokio::test]
async fn transactional_notify_on_commit_only() {
    let ps = pubsub().await;
    let ch = channel("tx");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    let mut client = raw_client().await;

    let tx = client.transaction().await.unwrap();
    ps.notify_tx(&tx, &ch, Text("rolled back")).await.unwrap();
    tx.rollback().await.unwrap();

    let tx = client.transaction().await.unwrap();
    ps.notify_tx(&tx, &ch, &"committed").await.unwrap();
    assert_quiet(&mut sub, Duration::from_millis(200)).await;
    tx.commit().await.unwrap();
    assert_eq!(next_message(&mut sub).await.payload(), "\"committed\"");

    // The same through a pooled deadpool client and its transaction.
    let mut pooled = ps.pool().get().await.unwrap();
    let tx = pooled.transaction().await.unwrap();
    ps.notify_tx(&tx, &ch, Text("pooled rollback"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = pooled.transaction().await.unwrap();
    ps.notify_tx(&tx, &ch, Text("pooled commit")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(next_message(&mut sub).await.payload(), "pooled commit");
    assert_quiet(&mut sub, Duration::from_millis(200)).await;
    ps.shutdown().await;
}

#[tokio::test]
async fn batch_delivers_repeats_in_order() {
    let ps = pubsub().await;
    let ch = channel("batch");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    let payloads = ["a", "a", "b", "a", "c", "c"];
    assert_eq!(
        ps.notify_batch(&ch, payloads.into_iter().map(Text))
            .await
            .unwrap(),
        6
    );
    for p in payloads {
        assert_eq!(next_message(&mut sub).await.payload(), p);
    }
    ps.shutdown().await;
}

#[tokio::test]
async fn limits_are_checked_before_the_server_at_the_exact_bytes() {
    let ps = pubsub().await;
    let ch = channel("limits");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();

    let ok = "x".repeat(7999);
    ps.notify(&ch, Text(&ok)).await.unwrap();
    assert_eq!(next_message(&mut sub).await.payload().len(), 7999);
    let err = ps.notify(&ch, Text(&"x".repeat(8000))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Limit);
    assert!(err.to_string().contains("8000 bytes"), "{err}");
    // Bytes, not characters: 4000 two-byte characters.
    assert_eq!(
        ps.notify(&ch, Text(&"é".repeat(4000)))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Limit
    );
    // Serialized size counts: a 7998-char string is 8000 bytes of JSON.
    assert_eq!(
        ps.notify(&ch, &"y".repeat(7998)).await.unwrap_err().kind(),
        ErrorKind::Limit
    );
    ps.notify(&ch, &"y".repeat(7997)).await.unwrap();
    assert_eq!(next_message(&mut sub).await.payload().len(), 7999);

    let name63 = format!("{ch}{}", "n".repeat(63 - ch.len()));
    let mut long = ps.listen::<Text>(&name63).await.unwrap();
    ps.notify(&name63, Text("63")).await.unwrap();
    assert_eq!(next_message(&mut long).await.channel(), name63);
    let name64 = format!("{name63}n");
    assert_eq!(
        ps.listen::<Text>(&name64).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(
        ps.notify(&name64, Text("x")).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(
        ps.listen::<Text>("").await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(
        ps.notify("a\0b", Text("x")).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    let batch_err = ps
        .notify_batch(&ch, ["fine", &"x".repeat(8000)].map(Text))
        .await
        .unwrap_err();
    assert_eq!(batch_err.kind(), ErrorKind::Limit);
    assert!(batch_err.to_string().contains("#1"), "{batch_err}");
    // Nothing of the refused batch was sent, and the listener is unharmed.
    ps.notify(&ch, Text("after")).await.unwrap();
    assert_eq!(next_message(&mut sub).await.payload(), "after");
    ps.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_pending_subscriptions_and_refuses_new_work() {
    let ps = pubsub().await;
    let ch = channel("shutdown");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    let mut waiter = ps.listen::<Text>(&ch).await.unwrap();
    ps.notify(&ch, Text("queued before shutdown"))
        .await
        .unwrap();
    // Once `waiter` has it, `sub` has it queued too (same fan-out), unread.
    next_message(&mut waiter).await;
    let pending = tokio::spawn(async move {
        let mut pending = waiter;
        pending.next().await.is_none()
    });
    let mut events = ps.events();
    tokio::time::timeout(WAIT, ps.shutdown())
        .await
        .expect("shutdown is bounded");
    assert!(
        tokio::time::timeout(WAIT, pending).await.unwrap().unwrap(),
        "pending subscription ended"
    );
    // What was already received can still be read, then the stream ends.
    assert_eq!(
        next_message(&mut sub).await.payload(),
        "queued before shutdown"
    );
    assert!(sub.next().await.is_none());
    wait_event(&mut events, |e| matches!(e, ConnectionEvent::ShutDown)).await;
    assert_eq!(
        ps.listen::<Text>(&ch).await.unwrap_err().kind(),
        ErrorKind::ShutDown
    );
    assert_eq!(
        ps.notify(&ch, Text("x")).await.unwrap_err().kind(),
        ErrorKind::ShutDown
    );
    ps.shutdown().await; // idempotent
}

#[tokio::test]
async fn bad_connection_string_and_unreachable_server_fail_clearly() {
    let err = pg_pubsub::PgPubSub::connect("postgres://user:secret@127.0.0.1:1/db?bogus=1")
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
    let err = pg_pubsub::PgPubSub::builder("postgres://user:secret@127.0.0.1:1/db")
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[tokio::test]
async fn publishes_through_a_given_pool_and_leaves_it_open() {
    let manager = pg_pubsub::deadpool_postgres::Manager::new(
        server().config(),
        pg_pubsub::tokio_postgres::NoTls,
    );
    let pool = pg_pubsub::deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    let ps = builder().pool(pool.clone()).connect().await.unwrap();
    let ch = channel("own_pool");
    let mut sub = ps.listen::<Text>(&ch).await.unwrap();
    ps.notify(&ch, Text("via your pool")).await.unwrap();
    assert_eq!(next_message(&mut sub).await.payload(), "via your pool");
    assert!(pool.status().size >= 1, "the given pool was used");
    ps.shutdown().await;
    assert!(
        !pool.is_closed(),
        "shutdown leaves a pool it did not create open"
    );
    drop(pool.get().await.unwrap());
}

#[tokio::test]
async fn debug_shows_the_start_of_long_payloads() {
    let ps = pubsub().await;
    let ch = channel("debug");
    let mut raw = ps.listen::<Text>(&ch).await.unwrap();
    let mut typed = ps.listen::<Order>(&ch).await.unwrap();
    let mut list = ps.listen::<Vec<u32>>(&ch).await.unwrap();
    let long = "é".repeat(3999);
    ps.notify(&ch, Text(&long)).await.unwrap();
    let numbers: Vec<u32> = (0..1500).collect();
    ps.notify(&ch, &numbers).await.unwrap();

    let shown = format!("{:?}", next(&mut raw).await);
    assert!(shown.contains("… (7998 bytes)"), "{shown}");
    assert!(shown.len() < 400, "{} bytes: {shown}", shown.len());
    let shown = format!("{:?}", next(&mut typed).await);
    assert!(shown.starts_with("Undecodable(DecodeError"), "{shown}");
    assert!(shown.contains("… (7998 bytes)"), "{shown}");
    assert!(shown.len() < 500, "{} bytes: {shown}", shown.len());
    let _ = next(&mut list).await; // the text above
    let shown = format!("{:?}", next(&mut list).await);
    assert!(shown.starts_with("Message"), "{shown}");
    assert!(
        shown.contains(&format!(
            "… ({} bytes)",
            serde_json::to_string(&numbers).unwrap().len()
        )),
        "{shown}"
    );
    assert!(shown.len() < 400, "{} bytes: {shown}", shown.len());
    ps.shutdown().await;
}

/// A connector given by the user: the listener lets tokio-postgres open
/// and read its socket (elsewhere the crate reads it, taking notification
/// frames off itself). Deliveries are the same.
#[tokio::test]
async fn a_connector_of_the_users_own_delivers_the_same() {
    let ps = builder()
        .tls(tokio_postgres::NoTls)
        .connect()
        .await
        .expect("connect");
    let ch = channel("own_connector");
    let mut typed = ps.listen::<Order>(&ch).await.unwrap();
    let mut raw = ps.listen::<Text>(&ch).await.unwrap();
    let order = Order {
        id: 1,
        item: "pen".into(),
    };
    ps.notify(&ch, &order).await.unwrap();
    ps.notify(&ch, Text("not json")).await.unwrap();
    assert_eq!(next_message(&mut typed).await.payload(), &order);
    match next(&mut typed).await {
        Delivery::Undecodable(e) => assert_eq!(e.raw(), "not json"),
        other => panic!("expected an undecodable payload, got {other:?}"),
    }
    assert_eq!(
        next_message(&mut raw).await.payload().0,
        r#"{"id":1,"item":"pen"}"#
    );
    assert_eq!(next_message(&mut raw).await.payload().0, "not json");
    ps.shutdown().await;
}
