//! Work queue against bare SQL on the same server: enqueue (one per
//! transaction from 8 tasks, a thousand per transaction) against bare
//! `INSERT`s into an equivalent table; claim + complete with 8 concurrent
//! do-nothing handlers against a hand-written `DELETE ... SKIP LOCKED LIMIT 1`
//! loop on 8 connections; claim latency (p50 / p99 of single claims) on a
//! fresh table and after millions of jobs went through it. Run with
//! `cargo bench --bench queue`.
//!
//! Env: `BENCH_SINGLE` (jobs enqueued one per transaction per round,
//! default 3 000), `BENCH_BATCHED` (default 200 000), `BENCH_WORK` (jobs claimed
//! and completed, default 100 000), `BENCH_PREFETCH` (the worker's
//! prefetch, default the worker's own), `BENCH_HISTORY_SECS` (how long the
//! claim + complete worker keeps finished jobs; default the worker's 1 day,
//! 0 keeps none), `BENCH_CHURN` (jobs passed through
//! before the second latency probe, default 5 000 000, a few minutes; 0
//! skips the latency phase), `BENCH_WORKER_VACUUM` (0: the churning worker
//! leaves vacuuming to autovacuum; default 1),
//! `BENCH_WORK_RUNS` (rounds of the claim + complete comparison, each
//! draining, in a rotating order, a queue without limits, one with a
//! global limit that never binds, one with a per-key limit of 1 over 256
//! keys, and the bare loop; median ratios reported; default 3),
//! `BENCH_GRAPHILE=1` (graphile-worker with batching drains the same
//! number of jobs in each round too: run `benches/peers/setup.sh` first),
//! `BENCH_ENQUEUE_RUNS` (interleaved rounds of the one-per-transaction
//! enqueue comparison, median reported, default 20: many short rounds,
//! since this machine's speed drifts by more than the difference measured), `DATABASE_URL` (else a
//! throwaway cluster).

#[path = "common/mod.rs"]
mod common;

use common::{bare_inserts, env_u64, line, median, rate, run_main, timed_tasks, Res};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_pubsub::queue::{Job, Limits, Queue, WorkerBuilder};
use pg_pubsub::PgPubSub;
use pg_pubsub::Text;

/// Concurrent tasks / connections / handlers.
const TASKS: usize = 8;
const PAYLOAD: &str = r#"{"kind":"email","to":"someone@example.com","id":"0123456789abcdef"}"#;

/// The same columns, defaults and claim index as `pgpubsub.jobs`, without
/// the function, the NOTIFY, leases or retries.
const BARE_SQL: &str = "
    DROP TABLE IF EXISTS bench_bare_jobs;
    CREATE TABLE bench_bare_jobs (
        id bigserial PRIMARY KEY,
        queue text NOT NULL,
        state text NOT NULL DEFAULT 'ready',
        priority smallint NOT NULL DEFAULT 0,
        run_at timestamptz NOT NULL DEFAULT now(),
        attempt int NOT NULL DEFAULT 0,
        max_attempts int NOT NULL DEFAULT 25,
        created_at timestamptz NOT NULL DEFAULT now(),
        payload text NOT NULL) WITH (fillfactor = 80);
    CREATE INDEX ON bench_bare_jobs (queue, priority DESC, run_at, id) WHERE state = 'ready';";

const BARE_INSERT: &str = "INSERT INTO bench_bare_jobs (queue, payload) VALUES ($1, $2)";
const BARE_INSERT_MANY: &str =
    "INSERT INTO bench_bare_jobs (queue, payload) SELECT $1, p FROM unnest($2::text[]) AS p";
const BARE_TAKE: &str = "DELETE FROM bench_bare_jobs WHERE id = (
        SELECT id FROM bench_bare_jobs WHERE queue = $1 AND state = 'ready' AND run_at <= now()
        ORDER BY priority DESC, run_at, id FOR UPDATE SKIP LOCKED LIMIT 1)
    RETURNING payload";

/// A ratio line of this bench.
fn line_of(what: &str, ours: f64, bare: f64, unit: &str) {
    line(what, "queue", ours, bare, unit);
}

fn main() -> Res<()> {
    run_main(|url| async move { run(&url).await })
}

