//! The relay to Redis Streams against a real `redis-server` (append-only,
//! fsync always): faults (SIGKILLed relays, broker and PostgreSQL
//! restarts) lose nothing; replays of what was in flight at a kill carry
//! the same `id` field, and are counted.
#![cfg(all(feature = "cli", feature = "relay-redis"))]

mod common;

use std::time::Duration;

use common::brokers::Redis;
use common::relay::{faults, payload_id, payload_key, Broker, Feed, KEYS};
use pg_pubsub::relay::redis::{self, AsyncCommands};
use pg_pubsub::relay::{RedisSink, Source, FIELD_ID, FIELD_ORIGIN, FIELD_PAYLOAD, FIELD_POSITION};
use pg_pubsub::Text;

struct RedisBroker {
    redis: Redis,
}

impl RedisBroker {
    async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.redis.url()).ok()?;
        client.get_multiplexed_async_connection().await.ok()
    }
}

/// Every entry of stream `key` as its fields.
async fn entries(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Option<Vec<std::collections::HashMap<String, String>>> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.ok()?;
    Some(
        reply
            .ids
            .iter()
            .map(|e| {
                e.map
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((k.clone(), redis::from_redis_value::<String>(v).ok()?))
                    })
                    .collect()
            })
            .collect(),
    )
}

impl Broker for RedisBroker {
    fn url(&self) -> String {
        self.redis.url()
    }

    fn stop(&mut self) {
        self.redis.stop();
    }

    fn start_again(&mut self) {
        self.redis.start_again();
    }

    async fn count(&mut self) -> usize {
        let Some(mut conn) = self.conn().await else {
            return 0;
        };
        let mut n = 0;
        for k in KEYS {
            n += conn
                .xlen::<_, usize>(format!("orders.{k}"))
                .await
                .unwrap_or(0);
        }
        n
    }

    async fn ids(&mut self) -> Vec<String> {
        let Some(mut conn) = self.conn().await else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for k in KEYS {
            for e in entries(&mut conn, &format!("orders.{k}"))
                .await
                .unwrap_or_default()
            {
                assert!(e[FIELD_ID].starts_with("orders:"), "{e:?}");
                let payload: serde_json::Value =
                    serde_json::from_str(&e[FIELD_PAYLOAD]).expect("JSON payload");
                assert_eq!(payload_key(&payload), Some(k));
                ids.push(payload_id(&payload).expect("id").to_owned());
            }
        }
        ids
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_message_reaches_redis_through_kills_and_restarts() {
    if !common::own_server("restart") {
        return;
    }
    let redis = tokio::task::block_in_place(Redis::start);
    let mut broker = RedisBroker { redis };
    let report = faults(
        &mut broker,
        Feed::Durable,
        &["--subject", "orders.{key}", "--key-field", "k"],
    )
    .await;
    // Redis keeps replays: at most what was in flight at the kills.
    eprintln!(
        "Redis: {report:?} ({} duplicates from {} kills)",
        report.duplicates, report.kills
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_carry_the_source_id_position_and_origin() {
    let redis = tokio::task::block_in_place(Redis::start);
    let ps = common::pubsub().await;
    let durable = ps.durable();
    durable.install().await.expect("install");
    let channel = common::channel("redis");
    for id in ["a", "b", "c"] {
        durable
            .publish(&channel, Text(format!(r#"{{"id":"{id}"}}"#)))
            .await
            .expect("publish");
    }
    let sink = RedisSink::connect(&redis.url()).await.expect("sink");
    let relay = ps
        .relay(Source::durable(&channel, "relay"), sink)
        .subject("events.{channel}")
        .await
        .expect("relay");
    let broker = RedisBroker { redis };
    let mut conn = broker.conn().await.expect("connect");
    let key = format!("events.{channel}");
    let got = tokio::time::timeout(common::WAIT, async {
        loop {
            let e = entries(&mut conn, &key).await.unwrap_or_default();
            if e.len() >= 3 {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("three entries");
    let payloads: Vec<&str> = got.iter().map(|e| e[FIELD_PAYLOAD].as_str()).collect();
    assert_eq!(
        payloads,
        [r#"{"id":"a"}"#, r#"{"id":"b"}"#, r#"{"id":"c"}"#]
    );
    for e in &got {
        assert_eq!(e[FIELD_ID], format!("{channel}:{}", e[FIELD_POSITION]));
        assert_eq!(e[FIELD_ORIGIN], format!("pg-pubsub/{channel}/relay"));
    }
    relay.close().await.expect("close");
    ps.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_by_sigterm_writes_its_acks_and_the_next_one_replays_nothing() {
    let redis = tokio::task::block_in_place(Redis::start);
    let ps = common::pubsub().await;
    let durable = ps.durable();
    durable.install().await.expect("install");
    let channel = common::channel("sigterm");
    let publish = |from: usize, to: usize| {
        let (durable, channel) = (durable.clone(), channel.clone());
        async move {
            let payloads: Vec<String> = (from..to).map(|i| format!(r#"{{"id":"{i}"}}"#)).collect();
            durable
                .publish_batch(&channel, payloads.iter().map(Text))
                .await
                .expect("publish");
        }
    };
    let broker = RedisBroker { redis };
    let conn = broker.conn().await.expect("connect");
    let key = format!("out.{channel}");
    // Entries until the one with payload id `last` (relayed in order: all
    // before it are in by then).
    let until = |last: usize| {
        let key = key.clone();
        let mut conn = conn.clone();
        async move {
            let last = format!(r#"{{"id":"{last}"}}"#);
            tokio::time::timeout(common::WAIT, async {
                loop {
                    let e = entries(&mut conn, &key).await.unwrap_or_default();
                    if e.iter().any(|e| e[FIELD_PAYLOAD] == last) {
                        return e.len();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("entries")
        }
    };
    let url = broker.url();
    let args = [
        "relay",
        "durable",
        &channel,
        "--group",
        "g",
        "--to",
        &url,
        "--subject",
        "out.{channel}",
    ];
    let mut fleet = common::fleet::Fleet::new();
    let first = fleet.spawn_cmd(&args, |l| l.contains("relaying")).await;
    publish(0, 50).await;
    assert_eq!(until(49).await, 50);
    let status = fleet.signal(first, "-TERM").await;
    assert!(status.success(), "{status}");
    fleet
        .wait_err(|i, l| i == first && l.contains("stopped: relayed 50 "))
        .await;
    fleet.spawn_cmd(&args, |l| l.contains("relaying")).await;
    publish(50, 60).await;
    // A replay of the first 50 would come before the new ones.
    assert_eq!(until(59).await, 60, "no replay after a clean stop");
    drop(conn);
    ps.shutdown().await;
}
