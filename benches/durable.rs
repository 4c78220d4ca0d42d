//! Durable channels against bare SQL on the same server: publish (one per
//! transaction, a thousand per transaction), consuming a backlog,
//! publish-to-receive latency, and storage under retention.
//! Run with `cargo bench --bench durable`.
//!
//! Env: `BENCH_SINGLE` (messages published one per transaction per
//! round, default 3 000), `BENCH_BATCHED` (per round, default 20 000),
//! `BENCH_PUBLISH_RUNS` (rounds, default 20: many short interleaved rounds
//! and their median ratio, since this machine's speed drifts by more than
//! the differences measured), `BENCH_BACKLOG` (default 1 000 000),
//! `BENCH_LATENCY_SECS` (per contender and round, default 3), `BENCH_LATENCY_RUNS` (rounds, median ratios reported, default 3), `BENCH_SOAK_SECS` (default 60),
//! `BENCH_CONSUME_RUNS` (rounds of that comparison, median reported,
//! default 3), `BENCH_PHASES` (comma-separated subset of
//! `publish,consume,latency,soak,channels`; default all but `channels`),
//! `BENCH_CHANNELS` (consumers in the `channels` phase, default 2 000),
//! `BENCH_CHANNELS_SECS` (its publishing time, default 20),
//! `DATABASE_URL` (else a throwaway cluster).

#[path = "common/mod.rs"]
mod common;

use common::{bare_inserts, env_u64, line, median, rate, run_main, timed_tasks, Res};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use pg_pubsub::durable::{Durable, DurableDelivery};
use pg_pubsub::Text;
use pg_pubsub::{Delivery, PgPubSub};
use tokio::time::MissedTickBehavior;

/// Concurrent publishing tasks in the one-per-transaction phase.
const TASKS: usize = 8;
const PAYLOAD: &str = r#"{"kind":"order","amount":42,"id":"0123456789abcdef"}"#;
/// Messages per second in the latency and soak phases.
const RATE: u64 = 1000;

/// The same columns, defaults and index as `pgpubsub.messages`, without
/// the function, the NOTIFY, or the tick cursor.
const BARE_SQL: &str = "
    DROP TABLE IF EXISTS bench_bare;
    CREATE TABLE bench_bare (
        id bigserial,
        channel text NOT NULL,
        xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        published_at timestamptz NOT NULL DEFAULT now(),
        payload text NOT NULL);
    CREATE INDEX ON bench_bare (channel, id);";

/// A ratio line of this bench.
fn line_of(what: &str, ours: f64, bare: f64, unit: &str) {
    line(what, "durable", ours, bare, unit);
}

fn main() -> Res<()> {
    run_main(|url| async move { run(&url).await })
}

async fn run(url: &str) -> Res<()> {
    let single = env_u64("BENCH_SINGLE", 3_000)?;
    let batched = env_u64("BENCH_BATCHED", 20_000)?;
    let backlog = env_u64("BENCH_BACKLOG", 1_000_000)?;
    let latency_secs = env_u64("BENCH_LATENCY_SECS", 3)?;
    let soak_secs = env_u64("BENCH_SOAK_SECS", 60)?;
    let ps = PgPubSub::builder(url)?
        .pool_size(TASKS + 2)
        .connect()
        .await?;
    let d = ps.durable();
    d.install().await?;
    let client = ps.pool().get().await?;
    client.batch_execute(BARE_SQL).await?;
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    println!(
        "PostgreSQL {version}, {} CPUs",
        std::thread::available_parallelism()?.get()
    );

    let phases =
        std::env::var("BENCH_PHASES").unwrap_or_else(|_| "publish,consume,latency,soak".to_owned());
    let phase = |name: &str| phases.split(',').any(|p| p.trim() == name);
    let chunk: Vec<String> = (0..1000).map(|_| PAYLOAD.to_owned()).collect();
    let stmt = client
        .prepare("INSERT INTO bench_bare (channel, payload) SELECT $1, unnest($2::text[])")
        .await?;
    if phase("publish") {
        publish(&ps, &d, &client, &stmt, &chunk, single, batched).await?;
    }
    if phase("consume") {
        let runs = env_u64("BENCH_CONSUME_RUNS", 3)?;
        consume(&d, &client, &stmt, &chunk, backlog, runs).await?;
    }
    if phase("latency") {
        latency(&ps, &d, url, latency_secs).await?;
    }
    if phase("soak") {
        soak(&d, &client, soak_secs).await?;
    }
    if phase("channels") {
        let n = env_u64("BENCH_CHANNELS", 2_000)?;
        let secs = env_u64("BENCH_CHANNELS_SECS", 20)?;
        channels(url, n as usize, secs).await?;
    }
    ps.shutdown().await;
    Ok(())
}