async fn run(url: &str) -> Res<()> {
    let single = env_u64("BENCH_SINGLE", 3_000)?;
    let batched = env_u64("BENCH_BATCHED", 200_000)?;
    let work = env_u64("BENCH_WORK", 100_000)?;
    let churn = env_u64("BENCH_CHURN", 5_000_000)?;
    let ps = PgPubSub::builder(url)?
        .pool_size(TASKS + 4)
        .connect()
        .await?;
    let q = ps.queue();
    q.install().await?;
    let client = ps.pool().get().await?;
    client.batch_execute(BARE_SQL).await?;
    client
        .batch_execute("DELETE FROM pgpubsub.jobs WHERE queue LIKE 'bench%'")
        .await?;

    // Enqueue, one job per transaction, 8 tasks: interleaved rounds, median
    // ratio (the machine's speed drifts more between phases than the
    // difference measured).
    let mut ratios = Vec::new();
    for run in 0..env_u64("BENCH_ENQUEUE_RUNS", 20)? {
        let ours = || {
            timed_tasks(TASKS, single, |n| {
                let q = q.clone();
                async move {
                    for _ in 0..n {
                        q.enqueue("bench_single", Text(PAYLOAD)).await?;
                    }
                    Ok(())
                }
            })
        };
        let bare = || {
            bare_inserts(
                ps.pool(),
                TASKS,
                single,
                BARE_INSERT,
                ["bench_single", PAYLOAD],
            )
        };
        // Alternate which goes first: the tables grow, the machine drifts.
        let (ours, bare) = if run % 2 == 0 {
            (ours().await?, bare().await?)
        } else {
            let bare = bare().await?;
            (ours().await?, bare)
        };
        line_of(
            &format!("  enqueue 1/tx, 8 tasks, run {run}"),
            rate(single, ours),
            rate(single, bare),
            "jobs/s",
        );
        ratios.push(bare.as_secs_f64() / ours.as_secs_f64());
    }
    println!(
        "{:<44} median ratio {:.2}",
        "enqueue, 1 per transaction, 8 tasks",
        median(ratios)
    );

    // Enqueue, a thousand per transaction, one task.
    let payloads: Vec<&str> = vec![PAYLOAD; 1000];
    let t = Instant::now();
    for _ in 0..batched / 1000 {
        q.enqueue_batch("bench_batched", payloads.iter().map(Text))
            .await?;
    }
    let ours = rate(batched, t.elapsed());
    let stmt = client.prepare(BARE_INSERT_MANY).await?;
    let t = Instant::now();
    for _ in 0..batched / 1000 {
        client
            .execute(&stmt, &[&"bench_batched", &payloads])
            .await?;
    }
    let bare = rate(batched, t.elapsed());
    line_of("enqueue, 1000 per transaction", ours, bare, "jobs/s");
    client
        .batch_execute(
            "TRUNCATE bench_bare_jobs; DELETE FROM pgpubsub.jobs WHERE queue LIKE 'bench%'",
        )
        .await?;
    // VACUUM refuses to run in the implicit transaction of a multi-statement batch.
    client.batch_execute("VACUUM ANALYZE pgpubsub.jobs").await?;
    client
        .batch_execute("VACUUM ANALYZE bench_bare_jobs")
        .await?;

    // Claim + complete, 8 handlers doing nothing: no limits, a global
    // limit that never binds, a per-key limit of 1 (256 keys), and the bare
    // loop, enqueued together and drained in a rotating order per round.
    claim_complete(url, &ps, &q, &client, work, env_u64("BENCH_WORK_RUNS", 3)?).await?;

    // Claim latency: on a fresh table, then after `churn` jobs went through it.
    if churn > 0 {
        latency_after_churn(&ps, churn).await?;
    }
    ps.shutdown().await;
    Ok(())
}

/// The limited queues of the claim + complete phase.
const GLOBAL: &str = "bench_work_global";
const KEYED: &str = "bench_work_key";
const KEYS: i64 = 256;

