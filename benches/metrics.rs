//! Metrics (feature `metrics`): what a scrape costs at scale, and what
//! recording costs on the hot paths. Run with
//! `cargo bench --all-features --bench metrics`.
//!
//! Phase 1 (scrape): 1,000 queues (10 jobs each: 5 due, 3 scheduled, 2
//! running; one dead), 1,000 durable channels × 3 groups with 100 unacked
//! messages each, 10 logical slots; [`Metrics::collect`] (the four
//! statements and setting ~12,000 gauges) and `render` timed, median of
//! `BENCH_SCRAPES` (default 20), before and after `VACUUM ANALYZE`.
//!
//! Phase 2 (hot paths): a recorder that can be switched off is installed
//! once; `BENCH_ROUNDS` (default 20) pairs of rounds, one recording and
//! one off, in ABBA order, each round with a fresh channel and queue, so
//! their metric handles are registered while the switch is in that
//! round's position (off: the facade's no-op handles, as without a
//! recorder). Measured: receiving `BENCH_NOTIFICATIONS` (default 50,000)
//! notifications sent in one transaction, and claiming and completing
//! `BENCH_JOBS` (default 5,000) jobs with 8 do-nothing handlers. Medians
//! per side, and the median over pairs of the extra time recording took.
//! `BENCH_PHASES`: `scrape`, `hot` or both (the default).
//! Without the feature the recording points are empty inline functions
//! on zero-sized types: nothing to measure.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_u64, median, run_main, Res};
use futures::StreamExt;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;
use pg_pubsub::queue::Job;
use pg_pubsub::{Delivery, PgPubSub};

/// A Prometheus recorder that hands out no-op handles while off.
struct Switch {
    inner: PrometheusRecorder,
    on: Arc<AtomicBool>,
}

impl Switch {
    fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }
}

