//! Work queue on a real server: exactly-once with several workers, leases
//! of dead workers, retries, dead jobs, scheduling, unique keys, graceful
//! shutdown, wake-ups.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pg_pubsub::queue::{Enqueued, Job, Queue, QueueEvent, Worker};
use pg_pubsub::Text;
use pg_pubsub::{ErrorKind, PgPubSub};
use tokio::sync::{mpsc, Semaphore};

/// A worker that reports `(id, attempt, payload)` of each job it completes.
async fn reporting(
    q: &Queue,
    name: &str,
    concurrency: usize,
) -> (Worker, mpsc::UnboundedReceiver<(i64, i32, String)>) {
    run_reporting(fast(q, name).concurrency(concurrency)).await
}

#[tokio::test]
async fn every_job_done_exactly_once_by_several_workers() {
    const JOBS: usize = 3000;
    let name = channel("q_once");
    let side = format!("side_{name}");
    let admin = raw_client().await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE {side} (job_id bigint NOT NULL, payload text NOT NULL)"
        ))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut instances = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (ps, q) = queue().await;
        let (tx, side, pool) = (tx.clone(), side.clone(), ps.pool().clone());
        let worker = fast(&q, &name)
            .concurrency(4)
            .run(move |job: Job| {
                let (tx, side, pool) = (tx.clone(), side.clone(), pool.clone());
                async move {
                    // The side effect and the completion commit together.
                    let mut client = pool.get().await.map_err(|e| e.to_string())?;
                    let t = client.transaction().await.map_err(|e| e.to_string())?;
                    t.execute(
                        &format!("INSERT INTO {side} VALUES ($1, $2)"),
                        &[&job.id(), &job.payload()],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    job.complete_tx(&*t).await.map_err(|e| e.to_string())?;
                    t.commit().await.map_err(|e| e.to_string())?;
                    let _ = tx.send(());
                    Ok::<_, String>(())
                }
            })
            .await
            .unwrap();
        workers.push(worker);
        instances.push((ps, q));
    }
    let payloads: Vec<String> = (0..JOBS).map(|i| i.to_string()).collect();
    let n = instances[0]
        .1
        .enqueue_batch(&name, payloads.iter().map(Text))
        .await
        .unwrap();
    assert_eq!(n, JOBS);
    for _ in 0..JOBS {
        recv(&mut rx).await;
    }
    for w in workers {
        w.shutdown().await.unwrap();
    }
    let row = admin
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT job_id), count(DISTINCT payload) FROM {side}"
            ),
            &[],
        )
        .await
        .unwrap();
    let (all, ids, payloads): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (all, ids, payloads),
        (JOBS as i64, JOBS as i64, JOBS as i64)
    );
    assert!(
        job_states(&admin, &name).await.is_empty(),
        "hot table empty"
    );
    for (ps, _) in instances {
        ps.shutdown().await;
    }
}

