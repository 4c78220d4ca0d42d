//! The relay to RabbitMQ against a real `rabbitmq-server`: faults
//! (SIGKILLed relays, broker and PostgreSQL restarts) lose nothing;
//! replays of what was in flight at a kill carry the same `message_id`,
//! and are counted. Messages are persistent, confirmed, with headers.
#![cfg(all(feature = "cli", feature = "relay-amqp"))]

mod common;

use std::time::Duration;

use common::brokers::Rabbit;
use common::relay::{faults, payload_id, Broker, Feed};
use pg_pubsub::relay::lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use pg_pubsub::relay::lapin::types::FieldTable;
use pg_pubsub::relay::lapin::{Channel, Connection};
use pg_pubsub::relay::{AmqpSink, Source, HEADER_ORIGIN, HEADER_POSITION};
use pg_pubsub::Text;

const QUEUE: &str = "orders";

struct RabbitBroker {
    rabbit: Rabbit,
    channel: Option<(Connection, Channel)>,
    /// What was taken from the queue so far: (message_id, payload id).
    got: Vec<(String, String)>,
}

impl RabbitBroker {
    /// A RabbitMQ server of its own, with the test's queue declared.
    async fn start() -> RabbitBroker {
        let rabbit = tokio::task::block_in_place(Rabbit::start);
        let mut broker = RabbitBroker {
            rabbit,
            channel: None,
            got: Vec::new(),
        };
        broker.declare().await;
        broker
    }

    /// A channel, opened again after a restart; `None` while it is down.
    async fn channel(&mut self) -> Option<Channel> {
        if let Some((conn, ch)) = &self.channel {
            if conn.status().connected() && ch.status().connected() {
                return Some(ch.clone());
            }
        }
        self.channel = None;
        let conn = Connection::connect(&self.rabbit.url(), AmqpSink::connection_properties())
            .await
            .map_err(|e| eprintln!("RabbitMQ: {e}"))
            .ok()?;
        let ch = conn.create_channel().await.ok()?;
        self.channel = Some((conn, ch.clone()));
        Some(ch)
    }

    /// A durable queue bound to `amq.topic` for `orders.#`.
    async fn declare(&mut self) {
        let ch = tokio::time::timeout(common::WAIT, async {
            loop {
                if let Some(ch) = self.channel().await {
                    return ch;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("RabbitMQ did not accept a connection");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(QUEUE, durable, FieldTable::default())
            .await
            .expect("declare");
        ch.queue_bind(
            QUEUE,
            "amq.topic",
            "orders.#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }
}

impl Broker for RabbitBroker {
    fn url(&self) -> String {
        self.rabbit.url()
    }

    fn stop(&mut self) {
        self.rabbit.stop();
    }

    fn start_again(&mut self) {
        self.rabbit.start_again();
    }

    async fn count(&mut self) -> usize {
        let Some(ch) = self.channel().await else {
            return self.got.len();
        };
        let passive = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        };
        match ch
            .queue_declare(QUEUE, passive, FieldTable::default())
            .await
        {
            Ok(q) => self.got.len() + q.message_count() as usize,
            Err(_) => self.got.len(),
        }
    }

    async fn ids(&mut self) -> Vec<String> {
        if let Some(ch) = self.channel().await {
            let no_ack = BasicGetOptions { no_ack: true };
            while let Ok(Some(m)) = ch.basic_get(QUEUE, no_ack).await {
                let d = m.delivery;
                assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
                let message_id = d.properties.message_id().as_ref().map(|s| s.to_string());
                let payload: serde_json::Value = serde_json::from_slice(&d.data).expect("JSON");
                self.got.push((
                    message_id.expect("message_id"),
                    payload_id(&payload).expect("id").to_owned(),
                ));
            }
        }
        self.got.iter().map(|(_, id)| id.clone()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_message_reaches_rabbitmq_through_kills_and_restarts() {
    if !common::own_server("restart") {
        return;
    }
    let mut broker = RabbitBroker::start().await;
    let report = faults(
        &mut broker,
        Feed::Durable,
        &[
            "--subject",
            "orders.{key}",
            "--key-field",
            "k",
            "--exchange",
            "amq.topic",
        ],
    )
    .await;
    // A replay has the message_id of the first copy.
    let mut by_id = std::collections::HashMap::new();
    for (message_id, id) in &broker.got {
        assert_eq!(by_id.entry(message_id.clone()).or_insert(id.clone()), id);
    }
    eprintln!(
        "RabbitMQ: {report:?} ({} duplicates from {} kills)",
        report.duplicates, report.kills
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_persistent_with_message_id_and_headers() {
    let mut broker = RabbitBroker::start().await;
    let ps = common::pubsub().await;
    let durable = ps.durable();
    durable.install().await.expect("install");
    let channel = common::channel("amqp");
    durable
        .publish(&channel, Text(r#"{"id":"a"}"#))
        .await
        .expect("publish");
    let sink = AmqpSink::connect(&broker.url(), "amq.topic")
        .await
        .expect("sink");
    let relay = ps
        .relay(Source::durable(&channel, "relay"), sink)
        .subject("orders.x")
        .await
        .expect("relay");
    let ch = broker.channel().await.expect("channel");
    let m = tokio::time::timeout(common::WAIT, async {
        loop {
            if let Ok(Some(m)) = ch.basic_get(QUEUE, BasicGetOptions { no_ack: true }).await {
                return m.delivery;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the message");
    assert_eq!(m.data, br#"{"id":"a"}"#);
    let message_id = m
        .properties
        .message_id()
        .as_ref()
        .expect("message_id")
        .to_string();
    assert!(
        message_id.starts_with(&format!("{channel}:")),
        "{message_id}"
    );
    let headers = m.properties.headers().as_ref().expect("headers");
    let header = |name: &str| {
        headers
            .inner()
            .get(name)
            .and_then(|v| v.as_long_string())
            .map(|s| s.to_string())
            .unwrap_or_default()
    };
    assert_eq!(format!("{channel}:{}", header(HEADER_POSITION)), message_id);
    assert_eq!(header(HEADER_ORIGIN), format!("pg-pubsub/{channel}/relay"));
    relay.close().await.expect("close");
    ps.shutdown().await;
}