/// Publish, one per transaction ([`TASKS`] tasks) and a thousand per
/// transaction, against bare `INSERT`s.
async fn publish(
    ps: &PgPubSub,
    d: &Durable,
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    chunk: &[String],
    single: u64,
    batched: u64,
) -> Res<()> {
    let runs = env_u64("BENCH_PUBLISH_RUNS", 20)?;
    d.set_quiet("single_quiet", true).await?;
    // Interleaved rounds, median ratio: the machine's speed drifts more
    // between phases than the difference measured.
    let (mut loud, mut quiet, mut batch) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // One message per transaction, TASKS tasks.
        let bare = || {
            bare_inserts(
                ps.pool(),
                TASKS,
                single,
                "INSERT INTO bench_bare (channel, payload) VALUES ($1, $2)",
                ["single", PAYLOAD],
            )
        };
        let publish_on = |channel: &'static str| {
            timed_tasks(TASKS, single, move |i| {
                let d = d.clone();
                async move {
                    for _ in 0..i {
                        d.publish(channel, Text(PAYLOAD)).await?;
                    }
                    Ok(())
                }
            })
        };
        // Alternate which goes first: the tables grow, the machine drifts.
        let (bare, notifying, silent) = if run % 2 == 0 {
            let bare = bare().await?;
            (
                bare,
                publish_on("single").await?,
                publish_on("single_quiet").await?,
            )
        } else {
            let silent = publish_on("single_quiet").await?;
            let notifying = publish_on("single").await?;
            (bare().await?, notifying, silent)
        };
        line_of(
            &format!("  publish 1/tx, 8 tasks, run {run}"),
            rate(single, notifying),
            rate(single, bare),
            "msg/s",
        );
        loud.push(bare.as_secs_f64() / notifying.as_secs_f64());
        quiet.push(bare.as_secs_f64() / silent.as_secs_f64());

        // A thousand per transaction, one task.
        let t = Instant::now();
        for _ in 0..batched / 1000 {
            client.execute(stmt, &[&"batched", &chunk]).await?;
        }
        let bare = t.elapsed();
        let t = Instant::now();
        for _ in 0..batched / 1000 {
            d.publish_batch("batched", chunk.iter().map(Text)).await?;
        }
        batch.push(bare.as_secs_f64() / t.elapsed().as_secs_f64());
    }
    let show = |what: &str, v: Vec<f64>| {
        let runs: Vec<String> = v.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{what:<44} median ratio {:.2}   (runs: {})",
            median(v),
            runs.join(" ")
        );
    };
    show("publish 1/tx, 8 tasks", loud);
    show("publish 1/tx, 8 tasks, quiet channel", quiet);
    show("publish 1000/tx", batch);
    Ok(())
}

