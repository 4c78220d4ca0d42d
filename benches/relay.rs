//! The relay to NATS JetStream against a bare publish loop to the same
//! `nats-server -js`, in the same run: `cargo bench --bench relay
//! --features relay-nats` (needs `nats-server` on the PATH).
//!
//! * **Throughput.** A backlog of `BENCH_RELAY_MESSAGES` (default 20 000)
//!   durable messages, published one per transaction or 1 000 per
//!   transaction, drained by a relay (`batch_size` 512, the default) to
//!   a stream; the bare side publishes the same payloads with the same
//!   headers from memory, 512 publishes awaiting their JetStream acks at
//!   once, as the relay does. Both sides set `Nats-Msg-Id` to fresh ids.
//!   The relay's rate counts from its first confirmed message; the time
//!   to that message (its start: the group's election, the first read)
//!   is printed apart. `BENCH_RELAY_RUNS` rounds (default 3), median
//!   reported.
//! * **Latency.** Messages published one per transaction at
//!   `BENCH_RELAY_RATE` per second (default 200) for
//!   `BENCH_RELAY_LATENCY_SECS` (default 5) while the relay runs: from the
//!   call to `publish` (which commits) to the message reaching a plain
//!   NATS subscriber of the subject (the server delivers it as it stores
//!   it, with the JetStream ack): an upper bound of commit to broker, by
//!   the commit's round trip.

#[path = "../tests/common/brokers.rs"]
#[allow(dead_code)]
mod brokers;
mod common;

use std::time::{Duration, Instant};

use common::{env_u64, median, rate, run_main, Res};
use futures::future::join_all;
use futures::StreamExt;
use pg_pubsub::relay::async_nats::jetstream::{self, context::Publish, stream};
use pg_pubsub::relay::async_nats::{self, HeaderMap};
use pg_pubsub::relay::{NatsSink, Source, HEADER_ORIGIN, HEADER_POSITION, HEADER_PUBLISHED_AT};
use pg_pubsub::{PgPubSub, Text};

/// Publishes awaiting their ack at once, on both sides.
const WINDOW: usize = 512;

fn payload(i: u64) -> String {
    format!(
        r#"{{"id":{i},"customer":"c{}","amount":"12.30","status":"paid"}}"#,
        i % 16
    )
}

fn main() -> Res<()> {
    let nats = brokers::Nats::start();
    let url = nats.url();
    let out = run_main(|pg| async move { run(&pg, &url).await });
    drop(nats);
    out
}

async fn run(pg: &str, nats_url: &str) -> Res<()> {
    let n = env_u64("BENCH_RELAY_MESSAGES", 20_000)?;
    let runs = env_u64("BENCH_RELAY_RUNS", 3)?;
    let latency_secs = env_u64("BENCH_RELAY_LATENCY_SECS", 5)?;
    let per_sec = env_u64("BENCH_RELAY_RATE", 200)?;
    let ps = PgPubSub::builder(pg)?.pool_size(16).connect().await?;
    ps.durable().install().await?;
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(stream::Config {
        name: "BENCH".to_owned(),
        subjects: vec!["bench.>".to_owned()],
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    println!("relay to NATS JetStream: {n} messages per side and round, median of {runs} rounds");
    for (mode, per_tx) in [
        ("1 message per transaction", 1),
        ("1000 messages per transaction", 1000),
    ] {
        let (mut ours, mut bare, mut starts) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..runs {
            let drained = relayed(&ps, nats_url, n, per_tx, round).await?;
            ours.push(drained.rate);
            starts.push(drained.start.as_secs_f64() * 1000.0);
            bare.push(bare_loop(&js, n, round).await?);
        }
        let (o, b) = (median(ours.clone()), median(bare.clone()));
        println!(
            "{:<44} relay {o:>10.0} msg/s  bare {b:>10.0} msg/s  ratio {:.2}  (relay {} / bare {}; relay start {:.1} ms)",
            format!("backlog drain, {mode}"),
            o / b,
            spread(&ours),
            spread(&bare),
            median(starts)
        );
    }
    latency(&ps, nats_url, &client, latency_secs, per_sec).await?;
    ps.shutdown().await;
    Ok(())
}

fn spread(v: &[f64]) -> String {
    let s: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
    s.join(" ")
}

/// A backlog of `n` messages on a fresh channel, then how fast a relay
/// has the broker confirm them all.
async fn relayed(ps: &PgPubSub, nats_url: &str, n: u64, per_tx: u64, round: u64) -> Res<Drained> {
    let channel = format!("bench_{per_tx}_{round}_{}", std::process::id());
    let durable = ps.durable();
    if per_tx == 1 {
        let tasks = 16u64;
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (durable, channel) = (durable.clone(), channel.clone());
                tokio::spawn(async move {
                    for i in (t..n).step_by(tasks as usize) {
                        durable.publish(&channel, Text(payload(i))).await?;
                    }
                    Ok::<_, pg_pubsub::Error>(())
                })
            })
            .collect();
        for h in handles {
            h.await??;
        }
    } else {
        let all: Vec<String> = (0..n).map(payload).collect();
        for chunk in all.chunks(per_tx as usize) {
            durable
                .publish_batch(&channel, chunk.iter().map(Text))
                .await?;
        }
    }
    let sink = NatsSink::connect(nats_url).await?;
    let started = Instant::now();
    let relay = ps
        .relay(Source::durable(&channel, "bench"), sink)
        .subject("bench.relay")
        .dead_letter("bench_dead")
        .await?;
    // Throughput counts from the first confirmed message: the relay's
    // start (its group's election, the first read) is reported apart.
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let s = relay.stats();
        if first.is_none() && s.relayed > 0 {
            first = Some((Instant::now(), s.relayed));
        }
        if s.relayed + s.dead_lettered >= n {
            assert_eq!(s.dead_lettered, 0, "nothing is refused");
            break;
        }
        // The relay has no completion event: poll its counters.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (at, before) = first.unwrap_or((started, 0));
    let took = at.elapsed();
    relay.close().await?;
    Ok(Drained {
        rate: rate(n - before, took),
        start: at - started,
    })
}