#[tokio::test]
async fn a_dead_workers_jobs_run_again_after_the_lease() {
    let (ps, q) = queue().await;
    let name = channel("q_lease");
    q.enqueue_batch(&name, ["a", "b", "c"].map(Text))
        .await
        .unwrap();
    // A worker that claims and then vanishes: only the SQL, a short lease.
    let admin = raw_client().await;
    let claimed = admin
        .query(
            "SELECT id FROM pgpubsub.claim($1, 10, interval '300 milliseconds')",
            &[&name],
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    let (worker, mut rx) = reporting(&q, &name, 2).await;
    let mut got: Vec<(i32, String)> = Vec::new();
    for _ in 0..3 {
        let (_, attempt, payload) = recv(&mut rx).await;
        got.push((attempt, payload));
    }
    got.sort();
    assert_eq!(
        got,
        vec![(2, "a".into()), (2, "b".into()), (2, "c".into())],
        "each job ran once more, as its second attempt"
    );
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_job_whose_last_lease_expires_is_dead_and_reported() {
    let (ps, q) = queue().await;
    let name = channel("q_lease_dead");
    let mut events = ps.queue().events();
    let last = q
        .enqueue(&name, Text("last"))
        .max_attempts(1)
        .await
        .unwrap()
        .id()
        .unwrap();
    let again = q
        .enqueue(&name, Text("again"))
        .max_attempts(2)
        .await
        .unwrap()
        .id()
        .unwrap();
    // Claimed by a worker that then vanishes: only the SQL, a short lease.
    let admin = raw_client().await;
    let claimed = admin
        .query(
            "SELECT id FROM pgpubsub.claim($1, 10, interval '200 milliseconds')",
            &[&name],
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let (worker, mut rx) = reporting(&q, &name, 1).await;
    // The worker's rescue reports both: one dead, one back to ready.
    match wait_event(&mut events, |e| matches!(e, QueueEvent::JobDead { .. })).await {
        QueueEvent::JobDead {
            job_id,
            attempts,
            error,
            ..
        } => {
            assert_eq!((job_id, attempts), (last, 1));
            assert!(error.contains("lease expired after 1 attempts"), "{error}");
        }
        _ => unreachable!(),
    }
    let (id, attempt, _) = recv(&mut rx).await;
    assert_eq!((id, attempt), (again, 2));
    worker.shutdown().await.unwrap();
    let dead = q.dead_jobs(Some(&name), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].attempts), (last, 1));
    let error = dead[0].last_error.as_deref().unwrap();
    assert!(error.contains("lease expired after 1 attempts"), "{error}");
    ps.shutdown().await;
}

#[tokio::test]
async fn leases_are_extended_while_the_handler_runs() {
    let (ps, q) = queue().await;
    let name = channel("q_extend");
    q.enqueue(&name, Text("slow")).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let r = runs.clone();
    let worker = fast(&q, &name)
        .concurrency(2)
        .lease(Duration::from_millis(300))
        .run(move |job: Job| {
            let (r, tx) = (r.clone(), tx.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                // Work lasting several leases.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = tx.send(job.attempt());
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, 1);
    worker.shutdown().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "never claimed twice");
    ps.shutdown().await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_succeed() {
    let (ps, q) = queue().await;
    let name = channel("q_retry");
    let mut events = ps.queue().events();
    let id = q.enqueue(&name, Text("x")).await.unwrap().id().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = fast(&q, &name)
        .run(move |job: Job| {
            let tx = tx.clone();
            async move {
                if job.attempt() == 2 {
                    panic!("boom on attempt 2");
                }
                if job.attempt() < 3 {
                    return Err(format!("failing attempt {}", job.attempt()));
                }
                let _ = tx.send(job.attempt());
                Ok(())
            }
        })
        .await
        .unwrap();
    for want in 1..=2 {
        match wait_event(&mut events, |e| matches!(e, QueueEvent::JobRetried { .. })).await {
            QueueEvent::JobRetried {
                job_id,
                attempt,
                error,
                ..
            } => {
                assert_eq!((job_id, attempt), (id, want));
                let expected = if want == 1 {
                    "failing attempt 1"
                } else {
                    "panicked: boom on attempt 2"
                };
                assert!(error.contains(expected), "{error}");
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(recv(&mut rx).await, 3);
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn always_failing_jobs_are_dead_with_their_error_then_retried_or_deleted() {
    let (ps, q) = queue().await;
    let name = channel("q_dead");
    let mut events = ps.queue().events();
    let a = q
        .enqueue(&name, Text("a"))
        .max_attempts(3)
        .await
        .unwrap()
        .id()
        .unwrap();
    let b = q
        .enqueue(&name, Text("b"))
        .max_attempts(3)
        .await
        .unwrap()
        .id()
        .unwrap();
    let worker = fast(&q, &name)
        .concurrency(2)
        .run(|job: Job| async move { Err::<(), _>(format!("cannot do {}", job.payload())) })
        .await
        .unwrap();
    let mut dead = Vec::new();
    for _ in 0..2 {
        match wait_event(&mut events, |e| matches!(e, QueueEvent::JobDead { .. })).await {
            QueueEvent::JobDead {
                job_id, attempts, ..
            } => dead.push((job_id, attempts)),
            _ => unreachable!(),
        }
    }
    dead.sort();
    assert_eq!(dead, vec![(a, 3), (b, 3)]);
    worker.shutdown().await.unwrap();

    let listed = q.dead_jobs(Some(&name), 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].id, a);
    assert_eq!(listed[0].attempts, 3);
    assert_eq!(listed[0].last_error.as_deref(), Some("cannot do a"));
    let stats = q.stats().await.unwrap();
    let s = stats.iter().find(|s| s.queue == name).unwrap();
    assert_eq!((s.ready, s.running, s.dead), (0, 0, 2));

    assert!(q.delete_dead(b).await.unwrap());
    assert!(!q.delete_dead(b).await.unwrap());
    assert!(q.retry_dead(a).await.unwrap());
    assert!(!q.retry_dead(a).await.unwrap());
    let (worker, mut rx) = reporting(&q, &name, 1).await;
    let (id, attempt, _) = recv(&mut rx).await;
    assert_eq!((id, attempt), (a, 1), "a retried dead job starts afresh");
    worker.shutdown().await.unwrap();
    assert!(q.dead_jobs(Some(&name), 10).await.unwrap().is_empty());
    ps.shutdown().await;
}

#[tokio::test]
async fn scheduled_jobs_do_not_run_early() {
    let (ps, q) = queue().await;
    let name = channel("q_sched");
    let delay = Duration::from_millis(1500);
    let start = Instant::now();
    q.enqueue(&name, Text("later")).delay(delay).await.unwrap();
    q.enqueue(&name, Text("now")).await.unwrap();
    let stats = q.stats().await.unwrap();
    let s = stats.iter().find(|s| s.queue == name).unwrap();
    assert_eq!((s.ready, s.scheduled), (1, 1));
    let (worker, mut rx) = reporting(&q, &name, 2).await;
    // Not their order: on a stalled machine both may be due by the first
    // claim, and its two handlers race.
    let mut ran = Vec::new();
    for _ in 0..2 {
        let payload = recv(&mut rx).await.2;
        ran.push((payload, start.elapsed()));
    }
    ran.sort();
    assert_eq!(ran[0].0, "later", "{ran:?}");
    assert_eq!(ran[1].0, "now", "{ran:?}");
    assert!(ran[0].1 >= delay, "the scheduled job ran early: {ran:?}");
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn unique_keys_while_pending_or_running() {
    let (ps, q) = queue().await;
    let name = channel("q_unique");
    let first = q
        .enqueue(&name, Text("1"))
        .unique_key("user-1")
        .await
        .unwrap();
    assert!(matches!(first, Enqueued::New(_)));
    assert_eq!(
        q.enqueue(&name, Text("2"))
            .unique_key("user-1")
            .await
            .unwrap(),
        Enqueued::Duplicate
    );
    // Same key, other queue: independent.
    let other = channel("q_unique_other");
    assert!(q
        .enqueue(&other, Text("3"))
        .unique_key("user-1")
        .await
        .unwrap()
        .id()
        .is_some());
    // From SQL, a duplicate is NULL.
    let admin = raw_client().await;
    let row = admin
        .query_one(
            "SELECT pgpubsub.enqueue($1, 'x', p_unique_key => 'user-1')",
            &[&name],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), None);
    // While running, still taken; once done, free again.
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let g = gate.clone();
    let worker = fast(&q, &name)
        .run(move |job: Job| {
            let (g, tx) = (g.clone(), tx.clone());
            async move {
                let _ = tx.send(job.id());
                let _permit = g.acquire().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(Some(recv(&mut rx).await), first.id());
    assert_eq!(
        q.enqueue(&name, Text("4"))
            .unique_key("user-1")
            .await
            .unwrap(),
        Enqueued::Duplicate
    );
    gate.add_permits(1);
    worker.shutdown().await.unwrap();
    assert!(q
        .enqueue(&name, Text("5"))
        .unique_key("user-1")
        .await
        .unwrap()
        .id()
        .is_some());
    ps.shutdown().await;
}

#[tokio::test]
async fn enqueue_in_a_transaction_is_nothing_on_rollback() {
    let (ps, q) = queue().await;
    let name = channel("q_tx");
    let mut client = raw_client().await;
    let t = client.transaction().await.unwrap();
    q.enqueue_tx(&t, &name, &"no").await.unwrap();
    t.rollback().await.unwrap();
    let t = client.transaction().await.unwrap();
    q.enqueue_tx(&t, &name, &"yes").await.unwrap();
    t.commit().await.unwrap();
    let (worker, mut rx) = reporting(&q, &name, 1).await;
    assert_eq!(recv(&mut rx).await.2, "\"yes\"");
    worker.shutdown().await.unwrap();
    assert!(job_states(&client, &name).await.is_empty());
    ps.shutdown().await;
}

#[tokio::test]
async fn enqueue_wakes_an_idle_worker_without_polling() {
    let (ps, q) = queue().await;
    let name = channel("q_wake");
    let (worker, mut rx) =
        run_reporting(q.worker(&name).poll_interval(Duration::from_secs(3600))).await;
    // The first poll tick is immediate; after it only a wake-up can help.
    q.enqueue(&name, Text("one")).await.unwrap();
    assert_eq!(recv(&mut rx).await.2, "one");
    // From SQL, as a trigger would.
    let admin = raw_client().await;
    admin
        .execute("SELECT pgpubsub.enqueue($1, 'two')", &[&name])
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await.2, "two");
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_and_gives_the_rest_back_at_once() {
    let (ps, q) = queue().await;
    let name = channel("q_stop");
    let quick = q.enqueue(&name, Text("quick")).await.unwrap().id().unwrap();
    q.enqueue(&name, Text("stuck")).await.unwrap();
    // Claimed ahead (prefetch) but never started: both handlers are busy.
    q.enqueue(&name, Text("unstarted")).await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let g = gate.clone();
    let worker = fast(&q, &name)
        .concurrency(2)
        .prefetch(2)
        .lease(Duration::from_secs(3600))
        .shutdown_timeout(Duration::from_millis(500))
        .run(move |job: Job| {
            let (g, tx) = (g.clone(), tx.clone());
            async move {
                let _ = tx.send(());
                if job.payload() != "quick" {
                    std::future::pending::<()>().await;
                }
                let _permit = g.acquire().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    recv(&mut rx).await;
    recv(&mut rx).await;
    let release = async {
        gate.add_permits(1);
    };
    let (res, ()) = tokio::join!(worker.shutdown(), release);
    res.unwrap();
    // Right after shutdown (the lease is an hour): the quick one is done,
    // the stuck and the unstarted one ready again, attempts not counted.
    let admin = raw_client().await;
    let rows = admin
        .query(
            "SELECT id, payload, state, attempt, lease_until IS NULL FROM pgpubsub.jobs \
             WHERE queue = $1 ORDER BY id",
            &[&name],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, i32, bool)> = rows
        .iter()
        .map(|r| (r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert!(rows.iter().all(|r| r.get::<_, i64>(0) != quick));
    assert_eq!(
        got,
        vec![
            ("stuck".into(), "ready".into(), 0, true),
            ("unstarted".into(), "ready".into(), 0, true)
        ]
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn complete_in_fails_when_the_claim_was_lost() {
    let (ps, q) = queue().await;
    let name = channel("q_lost");
    q.enqueue(&name, Text("x")).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pool = ps.pool().clone();
    let worker = fast(&q, &name)
        .run(move |job: Job| {
            let (tx, pool) = (tx.clone(), pool.clone());
            async move {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                // Someone else took the job over meanwhile.
                client
                    .execute(
                        "UPDATE pgpubsub.jobs SET attempt = attempt + 1 WHERE id = $1",
                        &[&job.id()],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let err = job.complete_tx(&**client).await.unwrap_err();
                let _ = tx.send(err.kind());
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, ErrorKind::Conflict);
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_sent() {
    let ps: PgPubSub = pubsub().await;
    let q = ps.queue();
    assert_eq!(
        q.enqueue("", Text("x")).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(
        q.enqueue("q", Text("a\0b")).await.unwrap_err().kind(),
        ErrorKind::Limit
    );
    assert_eq!(
        q.enqueue("q", Text("x"))
            .max_attempts(0)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Config
    );
    // The SQL functions check it too (the table has no CHECK constraint).
    q.install().await.unwrap();
    let client = ps.pool().get().await.unwrap();
    for sql in [
        "SELECT pgpubsub.enqueue('q', 'x', NULL, 0::int2, 0)",
        "SELECT pgpubsub.enqueue_many('q', ARRAY['x'], NULL, 0::int2, -1)",
    ] {
        let err = client.query_one(sql, &[]).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE),
            "{sql}: {err}"
        );
    }
    drop(client);
    let err = q
        .worker("q")
        .concurrency(0)
        .run(|_job: Job| async { Ok::<_, String>(()) })
        .await;
    assert_eq!(err.unwrap_err().kind(), ErrorKind::Config);
    ps.shutdown().await;
}

/// Real worker processes (`pg-pubsub queue work`), each job's command
/// sending its job id on `done` with `pg-pubsub notify`.
#[cfg(feature = "cli")]
mod cli {
    use std::collections::BTreeSet;

    use super::*;
    use crate::common::fleet::Fleet;

    const BIN: &str = env!("CARGO_BIN_EXE_pg-pubsub");

    async fn spawn_worker(fleet: &mut Fleet, queue: &str, done: &str, extra: &[&str]) -> usize {
        let script = format!("exec '{BIN}' notify '{done}' \"$PGPUBSUB_JOB_ID\" >/dev/null");
        let mut args = vec![queue];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", &script]);
        fleet.spawn_worker(&args).await
    }

    async fn enqueue_ids(q: &Queue, queue: &str, n: usize) -> BTreeSet<String> {
        let payloads: Vec<String> = (0..n).map(|i| format!("job {i}")).collect();
        q.enqueue_batch(queue, payloads.iter().map(Text))
            .await
            .unwrap();
        let admin = raw_client().await;
        admin
            .query(
                "SELECT id::text FROM pgpubsub.jobs WHERE queue = $1",
                &[&queue],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    #[tokio::test]
    async fn worker_processes_do_every_job_exactly_once() {
        const JOBS: usize = 400;
        let (ps, q) = queue().await;
        let (name, done) = (channel("q_cli"), channel("q_cli_done"));
        let (notifier, mut rx) = raw_listener(&done).await;
        let mut fleet = Fleet::new();
        // Enqueued (and their ids read from the table) before any worker
        // runs: a running one would complete, and delete, some first.
        let ids = enqueue_ids(&q, &name, JOBS).await;
        for _ in 0..4 {
            spawn_worker(&mut fleet, &name, &done, &["--concurrency", "4"]).await;
        }
        let mut seen = BTreeSet::new();
        while seen.len() < JOBS {
            seen.insert(recv(&mut rx).await.1);
        }
        for i in 0..4 {
            let status = fleet.signal(i, "-TERM").await;
            assert!(status.success(), "SIGTERM exits 0: {status}");
        }
        // Everything the commands sent arrives before the sentinel.
        notifier
            .execute("SELECT pg_notify($1, 'end')", &[&done])
            .await
            .unwrap();
        let rest = recv_until(&mut rx, "end").await;
        assert!(rest.is_empty(), "ran twice: {rest:?}");
        assert_eq!(seen, ids);
        let left = job_states(&notifier, &name).await;
        assert!(left.is_empty(), "all completed: left {left:?}");
        ps.shutdown().await;
    }

    #[tokio::test]
    async fn a_sigkilled_workers_jobs_run_again_after_the_lease() {
        const JOBS: usize = 200;
        let (ps, q) = queue().await;
        let (name, done) = (channel("q_kill"), channel("q_kill_done"));
        let (notifier, mut rx) = raw_listener(&done).await;
        let mut fleet = Fleet::new();
        let opts = ["--concurrency", "4", "--lease", "1"];
        // Before any worker runs (see above).
        let ids = enqueue_ids(&q, &name, JOBS).await;
        for _ in 0..3 {
            spawn_worker(&mut fleet, &name, &done, &opts).await;
        }
        let mut seen = BTreeSet::new();
        while seen.len() < JOBS / 4 {
            seen.insert(recv(&mut rx).await.1);
        }
        let status = fleet.signal(0, "-KILL").await;
        assert!(!status.success());
        while seen.len() < JOBS {
            seen.insert(recv(&mut rx).await.1);
        }
        for i in 1..3 {
            assert!(fleet.signal(i, "-TERM").await.success());
        }
        assert_eq!(seen, ids, "none lost");
        assert!(
            job_states(&notifier, &name).await.is_empty(),
            "all completed"
        );
        ps.shutdown().await;
    }

    #[tokio::test]
    async fn a_failing_command_keeps_its_stderr_as_the_error() {
        let (ps, q) = queue().await;
        let name = channel("q_cli_fail");
        let id = q
            .enqueue(&name, Text("payload"))
            .max_attempts(1)
            .await
            .unwrap()
            .id()
            .unwrap();
        let done = channel("q_cli_fail_done");
        let (_notifier, mut rx) = raw_listener(&done).await;
        let script = format!(
            "echo \"attempt $PGPUBSUB_ATTEMPT got $(cat)\" >&2; \
             '{BIN}' notify '{done}' ran >/dev/null; exit 3"
        );
        let mut fleet = Fleet::new();
        fleet
            .spawn_worker(&[&name, "--", "sh", "-c", &script])
            .await;
        recv(&mut rx).await;
        // A graceful stop waits for the command and records its failure.
        assert!(fleet.signal(0, "-TERM").await.success());
        let dead = q.dead_jobs(Some(&name), 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, id);
        let err = dead[0].last_error.as_deref().unwrap();
        assert!(err.contains("attempt 1 got payload"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        ps.shutdown().await;
    }
}

#[tokio::test]
async fn enqueue_wakes_workers_after_commit_but_not_for_later_jobs() {
    let (_ps, q) = queue().await;
    let (_listener, mut rx) = raw_listener(&q.schema().jobs_channel()).await;
    let (now, later, sentinel) = (channel("now"), channel("later"), channel("end"));
    // Concurrent: all but the first are woken after commit, merged.
    let (q2, now2) = (&q, &now);
    futures::future::try_join_all((0..3).map(|i| async move { q2.enqueue(now2, &i).await }))
        .await
        .expect("enqueue");
    q.enqueue(&later, &1)
        .delay(Duration::from_secs(3600))
        .await
        .expect("enqueue later");
    q.enqueue(&sentinel, &1).await.expect("enqueue sentinel");
    let woken = recv_until(&mut rx, &sentinel).await;
    assert!(woken.contains(&now), "no wake-up for {now}: {woken:?}");
    assert!(!woken.contains(&later), "woken for a later job: {woken:?}");
}

/// Runs `jobs` jobs through one worker of `q` (a schema of its own, so a
/// jobs table of its own) and shuts it down; returns how many times the
/// table was vacuumed outside autovacuum by then. Shutdown waits for a
/// vacuum the worker started, so the count is final.
async fn vacuums_after(q: &Queue, jobs: usize, vacuum: bool) -> i64 {
    let name = channel("q_vac");
    let payloads: Vec<String> = (0..jobs).map(|i| i.to_string()).collect();
    q.enqueue_batch(&name, payloads.iter().map(Text))
        .await
        .unwrap();
    let (worker, mut rx) = run_reporting(fast(q, &name).concurrency(8).vacuum(vacuum)).await;
    for _ in 0..jobs {
        recv(&mut rx).await;
    }
    worker.shutdown().await.unwrap();
    let admin = raw_client().await;
    let table = format!("{}.jobs", q.schema().as_str());
    assert!(
        job_states_in(&admin, &table, &name).await.is_empty(),
        "all completed"
    );
    admin
        .query_one(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

/// A queue in a schema no other test uses, installed.
async fn own_schema_queue(ps: &PgPubSub) -> Queue {
    let q = ps.queue().with_schema(&channel("q_schema")).unwrap();
    q.install().await.unwrap();
    q
}

#[tokio::test]
async fn a_worker_vacuums_the_jobs_table_after_many_jobs_unless_told_not_to() {
    let ps = pubsub().await;
    // Just over the threshold: one vacuum, before the queue falls quiet.
    let jobs = 5_100;
    let q = own_schema_queue(&ps).await;
    assert!(vacuums_after(&q, jobs, true).await >= 1);
    let q = own_schema_queue(&ps).await;
    assert_eq!(vacuums_after(&q, jobs, false).await, 0);
    ps.shutdown().await;
}

#[tokio::test]
async fn a_worker_whose_role_does_not_own_the_table_leaves_vacuum_to_autovacuum() {
    let admin_ps = pubsub().await;
    let q = own_schema_queue(&admin_ps).await;
    let (schema, role) = (q.schema().as_str().to_owned(), channel("q_role"));
    let admin = raw_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA {schema} TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA {schema} TO {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};"
        ))
        .await
        .unwrap();
    let url = server().url().replacen("postgres@", &format!("{role}@"), 1);
    let ps = PgPubSub::connect(url.as_str()).await.expect("connect");
    let q = ps.queue().with_schema(&schema).unwrap();
    // Past the quiet-moment minimum: the worker tries, finds it may not,
    // and goes on working.
    assert_eq!(vacuums_after(&q, 600, true).await, 0);
    ps.shutdown().await;
    admin_ps.shutdown().await;
}

/// `PgPubSub::shutdown` stops its workers before the pool closes: a job
/// running when it is called finishes, its completion is written, and it
/// never runs again (a worker started afterwards does not get it).
#[tokio::test]
async fn a_job_running_at_shutdown_completes_once() {
    let name = channel("q_shutdown");
    let runs = format!("runs_{name}");
    let admin = raw_client().await;
    admin
        .batch_execute(&format!("CREATE TABLE {runs} (job_id bigint NOT NULL)"))
        .await
        .unwrap();
    let (ps, q) = queue().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let recorder = Arc::new(raw_client().await);
    let worker = {
        let (recorder, runs) = (recorder.clone(), runs.clone());
        fast(&q, &name)
            // Short: a job whose completion was lost would soon run again.
            .lease(Duration::from_secs(1))
            .run(move |job: Job| {
                let (started, recorder) = (started_tx.clone(), recorder.clone());
                let sql = format!("INSERT INTO {runs} VALUES ($1)");
                async move {
                    recorder
                        .execute(&sql, &[&job.id()])
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = started.send(job.id());
                    // Still running when shutdown starts (which waits for it).
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok::<_, String>(())
                }
            })
            .await
            .unwrap()
    };
    let first = q
        .enqueue(&name, &"first")
        .await
        .unwrap()
        .id()
        .expect("new job");
    assert_eq!(recv(&mut started).await, first);

    ps.shutdown().await;
    worker.wait().await.unwrap();
    assert!(
        job_states(&admin, &name).await.is_empty(),
        "the completion was written before the pool closed"
    );

    // A later worker on the same queue runs the next job, never the first.
    let (ps2, q2) = queue().await;
    let (_worker2, mut done) = reporting(&q2, &name, 1).await;
    let second = q2
        .enqueue(&name, &"second")
        .await
        .unwrap()
        .id()
        .expect("new job");
    let (id, _, _) = recv(&mut done).await;
    assert_eq!(id, second);
    let count: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM {runs} WHERE job_id = $1"),
            &[&first],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "the job running at shutdown ran once");
    ps2.shutdown().await;
}

/// An idle transaction holds back the xmin horizon: `horizon_holder`
/// names it, and a worker that vacuums reports it as an event. On a cluster
/// of its own, so no other test's session is the oldest.
#[tokio::test]
async fn a_transaction_holding_the_horizon_is_named_and_reported() {
    let server = own_cluster(pg_pubsub::testing::TestOptions::default()).await;
    let ps = PgPubSub::connect(server.url()).await.expect("connect");
    let q = ps.queue();
    q.install().await.expect("install");
    let holder = raw_client_to(&server).await;
    holder
        .batch_execute(
            "SET application_name = 'forgotten_begin'; BEGIN; SELECT pg_current_xact_id();",
        )
        .await
        .expect("idle in transaction");
    let found = q
        .horizon_holder()
        .await
        .expect("holder")
        .expect("some holder");
    assert_eq!(found.kind, pg_pubsub::queue::HolderKind::Session);
    assert_eq!(found.name, "forgotten_begin");
    assert_eq!(found.state.as_deref(), Some("idle in transaction"));

    // More than 1,000 transactions behind the holder (a claim takes many
    // jobs in one), and 600 jobs: enough for the worker to vacuum when the
    // queue falls quiet.
    let other = raw_client_to(&server).await;
    for _ in 0..1_100 {
        other
            .simple_query("SELECT pg_current_xact_id()")
            .await
            .expect("a transaction");
    }
    let name = channel("horizon");
    let payloads: Vec<String> = (0..600).map(|i| i.to_string()).collect();
    q.enqueue_batch(&name, payloads.iter().map(Text))
        .await
        .expect("enqueue");
    let mut events = q.events();
    let worker = fast(&q, &name)
        .concurrency(8)
        .horizon_warning(Duration::ZERO)
        .run(|_job: Job| async { Ok::<_, std::convert::Infallible>(()) })
        .await
        .expect("worker");
    let event = wait_event(&mut events, |e| matches!(e, QueueEvent::HorizonHeld { .. })).await;
    let QueueEvent::HorizonHeld {
        holder: reported, ..
    } = event
    else {
        unreachable!("matched above");
    };
    assert_eq!(reported.name, "forgotten_begin");
    assert!(reported.xid_age >= 1_000, "{reported:?}");
    worker.shutdown().await.expect("shutdown");
    ps.shutdown().await;
}
