//! The relay to NATS JetStream against a real `nats-server -js`: faults
//! (SIGKILLed relays, broker and PostgreSQL restarts) lose nothing and,
//! thanks to `Nats-Msg-Id`, store nothing twice; poison messages go to the
//! dead-letter channel; headers.
#![cfg(all(feature = "cli", feature = "relay-nats"))]

mod common;

use std::time::Duration;

use common::brokers::Nats;
use common::relay::{faults, payload_id, Broker, Feed};
use pg_pubsub::relay::async_nats::jetstream::{self, stream};
use pg_pubsub::relay::{NatsSink, Source, HEADER_ORIGIN, HEADER_POSITION, HEADER_PUBLISHED_AT};
use pg_pubsub::Text;

/// A JetStream stream `name` over `subjects`, created once the server's
/// JetStream answers.
async fn create_stream(url: &str, name: &str, subjects: &str, max_size: i32) -> jetstream::Context {
    let client = pg_pubsub::relay::async_nats::connect(url)
        .await
        .expect("connect to NATS");
    let js = jetstream::new(client);
    let config = stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        duplicate_window: Duration::from_secs(120),
        max_message_size: max_size,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    tokio::time::timeout(common::WAIT, async {
        loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(_) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("JetStream did not come up");
    js
}

/// Every message of stream `name`: (subject, payload id, headers).
async fn stream_messages(
    js: &jetstream::Context,
    name: &str,
) -> Option<Vec<(String, String, async_nats_headers::Headers)>> {
    let mut stream = js.get_stream(name).await.ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.ok()?;
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
        let id = payload_id(&payload).unwrap_or_default().to_owned();
        out.push((
            m.subject.to_string(),
            id,
            async_nats_headers::of(&m.headers),
        ));
    }
    Some(out)
}

mod async_nats_headers {
    use std::collections::HashMap;

    pub type Headers = HashMap<String, String>;

    pub fn of(h: &pg_pubsub::relay::async_nats::HeaderMap) -> Headers {
        h.iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.first()?.to_string())))
            .collect()
    }
}

struct NatsBroker {
    nats: Nats,
    js: jetstream::Context,
}

impl Broker for NatsBroker {
    fn url(&self) -> String {
        self.nats.url()
    }

    fn stop(&mut self) {
        self.nats.stop();
    }

    fn start_again(&mut self) {
        self.nats.start_again();
    }

