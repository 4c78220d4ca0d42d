//! The worker's builder and handle. The claim loop is in `runner`, one
//! job's attempt in `attempt`, batched completions in `completer`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::job::Job;
use super::context::Ctx;
use super::runner::Runner;
use super::store::Sql;
use super::{check_queue, Queue};
use crate::client::PgPubSub;
use crate::error::{Error, ErrorKind, Result};
use crate::ListenOptions;

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
}

impl Queue {
    /// A worker for `queue` (default: concurrency 1, lease 30 s, poll 1 s,
    /// shutdown timeout 10 s, retries from 1 s doubling up to 1 h).
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
    /// many jobs and a handler that finishes starts the next job at once. They wait in this worker, their leases
    /// extended; on shutdown they are given back at once. Default: the
    /// concurrency. 0 claims only for free handlers (fairer across many
    /// workers on a short queue, slower on a long one).
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
    /// `VACUUM (SKIP_LOCKED)` after every 5,000 jobs it finished (or 5% of
    /// the table's live jobs, if more), and when its queue falls quiet
    /// after at least 500. Needs the role to own the table (as it does when
    /// the crate installed the schema); otherwise the worker logs once and
    /// leaves it to autovacuum.
    pub fn vacuum(mut self, on: bool) -> Self {
        self.vacuum = on;
        self
    }

    /// Starts the worker in the background and returns its handle. Each
    /// job runs `handler` in a task of its own: `Ok` completes the job,
    /// `Err` (its `Display` text is kept) or a panic fails the attempt.
    pub async fn run<F, Fut, E>(self, handler: F) -> Result<Worker>
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        check_queue(&self.name)?;
        let prefetch = self.prefetch.unwrap_or(self.concurrency);
        if self.concurrency == 0 || self.concurrency.saturating_add(prefetch) > i32::MAX as usize {
            return Err(Error::new(
                ErrorKind::Config,
                "concurrency must be at least 1 (and with prefetch, fit an i32)",
            ));
        }
        if self.lease < Duration::from_millis(30) || self.poll_interval.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "lease must be at least 30 ms and poll_interval above zero",
            ));
        }
        let queue = self.queue.clone();
        queue.install().await?;
        let plain = ListenOptions::new().single_listener(false).filtered(false);
        let wake = queue
            .pubsub
            .listen_raw_with(&queue.schema.jobs_channel(), plain)
            .await?;
        let ctx = Arc::new(Ctx {
            sql: Sql::new(queue.schema.as_str()),
            name: Arc::from(self.name.as_str()),
            queue,
            retry_base: self.retry_base,
            retry_max: self.retry_max,
            completing: Default::default(),
        });
        let (stop_tx, stop) = watch::channel(false);
        let runner = Runner::new(
            ctx,
            Arc::new(handler),
            self.concurrency,
            self.concurrency + prefetch,
            self.lease,
            self.poll_interval,
            self.shutdown_timeout,
        )
        .vacuum(self.vacuum);
        let task = tokio::spawn(runner.run(wake, stop));
        Ok(Worker {
            queue: self.name,
            stop: stop_tx,
            task,
        })
    }
}

/// A running worker, from [`WorkerBuilder::run`]. Dropping it stops the
/// worker as [`shutdown`](Self::shutdown) does, without waiting.
///
/// Shut workers down before their [`PgPubSub`]: once the pool is closed
/// a worker cannot complete or give back jobs (they run again after the
/// lease).
pub struct Worker {
    queue: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("finished", &self.task.is_finished())
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
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits until the worker ends by itself (its [`PgPubSub`] shut down).
    pub async fn wait(self) -> Result<()> {
        self.join().await
    }

    async fn join(self) -> Result<()> {
        let Worker { task, stop, .. } = self;
        let res = task.await;
        drop(stop);
        res.map_err(|e| {
            Error::new(ErrorKind::Queue, format!("the worker task failed: {e}")).with_source(e)
        })
    }
}
