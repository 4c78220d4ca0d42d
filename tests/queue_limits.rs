//! Queue limits (issue 19): a global concurrency limit across several
//! worker handles, a per-key limit of 1 (strict order per key), and a rate
//! limit, each checked from what the database records while the workers
//! run.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;
use pg_pubsub::queue::{Job, Limits, Queue, Rate, Worker};
use pg_pubsub::Text;

/// Jobs of `queue` still in the jobs table.
async fn live(client: &tokio_postgres::Client, queue: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pgpubsub.jobs WHERE queue = $1",
            &[&queue],
        )
        .await
        .expect("count jobs")
        .get(0)
}

/// Polls the database until `queue` is empty; returns the most jobs seen
/// running at once, and the most running jobs of one key.
async fn watch_until_empty(queue: &str) -> (i64, i64) {
    let client = raw_client().await;
    let sql = "SELECT count(*) FROM pgpubsub.jobs WHERE queue = $1 AND state = 'running'";
    let per_key = "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM pgpubsub.jobs \
                   WHERE queue = $1 AND state = 'running' AND concurrency_key IS NOT NULL \
                   GROUP BY concurrency_key) k";
    let (mut most, mut most_key) = (0, 0);
    tokio::time::timeout(WAIT * 3, async {
        loop {
            let row = client.query_one(sql, &[&queue]).await.expect("running");
            most = most.max(row.get::<_, i64>(0));
            let row = client.query_one(per_key, &[&queue]).await.expect("per key");
            most_key = most_key.max(row.get::<_, i64>(0));
            if live(&client, queue).await == 0 {
                break;
            }
        }
    })
    .await
    .expect("the jobs were done in time");
    (most, most_key)
}

async fn shutdown_all(workers: Vec<Worker>) {
    for w in workers {
        w.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_limit_holds_across_handles() {
    let name = channel("lim_global");
    let (ps, q) = queue().await;
    q.set_limits(&name, Limits::new().concurrency(3))
        .await
        .expect("set limits");
    assert_eq!(q.limits(&name).await.unwrap().concurrency, Some(3));
    let payloads: Vec<String> = (0..60).map(|i| i.to_string()).collect();
    q.enqueue_batch(&name, payloads.iter().map(Text))
        .await
        .expect("enqueue");
    // Four handles (each its own pool), concurrency 8 each; handlers count
    // themselves too.
    let (now, most) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    let mut handles = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let ps = pubsub().await;
        let (now, most) = (now.clone(), most.clone());
        let w = ps
            .queue()
            .worker(&name)
            .concurrency(8)
            .poll_interval(Duration::from_millis(100))
            .run(move |_job: Job| {
                let (now, most) = (now.clone(), most.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    // Work, so that handlers overlap.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, String>(())
                }
            })
            .await
            .expect("worker");
        workers.push(w);
        handles.push(ps);
    }
    let (running, _) = watch_until_empty(&name).await;
    shutdown_all(workers).await;
    assert!(
        running <= 3,
        "at most 3 running in the database, saw {running}"
    );
    assert_eq!(running, 3, "the limit was reached");
    let most = most.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&most),
        "at most 3 handlers at once, saw {most}"
    );
    let stats = q.stats().await.unwrap();
    let s = stats.iter().find(|s| s.queue == name).expect("listed");
    assert_eq!(s.limits, Limits::new().concurrency(3));
    for h in handles {
        h.shutdown().await;
    }
    ps.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_key_limit_of_one_keeps_each_keys_order() {
    let name = channel("lim_key");
    let (ps, q) = queue().await;
    q.set_limits(&name, Limits::new().per_key(1))
        .await
        .expect("set limits");
    // Four keys, ten jobs each, interleaved; and unkeyed jobs, not limited.
    for seq in 0..10 {
        for key in ["a", "b", "c", "d"] {
            q.enqueue(&name, Text(&format!("{key}:{seq}")))
                .key(key)
                .await
                .expect("enqueue");
        }
        q.enqueue(&name, Text("-:0")).await.expect("enqueue");
    }
    let started: Arc<Mutex<HashMap<String, Vec<u32>>>> = Default::default();
    let in_flight: Arc<Mutex<HashMap<String, usize>>> = Default::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (started, in_flight, overlaps) = (started.clone(), in_flight.clone(), overlaps.clone());
        let w = q
            .worker(&name)
            .concurrency(8)
            .poll_interval(Duration::from_millis(100))
            .run(move |job: Job| {
                let (started, in_flight, overlaps) =
                    (started.clone(), in_flight.clone(), overlaps.clone());
                async move {
                    let text = job.payload().to_owned();
                    let (key, seq) = text.split_once(':').ok_or("payload")?;
                    let seq: u32 = seq.parse().map_err(|_| "seq")?;
                    if key != "-" {
                        let mut f = in_flight.lock().unwrap();
                        let n = f.entry(key.to_owned()).or_default();
                        *n += 1;
                        if *n > 1 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        started
                            .lock()
                            .unwrap()
                            .entry(key.to_owned())
                            .or_default()
                            .push(seq);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if key != "-" {
                        *in_flight.lock().unwrap().get_mut(key).ok_or("key")? -= 1;
                    }
                    Ok::<_, String>(())
                }
            })
            .await
            .expect("worker");
        workers.push(w);
    }
    let (_, most_key) = watch_until_empty(&name).await;
    shutdown_all(workers).await;
    assert!(
        most_key <= 1,
        "one running job per key in the database, saw {most_key}"
    );
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "no two jobs of a key at once"
    );
    let started = started.lock().unwrap().clone();
    for key in ["a", "b", "c", "d"] {
        assert_eq!(
            started[key],
            (0..10).collect::<Vec<u32>>(),
            "key {key} in order"
        );
    }
    ps.shutdown().await;
}

