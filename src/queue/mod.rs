//! Work queue: each job done once across a fleet of workers, with retries,
//! leases, dead jobs, and enqueueing inside the caller's transaction.
//!
//! ```no_run
//! # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
//! let queue = pubsub.queue();
//! queue.enqueue("emails", &serde_json::json!({"to": "a@b"})).await?;
//! let worker = queue
//!     .worker("emails")
//!     .concurrency(8)
//!     .run(|job| async move {
//!         let mail: serde_json::Value = job.json()?;
//!         println!("attempt {}: {mail}", job.attempt());
//!         Ok::<_, pg_pubsub::Error>(())
//!     })
//!     .await?;
//! // ... later:
//! worker.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! From SQL (a trigger, another language):
//! `SELECT pgpubsub.enqueue('emails', '{"to":"a@b"}')`, with optional
//! `p_run_at`, `p_priority`, `p_max_attempts`, `p_unique_key`.
//!
//! ## The tables
//!
//! In the crate's schema ([`schema_sql`](crate::schema::schema_sql)):
//! * `jobs(id, queue, state, priority, run_at, attempt, max_attempts,
//!   lease_until, unique_key, last_error, created_at, payload)`: only jobs
//!   that are `ready` (due or scheduled) or `running`. A completed job is
//!   deleted, a dead one moved to `dead_jobs`: the claim index holds live
//!   work only. Its dead entries (the `ready` versions of claimed jobs)
//!   are removed by VACUUM, which workers also run themselves
//!   ([`WorkerBuilder::vacuum`]), so claiming costs the same after
//!   millions of jobs, as long as no transaction holds back the xmin
//!   horizon (then each claim walks over every job claimed since:
//!   [`Queue::horizon_holder`] names it, workers report it as
//!   [`QueueEvent::HorizonHeld`]). No CHECK constraints: PostgreSQL re-plans them in
//!   every writing statement (a fifth of a one-job insert).
//! * `dead_jobs`: jobs that failed their last attempt, with the error.
//! * `finished_jobs`: completed jobs (with their output) and cancelled
//!   ones, moved there by the completion statement itself
//!   (`WITH d AS (DELETE … RETURNING …) INSERT INTO finished_jobs …`), kept
//!   for the workers' [`history`](WorkerBuilder::history) (default 1 day).
//! * `paused_queues`: a row per paused queue ([`Queue::pause`]).
//! * functions `enqueue`, `enqueue_many`, `claim`, `fail`, `rescue` (returns
//!   the rescued jobs: id, attempt, dead, error), `retry_dead`, `cancel`.
//!
//! ## Control
//!
//! [`Queue::cancel`] removes a waiting job (it never runs) or sets
//! `cancel_requested` on a running one and sends `cancel <id>` on
//! `<schema>_queue_ctl`; the worker holding it sets the job's signal
//! ([`Job::cancelled`]); the lease extension also returns cancelled ids (the
//! fallback). Whatever the handler returns then, the job ends cancelled: the
//! completion statement, `fail` and `rescue` all check `cancel_requested`.
//! [`Queue::pause`] inserts into `paused_queues` and sends `pause <queue>`;
//! workers stop claiming at once and re-read the table every poll. A handler
//! returning [`Outcome::Snooze`] makes its job ready later with its attempt
//! given back (as at shutdown).
//!
//! ## Claiming, leases, retries
//!
//! A worker claims, in one statement, up to its free handlers plus a
//! prefetch ([`WorkerBuilder::prefetch`]; by default it adapts, from the
//! concurrency up to 256, so that fast handlers never wait for a claim's
//! round trip) (`FOR UPDATE SKIP LOCKED`, setting `state`, `attempt` and
//! `lease_until`); the claim runs while handlers finish and start;
//! workers woken together take disjoint jobs without waiting on each
//! other. Each job's handler runs in a task of its own; finished jobs are
//! deleted in batches by a completer task on another pooled connection
//! (whatever finished while its last `DELETE` ran goes in the next one),
//! so completing overlaps with claiming. `(id, attempt)` is the claim:
//! completing, failing and extending the lease check it, so a worker that
//! lost its lease cannot complete a job someone else now runs. Leases are
//! extended every third of their length while the handler runs (one
//! statement for all the worker's jobs); every poll, a worker makes jobs
//! whose lease expired ready again, or dead if that was their last attempt
//! (a dead worker's jobs run again after the lease), and emits
//! [`JobRetried`](crate::event::QueueEvent::JobRetried) or
//! [`JobDead`](crate::event::QueueEvent::JobDead) for them. At least once:
//! the handler gets the attempt number ([`Job::attempt`]), and
//! [`Job::complete_tx`] completes the job in the
//! handler's own transaction for an exactly-once effect.
//!
//! A handler returns `Ok(())` or `Ok(`[`Outcome`]`)`: done, done with an
//! output ([`Outcome::json`], at most [`MAX_OUTPUT_BYTES`]), or snoozed.
//! A failed attempt (`Err` or a panic) is retried after
//! `min(max, base * 2^(attempt-1))` scaled by a random factor in
//! `[0.5, 1]` (defaults: 1 s and 1 h), until `max_attempts` (default 25);
//! then the job is dead ([`Queue::dead_jobs`], [`Queue::retry_dead`],
//! [`Queue::delete_dead`]).
//!
//! ## Limits
//!
//! [`Queue::set_limits`] stores a queue's [`Limits`] in `queue_limits`:
//! at most N jobs running at once, at most N running per key
//! ([`Enqueue::key`], column `concurrency_key`), at most N started per
//! interval (a fixed window kept in the row). Every worker reads whether
//! its queue has a row at start and at each poll; without one it claims
//! with the plain statement above (no cost), with one through the
//! `claim_limited` function, which takes a transaction advisory lock per
//! queue and then counts the queue's running jobs (on `jobs_lease`) and
//! the running jobs of the candidate keys. The counts come after the lock
//! in a statement of their own, so they see every claim committed before
//! it; jobs claimed and waiting in a worker (prefetched) count as running.
//! Completions, failures and rescues only lower the counts and take no
//! lock. A worker held back by a limit claims again when its own
//! completions are written, on a wake-up, or at its next poll.
//!
//! ## Wake-ups
//!
//! `enqueue` sends `pg_notify('<schema>_jobs', queue)`: the same payload
//! for every job of a transaction, so the server sends one notification
//! per queue per transaction. [`Queue::enqueue`], which commits by itself,
//! sends it after the commit instead, merged with what its handle enqueues
//! meanwhile (one notifying commit for many enqueuers). Workers listen on the instance's listener
//! connection and also poll (default every second), so a lost
//! notification only delays. Jobs scheduled for later send none; they are
//! found by the poll (so they may start up to one poll interval late,
//! never early).

