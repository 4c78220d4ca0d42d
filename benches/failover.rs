//! Failover latency: the time from stopping the primary to the first message
//! delivered from the new primary, per capability (a listener, a durable
//! consumer, a queue worker), through one multi-host handle.
//!
//! Each run starts a primary and a streaming standby (`pg_basebackup`),
//! publishes every 5 ms on each capability (notify, durable publish,
//! enqueue; failed calls are retried), then stops the primary (`fast`, as a
//! switchover does, or `immediate`, a crash), promotes the standby at once,
//! and times, from the moment the stop began, the first delivery of anything
//! published once the old primary was down (so committed on the new one).
//! `promoted` is when `pg_ctl promote -w` returned: the floor, the server's share.
//! The baseline is a bare tokio-postgres listener on the same two-host URL
//! (`target_session_attrs=read-write`) that reconnects 100 ms after a loss.
//!
//! Run with `cargo bench --bench failover`. Env: `BENCH_RUNS` (per fault,
//! default 5), `BENCH_BACKOFF_MAX_MS` (the reconnect backoff's cap; default:
//! the builder's, 10 s), `BENCH_HEALTH_MS` (health-check interval; default
//! the builder's, 10 s).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_u64, median, Res};
use futures::StreamExt;
use pg_pubsub::durable::DurableDelivery;
use pg_pubsub::testing::{TestOptions, TestServer};
use pg_pubsub::{Backoff, Delivery, PgPubSub, Text};

const PACE: Duration = Duration::from_millis(5);
const NOT_YET: u64 = u64::MAX;

/// When the first message published after the fault was delivered, per capability.
#[derive(Default)]
struct Firsts {
    notify: Option<Instant>,
    durable: Option<Instant>,
    queue: Option<Instant>,
    /// The baseline: a hand-written tokio-postgres listener (below).
    bare: Option<Instant>,
}

