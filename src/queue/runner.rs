//! The worker's loop: claims jobs in batches sized to its free capacity,
//! starts an attempt per job, extends all leases in one statement, rescues
//! expired leases, and shuts down gracefully.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::completer::Done;
use super::context::Ctx;
use super::job::Job;
use super::outcome::IntoOutcome;
use super::prefetch::Prefetch;
use super::store::RETAIN_BATCH;
use super::{attempt, completer, vacuum};
use crate::error::Result;
use crate::event::QueueEvent;
use crate::{Delivery, Subscription};

pub(super) struct Runner<F> {
    ctx: Arc<Ctx>,
    handler: Arc<F>,
    concurrency: usize,
    /// Jobs held beyond the running ones (see `prefetch`).
    prefetch: Prefetch,
    lease: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
    /// One task per running attempt.
    running: JoinSet<()>,
    /// The claim `(id, attempt)` of each running attempt.
    slots: HashMap<tokio::task::Id, (i64, i32)>,
    /// Claimed jobs waiting for a free handler (prefetched).
    waiting: VecDeque<Job>,
    /// The cancellation signal of each held job (running or waiting), by id.
    cancels: HashMap<i64, Arc<watch::Sender<bool>>>,
    /// The queue is paused: claim nothing.
    paused: bool,
    /// When finished jobs were last trimmed to the history.
    retained: Option<Instant>,
    /// Claims of jobs whose handler returned `Ok`, to the completer.
    done: Option<mpsc::UnboundedSender<Done>>,
    completer: Option<JoinHandle<()>>,
    /// Whether to vacuum the jobs table (see `vacuum`), and the task doing it.
    vacuum: bool,
    vacuumer: Option<JoinHandle<()>>,
    /// Whether the queue has limits (a `queue_limits` row): then claims go
    /// through `claim_limited`. Read at start and at every poll, so a
    /// queue without limits pays nothing.
    limited: bool,
}