/// Consumes a backlog with one group vs a bare keyset loop, `runs` times
/// alternately (a new group each time); prints each run and the medians.
async fn consume(
    d: &Durable,
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    chunk: &[String],
    backlog: u64,
    runs: u64,
) -> Res<()> {
    d.set_quiet("backlog", true).await?;
    for _ in 0..backlog / 1000 {
        d.publish_batch("backlog", chunk.iter().map(Text)).await?;
        client.execute(stmt, &[&"backlog", &chunk]).await?;
    }
    // One statement each: VACUUM refuses to run in a multi-statement batch.
    client.batch_execute("VACUUM ANALYZE bench_bare").await?;
    client
        .batch_execute("VACUUM ANALYZE pgpubsub.messages")
        .await?;
    // Every run's group exists before the first one acks, so automatic
    // retention removes nothing until the last run.
    for run in 0..runs {
        d.subscribe::<Text>("backlog", &format!("bench{run}"))
            .batch_size(1)
            .await?
            .close()
            .await?;
    }
    let page = client
        .prepare("SELECT id, payload FROM bench_bare WHERE channel = $1 AND id > $2 ORDER BY id LIMIT 1000")
        .await?;
    let (mut bares, mut durables) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let t = Instant::now();
        let mut last = 0i64;
        let mut read = 0u64;
        loop {
            let rows = client.query(&page, &[&"backlog", &last]).await?;
            let Some(row) = rows.last() else { break };
            last = row.get(0);
            // Decoded like the durable consumer's payloads, which any consumer needs.
            for r in &rows {
                std::hint::black_box(r.get::<_, String>(1));
            }
            read += rows.len() as u64;
        }
        let bare = rate(backlog, t.elapsed());
        assert_eq!(read, backlog);
        let t = Instant::now();
        let mut sub = d
            .subscribe::<Text>("backlog", &format!("bench{run}"))
            .batch_size(1000)
            .await?;
        for _ in 0..backlog {
            match sub.next().await {
                Some(DurableDelivery::Message(m)) => m.ack(),
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
        sub.close().await?;
        let durable = rate(backlog, t.elapsed());
        line_of(&format!("  consume run {run}"), durable, bare, "msg/s");
        bares.push(bare);
        durables.push(durable);
    }
    let ratios = durables.iter().zip(&bares).map(|(d, b)| d / b).collect();
    line_of(
        "consume backlog, one group, median (msg/s)",
        median(durables),
        median(bares),
        "msg/s",
    );
    // Each run's pair shares the machine's load at the time: steadier.
    println!(
        "{:<44} {:.2}",
        "consume: median of the runs' ratios",
        median(ratios)
    );
    Ok(())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The `pct` percentile of `v` (nanoseconds), in milliseconds; `v` sorted.
fn pct(v: &[u64], pct: usize) -> f64 {
    v[(v.len() * pct / 100).min(v.len() - 1)] as f64 / 1e6
}

/// Publish-to-receive latency at [`RATE`]/s, in `BENCH_LATENCY_RUNS`
/// rounds of `secs` per contender (the order rotates each round): durable
/// (NOTIFY wake-up, tick and read), the bare reader the durable one is
/// measured against (LISTEN-woken, reading `id > last` from an equivalent
/// table on its own connection: not gap-free under out-of-order commits),
/// and an ephemeral `listen`. Reports the median of the rounds' ratios: a
/// p99 of a few thousand samples swings with the machine.
async fn latency(ps: &PgPubSub, d: &Durable, url: &str, secs: u64) -> Res<()> {
    let runs = env_u64("BENCH_LATENCY_RUNS", 3)?;
    let (mut p50s, mut p99s, mut eph99s) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let mut times: [Vec<u64>; 3] = Default::default();
        for k in 0..3 {
            let which = (k + run as usize) % 3;
            times[which] = match which {
                0 => bare_latencies(ps, url, secs).await?,
                1 => durable_latencies(d, secs).await?,
                _ => ephemeral_latencies(ps, secs).await?,
            };
        }
        let [mut bare, mut dur, mut eph] = times;
        bare.sort_unstable();
        dur.sort_unstable();
        eph.sort_unstable();
        let show = |v: &[u64]| format!("{:.2} / {:.2} / {:.2}", pct(v, 50), pct(v, 90), pct(v, 99));
        println!(
            "{:<44} durable {} ms   bare {} ms   ephemeral {} ms",
            format!("  latency p50 / p90 / p99, run {run}"),
            show(&dur),
            show(&bare),
            show(&eph)
        );
        p50s.push(pct(&dur, 50) / pct(&bare, 50));
        p99s.push(pct(&dur, 99) / pct(&bare, 99));
        eph99s.push(pct(&dur, 99) / pct(&eph, 99));
    }
    let show = |what: &str, ratios: Vec<f64>| {
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{:<44} median ratio {:.2}   (runs: {})",
            format!("latency {what} at {RATE}/s"),
            median(ratios),
            shown.join(" ")
        );
    };
    show("p50 (vs bare LISTEN + id > last)", p50s);
    show("p99 (vs bare LISTEN + id > last)", p99s);
    show("p99 (vs ephemeral listen)", eph99s);
    Ok(())
}

