//! The worker's builder and handle. The claim loop is in `runner`, one
//! job's attempt in `attempt`, batched completions in `completer`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::context::Ctx;
use super::job::Job;
use super::prefetch::Prefetch;
use super::runner::Runner;
use super::store::Sql;
use super::{check_queue, Queue};
use crate::client::PgPubSub;
use crate::error::{Error, Origin, Result};
use crate::Text;

/// Options for a worker, from [`Queue::worker`] or [`PgPubSub::worker`].
#[must_use = "a builder does nothing until .run() is awaited"]
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    queue: Queue,
    name: String,
    concurrency: usize,
    prefetch: Option<usize>,
    lease: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
    retry_base: Duration,
    retry_max: Duration,
    vacuum: bool,
    horizon_after: Duration,
    history: Duration,
    schedules: bool,
}

impl Queue {
    /// A worker for `queue` (default: concurrency 1, lease 30 s, poll 1 s,
    /// shutdown timeout 10 s, retries from 1 s doubling up to 1 h, finished
    /// jobs kept 1 day).
    pub fn worker(&self, queue: &str) -> WorkerBuilder {
        WorkerBuilder {
            queue: self.clone(),
            name: queue.to_owned(),
            concurrency: 1,
            prefetch: None,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(10),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(3600),
            vacuum: true,
            horizon_after: Duration::from_secs(60),
            history: Duration::from_secs(24 * 3600),
            schedules: true,
        }
    }
}

impl PgPubSub {
    /// A worker for `queue` in the default schema: `pubsub.queue().worker(queue)`.
    pub fn worker(&self, queue: &str) -> WorkerBuilder {
        self.queue().worker(queue)
    }
}

impl WorkerBuilder {
    /// Handlers running at once. Default 1. A claim takes up to the free
    /// handlers plus the [`prefetch`](Self::prefetch) in one round trip.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Jobs claimed ahead of free handlers, so that one round trip claims
    /// many jobs and a handler that finishes starts the next job at once.
    /// They wait in this worker, their leases extended; on shutdown they
    /// are given back at once. Setting it fixes the number. 0 claims only
    /// for free handlers (fairer across many workers on a short queue,
    /// slower on a long one).
    ///
    /// Default: adaptive, from the concurrency up to 256. It doubles while
    /// handlers finish faster than a claim's round trip and the queue has
    /// more, and shrinks back when they keep up. Waiting jobs count as
    /// running for the queue's limits; a limit that binds makes claims come
    /// back short, which never grows the prefetch.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n);
        self
    }

    /// How long a claim lasts without being extended. The worker extends
    /// it every third of this while the handler runs; if the worker dies,
    /// its jobs run again about this long later. Default 30 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often to look for due jobs (and expired leases) without a
    /// wake-up. Scheduled and retried jobs are found this way. Default 1 s.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long [`Worker::shutdown`] lets running handlers finish before
    /// it stops them and gives their jobs back. Default 10 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Retry delay after failed attempt `n`: `min(max, base * 2^(n-1))`,
    /// times a random factor in `[0.5, 1]`. Default 1 s and 1 h.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max = max;
        self
    }

    /// Whether the worker vacuums the jobs table itself, so that claims
    /// stay fast under heavy traffic between autovacuum runs. Default on:
    /// `VACUUM (SKIP_LOCKED, TRUNCATE false)` after every 5,000 jobs it
    /// finished (or 5% of the table's live jobs, if more; and no sooner
    /// than nine times as long as its last vacuum took), and when its queue
    /// falls quiet after at least 500. Needs the role to own the table (as it does when
    /// the crate installed the schema); otherwise the worker logs once and
    /// leaves it to autovacuum.
    pub fn vacuum(mut self, on: bool) -> Self {
        self.vacuum = on;
        self
    }

    /// How long a transaction (or prepared transaction) must hold back the
    /// xmin horizon before the worker reports it, when it vacuums, as
    /// [`QueueEvent::HorizonHeld`](crate::event::QueueEvent::HorizonHeld).
    /// Default: 60 s.
    pub fn horizon_warning(mut self, after: Duration) -> Self {
        self.horizon_after = after;
        self
    }

    /// How long finished jobs of the queue (completed, with their output,
    /// and cancelled) stay in `finished_jobs` ([`Queue::finished_jobs`]).
    /// Default: 1 day. The worker deletes older ones in batches of 1000
    /// (every tenth of this, at most every 10 s); with several workers on
    /// a queue, the shortest history wins. Zero keeps no completed job (the
    /// completion is then a plain `DELETE`, the fastest) and cancelled ones
    /// only until the next poll. Dead jobs are not affected: they stay in
    /// `dead_jobs` until retried or deleted.
    pub fn history(mut self, keep: Duration) -> Self {
        self.history = keep;
        self
    }

    /// Whether the worker also runs a scheduler for the schema's periodic
    /// jobs ([`crate::cron`]), so that workers alone keep schedules firing
    /// (once per slot however many run). Default on.
    pub fn schedules(mut self, on: bool) -> Self {
        self.schedules = on;
        self
    }

    /// Starts the worker in the background and returns its handle. Each
    /// job runs `handler` in a task of its own: `Ok(())` completes the job,
    /// `Ok(`[`Outcome`](super::Outcome)`)` completes it with an output or
    /// snoozes it, `Err` (its `Display` text is kept) or a panic fails the
    /// attempt. A job cancelled while it runs ends cancelled whatever the
    /// handler returns ([`Job::cancelled`]).
    pub async fn run<F, Fut, O, E>(self, handler: F) -> Result<Worker>
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<O, E>> + Send + 'static,
        O: super::IntoOutcome,
        E: fmt::Display + Send + 'static,
    {
        check_queue(&self.name)?;
        let prefetch = self.prefetch.unwrap_or(self.concurrency);
        if self.concurrency == 0 || self.concurrency.saturating_add(prefetch) > i32::MAX as usize {
            return Err(Error::new(
                Origin::Config,
                "concurrency must be at least 1 (and with prefetch, fit an i32)",
            ));
        }
        if self.lease < Duration::from_millis(30) || self.poll_interval.is_zero() {
            return Err(Error::new(
                Origin::Config,
                "lease must be at least 30 ms and poll_interval above zero",
            ));
        }
        let queue = self.queue.clone();
        queue.install().await?;
        // Behind a transaction pooler there is no LISTEN: poll only (every
        // poll interval), and find cancels by the lease extension.
        let (wake, control) = if queue.pubsub.is_transaction_pooled() {
            (None, None)
        } else {
            let listen = |channel: String| {
                let pubsub = queue.pubsub.clone();
                async move {
                    pubsub
                        .listen::<Text>(&channel)
                        .single_listener(false)
                        .filtered(false)
                        .await
                }
            };
            (
                Some(listen(queue.schema.jobs_channel()).await?),
                Some(listen(queue.schema.queue_control_channel()).await?),
            )
        };
        let ctx = Arc::new(Ctx {
            sql: Sql::new(queue.schema.as_str()),
            name: Arc::from(self.name.as_str()),
            exec: queue.exec.clone(),
            jobs_channel: queue.schema.jobs_channel(),
            events: queue.pubsub.inner.buses.queue.clone(),
            retry_base: self.retry_base,
            retry_max: self.retry_max,
            horizon_after: self.horizon_after,
            history: self.history,
            completing: Default::default(),
            completed: Default::default(),
            metrics: crate::record::QueueMetrics::new(&self.name),
        });
        let stop_tx = Arc::new(watch::Sender::new(None::<Instant>));
        let stop = stop_tx.subscribe();
        // Stopped by the handle's shutdown: handlers get the lesser of the
        // worker's shutdown timeout and three quarters of what is left of
        // the handle's, the rest is for completing and giving jobs back.
        let registration = {
            let stop_tx = stop_tx.clone();
            let own = self.shutdown_timeout;
            self.queue
                .pubsub
                .inner
                .services
                .register("worker", move |by| {
                    let now = Instant::now();
                    let left = by.saturating_duration_since(now);
                    let until = now + own.min(left - left / 4);
                    stop_tx.send_if_modified(|s| s.is_none() && s.replace(until).is_none());
                })?
        };
        // One per handle and schema, shared by its workers.
        let scheduler = if self.schedules {
            Some(crate::cron::shared_scheduler(&queue)?)
        } else {
            None
        };
        let runner = Runner::new(
            ctx,
            Arc::new(handler),
            self.concurrency,
            Prefetch::new(self.prefetch, self.concurrency),
            self.lease,
            self.poll_interval,
            self.shutdown_timeout,
        )
        .vacuum(self.vacuum);
        let task = tokio::spawn(async move {
            runner.run(wake, control, stop).await;
            // The last worker's drop stops the scheduler (the handle's
            // shutdown waits for it through its own registration).
            drop(scheduler);
            drop(registration);
        });
        Ok(Worker {
            queue: self.name,
            stop: stop_tx,
            shutdown_timeout: self.shutdown_timeout,
            events: self.queue.pubsub.inner.buses.queue.clone(),
            task: Some(task),
        })
    }
}