impl<F, Fut, O, E> Runner<F>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<O, E>> + Send + 'static,
    O: IntoOutcome,
    E: fmt::Display + Send + 'static,
{
    pub(super) fn new(
        ctx: Arc<Ctx>,
        handler: Arc<F>,
        concurrency: usize,
        prefetch: Prefetch,
        lease: Duration,
        poll_interval: Duration,
        shutdown_timeout: Duration,
    ) -> Self {
        Runner {
            ctx,
            handler,
            concurrency,
            prefetch,
            lease,
            poll_interval,
            shutdown_timeout,
            running: JoinSet::new(),
            slots: HashMap::new(),
            waiting: VecDeque::new(),
            cancels: HashMap::new(),
            paused: false,
            retained: None,
            done: None,
            completer: None,
            vacuum: false,
            vacuumer: None,
            limited: false,
        }
    }

    /// Vacuum the jobs table from this worker (see `vacuum`).
    pub(super) fn vacuum(mut self, on: bool) -> Self {
        self.vacuum = on;
        self
    }

    pub(super) async fn run(
        mut self,
        mut wake: Option<Subscription<crate::Text>>,
        mut control: Option<Subscription<crate::Text>>,
        mut stop: watch::Receiver<Option<Instant>>,
    ) {
        // Completions go to their own task (and pooled connection): they
        // are deleted in batches while the next claim is under way.
        let (done, rx) = mpsc::unbounded_channel();
        self.done = Some(done);
        let finished = self.vacuum.then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.vacuumer = Some(tokio::spawn(vacuum::run(self.ctx.clone(), rx)));
            tx
        });
        self.completer = Some(tokio::spawn(completer::run(self.ctx.clone(), rx, finished)));
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Not at once: nothing is held yet, and a claim then under way
        // takes fresh leases.
        let mut extend = tokio::time::interval_at(Instant::now() + self.lease / 3, self.lease / 3);
        extend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut plan = ClaimPlan::default();
        // The claim under way, and how many jobs it asked for. It runs
        // alongside the loop: handlers finish and waiting jobs start while
        // it is on the wire, rather than after it.
        let mut claiming: Option<(usize, Claim)> = None;
        self.refresh_state().await;
        loop {
            self.start_waiting();
            let asked = claiming.as_ref().map_or(0, |(n, _)| *n);
            let busy = self.running.len() + self.waiting.len() + asked;
            if claiming.is_some()
                && self.waiting.is_empty()
                && self.running.len() < self.concurrency
            {
                self.prefetch.starving();
            }
            if claiming.is_none() {
                let capacity = self.concurrency + self.prefetch.get();
                if let Some(n) = plan.next(capacity, busy).filter(|_| !self.paused) {
                    plan.started();
                    claiming = Some((n, self.claim(n)));
                }
            }
            tokio::select! {
                biased;
                changed = stop.changed() => {
                    if changed.is_err() || stop.borrow().is_some() {
                        break;
                    }
                }
                res = in_flight(&mut claiming) => {
                    let n = claiming.take().map_or(0, |(n, _)| n);
                    match res {
                        Ok(rows) => {
                            let got = self.accept(rows);
                            plan.claimed(n, got);
                            self.prefetch.claimed(n, got);
                        }
                        Err(e) => {
                            tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: claiming jobs failed");
                            plan.failed();
                        }
                    }
                }
                Some(res) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.reap(res);
                    while let Some(res) = self.running.try_join_next_with_id() {
                        self.reap(res);
                    }
                    plan.woken();
                }
                d = next_of(&mut wake) => match d {
                    Some(Delivery::Message(m)) if *m.payload() == *self.ctx.name => plan.woken(),
                    // Notifications may have been missed while reconnecting.
                    Some(Delivery::Gap(_) | Delivery::Lagged(_)) => plan.woken(),
                    Some(_) => {}
                    None => break, // the PgPubSub shut down
                },
                d = next_of(&mut control) => match d {
                    Some(Delivery::Message(m)) => {
                        if self.control(m.payload()) {
                            plan.woken();
                        }
                    }
                    // Missed a pause or a cancel: look now.
                    Some(Delivery::Gap(_) | Delivery::Lagged(_)) => {
                        self.refresh_state().await;
                        self.extend().await;
                        plan.woken();
                    }
                    Some(_) => {}
                    None => break,
                },
                // A limit may have held jobs back until this worker's
                // completions were written.
                _ = self.ctx.completed.notified(), if self.limited => plan.woken(),
                _ = poll.tick() => {
                    plan.polled();
                    self.refresh_state().await;
                    self.rescue().await;
                    self.retain().await;
                }
                _ = extend.tick() => self.extend().await,
            }
        }
        // Jobs of a claim under way are held by this worker: they go back
        // with the other unstarted ones.
        if let Some((_, claim)) = claiming {
            if let Ok(rows) = claim.await {
                self.accept(rows);
            }
        }
        // Dropped handle: its own shutdown timeout.
        let by = stop
            .borrow()
            .unwrap_or_else(|| Instant::now() + self.shutdown_timeout);
        self.drain(&mut extend, by).await;
    }

    /// Claims up to `n` jobs in one statement, on a pooled connection: a
    /// future that borrows nothing from the loop (see [`Runner::accept`]).
    fn claim(&self, n: usize) -> Claim {
        let ctx = self.ctx.clone();
        let limited = self.limited;
        let limit = n as i32;
        let lease = self.lease.as_secs_f64();
        Box::pin(async move {
            let sql = if limited {
                &ctx.sql.claim_limited
            } else {
                &ctx.sql.claim
            };
            let name = &*ctx.name;
            ctx.with_client("claiming jobs", |client| async move {
                client
                    .query_p(
                        sql,
                        &[
                            (&name, Type::TEXT),
                            (&limit, Type::INT4),
                            (&lease, Type::FLOAT8),
                        ],
                    )
                    .await
            })
            .await
        })
    }

    /// Takes the claimed `rows` into `waiting`; returns how many.
    fn accept(&mut self, mut rows: Vec<tokio_postgres::Row>) -> usize {
        let count = rows.len();
        // Returned in id order: start the higher priorities first.
        rows.sort_by_key(|row| std::cmp::Reverse(row.get::<_, i16>(3)));
        for row in rows {
            let cancel = Arc::new(watch::Sender::new(false));
            self.cancels.insert(row.get(0), cancel.clone());
            self.waiting.push_back(Job {
                id: row.get(0),
                queue: self.ctx.name.clone(),
                attempt: row.get(1),
                max_attempts: row.get(2),
                priority: row.get(3),
                created_at: row.get::<_, SystemTime>(4),
                payload: row.get(5),
                complete_sql: self.ctx.sql.complete_one.clone(),
                completed: Arc::new(AtomicBool::new(false)),
                cancel,
            });
        }
        count
    }

    /// Reads whether the queue is paused (the fallback for lost
    /// notifications) and which limits it has (which claim to use); on an
    /// error, keeps what it knew.
    async fn refresh_state(&mut self) {
        let (sql, name) = (&self.ctx.sql.queue_state, &*self.ctx.name);
        let res = self
            .ctx
            .with_client(
                "reading the queue's pause and limits",
                |client| async move {
                    let rows = client.query_p(sql, &[(&name, Type::TEXT)]).await?;
                    Ok(rows.first().map_or((false, false), |row| {
                        (row.get::<_, bool>(0), row.get::<_, bool>(1))
                    }))
                },
            )
            .await;
        match res {
            Ok((paused, limited)) => {
                self.set_paused(paused);
                self.limited = limited;
            }
            Err(e) => {
                tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: reading the queue's pause and limits failed")
            }
        }
    }

    /// Starts an attempt for each waiting job while handlers are free.
    fn start_waiting(&mut self) {
        let Some(done) = &self.done else { return };
        while self.running.len() < self.concurrency {
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            let claim = (job.id, job.attempt);
            let run = attempt::run(self.ctx.clone(), self.handler.clone(), job, done.clone());
            let task = self.running.spawn(run);
            self.slots.insert(task.id(), claim);
        }
    }

    /// An attempt's task ended (it completed or failed its job itself).
    /// A task stopped at shutdown keeps its slot: its job is given back.
    fn reap(&mut self, res: std::result::Result<(tokio::task::Id, ()), JoinError>) {
        let task = match res {
            Ok((task, ())) => task,
            Err(e) if e.is_cancelled() => return,
            Err(e) => e.id(),
        };
        if let Some((id, _)) = self.slots.remove(&task) {
            self.cancels.remove(&id);
        }
    }

    /// A control message (`cancel <id>`, `pause <queue>`, `resume <queue>`);
    /// `true` when the queue was resumed (claim again).
    fn control(&mut self, msg: &str) -> bool {
        if let Some(id) = msg.strip_prefix("cancel ") {
            if let Some(cancel) = id.parse::<i64>().ok().and_then(|id| self.cancels.get(&id)) {
                cancel.send_replace(true);
            }
        } else if msg.strip_prefix("pause ") == Some(&*self.ctx.name) {
            self.set_paused(true);
        } else if msg.strip_prefix("resume ") == Some(&*self.ctx.name) {
            self.set_paused(false);
            return true;
        }
        false
    }

    fn set_paused(&mut self, paused: bool) {
        if paused != self.paused {
            tracing::info!(queue = %self.ctx.name, paused, "pg-pubsub: queue pause changed");
            self.ctx.events.emit(QueueEvent::PauseChanged {
                queue: self.ctx.name.clone(),
                paused,
            });
        }
        self.paused = paused;
    }

    /// Deletes this queue's finished jobs older than the history, a few
    /// bounded batches at a time, at most every tenth of the history (and
    /// at most every 10 s).
    async fn retain(&mut self) {
        let every = (self.ctx.history / 10).min(Duration::from_secs(10));
        if self.retained.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.retained = Some(Instant::now());
        let (sql, name) = (&self.ctx.sql.retain, &*self.ctx.name);
        let secs = self.ctx.history.as_secs_f64();
        for _ in 0..10 {
            let res = self
                .ctx
                .with_client("trimming finished jobs", |client| async move {
                    client
                        .execute_p(sql, &[(&name, Type::TEXT), (&secs, Type::FLOAT8)])
                        .await
                })
                .await;
            match res {
                Ok(n) if n < RETAIN_BATCH as u64 => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: trimming finished jobs failed");
                    return;
                }
            }
        }
    }

    /// Extends the leases of the running and waiting jobs in one statement,
    /// and tells those someone cancelled (in case the notification was lost).
    async fn extend(&self) {
        let completing: Vec<(i64, i32)> = self.ctx.completing(|set| set.iter().copied().collect());
        if self.slots.is_empty() && self.waiting.is_empty() && completing.is_empty() {
            return;
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = self
            .slots
            .values()
            .copied()
            .chain(self.waiting.iter().map(|j| (j.id, j.attempt)))
            .chain(completing)
            .unzip();
        let (sql, lease) = (&self.ctx.sql.extend, self.lease.as_secs_f64());
        let res = self
            .ctx
            .with_client("extending leases", |client| async move {
                client
                    .query_p(
                        sql,
                        &[
                            (&ids, Type::INT8_ARRAY),
                            (&attempts, Type::INT4_ARRAY),
                            (&lease, Type::FLOAT8),
                        ],
                    )
                    .await
            })
            .await;
        match res {
            Ok(rows) => {
                for row in rows {
                    if let Some(cancel) = self.cancels.get(&row.get::<_, i64>(0)) {
                        cancel.send_replace(true);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: extending leases failed")
            }
        }
    }

    /// Makes jobs whose lease expired ready again (or dead), and says so
    /// with the same events as handler failures.
    async fn rescue(&self) {
        let (sql, name) = (&self.ctx.sql.rescue, &*self.ctx.name);
        let res = self
            .ctx
            .with_client("rescuing expired jobs", |client| async move {
                client.query_p(sql, &[(&name, Type::TEXT)]).await
            })
            .await;
        let rows = match res {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: rescuing jobs failed");
                return;
            }
        };
        for row in rows {
            let (job_id, attempt, dead): (i64, i32, bool) = (row.get(0), row.get(1), row.get(2));
            let error: Arc<str> = Arc::from(row.get::<_, &str>(3));
            tracing::info!(queue = %self.ctx.name, job_id, attempt, dead, %error, "pg-pubsub: job's lease expired");
            let queue = self.ctx.name.clone();
            self.ctx.events.emit(if dead {
                QueueEvent::JobDead {
                    queue,
                    job_id,
                    attempts: attempt,
                    error,
                }
            } else {
                QueueEvent::JobRetried {
                    queue,
                    job_id,
                    attempt,
                    error,
                    retry_in: Duration::ZERO,
                }
            });
        }
    }

    /// Shutdown: no more claims; running handlers get until `by`; the rest are stopped and their jobs given back, after the
    /// pending completions are written.
    async fn drain(&mut self, extend: &mut tokio::time::Interval, by: Instant) {
        // Jobs that never started go back at once, not after the handlers.
        let unstarted: Vec<(i64, i32)> =
            self.waiting.drain(..).map(|j| (j.id, j.attempt)).collect();
        self.give_back(unstarted).await;
        let deadline = tokio::time::sleep_until(by);
        tokio::pin!(deadline);
        while !self.running.is_empty() {
            tokio::select! {
                Some(res) = self.running.join_next_with_id() => self.reap(res),
                _ = &mut deadline => break,
                _ = extend.tick() => self.extend().await,
            }
        }
        self.running.abort_all();
        while let Some(res) = self.running.join_next_with_id().await {
            self.reap(res);
        }
        // The last sender: the completer flushes what is pending and ends.
        self.done = None;
        if let Some(completer) = self.completer.take() {
            if let Err(e) = completer.await {
                tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: the completer task failed");
            }
        }
        let back: Vec<(i64, i32)> = self.slots.drain().map(|(_, claim)| claim).collect();
        self.give_back(back).await;
        // Ends with the completer; a vacuum under way is short and finished.
        if let Some(vacuumer) = self.vacuumer.take() {
            if let Err(e) = vacuumer.await {
                tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: the vacuum task failed");
            }
        }
    }

    /// Makes claimed jobs ready again at once, their attempt not counted.
    async fn give_back(&self, back: Vec<(i64, i32)>) {
        if back.is_empty() {
            return;
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = back.into_iter().unzip();
        let sql = &self.ctx.sql.give_back;
        let (channel, name) = (&self.ctx.jobs_channel, &*self.ctx.name);
        let res = self
            .ctx
            .with_client("giving jobs back", |client| async move {
                client
                    .execute_p(
                        sql,
                        &[
                            (&ids, Type::INT8_ARRAY),
                            (&attempts, Type::INT4_ARRAY),
                            (&channel, Type::TEXT),
                            (&name, Type::TEXT),
                        ],
                    )
                    .await
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(queue = %self.ctx.name, %e, "pg-pubsub: giving jobs back failed; they run again after the lease");
        }
    }
}
/// A claim on the wire: the claimed rows.
type Claim = Pin<Box<dyn Future<Output = Result<Vec<tokio_postgres::Row>>> + Send>>;

/// The claim under way, if any; never resolves without one (a `select!`
/// branch that is simply not taken).
async fn in_flight(claiming: &mut Option<(usize, Claim)>) -> Result<Vec<tokio_postgres::Row>> {
    match claiming {
        Some((_, claim)) => claim.await,
        None => std::future::pending().await,
    }
}

/// The next delivery of `sub`; never, without one (poll-only behind a
/// transaction pooler).
async fn next_of(sub: &mut Option<Subscription<crate::Text>>) -> Option<Delivery<crate::Text>> {
    match sub {
        Some(sub) => sub.next().await,
        None => std::future::pending().await,
    }
}

/// When to claim and how many: as many as there are free handlers, again
/// at once after a full batch (more may be due), else after a wake-up, a
/// finished job or a poll; after a failed claim, only at the next poll. A
/// wake-up that arrives while a claim is on the wire counts after it: the
/// claim's snapshot may predate the job that woke it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct ClaimPlan {
    /// Nothing says the queue is empty (a short claim did).
    drained: bool,
    held: bool,
    in_flight: bool,
    /// Woken while a claim was on the wire.
    woken_in_flight: bool,
}

impl ClaimPlan {
    /// How many jobs to claim now, with `busy` of `capacity` slots taken.
    fn next(&self, capacity: usize, busy: usize) -> Option<usize> {
        let free = capacity.saturating_sub(busy);
        (!self.drained && !self.held && !self.in_flight && free > 0).then_some(free)
    }

    /// A claim went on the wire.
    fn started(&mut self) {
        self.in_flight = true;
        self.woken_in_flight = false;
    }

    /// The claim asked for `asked` and got `got`.
    fn claimed(&mut self, asked: usize, got: usize) {
        self.in_flight = false;
        self.drained = got < asked && !std::mem::take(&mut self.woken_in_flight);
    }

    /// The claim failed: wait for the poll.
    fn failed(&mut self) {
        self.in_flight = false;
        self.held = true;
    }

    /// A wake-up for the queue, a gap, or a finished job.
    fn woken(&mut self) {
        self.drained = false;
        if self.in_flight {
            self.woken_in_flight = true;
        }
    }

    /// The poll interval passed.
    fn polled(&mut self) {
        self.drained = false;
        self.held = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_what_is_free_and_again_after_a_full_batch() {
        let mut plan = ClaimPlan::default();
        assert_eq!(plan.next(8, 3), Some(5));
        plan.claimed(5, 5);
        assert_eq!(plan.next(8, 8), None, "no free handler");
        assert_eq!(plan.next(8, 6), Some(2), "full batch: more may be due");
        plan.claimed(2, 1);
        assert_eq!(plan.next(8, 2), None, "short batch: wait for a reason");
        plan.woken();
        assert_eq!(plan.next(8, 2), Some(6));
    }

    #[test]
    fn a_wake_up_during_a_claim_outlives_its_short_answer() {
        let mut plan = ClaimPlan::default();
        plan.started();
        assert_eq!(plan.next(8, 0), None, "one claim at a time");
        plan.woken();
        plan.claimed(8, 2);
        assert_eq!(
            plan.next(8, 2),
            Some(6),
            "the job that woke it may be newer than its snapshot"
        );
        plan.started();
        plan.claimed(6, 0);
        assert_eq!(plan.next(8, 2), None, "drained, and nothing new since");
    }

    #[test]
    fn a_failed_claim_waits_for_the_poll_not_for_wake_ups() {
        let mut plan = ClaimPlan::default();
        plan.failed();
        plan.woken();
        assert_eq!(plan.next(4, 0), None);
        plan.polled();
        assert_eq!(plan.next(4, 0), Some(4));
        assert_eq!(plan.next(4, 9), None, "never negative");
    }
}