impl Recorder for Switch {
    fn describe_counter(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.inner.describe_counter(k, u, d)
    }
    fn describe_gauge(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.inner.describe_gauge(k, u, d)
    }
    fn describe_histogram(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.inner.describe_histogram(k, u, d)
    }
    fn register_counter(&self, key: &Key, m: &Metadata<'_>) -> Counter {
        if self.on() {
            self.inner.register_counter(key, m)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, m: &Metadata<'_>) -> Gauge {
        if self.on() {
            self.inner.register_gauge(key, m)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, m: &Metadata<'_>) -> Histogram {
        if self.on() {
            self.inner.register_histogram(key, m)
        } else {
            Histogram::noop()
        }
    }
}

fn main() -> Res<()> {
    run_main(|url| async move { run(&url).await })
}

async fn run(url: &str) -> Res<()> {
    let recorder = pg_pubsub::metrics::prometheus_builder().build_recorder();
    let handle = recorder.handle();
    let on = Arc::new(AtomicBool::new(true));
    metrics::set_global_recorder(Switch {
        inner: recorder,
        on: on.clone(),
    })
    .map_err(|e| format!("installing the recorder: {e}"))?;
    pg_pubsub::metrics::describe();

    let ps = PgPubSub::builder(url)?.pool_size(16).connect().await?;
    let phases = std::env::var("BENCH_PHASES").unwrap_or_else(|_| "scrape,hot".to_owned());
    if phases.contains("scrape") {
        scrape(&ps, &handle).await?;
    }
    if phases.contains("hot") {
        hot_paths(&ps, &on).await?;
    }
    ps.shutdown().await;
    Ok(())
}

const QUEUES: i32 = 1000;
const CHANNELS: i32 = 1000;
const GROUPS: i32 = 3;
const LAG: i32 = 100;
const SLOTS: i32 = 10;

async fn scrape(ps: &PgPubSub, handle: &metrics_exporter_prometheus::PrometheusHandle) -> Res<()> {
    let scrapes = env_u64("BENCH_SCRAPES", 20)? as usize;
    ps.queue().install().await?;
    ps.durable().install().await?;
    let client = ps.pool().get().await?;
    let t = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO pgpubsub.jobs (queue, state, run_at, attempt, lease_until, payload) \
             SELECT 'bq_' || q, CASE WHEN i <= 8 THEN 'ready' ELSE 'running' END, \
               CASE WHEN i <= 5 THEN now() - interval '1 minute' \
                    WHEN i <= 8 THEN now() + interval '1 hour' ELSE now() END, \
               CASE WHEN i <= 8 THEN 0 ELSE 1 END, \
               CASE WHEN i <= 8 THEN NULL ELSE now() + interval '1 hour' END, '{{}}' \
             FROM generate_series(1, {QUEUES}) q, generate_series(1, 10) i; \
             INSERT INTO pgpubsub.dead_jobs (id, queue, priority, attempt, max_attempts, created_at, payload) \
             SELECT -q, 'bq_' || q, 0, 1, 1, now(), '{{}}' FROM generate_series(1, {QUEUES}) q; \
             INSERT INTO pgpubsub.groups (channel, group_name, tick_id, xid, seq) \
             SELECT 'bc_' || c, 'g' || g, 0, '0'::xid8, 0 \
             FROM generate_series(1, {CHANNELS}) c, generate_series(1, {GROUPS}) g;"
        ))
        .await?;
    // The lag: 100 messages per channel, in ten transactions.
    for _ in 0..10 {
        client
            .batch_execute(&format!(
                "INSERT INTO pgpubsub.messages (channel, payload) \
                 SELECT 'bc_' || c, '{{\"n\": 1}}' \
                 FROM generate_series(1, {CHANNELS}) c, generate_series(1, {}) i",
                LAG / 10
            ))
            .await?;
    }
    for i in 0..SLOTS {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&format!("bench_metrics_{i}")],
            )
            .await?;
    }
    println!("setup: {:.1} s", t.elapsed().as_secs_f64());

    let metrics = ps.metrics();
    for label in ["fresh tables", "after VACUUM ANALYZE"] {
        if label != "fresh tables" {
            client
                .batch_execute(
                    "VACUUM ANALYZE pgpubsub.jobs, pgpubsub.dead_jobs, pgpubsub.groups, \
                     pgpubsub.messages, pgpubsub.ticks",
                )
                .await?;
        }
        metrics.collect().await?; // prepares the statements
        let (mut collect, mut render) = (Vec::new(), Vec::new());
        let mut size = 0;
        for _ in 0..scrapes {
            let t = Instant::now();
            metrics.collect().await?;
            collect.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            handle.run_upkeep();
            size = handle.render().len();
            render.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let max = collect.iter().copied().fold(0.0, f64::max);
        println!(
            "scrape ({label}): collect median {:.1} ms (max {max:.1}), render median {:.1} ms, {} KiB of text",
            median(collect),
            median(render),
            size / 1024
        );
    }
    let text = pg_pubsub::metrics::render(ps, handle).await?;
    let series = |name: &str| {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .count()
    };
    println!(
        "series: queue_jobs {}, group_lag_messages {}, slot_lag_bytes {}",
        series("pgpubsub_queue_jobs"),
        series("pgpubsub_durable_group_lag_messages"),
        series("pgpubsub_wal_slot_lag_bytes")
    );
    for i in 0..SLOTS {
        client
            .execute(
                "SELECT pg_drop_replication_slot($1)",
                &[&format!("bench_metrics_{i}")],
            )
            .await?;
    }
    Ok(())
}