/// A running worker, from [`WorkerBuilder::run`]. Dropping it stops the
/// worker as [`shutdown`](Self::shutdown) does, without waiting.
///
/// [`PgPubSub::shutdown`] stops it too, before the pool closes: running
/// handlers get the worker's shutdown timeout or three quarters of the
/// handle's, whichever is shorter, then their jobs are given back.
pub struct Worker {
    queue: String,
    stop: Arc<watch::Sender<Option<Instant>>>,
    shutdown_timeout: Duration,
    events: crate::event::Bus<crate::event::QueueEvent>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field(
                "finished",
                &self.task.as_ref().is_none_or(JoinHandle::is_finished),
            )
            .finish()
    }
}

impl Worker {
    /// The queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Stops claiming, lets running handlers finish within the shutdown
    /// timeout, completes what finished, then stops the rest and gives
    /// their jobs back at once (ready again, the attempt not counted).
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop(Instant::now() + self.shutdown_timeout);
        self.join().await
    }

    /// Waits until the worker ends by itself (its [`PgPubSub`] shut down).
    pub async fn wait(mut self) -> Result<()> {
        self.join().await
    }

    /// Job events of the workers of this worker's [`PgPubSub`] (see
    /// [`Queue::events`]).
    pub fn events(&self) -> crate::event::Events<crate::event::QueueEvent> {
        self.events.subscribe()
    }

    fn stop(&self, by: Instant) {
        self.stop
            .send_if_modified(|s| s.is_none() && s.replace(by).is_none());
    }

    async fn join(&mut self) -> Result<()> {
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        task.await.map_err(|e| {
            Error::new(Origin::Queue, format!("the worker task failed: {e}")).with_source(e)
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop(Instant::now() + self.shutdown_timeout);
        }
    }
}