async fn claim_complete(
    url: &str,
    ps: &PgPubSub,
    q: &Queue,
    client: &deadpool_postgres::Client,
    work: u64,
    runs: u64,
) -> Res<()> {
    q.set_limits(GLOBAL, Limits::new().concurrency(1_000_000))
        .await?;
    q.set_limits(KEYED, Limits::new().per_key(1)).await?;
    let stmt = client.prepare(BARE_INSERT_MANY).await?;
    let payloads: Vec<&str> = vec![PAYLOAD; 1000];
    let graphile = std::env::var("BENCH_GRAPHILE").is_ok_and(|v| v == "1");
    let names = [
        "plain",
        "global limit",
        "per-key limit",
        "bare",
        "graphile-worker (batching)",
    ];
    let contenders = if graphile { 5 } else { 4 };
    let mut ratios: [Vec<f64>; 5] = Default::default();
    let mut lead: Vec<f64> = Vec::new();
    for run in 0..runs {
        for queue in ["bench_work", GLOBAL, KEYED] {
            for _ in 0..work / 1000 {
                q.enqueue_batch(queue, payloads.iter().map(Text)).await?;
            }
        }
        client
            .execute(
                "UPDATE pgpubsub.jobs SET concurrency_key = (id % $1)::text WHERE queue = $2",
                &[&KEYS, &KEYED],
            )
            .await?;
        for _ in 0..work / 1000 {
            client.execute(&stmt, &[&"bench_work", &payloads]).await?;
        }
        client.batch_execute("VACUUM ANALYZE pgpubsub.jobs").await?;
        client
            .batch_execute("VACUUM ANALYZE bench_bare_jobs")
            .await?;
        let mut rates = [0.0; 5];
        for i in 0..contenders {
            let which = (i + run as usize) % contenders;
            let t = Instant::now();
            match which {
                0 => drain(q, "bench_work", work as usize).await?,
                1 => drain(q, GLOBAL, work as usize).await?,
                2 => drain(q, KEYED, work as usize).await?,
                3 => bare_take(ps, "bench_work").await?,
                _ => {
                    // Times itself (its own enqueue is not timed).
                    rates[4] = graphile_drain(url, work).await?;
                    continue;
                }
            }
            rates[which] = rate(work, t.elapsed());
        }
        if graphile {
            lead.push(rates[0] / rates[4]);
        }
        for (i, name) in names.iter().enumerate().take(contenders) {
            line_of(
                &format!("  claim + complete, 8 handlers, {name}, run {run}"),
                rates[i],
                rates[3],
                "jobs/s",
            );
        }
        for (i, r) in rates.iter().enumerate().take(contenders) {
            ratios[i].push(r / rates[3]);
        }
    }
    for (i, r) in ratios.into_iter().enumerate().take(contenders) {
        if i == 3 {
            continue;
        }
        println!(
            "{:<60} median ratio to bare {:.2}",
            format!("claim + complete, 8 handlers / connections, {}", names[i]),
            median(r)
        );
    }
    if graphile {
        println!(
            "{:<60} median ratio {:.2}",
            "drain, pg-pubsub / graphile-worker (batching)",
            median(lead)
        );
    }
    q.set_limits(GLOBAL, Limits::new()).await?;
    q.set_limits(KEYED, Limits::new()).await?;
    Ok(())
}

/// Runs `benches/peers/graphile_drain.mjs` (installed by
/// `benches/peers/setup.sh`) on the same server; its drain rate in jobs/s.
async fn graphile_drain(url: &str, n: u64) -> Res<f64> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peers/graphile_drain.mjs"
    );
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("DATABASE_URL", url)
        .env("N", n.to_string())
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "graphile_drain.mjs failed (run benches/peers/setup.sh first?): {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    line["rate"]
        .as_f64()
        .ok_or_else(|| "graphile_drain.mjs printed no rate".into())
}