async fn hot_paths(ps: &PgPubSub, on: &AtomicBool) -> Res<()> {
    let pairs = env_u64("BENCH_ROUNDS", 20)?;
    let sizes = (
        env_u64("BENCH_NOTIFICATIONS", 50_000)?,
        env_u64("BENCH_JOBS", 5_000)?,
    );
    ps.queue().install().await?;
    let client = ps.pool().get().await?;
    // Warm-up (connections, prepared statements), not counted.
    round(ps, &client, "warm", sizes).await?;
    // [with, without] throughputs of each pair, listen then claim.
    let mut pairs_seen: Vec<[(f64, f64); 2]> = Vec::new();
    for p in 0..pairs {
        // ABBA: recording first in even pairs, last in odd ones, so a
        // drift of the machine's speed favours neither side.
        let order = if p % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut got = [(0.0, 0.0); 2];
        for recording in order {
            on.store(recording, Ordering::Relaxed);
            got[usize::from(!recording)] =
                round(ps, &client, &format!("{p}_{recording}"), sizes).await?;
        }
        pairs_seen.push([got[0], got[1]]);
    }
    on.store(true, Ordering::Relaxed);
    for (i, what, unit) in [
        (0, "listen + receive", "notifications/s"),
        (1, "claim + complete (8 handlers)", "jobs/s"),
    ] {
        let pick = |f: fn(&[(f64, f64); 2]) -> f64| pairs_seen.iter().map(f).collect::<Vec<_>>();
        let (with, without) = if i == 0 {
            (pick(|p| p[0].0), pick(|p| p[1].0))
        } else {
            (pick(|p| p[0].1), pick(|p| p[1].1))
        };
        // Per pair: how much longer the same work took while recording.
        let costs: Vec<f64> = with
            .iter()
            .zip(&without)
            .map(|(w, o)| o / w - 1.0)
            .collect();
        println!(
            "{what:<32} recording {:>9.0} {unit}  off {:>9.0} {unit}  cost (median of {} pairs) {:+.1}%",
            median(with),
            median(without),
            costs.len(),
            median(costs) * 100.0
        );
    }
    Ok(())
}

/// One round: receive `notes` notifications sent in one transaction, then
/// claim and complete `jobs` jobs with 8 do-nothing handlers. Throughputs.
async fn round(
    ps: &PgPubSub,
    client: &deadpool_postgres::Client,
    tag: &str,
    (notes, jobs): (u64, u64),
) -> Res<(f64, f64)> {
    // Fresh names: their metric handles are registered now, as the switch is.
    let ch = format!("bench_m_{tag}");
    let mut sub = ps.listen::<serde_json::Value>(&ch).await?;
    let t = Instant::now();
    client
        .execute(
            "SELECT pg_notify($1, format('{\"n\": %s}', g)) FROM generate_series(1, $2::int8) g",
            &[&ch, &(notes as i64)],
        )
        .await?;
    let mut got = 0;
    while got < notes {
        let next = tokio::time::timeout(Duration::from_secs(30), sub.next());
        match next
            .await
            .map_err(|_| format!("{got} of {notes} notifications"))?
        {
            Some(Delivery::Message(_)) => got += 1,
            Some(other) => return Err(format!("unexpected {other:?}").into()),
            None => return Err("subscription ended".into()),
        }
    }
    let listen = notes as f64 / t.elapsed().as_secs_f64();
    drop(sub);

    let name = format!("bench_mq_{tag}");
    client
        .execute(
            "INSERT INTO pgpubsub.jobs (queue, payload) \
             SELECT $1, '{}' FROM generate_series(1, $2::int8)",
            &[&name, &(jobs as i64)],
        )
        .await?;
    let done = Arc::new(AtomicU64::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let (d, a) = (done.clone(), all.clone());
    let t = Instant::now();
    let worker = ps
        .queue()
        .worker(&name)
        .concurrency(8)
        .run(move |_job: Job| {
            let (d, a) = (d.clone(), a.clone());
            async move {
                if d.fetch_add(1, Ordering::Relaxed) + 1 == jobs {
                    a.notify_one();
                }
                Ok::<_, String>(())
            }
        })
        .await?;
    tokio::time::timeout(Duration::from_secs(120), all.notified())
        .await
        .map_err(|_| format!("{} of {jobs} jobs", done.load(Ordering::Relaxed)))?;
    let claim = jobs as f64 / t.elapsed().as_secs_f64();
    worker.shutdown().await?;
    Ok((listen, claim))
}
