//! A fleet of worker processes with a Rust handler: four processes with
//! concurrency 4 and 10,000 jobs, each job's handler writing a row into a
//! side table in the transaction that completes the job (`complete_tx`).
//! Every job is done exactly once, also when workers are SIGKILLed
//! mid-run and restarted (their jobs run again after the lease).
//!
//! The worker processes are this test binary again, running only
//! [`queue_worker_child`] (see [`Fleet::spawn_self`]).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::fleet::Fleet;
use common::*;
use pg_pubsub::queue::Job;
use pg_pubsub::PgPubSub;
use pg_pubsub::Text;

const JOBS: usize = 10_000;
const WORKERS: usize = 4;
const CONCURRENCY: usize = 4;

/// Environment of a worker child: the queue (its side table is `side_<queue>`)
/// and the lease in milliseconds.
const QUEUE_ENV: &str = "PG_PUBSUB_QUEUE_CHILD";
const LEASE_ENV: &str = "PG_PUBSUB_QUEUE_CHILD_LEASE_MS";

/// Creates the side table of `queue` and enqueues [`JOBS`] jobs.
async fn setup(name: &str) -> tokio_postgres::Client {
    let admin = raw_client().await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE side_{name} (job_id bigint PRIMARY KEY, attempt int NOT NULL, \
             pid int NOT NULL)"
        ))
        .await
        .unwrap();
    let (ps, q) = queue().await;
    let payloads: Vec<String> = (0..JOBS).map(|i| i.to_string()).collect();
    assert_eq!(
        q.enqueue_batch(name, payloads.iter().map(Text))
            .await
            .unwrap(),
        JOBS
    );
    ps.shutdown().await;
    admin
}

async fn spawn_worker(fleet: &mut Fleet, queue: &str, lease_ms: u64) -> usize {
    let lease = lease_ms.to_string();
    fleet
        .spawn_self(
            "queue_worker_child",
            &[(QUEUE_ENV, queue), (LEASE_ENV, &lease)],
            |l| l.starts_with("working"),
        )
        .await
}

/// Reads the workers' stderr until `done <id>` lines name `until`
/// distinct jobs; `read` is how many lines of [`Fleet::stderr`] were
/// counted already.
async fn wait_done(fleet: &mut Fleet, seen: &mut HashSet<i64>, read: &mut usize, until: usize) {
    loop {
        for (_, l) in &fleet.stderr[*read..] {
            assert!(!l.starts_with("duplicate"), "{l}");
            if let Some(id) = l.strip_prefix("done ") {
                seen.insert(id.parse().expect("job id"));
            }
        }
        *read = fleet.stderr.len();
        if seen.len() >= until {
            return;
        }
        // One WAIT per line: the bound is on progress, not on the total.
        fleet.wait_err(|_, _| true).await;
    }
}

/// `(rows, distinct job ids, highest attempt)` of the side table, then
/// how many jobs of the queue are still live, and how many dead.
async fn side_counts(admin: &tokio_postgres::Client, queue: &str) -> (i64, i64, i32, i64, i64) {
    let row = admin
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT job_id), coalesce(max(attempt), 0), \
                 (SELECT count(*) FROM pgpubsub.jobs WHERE queue = $1), \
                 (SELECT count(*) FROM pgpubsub.dead_jobs WHERE queue = $1) FROM side_{queue}"
            ),
            &[&queue],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

#[tokio::test]
async fn four_worker_processes_do_ten_thousand_jobs_exactly_once() {
    let name = channel("q_fleet");
    let admin = setup(&name).await;
    let mut fleet = Fleet::new();
    for _ in 0..WORKERS {
        spawn_worker(&mut fleet, &name, 30_000).await;
    }
    let (mut seen, mut read) = (HashSet::new(), 0);
    wait_done(&mut fleet, &mut seen, &mut read, JOBS).await;
    for i in 0..WORKERS {
        let status = fleet.signal(i, "-TERM").await;
        assert!(status.success(), "SIGTERM exits 0: {status}");
    }
    // Every job once, each on its first attempt; nothing left, nothing dead.
    assert_eq!(
        side_counts(&admin, &name).await,
        (JOBS as i64, JOBS as i64, 1, 0, 0)
    );
}