/// The bare baseline: publishes `INSERT … RETURNING pg_notify(…)` into
/// `bench_bare` (a pooled connection per publish, as `publish` takes one);
/// a reader on a connection of its own LISTENs and, on each notification
/// (and those queued meanwhile), reads `WHERE channel = $1 AND id > last
/// ORDER BY id` on that same connection.
async fn bare_latencies(ps: &PgPubSub, url: &str, secs: u64) -> Res<Vec<u64>> {
    use futures::FutureExt;
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let (note_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if note_tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client.batch_execute("LISTEN bench_bare_wake").await?;
    let mut last: i64 = client
        .query_one(
            "SELECT coalesce(max(id), 0) FROM bench_bare WHERE channel = 'latency'",
            &[],
        )
        .await?
        .get(0);
    let read = client
        .prepare("SELECT id, payload FROM bench_bare WHERE channel = $1 AND id > $2 ORDER BY id")
        .await?;
    let (row_tx, rows) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = tokio::spawn(async move {
        while notes.recv().await.is_some() {
            while notes.recv().now_or_never().flatten().is_some() {}
            let page = client.query(&read, &[&"latency", &last]).await?;
            for r in &page {
                last = r.get(0);
                if row_tx.send(r.get(1)).is_err() {
                    return Res::Ok(());
                }
            }
        }
        Res::Ok(())
    });
    let mut rows = Box::pin(futures::stream::unfold(rows, |mut rx| async move {
        rx.recv().await.map(|t| (t, rx))
    }));
    let pool = ps.pool().clone();
    let times = timed_stream(
        secs,
        move |t| {
            let pool = pool.clone();
            async move {
                let c = pool.get().await?;
                let stmt = c
                    .prepare_cached(
                        "INSERT INTO bench_bare (channel, payload) VALUES ('latency', $1) \
                         RETURNING pg_notify('bench_bare_wake', '')",
                    )
                    .await?;
                c.execute(&stmt, &[&t]).await?;
                Ok(())
            }
        },
        &mut rows,
        Some,
    )
    .await?;
    reader.abort();
    driver.abort();
    Ok(times)
}

/// Publishes at [`RATE`]/s for `secs` from one task; returns how long each
/// message took from before its publish call to its arrival on `stream`
/// (`sent` reads the publish time from an item, if it is a message).
async fn timed_stream<P, Fut, S, F>(secs: u64, publish: P, stream: &mut S, sent: F) -> Res<Vec<u64>>
where
    P: Fn(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Res<()>> + Send,
    S: futures::Stream + Unpin,
    F: Fn(S::Item) -> Option<String>,
{
    let n = RATE * secs;
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        for _ in 0..n {
            tick.tick().await;
            publish(now_ns().to_string()).await?;
        }
        Res::Ok(())
    });
    let mut times = Vec::with_capacity(n as usize);
    while times.len() < n as usize {
        let item = stream.next().await.ok_or("the stream ended")?;
        if let Some(at) = sent(item) {
            times.push(now_ns().saturating_sub(at.parse()?));
        }
    }
    publisher.await??;
    Ok(times)
}

