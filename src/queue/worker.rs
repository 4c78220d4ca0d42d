//! The worker: claims jobs in batches, runs a handler on each with a
//! concurrency limit, completes them in batches, retries failures, keeps
//! leases alive, and shuts down gracefully.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle, JoinSet};

use super::job::Job;
use super::{check_queue, Queue};
use crate::client::PgPubSub;
use crate::error::{Error, ErrorKind, Result};
use crate::{ConnectionEvent, Delivery, ListenOptions, Subscription};

/// Longest error text kept for a failed attempt, in bytes.
const MAX_ERROR_BYTES: usize = 8 * 1024;

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
    /// Handlers running at once (and jobs claimed at most per round trip). Default 1.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Jobs claimed ahead of free handlers, so that one round trip claims
    /// (and completes) many jobs. They wait in this worker, their leases
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
        let s = queue.schema.as_str();
        let sql = Sql {
            // Completing what finished and claiming more in one round
            // trip: the DELETE runs even though nothing reads it. The claim
            // is `{s}.claim()` written out, so its plan is prepared once
            // rather than at every call of the SQL function.
            claim: format!(
                "WITH done AS (DELETE FROM {s}.jobs j \
                   USING unnest($4::int8[], $5::int4[]) AS d(id, attempt) \
                   WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running' RETURNING 1), \
                 picked AS MATERIALIZED (SELECT j.id FROM {s}.jobs j \
                   WHERE j.queue = $1 AND j.state = 'ready' AND j.run_at <= now() \
                   ORDER BY j.priority DESC, j.run_at, j.id LIMIT $2::int4 FOR UPDATE SKIP LOCKED) \
                 UPDATE {s}.jobs j SET state = 'running', attempt = j.attempt + 1, \
                   lease_until = now() + make_interval(secs => $3::float8) \
                 FROM picked WHERE j.id = picked.id \
                 RETURNING j.id, j.attempt, j.max_attempts, j.priority, j.created_at, j.payload"
            ),
            complete: format!(
                "DELETE FROM {s}.jobs j USING unnest($1::int8[], $2::int4[]) AS d(id, attempt) \
                 WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running'"
            ),
            complete_one: Arc::from(format!(
                "DELETE FROM {s}.jobs WHERE id = $1 AND attempt = $2 AND state = 'running'"
            )),
            extend: format!(
                "UPDATE {s}.jobs j SET lease_until = now() + make_interval(secs => $3::float8) \
                 FROM unnest($1::int8[], $2::int4[]) AS d(id, attempt) \
                 WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running'"
            ),
            fail: format!("SELECT {s}.fail($1, $2, $3, make_interval(secs => $4::float8))"),
            rescue: format!("SELECT {s}.rescue($1)"),
            // Given-back jobs did not really get their attempt; others are
            // woken at once rather than at their next poll.
            give_back: format!(
                "WITH u AS (UPDATE {s}.jobs j SET state = 'ready', attempt = j.attempt - 1, \
                 lease_until = NULL FROM unnest($1::int8[], $2::int4[]) AS d(id, attempt) \
                 WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running' RETURNING 1) \
                 SELECT count(*), pg_notify($3, $4) FROM u HAVING count(*) > 0"
            ),
        };
        let (stop_tx, stop) = watch::channel(false);
        let runner = Runner {
            queue,
            name: Arc::from(self.name.as_str()),
            handler: Arc::new(handler),
            concurrency: self.concurrency,
            capacity: self.concurrency + prefetch,
            lease: self.lease,
            poll_interval: self.poll_interval,
            shutdown_timeout: self.shutdown_timeout,
            retry_base: self.retry_base,
            retry_max: self.retry_max,
            sql,
            running: JoinSet::new(),
            slots: HashMap::new(),
            waiting: VecDeque::new(),
            done: Vec::new(),
        };
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

struct Sql {
    claim: String,
    complete: String,
    complete_one: Arc<str>,
    extend: String,
    fail: String,
    rescue: String,
    give_back: String,
}

/// A claimed job whose handler runs.
struct Slot {
    id: i64,
    attempt: i32,
    max_attempts: i32,
    completed: Arc<AtomicBool>,
}

type Outcome = std::result::Result<(), String>;

struct Runner<F> {
    queue: Queue,
    name: Arc<str>,
    handler: Arc<F>,
    concurrency: usize,
    /// Jobs held at most: running plus waiting.
    capacity: usize,
    lease: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
    retry_base: Duration,
    retry_max: Duration,
    sql: Sql,
    running: JoinSet<Outcome>,
    slots: HashMap<tokio::task::Id, Slot>,
    /// Claimed jobs waiting for a free handler (prefetched).
    waiting: VecDeque<Job>,
    /// Claims of jobs whose handler returned `Ok`, completed in one statement.
    done: Vec<(i64, i32)>,
}

