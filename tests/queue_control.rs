//! Queue control on a real server: cancelling waiting and running jobs,
//! pausing and resuming a queue, snoozing, job output, finished-job history.
//! (Across processes, with `pg-pubsub queue work`: tests/cli.rs.)

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pg_pubsub::queue::{Cancelled, FinishedState, Job, Outcome, QueueEvent};
use pg_pubsub::Text;
use tokio::sync::{mpsc, Semaphore};

/// Polls `cond` until it holds, failing after [`WAIT`].
async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let res = tokio::time::timeout(WAIT, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(res.is_ok(), "timed out waiting for {what}");
}

#[tokio::test]
async fn a_cancelled_waiting_job_never_runs() {
    let (ps, q) = queue().await;
    let name = channel("qc_wait");
    let ready = q.enqueue(&name, Text("ready")).await.unwrap().id().unwrap();
    let later = q
        .enqueue(&name, Text("later"))
        .delay(Duration::from_millis(100))
        .await
        .unwrap()
        .id()
        .unwrap();
    assert_eq!(q.cancel(ready).await.unwrap(), Cancelled::Removed);
    assert_eq!(q.cancel(later).await.unwrap(), Cancelled::Removed);
    assert_eq!(q.cancel(ready).await.unwrap(), Cancelled::AlreadyFinished);
    assert_eq!(q.cancel(i64::MAX).await.unwrap(), Cancelled::Unknown);
    let (worker, mut rx) = run_reporting(fast(&q, &name)).await;
    // Due after the cancelled scheduled job: it would have run first.
    q.enqueue(&name, Text("sentinel"))
        .delay(Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await.2, "sentinel");
    assert!(rx.try_recv().is_err(), "a cancelled job ran");
    let f = q.finished_job(later).await.unwrap().expect("kept");
    assert_eq!((f.state, f.attempts), (FinishedState::Cancelled, 0));
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_running_job_is_told_and_ends_cancelled_whatever_it_returns() {
    let (ps, q) = queue().await;
    let (other, q2) = queue().await; // another instance: its own listener
    let name = channel("qc_run");
    let mut events = q.events();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = fast(&q, &name)
        .concurrency(2)
        .lease(Duration::from_secs(3600))
        .run(move |job: Job| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(job.id());
                job.cancelled().await;
                assert!(job.is_cancelled());
                // Neither an error nor a success changes the outcome.
                match job.payload() {
                    "err" => Err("stopped".to_owned()),
                    _ => Ok(()),
                }
            }
        })
        .await
        .unwrap();
    let a = q.enqueue(&name, Text("err")).await.unwrap().id().unwrap();
    let b = q.enqueue(&name, Text("ok")).await.unwrap().id().unwrap();
    let mut started = vec![recv(&mut rx).await, recv(&mut rx).await];
    started.sort();
    assert_eq!(started, vec![a, b]);
    assert_eq!(q2.cancel(a).await.unwrap(), Cancelled::Signalled);
    assert_eq!(q2.cancel(b).await.unwrap(), Cancelled::Signalled);
    let mut ended = Vec::new();
    while ended.len() < 2 {
        match wait_event(&mut events, |e| {
            matches!(
                e,
                QueueEvent::JobCancelled { .. } | QueueEvent::JobRetried { .. }
            )
        })
        .await
        {
            QueueEvent::JobCancelled {
                job_id, attempt, ..
            } => ended.push((job_id, attempt)),
            e => panic!("retried: {e:?}"),
        }
    }
    ended.sort();
    assert_eq!(ended, vec![(a, 1), (b, 1)]);
    for id in [a, b] {
        let f = q.finished_job(id).await.unwrap().expect("kept");
        assert_eq!(f.state, FinishedState::Cancelled);
    }
    assert!(job_states(&raw_client().await, &name).await.is_empty());
    assert_eq!(q.cancel(a).await.unwrap(), Cancelled::AlreadyFinished);
    worker.shutdown().await.unwrap();
    other.shutdown().await;
    ps.shutdown().await;
}