async fn ephemeral_latencies(ps: &PgPubSub, secs: u64) -> Res<Vec<u64>> {
    let mut sub = ps.listen::<Text>("bench_latency").await?;
    let p = ps.clone();
    timed_stream(
        secs,
        move |t| {
            let p = p.clone();
            async move { Ok(p.notify("bench_latency", Text(&t)).await?) }
        },
        &mut sub,
        |d| match d {
            Delivery::Message(m) => Some(m.raw().to_owned()),
            _ => None,
        },
    )
    .await
}

async fn durable_latencies(d: &Durable, secs: u64) -> Res<Vec<u64>> {
    let mut sub = d
        .subscribe::<Text>("bench_latency", "lat")
        .start(pg_pubsub::durable::Start::Latest)
        .await?;
    let p = d.clone();
    let times = timed_stream(
        secs,
        move |t| {
            let p = p.clone();
            async move { Ok(p.publish("bench_latency", Text(&t)).await?) }
        },
        &mut sub,
        |d| match d {
            DurableDelivery::Message(m) => {
                m.ack();
                Some(m.payload().to_string())
            }
            _ => None,
        },
    )
    .await?;
    sub.close().await?;
    Ok(times)
}

/// Publishes at [`RATE`]/s for `secs` to a channel with two groups: one
/// consuming and acking, one that never runs. The consumer's automatic
/// retention (every 10 s, max age 60 s) is all that bounds the table;
/// prints its size every 30 s.
async fn soak(d: &Durable, client: &tokio_postgres::Client, secs: u64) -> Res<()> {
    // Start from an empty table so sizes are the soak's own.
    client
        .batch_execute("TRUNCATE pgpubsub.messages, pgpubsub.ticks; DELETE FROM pgpubsub.groups")
        .await?;
    // Every partition with its indexes and TOAST: the parent stores nothing.
    let size_sql = "SELECT (SELECT sum(pg_total_relation_size(relid)) \
                    FROM pg_partition_tree('pgpubsub.messages'))::bigint, \
                    (SELECT count(*) FROM pgpubsub.messages), \
                    (SELECT string_agg(n::text, '/' ORDER BY k) FROM \
                     (SELECT part AS k, count(*) AS n FROM pgpubsub.messages GROUP BY part) p)";
    d.subscribe::<Text>("soak", "stuck")
        .retain_every(None)
        .await?
        .close()
        .await?;
    let mut sub = d
        .subscribe::<Text>("soak", "g")
        .retain_every(Some(Duration::from_secs(10)))
        .max_age(Some(Duration::from_secs(60)))
        .await?;
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (counter, lost_counter) = (received.clone(), lost.clone());
    let consumer = tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            match item {
                DurableDelivery::Message(m) => {
                    m.ack();
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                DurableDelivery::Truncated { lost } => {
                    lost_counter.fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
                }
                _ => {}
            }
        }
    });
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sent = 0u64;
    let per_tick: Vec<String> = (0..RATE / 10).map(|_| PAYLOAD.to_owned()).collect();
    println!(
        "soak: {RATE}/s for {secs} s, groups g (consuming) and stuck (never runs); \
         g's consumer retains every 10 s with max age 60 s"
    );
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        d.publish_batch("soak", per_tick.iter().map(Text)).await?;
        sent += per_tick.len() as u64;
        if sent % (RATE * 30) == 0 {
            let row = client.query_one(size_sql, &[]).await?;
            let (bytes, rows): (i64, i64) = (row.get(0), row.get(1));
            let parts: Option<String> = row.get(2);
            println!(
                "  t={:>4.0}s sent {sent:>7} received {:>7} g lost {:>3} table+index {:>6} kB, {rows} rows (per non-empty partition {})",
                start.elapsed().as_secs_f64(),
                received.load(std::sync::atomic::Ordering::Relaxed),
                lost.load(std::sync::atomic::Ordering::Relaxed),
                bytes / 1024,
                parts.unwrap_or_default()
            );
        }
    }
    consumer.abort();
    Ok(())
}