    async fn count(&mut self) -> usize {
        match self.js.get_stream("ORDERS").await {
            Ok(mut s) => s
                .info()
                .await
                .map(|i| i.state.messages as usize)
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    async fn ids(&mut self) -> Vec<String> {
        let messages = stream_messages(&self.js, "ORDERS")
            .await
            .unwrap_or_default();
        for (subject, id, headers) in &messages {
            assert!(subject.starts_with("orders."), "{subject}");
            assert!(headers.contains_key("Nats-Msg-Id"), "{id}: {headers:?}");
        }
        messages.into_iter().map(|(_, id, _)| id).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_message_reaches_nats_once_through_kills_and_restarts() {
    if !common::own_server("restart") {
        return;
    }
    let nats = tokio::task::block_in_place(Nats::start);
    let js = create_stream(&nats.url(), "ORDERS", "orders.>", -1).await;
    let mut broker = NatsBroker { nats, js };
    let report = faults(
        &mut broker,
        Feed::Durable,
        &["--subject", "orders.{key}", "--key-field", "k"],
    )
    .await;
    eprintln!("NATS: {report:?}");
    assert_eq!(
        report.duplicates, 0,
        "the duplicate window drops every replay: {report:?}"
    );
    assert!(report.kills >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_change_and_outbox_message_reaches_nats_once_from_the_wal() {
    if !common::own_server("restart") {
        return;
    }
    let nats = tokio::task::block_in_place(Nats::start);
    let js = create_stream(&nats.url(), "ORDERS", "orders.>", -1).await;
    let mut broker = NatsBroker { nats, js };
    let subjects = [
        "--subject",
        "orders.{key}",
        "--message-subject",
        "orders.{key}",
    ];
    let mut args = subjects.to_vec();
    args.extend(["--key-field", "k"]);
    let report = faults(&mut broker, Feed::Wal, &args).await;
    eprintln!("NATS from the WAL: {report:?}");
    assert_eq!(
        report.duplicates, 0,
        "the duplicate window drops every replay: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_channel_with_headers_on_the_rest() {
    let nats = tokio::task::block_in_place(Nats::start);
    let js = create_stream(&nats.url(), "POISON", "poison.>", 512).await;
    let ps = common::pubsub().await;
    let durable = ps.durable();
    durable.install().await.expect("install");
    let channel = common::channel("poison");
    let dead = common::channel("dead");
    let big = "x".repeat(2000);
    for payload in [
        r#"{"id":"a","k":"one"}"#.to_owned(),
        format!(r#"{{"id":"big","k":"one","pad":"{big}"}}"#),
        r#"{"id":"nokey"}"#.to_owned(),
        r#"{"id":"b","k":"two"}"#.to_owned(),
    ] {
        durable
            .publish(&channel, Text(&payload))
            .await
            .expect("publish");
    }
    let mut letters = durable
        .subscribe::<serde_json::Value>(&dead, "test")
        .await
        .expect("subscribe to the dead letters");
    let sink = NatsSink::connect(&nats.url()).await.expect("sink");
    let relay = ps
        .relay(Source::durable(&channel, "relay"), sink)
        .subject("poison.{key}")
        .key_field("k")
        .dead_letter(&dead)
        .origin("test-origin")
        .await
        .expect("relay");

    let mut why = Vec::new();
    for _ in 0..2 {
        let m = common::next_durable(&mut letters).await;
        let letter = m.payload();
        let payload: serde_json::Value =
            serde_json::from_str(letter["payload"].as_str().expect("payload")).expect("JSON");
        why.push((
            payload["id"].as_str().expect("id").to_owned(),
            letter["error"].to_string(),
        ));
        assert_eq!(letter["origin"], "test-origin");
        assert!(letter["id"]
            .as_str()
            .expect("id")
            .starts_with(&format!("{channel}:")));
        m.ack();
    }
    why.sort();
    assert_eq!(why[0].0, "big");
    assert!(
        why[0].1.contains("maximum") || why[0].1.contains("max"),
        "{}",
        why[0].1
    );
    assert_eq!(why[1].0, "nokey");
    assert!(why[1].1.contains("no field"), "{}", why[1].1);

    // The others went through, in order, with their headers.
    let messages = tokio::time::timeout(common::WAIT, async {
        loop {
            if let Some(m) = stream_messages(&js, "POISON").await {
                if m.len() >= 2 {
                    return m;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("two messages in the stream");
    let got: Vec<(&str, &str)> = messages
        .iter()
        .map(|(s, id, _)| (s.as_str(), id.as_str()))
        .collect();
    assert_eq!(got, [("poison.one", "a"), ("poison.two", "b")]);
    for (_, _, h) in &messages {
        assert!(
            h["Nats-Msg-Id"].starts_with(&format!("{channel}:")),
            "{h:?}"
        );
        assert_eq!(h[HEADER_ORIGIN], "test-origin");
        assert_eq!(h[HEADER_POSITION].split('/').count(), 3, "{h:?}");
        assert!(h[HEADER_PUBLISHED_AT].ends_with('Z'), "{h:?}");
    }
    // Settled: relayed, dead-lettered, acked.
    let stats = tokio::time::timeout(common::WAIT, async {
        loop {
            let s = relay.stats();
            if s.relayed + s.dead_lettered >= 4 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("stats");
    assert_eq!((stats.relayed, stats.dead_lettered), (2, 2), "{stats:?}");
    assert!(stats.lag.is_some() && stats.position.is_some());
    relay.close().await.expect("close");
    let groups = ps.admin().groups(&channel).await.expect("groups");
    let g = groups
        .iter()
        .find(|g| g.group == "relay")
        .expect("the relay's group");
    assert_eq!(g.lag_messages, 0, "acked past every message: {g:?}");
    letters
        .close()
        .await
        .expect("close the dead letters' subscription");
    ps.shutdown().await;
}