mod admin;
mod attempt;
mod completer;
mod context;
mod control;
mod enqueue;
mod horizon;
mod job;
mod limits;
mod outcome;
mod prefetch;
mod runner;
mod store;
mod vacuum;
mod worker;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::OnceCell;

pub use crate::event::QueueEvent;
pub use admin::{DeadJob, QueueStats};
pub use control::{Cancelled, FinishedJob, FinishedState};
pub use enqueue::{Batch, Enqueue, EnqueueBatch, Enqueued, OwnTransaction};
pub use horizon::{HolderKind, HorizonHolder};
pub use job::Job;
pub use limits::{Limits, Rate};
pub use outcome::{IntoOutcome, JobOutput, Outcome, MAX_OUTPUT_BYTES};
pub use worker::{Worker, WorkerBuilder};

use crate::client::PgPubSub;
use crate::error::{Error, Origin, Result};
use crate::schema::SchemaName;

/// The longest queue name accepted, in bytes.
const MAX_QUEUE_BYTES: usize = 200;

/// Work queues in one schema, through a [`PgPubSub`]. Cheap to clone.
///
/// Made by [`PgPubSub::queue`] or [`Queue::with_schema`]. The schema is
/// installed on first use (or by [`install`](Self::install)).
#[derive(Clone)]
pub struct Queue {
    /// Every statement runs here.
    pub(crate) exec: crate::exec::Exec,
    /// The listener (wake-ups), events and services only.
    pub(crate) pubsub: PgPubSub,
    pub(crate) schema: SchemaName,
    installed: Arc<OnceCell<()>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("schema", &self.schema)
            .finish()
    }
}

impl PgPubSub {
    /// Work queues in the default schema (`pgpubsub`).
    pub fn queue(&self) -> Queue {
        Queue {
            exec: self.exec().clone(),
            pubsub: self.clone(),
            schema: SchemaName::default(),
            installed: Arc::new(OnceCell::new()),
        }
    }

    /// Enqueues `payload` on `queue` in the default schema, as
    /// [`Queue::enqueue`] does (set options on the returned [`Enqueue`],
    /// then await it). Keep a [`Queue`] to enqueue often: each new one
    /// checks the schema version once.
    pub fn enqueue<'a, P: crate::Encode>(&self, queue: &'a str, payload: P) -> Enqueue<'a, P> {
        Enqueue::new(
            std::borrow::Cow::Owned(self.queue()),
            queue,
            payload,
            OwnTransaction,
        )
    }
}

/// Checks a queue name: 1 to 200 bytes, no NUL.
pub(crate) fn check_queue(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('\0') || name.len() > MAX_QUEUE_BYTES {
        return Err(Error::new(
            Origin::InvalidName,
            format!("queue name must be 1 to {MAX_QUEUE_BYTES} bytes, without NUL"),
        ));
    }
    Ok(())
}

impl Queue {
    /// Work queues of the same handle in another `schema` (a lowercase
    /// identifier of at most 40 bytes).
    pub fn with_schema(&self, schema: &str) -> Result<Queue> {
        Ok(Queue {
            exec: self.exec.clone(),
            pubsub: self.pubsub.clone(),
            schema: SchemaName::new(schema)?,
            installed: Arc::new(OnceCell::new()),
        })
    }

    /// The schema.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The [`PgPubSub`] this uses.
    pub fn pubsub(&self) -> &PgPubSub {
        &self.pubsub
    }

    /// Creates or upgrades the schema (the same installer as durable
    /// channels). Safe when several processes install at once.
    pub async fn install(&self) -> Result<()> {
        crate::schema::ensure(&self.pubsub, &self.schema, &self.installed).await
    }

    /// Runs `f` on a pooled connection (installing the schema first) within
    /// the notify timeout.
    pub(crate) async fn with_client<R, F, Fut>(&self, stage: &'static str, f: F) -> Result<R>
    where
        F: FnOnce(crate::exec::Conn) -> Fut,
        Fut: Future<Output = Result<R, tokio_postgres::Error>>,
    {
        self.install().await?;
        self.exec.run(Origin::Queue, stage, f).await
    }

    /// Job events (retries, dead jobs) of the workers of this handle's
    /// [`PgPubSub`] (every schema) from now on. Bounded and lossy (see
    /// [`Events`](crate::event::Events)).
    pub fn events(&self) -> crate::event::Events<QueueEvent> {
        self.pubsub.inner.buses.queue.subscribe()
    }

    /// `schema.name`, for building statements.
    pub(crate) fn obj(&self, name: &str) -> String {
        format!("{}.{name}", self.schema.as_str())
    }
}