#[tokio::test]
async fn sigkilled_workers_are_restarted_and_no_job_is_lost_or_done_twice() {
    let name = channel("q_fleet_kill");
    let admin = setup(&name).await;
    let mut fleet = Fleet::new();
    for _ in 0..WORKERS {
        spawn_worker(&mut fleet, &name, 1_000).await;
    }
    let (mut seen, mut read) = (HashSet::new(), 0);
    wait_done(&mut fleet, &mut seen, &mut read, JOBS / 4).await;
    // Two workers die holding claims (running and prefetched jobs) ...
    for i in 0..2 {
        let pid = fleet.pid(i);
        assert!(!fleet.signal(i, "-KILL").await.success());
        // A job it committed may have lost its `done` line with it: count
        // the side table's rows once its sessions ended.
        wait_sessions_gone(&app_name(pid)).await;
    }
    let rows = admin
        .query(&format!("SELECT job_id FROM side_{name}"), &[])
        .await
        .unwrap();
    seen.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    wait_done(&mut fleet, &mut seen, &mut read, JOBS / 2).await;
    // ... and are replaced.
    for _ in 0..2 {
        spawn_worker(&mut fleet, &name, 1_000).await;
    }
    wait_done(&mut fleet, &mut seen, &mut read, JOBS).await;
    for i in 2..fleet.procs.len() {
        assert!(fleet.signal(i, "-TERM").await.success());
    }
    let (rows, ids, max_attempt, live, dead) = side_counts(&admin, &name).await;
    assert_eq!((rows, ids, live, dead), (JOBS as i64, JOBS as i64, 0, 0));
    // The killed workers' claims ran again once their lease expired.
    assert!(max_attempt >= 2, "no job ran a second attempt");
}

/// Does nothing in a normal test run. Run as a worker process by the
/// tests above with [`QUEUE_ENV`] set: works the queue until SIGTERM,
/// printing `working` once, then `done <id>` on stderr per job committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_worker_child() {
    let Ok(queue) = std::env::var(QUEUE_ENV) else {
        return;
    };
    // The worker's warnings (failed statements) reach the parent's output.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let lease_ms: u64 = std::env::var(LEASE_ENV).unwrap().parse().unwrap();
    let url = std::env::var("DATABASE_URL").unwrap();
    let ps = PgPubSub::builder(&url)
        .unwrap()
        .application_name(app_name(std::process::id()))
        .pool_size(CONCURRENCY + 4)
        .connect()
        .await
        .unwrap();
    let pool = ps.pool().clone();
    let insert: std::sync::Arc<str> =
        format!("INSERT INTO side_{queue} VALUES ($1, $2, pg_backend_pid())").into();
    let worker = ps
        .worker(&queue)
        .concurrency(CONCURRENCY)
        .lease(Duration::from_millis(lease_ms))
        .poll_interval(Duration::from_millis(100))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .run(move |job: Job| {
            let (pool, insert) = (pool.clone(), insert.clone());
            async move {
                let mut client = pool.get().await.map_err(|e| e.to_string())?;
                let tx = client.transaction().await.map_err(|e| e.to_string())?;
                if let Err(e) = tx.execute(&*insert, &[&job.id(), &job.attempt()]).await {
                    // The parent fails on this line: a job done twice.
                    eprintln_now(&format!("duplicate {}: {e}", job.id()));
                    return Err(e.to_string());
                }
                job.complete_tx(&*tx).await.map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                eprintln_now(&format!("done {}", job.id()));
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    eprintln_now("working");
    term.recv().await;
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
    std::process::exit(0);
}

/// The `application_name` of a worker child's sessions.
fn app_name(pid: u32) -> String {
    format!("queue worker {pid}")
}

/// A line straight to the stderr handle (`eprintln!` output would be
/// captured by libtest).
fn eprintln_now(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}