/// Claim times of the jobs (the lease's end minus the lease: the clock
/// `claim_limited` used for the window), recorded by the handlers.
async fn run_rate_limited(q: &Queue, name: &str, lease: Duration) -> Vec<SystemTime> {
    let client = Arc::new(raw_client().await);
    let claims: Arc<Mutex<Vec<SystemTime>>> = Default::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (client, claims) = (client.clone(), claims.clone());
        let w = q
            .worker(name)
            .concurrency(8)
            .lease(lease)
            .poll_interval(Duration::from_millis(50))
            .run(move |job: Job| {
                let (client, claims) = (client.clone(), claims.clone());
                async move {
                    let row = client
                        .query_one(
                            "SELECT lease_until FROM pgpubsub.jobs WHERE id = $1",
                            &[&job.id()],
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    let until: SystemTime = row.get(0);
                    claims.lock().unwrap().push(until - lease);
                    Ok::<_, String>(())
                }
            })
            .await
            .expect("worker");
        workers.push(w);
    }
    watch_until_empty(name).await;
    shutdown_all(workers).await;
    let mut claims = claims.lock().unwrap().clone();
    claims.sort();
    claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_per_window() {
    let name = channel("lim_rate");
    let (ps, q) = queue().await;
    let (count, per) = (4usize, Duration::from_millis(300));
    q.set_limits(&name, Limits::new().rate(count as u32, per))
        .await
        .expect("set limits");
    assert_eq!(
        q.limits(&name).await.unwrap().rate,
        Some(Rate {
            count: count as u32,
            per
        })
    );
    let payloads: Vec<String> = (0..17).map(|i| i.to_string()).collect();
    q.enqueue_batch(&name, payloads.iter().map(Text))
        .await
        .expect("enqueue");
    let claims = run_rate_limited(&q, &name, Duration::from_secs(30)).await;
    assert_eq!(claims.len(), 17);
    // The windows as claim_limited opens them: at the first claim after
    // the previous window closed.
    let mut windows: Vec<usize> = Vec::new();
    let mut open = claims[0];
    windows.push(0);
    for &at in &claims {
        if at >= open + per {
            open = at;
            windows.push(0);
        }
        *windows.last_mut().unwrap() += 1;
    }
    assert!(
        windows.iter().all(|&n| n <= count),
        "at most {count} starts per window: {windows:?}"
    );
    assert!(windows.len() >= 17usize.div_ceil(count), "{windows:?}");
    // Removing the limits: claims are plain again, the row is gone.
    q.set_limits(&name, Limits::new()).await.unwrap();
    assert!(q.limits(&name).await.unwrap().is_none());
    ps.shutdown().await;
}