/// The baseline: a bare tokio-postgres listener on the same URL with
/// `target_session_attrs=read-write`, as one would write it by hand: on any
/// loss, a new connection 100 ms later, `LISTEN`, and on.
async fn bare_listener(url: String, fault: Arc<AtomicU64>, firsts: Arc<Mutex<Firsts>>) {
    let url = format!("{url}?target_session_attrs=read-write");
    loop {
        if let Ok((client, mut conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let driver = tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                while let Some(Ok(message)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(n) = message {
                        let _ = tx.send(n.payload().to_owned());
                    }
                }
            });
            if client.batch_execute("LISTEN failover_bench").await.is_ok() {
                while let Some(payload) = rx.recv().await {
                    let late = payload
                        .parse::<u64>()
                        .is_ok_and(|n| n > fault.load(Ordering::Acquire));
                    if late {
                        firsts.lock().unwrap().bare.get_or_insert_with(Instant::now);
                        return;
                    }
                }
            }
            driver.abort();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

async fn bench() -> Res<()> {
    let runs = env_u64("BENCH_RUNS", 5)? as usize;
    let backoff_max = env_u64("BENCH_BACKOFF_MAX_MS", 0)?;
    let health = env_u64("BENCH_HEALTH_MS", 0)?;
    println!(
        "failover: {runs} runs per fault, backoff cap {}, health check {}",
        if backoff_max == 0 {
            "10 s (default)".to_owned()
        } else {
            format!("{backoff_max} ms")
        },
        if health == 0 {
            "10 s (default)".to_owned()
        } else {
            format!("{health} ms")
        },
    );
    for crash in [false, true] {
        let mut rows: Vec<[f64; 5]> = Vec::new();
        for _ in 0..runs {
            rows.push(run(crash, backoff_max, health).await?);
        }
        let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
        let max = |i: usize| rows.iter().map(|r| r[i]).fold(0.0, f64::max);
        println!(
            "{:<9} promoted {:>6.0} ms | listener {:>6.0} ms (max {:>6.0}) | durable consumer {:>6.0} ms (max {:>6.0}) | worker {:>6.0} ms (max {:>6.0}) | bare listener {:>6.0} ms (max {:>6.0}); listener/bare {:.2}  [medians of {runs}]",
            if crash { "crash" } else { "stop" },
            col(0),
            col(1),
            max(1),
            col(2),
            max(2),
            col(3),
            max(3),
            col(4),
            max(4),
            col(1) / col(4)
        );
    }
    Ok(())
}

/// One failover; milliseconds from the fault to: promoted, and the first
/// delivery per capability.
async fn run(crash: bool, backoff_max: u64, health: u64) -> Res<[f64; 5]> {
    let (primary, standby) = tokio::task::spawn_blocking(|| -> Res<(TestServer, TestServer)> {
        let primary = TestServer::start()?;
        let standby = primary.start_standby(TestOptions::default())?;
        Ok((primary, standby))
    })
    .await??;
    let (primary, standby) = (Arc::new(primary), Arc::new(standby));
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        primary.port().unwrap_or_default(),
        standby.port().unwrap_or_default()
    );
    let mut builder = PgPubSub::builder(url.as_str())?;
    if backoff_max > 0 {
        builder = builder.backoff(Backoff {
            max: Duration::from_millis(backoff_max),
            ..Backoff::default()
        });
    }
    if health > 0 {
        let h = Duration::from_millis(health);
        builder = builder.health_check(h, h);
    }
    let ps = builder.connect().await?;
    let (d, q) = (ps.durable(), ps.queue());
    d.install().await?;
    q.install().await?;
    let ch = "failover_bench";
    let mut sub = ps.listen::<Text>(ch).await?;
    let mut consumer = d.subscribe::<Text>(ch, "bench").await?;
    let fault_seq = Arc::new(AtomicU64::new(NOT_YET));
    let firsts = Arc::new(Mutex::new(Firsts::default()));
    let bare = tokio::spawn(bare_listener(
        url.clone(),
        fault_seq.clone(),
        firsts.clone(),
    ));
    let after = |n: &str, fault: &AtomicU64| {
        n.parse::<u64>()
            .is_ok_and(|n| n > fault.load(Ordering::Acquire))
    };

    let (f, s) = (firsts.clone(), fault_seq.clone());
    let listening = tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            if let Delivery::Message(m) = d {
                if after(m.payload().as_str(), &s) {
                    f.lock().unwrap().notify.get_or_insert_with(Instant::now);
                    return;
                }
            }
        }
    });
    let (f, s) = (firsts.clone(), fault_seq.clone());
    let consuming = tokio::spawn(async move {
        while let Some(d) = consumer.next().await {
            if let DurableDelivery::Message(m) = d {
                let late = after(m.payload(), &s);
                m.ack();
                if late {
                    f.lock().unwrap().durable.get_or_insert_with(Instant::now);
                    return;
                }
            }
        }
    });
    let (f, s) = (firsts.clone(), fault_seq.clone());
    let worker = q
        .worker("failover_bench")
        .run(move |job: pg_pubsub::queue::Job| {
            let (f, s) = (f.clone(), s.clone());
            async move {
                if after(job.payload(), &s) {
                    f.lock().unwrap().queue.get_or_insert_with(Instant::now);
                }
                Ok::<_, String>(())
            }
        })
        .await?;

    // Publishers: one sequence, each capability in its own loop.
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for which in 0..3 {
        let (ps, d, q, seq, stop) = (ps.clone(), d.clone(), q.clone(), seq.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            while stop.load(Ordering::Acquire) == 0 {
                let n = seq.fetch_add(1, Ordering::AcqRel).to_string();
                let _ = match which {
                    0 => ps.notify(ch, Text(&n)).await,
                    1 => d.publish(ch, Text(&n)).await,
                    _ => q.enqueue("failover_bench", Text(&n)).await.map(drop),
                };
                tokio::time::sleep(PACE).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t0 = Instant::now();
    let p = primary.clone();
    tokio::task::spawn_blocking(move || if crash { p.crash() } else { p.stop() }).await??;
    // Numbered from now on: committed on the new primary (the old one is down).
    fault_seq.store(seq.load(Ordering::Acquire), Ordering::Release);
    let s = standby.clone();
    tokio::task::spawn_blocking(move || s.promote()).await??;
    let promoted = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let f = firsts.lock().unwrap();
            if f.notify.is_some() && f.durable.is_some() && f.queue.is_some() && f.bare.is_some() {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err("no delivery within 60 s after the failover".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(1, Ordering::Release);
    for l in loops {
        let _ = l.await;
    }
    let _ = listening.await;
    let _ = bare.await;
    let _ = consuming.await;
    let _ = worker.shutdown().await;
    ps.shutdown().await;
    let f = firsts.lock().unwrap();
    let ms = |t: Option<Instant>| t.map_or(f64::NAN, |t| (t - t0).as_secs_f64() * 1000.0);
    Ok([
        promoted.as_secs_f64() * 1000.0,
        ms(f.notify),
        ms(f.durable),
        ms(f.queue),
        ms(f.bare),
    ])
}