impl<F, Fut, E> Runner<F>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    async fn run(mut self, mut wake: Subscription<String>, mut stop: watch::Receiver<bool>) {
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut extend = tokio::time::interval(self.lease / 3);
        extend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut want = true;
        // After a failed round trip, wait for the next poll before another.
        let mut held = false;
        loop {
            self.start_waiting();
            let free = self.capacity - self.running.len() - self.waiting.len();
            let n = if want { free } else { 0 };
            if !held && (n > 0 || !self.done.is_empty()) {
                match self.claim(n).await {
                    // A full batch means more may be due: claim again at once.
                    Ok(got) => want = want && got == n,
                    Err(e) => {
                        tracing::warn!(queue = %self.name, %e, "pg-pubsub: claiming jobs failed");
                        held = true;
                    }
                }
                self.start_waiting();
            }
            tokio::select! {
                biased;
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
                Some(res) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.finished(res).await;
                    // Everything else already finished goes in the same batch.
                    while let Some(res) = self.running.try_join_next_with_id() {
                        self.finished(res).await;
                    }
                    want = true;
                }
                d = wake.next() => match d {
                    Some(Delivery::Message(m)) if *m.payload() == *self.name => want = true,
                    // Notifications may have been missed while reconnecting.
                    Some(Delivery::Gap(_) | Delivery::Lagged(_)) => want = true,
                    Some(_) => {}
                    None => break, // the PgPubSub shut down
                },
                _ = poll.tick() => {
                    want = true;
                    held = false;
                    self.rescue().await;
                }
                _ = extend.tick() => self.extend().await,
            }
        }
        self.drain(&mut extend).await;
    }

    /// Completes the jobs in `done` and claims up to `n` more (into
    /// `waiting`) in one statement; returns how many were claimed. On
    /// error, `done` is kept for the next try (completing twice is harmless).
    async fn claim(&mut self, n: usize) -> Result<usize> {
        let (sql, name) = (&self.sql.claim, &*self.name);
        let limit = n as i32;
        let lease = self.lease.as_secs_f64();
        let (ids, attempts): (Vec<i64>, Vec<i32>) = self.done.iter().copied().unzip();
        let rows = self
            .queue
            .with_client("claiming jobs", |client| async move {
                let stmt = client.prepare_cached(sql).await?;
                client
                    .query(&stmt, &[&name, &limit, &lease, &ids, &attempts])
                    .await
            })
            .await?;
        self.done.clear();
        let count = rows.len();
        for row in rows {
            self.waiting.push_back(Job {
                id: row.get(0),
                queue: self.name.clone(),
                attempt: row.get(1),
                max_attempts: row.get(2),
                priority: row.get(3),
                created_at: row.get::<_, SystemTime>(4),
                payload: row.get(5),
                complete_sql: self.sql.complete_one.clone(),
                completed: Arc::new(AtomicBool::new(false)),
            });
        }
        Ok(count)
    }

    /// Starts handlers for waiting jobs while handlers are free.
    fn start_waiting(&mut self) {
        while self.running.len() < self.concurrency {
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            let slot = Slot {
                id: job.id,
                attempt: job.attempt,
                max_attempts: job.max_attempts,
                completed: job.completed.clone(),
            };
            let handler = self.handler.clone();
            let task = self
                .running
                .spawn(async move { handler(job).await.map_err(|e| e.to_string()) });
            self.slots.insert(task.id(), slot);
        }
    }

    /// A handler ended: queue its completion, or fail the attempt.
    async fn finished(&mut self, res: std::result::Result<(tokio::task::Id, Outcome), JoinError>) {
        let (task, outcome) = match res {
            Ok((task, outcome)) => (task, outcome),
            Err(e) => (e.id(), Err(panic_text(e))),
        };
        let Some(slot) = self.slots.remove(&task) else {
            return;
        };
        match outcome {
            Ok(()) => {
                if !slot.completed.load(Ordering::Acquire) {
                    self.done.push((slot.id, slot.attempt));
                }
            }
            Err(text) => self.fail(&slot, text).await,
        }
    }

    /// Completes the jobs in `done` in one statement. On error they are
    /// kept for the next try (completing twice is harmless).
    async fn flush(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = self.done.iter().copied().unzip();
        let sql = &self.sql.complete;
        let res = self
            .queue
            .with_client("completing jobs", |client| async move {
                let stmt = client.prepare_cached(sql).await?;
                client.execute(&stmt, &[&ids, &attempts]).await
            })
            .await;
        match res {
            Ok(_) => self.done.clear(),
            Err(e) => tracing::warn!(queue = %self.name, %e, "pg-pubsub: completing jobs failed"),
        }
    }

    async fn fail(&self, slot: &Slot, text: String) {
        let mut error: String = text.replace('\0', "\u{FFFD}");
        if error.len() > MAX_ERROR_BYTES {
            let mut cut = MAX_ERROR_BYTES;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let delay = retry_delay(self.retry_base, self.retry_max, slot.attempt);
        let (sql, secs) = (&self.sql.fail, delay.as_secs_f64());
        let (id, attempt, err) = (slot.id, slot.attempt, &error);
        let res = self
            .queue
            .with_client("failing a job", |client| async move {
                let stmt = client.prepare_cached(sql).await?;
                let row = client
                    .query_one(&stmt, &[&id, &attempt, err, &secs])
                    .await?;
                Ok(row.get::<_, Option<String>>(0))
            })
            .await;
        let event = match res.as_ref().map(Option::as_deref) {
            Ok(Some("retry")) => ConnectionEvent::JobRetried {
                queue: self.name.clone(),
                job_id: id,
                attempt,
                error: Arc::from(error.as_str()),
                retry_in: delay,
            },
            Ok(Some("dead")) => ConnectionEvent::JobDead {
                queue: self.name.clone(),
                job_id: id,
                attempts: attempt,
                error: Arc::from(error.as_str()),
            },
            Ok(_) => {
                tracing::debug!(queue = %self.name, id, attempt, "pg-pubsub: failed job's claim was lost");
                return;
            }
            Err(e) => {
                // The job runs again once its lease expires.
                tracing::warn!(queue = %self.name, id, %e, "pg-pubsub: recording a failed job failed");
                return;
            }
        };
        tracing::info!(queue = %self.name, id, attempt, max = slot.max_attempts, %error, "pg-pubsub: job failed");
        self.queue.pubsub.emit(event);
    }

    /// Extends the leases of the running and waiting jobs.
    async fn extend(&self) {
        if self.slots.is_empty() && self.waiting.is_empty() {
            return;
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = self
            .slots
            .values()
            .map(|s| (s.id, s.attempt))
            .chain(self.waiting.iter().map(|j| (j.id, j.attempt)))
            .unzip();
        let (sql, lease) = (&self.sql.extend, self.lease.as_secs_f64());
        let res = self
            .queue
            .with_client("extending leases", |client| async move {
                let stmt = client.prepare_cached(sql).await?;
                client.execute(&stmt, &[&ids, &attempts, &lease]).await
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(queue = %self.name, %e, "pg-pubsub: extending leases failed");
        }
    }

    /// Makes jobs whose lease expired ready again (or dead).
    async fn rescue(&self) {
        let (sql, name) = (&self.sql.rescue, &*self.name);
        let res = self
            .queue
            .with_client("rescuing expired jobs", |client| async move {
                let stmt = client.prepare_cached(sql).await?;
                let row = client.query_one(&stmt, &[&name]).await?;
                Ok(row.get::<_, i64>(0))
            })
            .await;
        match res {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(queue = %self.name, n, "pg-pubsub: jobs with expired leases rescued")
            }
            Err(e) => tracing::warn!(queue = %self.name, %e, "pg-pubsub: rescuing jobs failed"),
        }
    }

    /// Shutdown: no more claims; running handlers get the shutdown
    /// timeout; the rest are stopped and their jobs given back.
    async fn drain(&mut self, extend: &mut tokio::time::Interval) {
        // Jobs that never started go back at once, not after the handlers.
        let unstarted: Vec<(i64, i32)> =
            self.waiting.drain(..).map(|j| (j.id, j.attempt)).collect();
        self.give_back(unstarted).await;
        let deadline = tokio::time::sleep(self.shutdown_timeout);
        tokio::pin!(deadline);
        while !self.running.is_empty() {
            tokio::select! {
                Some(res) = self.running.join_next_with_id() => self.finished(res).await,
                _ = &mut deadline => break,
                _ = extend.tick() => self.extend().await,
            }
            self.flush().await;
        }
        self.running.abort_all();
        while let Some(res) = self.running.join_next_with_id().await {
            match res {
                Err(e) if e.is_cancelled() => {}
                // It finished before the abort took effect.
                other => self.finished(other).await,
            }
        }
        self.flush().await;
        let back: Vec<(i64, i32)> = self.slots.drain().map(|(_, s)| (s.id, s.attempt)).collect();
        self.give_back(back).await;
    }

    /// Makes claimed jobs ready again at once, their attempt not counted.
    async fn give_back(&self, back: Vec<(i64, i32)>) {
        if back.is_empty() {
            return;
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = back.into_iter().unzip();
        let sql = &self.sql.give_back;
        let (channel, name) = (self.queue.schema.jobs_channel(), &*self.name);
        let res = self
            .queue
            .with_client("giving jobs back", |client| async move {
                client
                    .execute(sql.as_str(), &[&ids, &attempts, &channel, &name])
                    .await
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(queue = %self.name, %e, "pg-pubsub: giving jobs back failed; they run again after the lease");
        }
    }
}

/// The delay before retrying after failed attempt `attempt` (from 1).
pub(crate) fn retry_delay(base: Duration, max: Duration, attempt: i32) -> Duration {
    let exp = attempt.saturating_sub(1).clamp(0, 62) as u32;
    let full = base
        .checked_mul(1u32.checked_shl(exp.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    // Jitter in [0.5, 1]: failing jobs of one batch spread out.
    full.mul_f64(0.5 + fastrand::f64() / 2.0)
}

fn panic_text(e: JoinError) -> String {
    if e.is_cancelled() {
        return "the handler was cancelled".to_owned();
    }
    let payload = e.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned());
    format!("the handler panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(60));
        for (attempt, full) in [(1, 1), (2, 2), (3, 4), (7, 60), (1000, 60)] {
            let d = retry_delay(b, m, attempt);
            let full = Duration::from_secs(full);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }
}