/// Publishing tasks in the `channels` phase (one publish in flight each).
const CHANNEL_PUBLISHERS: u64 = 4;

/// `n` durable channels with one consumer each in one process (its own
/// handle): publishes [`RATE`]/s in total for `secs`, round-robin over
/// the channels, and checks every message arrived; prints the time to
/// subscribe them all and publish-to-receive latency.
async fn channels(url: &str, n: usize, secs: u64) -> Res<()> {
    let ps = PgPubSub::builder(url)?.pool_size(16).connect().await?;
    let d = ps.durable().with_schema("bench_channels")?;
    d.install().await?;
    let names: Vec<String> = (0..n).map(|i| format!("many_{i}")).collect();
    let started = Instant::now();
    let mut subs = Vec::with_capacity(n);
    for name in &names {
        subs.push(
            d.subscribe::<Text>(name, "g")
                .start(pg_pubsub::durable::Start::Latest)
                .await?,
        );
    }
    let subscribed = started.elapsed();
    while subs.iter().any(|s| !s.is_active()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let active = started.elapsed();
    println!(
        "{:<44} subscribe {:.2} s, all active after {:.2} s",
        format!("{n} channels, one consumer each"),
        subscribed.as_secs_f64(),
        active.as_secs_f64()
    );
    // Each consumer's task sends (message number, latency) per message.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(item) = sub.next().await {
                    if let DurableDelivery::Message(m) = item {
                        m.ack();
                        let (k, at) = m.payload().split_once(':').unwrap_or(("", ""));
                        let (k, at) = (k.parse().unwrap_or(u64::MAX), at.parse().unwrap_or(0));
                        if tx.send((k, now_ns().saturating_sub(at))).is_err() {
                            break;
                        }
                    }
                }
                sub
            })
        })
        .collect();
    drop(tx);
    let total = RATE * secs;
    let per_task = total / CHANNEL_PUBLISHERS;
    let publishers: Vec<_> = (0..CHANNEL_PUBLISHERS)
        .map(|t| {
            let (d, names) = (d.clone(), names.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(
                    1_000_000 * CHANNEL_PUBLISHERS / RATE,
                ));
                tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
                for i in 0..per_task {
                    tick.tick().await;
                    let k = i * CHANNEL_PUBLISHERS + t;
                    let name = &names[k as usize % names.len()];
                    d.publish(name, Text(&format!("{k}:{}", now_ns()))).await?;
                }
                Res::Ok(())
            })
        })
        .collect();
    let sent = per_task * CHANNEL_PUBLISHERS;
    let mut seen = vec![false; sent as usize];
    let (mut times, mut dupes) = (Vec::with_capacity(sent as usize), 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs + 60);
    while times.len() < sent as usize {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((k, ns))) => match seen.get_mut(k as usize) {
                Some(s) if !*s => {
                    *s = true;
                    times.push(ns);
                }
                _ => dupes += 1,
            },
            Ok(None) | Err(_) => break,
        }
    }
    for p in publishers {
        p.await??;
    }
    for r in readers {
        r.abort();
    }
    if times.is_empty() {
        return Err("no message was delivered".into());
    }
    times.sort_unstable();
    println!(
        "{:<44} delivered {}/{sent} ({dupes} again), latency p50 / p99 / max {:.1} / {:.1} / {:.1} ms",
        format!("{RATE}/s over {n} channels for {secs} s"),
        times.len(),
        pct(&times, 50),
        pct(&times, 99),
        times.last().map_or(0.0, |&t| t as f64 / 1e6)
    );
    ps.shutdown().await;
    if times.len() < sent as usize {
        return Err(format!(
            "{} of {sent} messages not delivered",
            sent as usize - times.len()
        )
        .into());
    }
    Ok(())
}