/// The bare `DELETE .. SKIP LOCKED LIMIT 1` loop on 8 connections until
/// `queue` of the bare table is empty.
async fn bare_take(ps: &PgPubSub, queue: &'static str) -> Res<()> {
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let pool = ps.pool().clone();
        tasks.push(tokio::spawn(async move {
            let c = pool.get().await?;
            let stmt = c.prepare_cached(BARE_TAKE).await?;
            while c.query_opt(&stmt, &[&queue]).await?.is_some() {}
            Res::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs a worker with 8 do-nothing handlers until `n` jobs were handled.
async fn drain(q: &Queue, queue: &str, n: usize) -> Res<()> {
    let worker = q.worker(queue).concurrency(TASKS);
    let worker = match std::env::var("BENCH_PREFETCH") {
        Ok(p) => worker.prefetch(p.parse()?),
        Err(_) => worker,
    };
    let worker = match std::env::var("BENCH_HISTORY_SECS") {
        Ok(s) => worker.history(Duration::from_secs(s.parse()?)),
        Err(_) => worker,
    };
    let counted = Counted::start(worker, n as u64).await?;
    counted.finish().await
}

/// A worker whose do-nothing handlers count the jobs they ran, and say when
/// the `n`th is done.
struct Counted {
    worker: pg_pubsub::queue::Worker,
    done: Arc<AtomicU64>,
    all: Arc<tokio::sync::Notify>,
}

impl Counted {
    async fn start(builder: WorkerBuilder, n: u64) -> Res<Counted> {
        let done = Arc::new(AtomicU64::new(0));
        let all = Arc::new(tokio::sync::Notify::new());
        let (d, a) = (done.clone(), all.clone());
        let worker = builder
            .run(move |_job: Job| {
                let (d, a) = (d.clone(), a.clone());
                async move {
                    if d.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        a.notify_one();
                    }
                    Ok::<_, String>(())
                }
            })
            .await?;
        Ok(Counted { worker, done, all })
    }

    /// Jobs run so far.
    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits for the `n`th job, then shuts the worker down.
    async fn finish(self) -> Res<()> {
        self.all.notified().await;
        self.worker.shutdown().await?;
        Ok(())
    }
}

/// The schema (fresh tables of its own) of the claim-latency phase, and
/// one that never sees traffic, probed alongside it.
const LAT: &str = "bench_claim";
const FRESH: &str = "bench_claim_fresh";
/// Latency samples per probe and table.
const SAMPLES: usize = 500;
/// Jobs per enqueue statement while churning.
const CHURN_BATCH: usize = 1000;
/// Ready jobs at most while churning: enqueueing waits for the worker.
const CHURN_BACKLOG: u64 = 20_000;

/// Claim latency (p50, p99) of the table of [`LAT`] before and after
/// `churn` jobs went through it, each time against a fresh table probed at
/// the same moment (samples interleaved: the machine's speed drifts more
/// in the minutes of the churn than the difference measured). The jobs are
/// enqueued a thousand per statement and run by a worker with 8
/// do-nothing handlers, as real traffic would be (claims, lease extensions,
/// batched deletes, the worker's own vacuums, autovacuum as the server and
/// the table are configured). The worker is shut down the moment the last
/// job is done, so whatever it had not vacuumed yet is still there.
async fn latency_after_churn(ps: &PgPubSub, churn: u64) -> Res<()> {
    let client = ps.pool().get().await?;
    for schema in [LAT, FRESH] {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await?;
        ps.queue().with_schema(schema)?.install().await?;
    }
    let q = ps.queue().with_schema(LAT)?;
    settle(&client).await?;
    probe(&client, "before the churn (both fresh)").await?;
    let t = Instant::now();
    let worker = q
        .worker(LAT)
        .concurrency(TASKS)
        .vacuum(env_u64("BENCH_WORKER_VACUUM", 1)? == 1);
    let counted = Counted::start(worker, churn).await?;
    let payloads: Vec<&str> = vec![PAYLOAD; CHURN_BATCH];
    let mut enqueued = 0u64;
    while enqueued < churn {
        if enqueued - counted.done() >= CHURN_BACKLOG {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let n = (churn - enqueued).min(CHURN_BATCH as u64) as usize;
        q.enqueue_batch(LAT, payloads[..n].iter().map(Text)).await?;
        enqueued += n as u64;
    }
    counted.finish().await?;
    let churned = t.elapsed();
    let vacuums = autovacuums(&client).await?;
    let row = client
        .query_one(
            &format!(
                "SELECT pg_total_relation_size('{LAT}.jobs'), n_dead_tup, autovacuum_count, \
                 vacuum_count FROM pg_stat_user_tables WHERE relid = '{LAT}.jobs'::regclass"
            ),
            &[],
        )
        .await?;
    println!(
        "  {churn} jobs in {:.0} s ({:.0} jobs/s); then {LAT}.jobs: {} kB with indexes, \
         {} dead tuples, {} autovacuums, {} vacuums by the worker",
        churned.as_secs_f64(),
        rate(churn, churned),
        row.get::<_, i64>(0) / 1024,
        row.get::<_, i64>(1),
        row.get::<_, i64>(2),
        row.get::<_, i64>(3)
    );
    settle(&client).await?;
    probe(&client, &format!("right after {churn} jobs")).await?;
    // Once autovacuum (as the server and the table are configured) went
    // over the table after the churn: what a quieter moment sees.
    let t = Instant::now();
    while autovacuums(&client).await? == vacuums && t.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let what = format!(
        "after the next autovacuum ({:.0} s later)",
        t.elapsed().as_secs_f64()
    );
    probe(&client, &what).await?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA {LAT} CASCADE; DROP SCHEMA {FRESH} CASCADE"
        ))
        .await?;
    Ok(())
}

/// Prints the claim latency of [`LAT`] against [`FRESH`], measured together.
async fn probe(client: &deadpool_postgres::Client, when: &str) -> Res<()> {
    let [(lat50, lat99), (fresh50, fresh99)] = claim_latency(client, [LAT, FRESH]).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "claim latency {when:<40} p50 / p99 {:.3} / {:.3} ms; fresh table {:.3} / {:.3} ms; ratio {:.2} / {:.2}",
        ms(lat50),
        ms(lat99),
        ms(fresh50),
        ms(fresh99),
        ms(lat50) / ms(fresh50),
        ms(lat99) / ms(fresh99),
    );
    Ok(())
}

/// Waits until no autovacuum worker runs (at most a minute), and says what
/// it waited for: on 2 cores, one running beside the probe takes half the
/// machine, which is not what the probe is about (the table's state).
async fn settle(client: &deadpool_postgres::Client) -> Res<()> {
    let t = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while t.elapsed() < Duration::from_secs(60) {
        let rows = client
            .query(
                "SELECT query FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
                &[],
            )
            .await?;
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !seen.is_empty() {
        println!(
            "  waited {:.1} s before probing for: {}",
            t.elapsed().as_secs_f64(),
            seen.into_iter().collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

/// Autovacuum runs of the latency phase's jobs table so far.
async fn autovacuums(client: &deadpool_postgres::Client) -> Res<i64> {
    let row = client
        .query_one(
            &format!(
                "SELECT autovacuum_count FROM pg_stat_user_tables \
                 WHERE relid = '{LAT}.jobs'::regclass"
            ),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// p50 and p99 of claiming one job (the `claim` function) on the
/// otherwise empty queue of each schema, samples interleaved; enqueueing
/// and completing it are not timed.
async fn claim_latency<const N: usize>(
    client: &deadpool_postgres::Client,
    schemas: [&str; N],
) -> Res<[(Duration, Duration); N]> {
    let mut stmts = Vec::new();
    for s in schemas {
        stmts.push((
            client
                .prepare(&format!("SELECT {s}.enqueue('{LAT}', $1)"))
                .await?,
            client
                .prepare(&format!(
                    "SELECT id, attempt FROM {s}.claim('{LAT}', 1, interval '30 s')"
                ))
                .await?,
            client
                .prepare(&format!(
                    "DELETE FROM {s}.jobs WHERE id = $1 AND attempt = $2"
                ))
                .await?,
        ));
    }
    let mut times = vec![Vec::with_capacity(SAMPLES); N];
    for _ in 0..SAMPLES {
        for ((enqueue, claim, complete), times) in stmts.iter().zip(&mut times) {
            client.execute(enqueue, &[&PAYLOAD]).await?;
            let t = Instant::now();
            let row = client.query_one(claim, &[]).await?;
            times.push(t.elapsed());
            let (id, attempt): (i64, i32) = (row.get(0), row.get(1));
            client.execute(complete, &[&id, &attempt]).await?;
        }
    }
    Ok(std::array::from_fn(|i| {
        times[i].sort();
        (times[i][SAMPLES / 2], times[i][SAMPLES * 99 / 100])
    }))
}