#[tokio::test]
async fn a_cancel_whose_notification_is_lost_is_found_by_the_lease_extension() {
    let (ps, q) = queue().await;
    let name = channel("qc_poll");
    let mut events = q.events();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = fast(&q, &name)
        .lease(Duration::from_millis(300))
        .run(move |job: Job| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                job.cancelled().await;
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    let id = q.enqueue(&name, Text("x")).await.unwrap().id().unwrap();
    recv(&mut rx).await;
    // What cancel() does, without its notification.
    raw_client()
        .await
        .execute(
            "UPDATE pgpubsub.jobs SET cancel_requested = true WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    wait_event(
        &mut events,
        |e| matches!(e, QueueEvent::JobCancelled { job_id, .. } if *job_id == id),
    )
    .await;
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_paused_queue_is_not_claimed_while_running_jobs_finish_then_resumes() {
    let (ps, q) = queue().await;
    let name = channel("qc_pause");
    let mut events = q.events();
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let g = gate.clone();
    let worker = fast(&q, &name)
        .concurrency(2)
        .prefetch(0)
        .run(move |job: Job| {
            let (g, tx, done_tx) = (g.clone(), tx.clone(), done_tx.clone());
            async move {
                let _ = tx.send(job.payload().to_owned());
                if job.payload() == "first" {
                    let _permit = g.acquire().await.map_err(|e| e.to_string())?;
                }
                let _ = done_tx.send(job.payload().to_owned());
                Ok::<_, String>(())
            }
        })
        .await
        .unwrap();
    q.enqueue(&name, Text("first")).await.unwrap();
    assert_eq!(recv(&mut rx).await, "first");
    assert!(q.pause(&name).await.unwrap());
    assert!(!q.pause(&name).await.unwrap(), "paused already");
    assert!(q.is_paused(&name).await.unwrap());
    wait_event(
        &mut events,
        |e| matches!(e, QueueEvent::PauseChanged { paused: true, queue } if **queue == *name),
    )
    .await;
    q.enqueue(&name, Text("second")).await.unwrap();
    // The running job finishes while paused; nothing new is claimed.
    gate.add_permits(1);
    assert_eq!(recv(&mut done).await, "first");
    let mut rx_stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    assert_quiet(&mut rx_stream, Duration::from_millis(1000)).await;
    let stats = q.stats().await.unwrap();
    let s = stats.iter().find(|s| s.queue == name).expect("stats");
    assert!(s.paused);
    assert_eq!((s.ready, s.running, s.completed), (1, 0, 1));
    assert!(q.resume(&name).await.unwrap());
    assert!(!q.is_paused(&name).await.unwrap());
    assert_eq!(next(&mut rx_stream).await, "second");
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_worker_started_on_a_paused_queue_waits_for_resume() {
    let (ps, q) = queue().await;
    let name = channel("qc_pause0");
    q.pause(&name).await.unwrap();
    q.enqueue(&name, Text("x")).await.unwrap();
    let mut events = q.events();
    let (worker, rx) = run_reporting(fast(&q, &name)).await;
    wait_event(&mut events, |e| {
        matches!(e, QueueEvent::PauseChanged { paused: true, .. })
    })
    .await;
    let mut rx = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    assert_quiet(&mut rx, Duration::from_millis(300)).await;
    q.resume(&name).await.unwrap();
    next(&mut rx).await;
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn snoozing_does_not_spend_an_attempt() {
    let (ps, q) = queue().await;
    let name = channel("qc_snooze");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = fast(&q, &name)
        .run(move |job: Job| {
            let (tx, runs) = (tx.clone(), runs.clone());
            async move {
                let _ = tx.send(job.attempt());
                // Snoozed twice, then done.
                Ok::<_, String>(match runs.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Outcome::Snooze(Duration::from_millis(20)),
                    _ => Outcome::Done,
                })
            }
        })
        .await
        .unwrap();
    // A single attempt allowed: a snooze that spent it would make it dead.
    let id = q
        .enqueue(&name, Text("a"))
        .max_attempts(1)
        .await
        .unwrap()
        .id()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(recv(&mut rx).await, 1);
    }
    until("the job to complete", || async {
        q.finished_job(id).await.unwrap().is_some()
    })
    .await;
    let f = q.finished_job(id).await.unwrap().expect("kept");
    assert_eq!((f.state, f.attempts), (FinishedState::Completed, 1));
    assert!(q.dead_jobs(Some(&name), 10).await.unwrap().is_empty());
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn output_is_kept_with_the_finished_job_then_removed_after_the_history() {
    let (ps, q) = queue().await;
    let name = channel("qc_out");
    let worker = fast(&q, &name)
        .history(Duration::from_millis(300))
        .run(|job: Job| async move {
            if job.payload() == "big" {
                let too_big = "x".repeat(pg_pubsub::queue::MAX_OUTPUT_BYTES);
                let e = Outcome::json(&too_big).expect_err("above the cap");
                assert_eq!(e.kind(), pg_pubsub::ErrorKind::Limit);
                return Ok(Outcome::Done);
            }
            Outcome::json(&serde_json::json!({ "id": job.id() })).map_err(|e| e.to_string())
        })
        .await
        .unwrap();
    let id = q.enqueue(&name, Text("x")).await.unwrap().id().unwrap();
    let big = q.enqueue(&name, Text("big")).await.unwrap().id().unwrap();
    until("the jobs to be kept", || async {
        q.finished_job(id).await.unwrap().is_some() && q.finished_job(big).await.unwrap().is_some()
    })
    .await;
    let f = q.finished_job(id).await.unwrap().expect("kept");
    assert_eq!(f.state, FinishedState::Completed);
    let out: serde_json::Value =
        serde_json::from_str(f.output.as_deref().expect("output")).unwrap();
    assert_eq!(out, serde_json::json!({ "id": id }));
    assert_eq!(
        q.finished_job(big).await.unwrap().expect("kept").output,
        None
    );
    let listed = q.finished_jobs(Some(&name), 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    // Older than the history: the worker deletes them.
    until("the history to be trimmed", || async {
        q.finished_jobs(Some(&name), 10).await.unwrap().is_empty()
    })
    .await;
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn without_history_completed_jobs_are_not_kept() {
    let (ps, q) = queue().await;
    let name = channel("qc_nohist");
    let (worker, mut rx) = run_reporting(fast(&q, &name).history(Duration::ZERO)).await;
    let id = q.enqueue(&name, Text("x")).await.unwrap().id().unwrap();
    recv(&mut rx).await;
    until("the job to complete", || async {
        job_states(&raw_client().await, &name).await.is_empty()
    })
    .await;
    assert_eq!(q.finished_job(id).await.unwrap(), None);
    assert_eq!(q.cancel(id).await.unwrap(), Cancelled::Unknown);
    worker.shutdown().await.unwrap();
    ps.shutdown().await;
}

#[tokio::test]
async fn a_test_job_can_be_cancelled() {
    let (job, cancel) = Job::for_test_cancellable("q", "p");
    assert!(!job.is_cancelled());
    let waiter = async { job.cancelled().await };
    let (_, ()) = tokio::join!(waiter, async { cancel() });
    assert!(job.is_cancelled());
}