/// A relay's drain: its rate after the first confirmed message, and the
/// time to that message.
struct Drained {
    rate: f64,
    start: Duration,
}

/// The same payloads and headers published from memory, `WINDOW` at a
/// time, each window's acks awaited together; messages per second.
async fn bare_loop(js: &jetstream::Context, n: u64, round: u64) -> Res<f64> {
    let origin = "bench-bare";
    let at = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let payloads: Vec<bytes::Bytes> = (0..n).map(|i| payload(i).into()).collect();
    let started = Instant::now();
    for (w, window) in payloads.chunks(WINDOW).enumerate() {
        let mut acks = Vec::with_capacity(window.len());
        for (i, p) in window.iter().enumerate() {
            let id = format!("bare:{round}:{}:{}", std::process::id(), w * WINDOW + i);
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            headers.insert(HEADER_POSITION, id.as_str());
            headers.insert(HEADER_PUBLISHED_AT, at.as_str());
            headers.insert(HEADER_ORIGIN, origin);
            let publish = Publish::build().payload(p.clone()).headers(headers);
            acks.push(js.send_publish("bench.bare", publish).await?);
        }
        for ack in join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await {
            ack?;
        }
    }
    Ok(rate(n, started.elapsed()))
}

/// Commit-to-broker latency of paced single-message transactions.
async fn latency(
    ps: &PgPubSub,
    nats_url: &str,
    client: &async_nats::Client,
    secs: u64,
    per_sec: u64,
) -> Res<()> {
    let channel = format!("bench_latency_{}", std::process::id());
    let mut sub = client.subscribe("bench.latency").await?;
    let sink = NatsSink::connect(nats_url).await?;
    let relay = ps
        .relay(Source::durable(&channel, "bench"), sink)
        .subject("bench.latency")
        .dead_letter("bench_dead")
        .await?;
    let base = Instant::now();
    let total = secs * per_sec;
    let durable = ps.durable();
    let publisher = tokio::spawn(async move {
        let mut sent = Vec::with_capacity(total as usize);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_sec));
        for i in 0..total {
            tick.tick().await;
            // Taken before the call: its commit is inside it, and the
            // relay may have the message before the call returns.
            sent.push(base.elapsed());
            durable
                .publish(&channel, Text(format!(r#"{{"i":{i}}}"#)))
                .await?;
        }
        Ok::<_, pg_pubsub::Error>(sent)
    });
    let mut got = vec![Duration::ZERO; total as usize];
    let mut seen = 0;
    while seen < total {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await?
            .ok_or("subscription ended")?;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let i = v["i"].as_u64().ok_or("no i")? as usize;
        if got[i] == Duration::ZERO {
            got[i] = base.elapsed();
            seen += 1;
        }
    }
    let sent = publisher.await??;
    let mut lat: Vec<f64> = sent
        .iter()
        .zip(&got)
        .map(|(s, g)| g.saturating_sub(*s).as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{:<44} {total} msgs at {per_sec}/s: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        "latency, publish to broker (1 per transaction)",
        q(0.5),
        q(0.99),
        lat[lat.len() - 1]
    );
    relay.close().await?;
    Ok(())
}
