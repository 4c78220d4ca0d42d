//! A claimed job, as a handler sees it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_postgres::types::Type;

use crate::error::{Error, Origin, Result, Stage};
use crate::truncate::Text;
use crate::tx::Executor;

/// A job claimed by a [`Worker`](super::Worker), handed to its handler.
pub struct Job {
    pub(super) id: i64,
    pub(super) queue: Arc<str>,
    pub(super) attempt: i32,
    pub(super) max_attempts: i32,
    pub(super) priority: i16,
    pub(super) created_at: SystemTime,
    pub(super) payload: String,
    /// `DELETE ... WHERE id AND attempt` for [`Job::complete_tx`].
    pub(super) complete_sql: Arc<str>,
    /// Set by `complete_tx`: the worker need not complete it again.
    pub(super) completed: Arc<AtomicBool>,
    /// Set (to `true`) when the job is cancelled while held.
    pub(super) cancel: Arc<watch::Sender<bool>>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .field("attempt", &self.attempt)
            .field("max_attempts", &self.max_attempts)
            .field("payload", &Text(&self.payload))
            .finish()
    }
}

impl Job {
    /// A job to unit-test a handler with, without a server or a worker:
    /// id 1, attempt 1 of 25, priority 0, created now. It belongs to no
    /// claim: [`complete_tx`](Self::complete_tx) on it fails.
    ///
    /// ```
    /// let job = pg_pubsub::queue::Job::for_test("emails", r#"{"to":"a@example.com"}"#);
    /// assert_eq!(job.queue(), "emails");
    /// ```
    pub fn for_test(queue: &str, payload: impl Into<String>) -> Job {
        Job {
            id: 1,
            queue: Arc::from(queue),
            attempt: 1,
            max_attempts: 25,
            priority: 0,
            created_at: SystemTime::now(),
            payload: payload.into(),
            // Matches no row: a test job's completion is a lost claim.
            complete_sql: Arc::from("SELECT 1 WHERE false"),
            completed: Arc::new(AtomicBool::new(false)),
            cancel: Arc::new(watch::Sender::new(false)),
        }
    }

    /// A [`for_test`](Self::for_test) job, and a function that cancels it
    /// (as [`Queue::cancel`](super::Queue::cancel) would), to test how a
    /// handler reacts.
    pub fn for_test_cancellable(
        queue: &str,
        payload: impl Into<String>,
    ) -> (Job, impl Fn() + Send + Sync + 'static) {
        let job = Job::for_test(queue, payload);
        let cancel = job.cancel.clone();
        (job, move || {
            cancel.send_replace(true);
        })
    }

    /// Whether the job was cancelled ([`Queue::cancel`](super::Queue::cancel))
    /// while it ran. The job then ends as cancelled whatever the handler
    /// returns: finish early, undo what should be undone.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves once the job is cancelled (at once if it is already);
    /// never resolves otherwise. Race it against the work:
    /// `tokio::select! { r = work => r, _ = job.cancelled() => Ok(()) }`.
    /// A cancellation reaches the worker running the job by a notification
    /// (within a second, usually milliseconds), or, if that is lost, at
    /// its next lease extension (a third of the lease).
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        // Err: the sender is in `self`, it cannot be gone.
        let _ = rx.wait_for(|c| *c).await;
    }
    /// The job's id (stable across attempts, and in `dead_jobs`).
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// This attempt's number: 1 for the first run.
    pub fn attempt(&self) -> i32 {
        self.attempt
    }

    /// The attempts allowed before the job is dead.
    pub fn max_attempts(&self) -> i32 {
        self.max_attempts
    }

    /// The job's priority (higher runs first).
    pub fn priority(&self) -> i16 {
        self.priority
    }

    /// When the job was enqueued (server clock).
    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    /// The payload text.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// The payload decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.payload).map_err(|e| {
            Error::new(
                Origin::Serialize,
                format!("job {} payload is not the expected JSON: {e}", self.id),
            )
            .with_source(e)
        })
    }

    /// Completes the job inside the caller's transaction (on the handler's
    /// own connection): the handler's database work and the completion
    /// commit together, or neither does. Fails with [`ErrorKind::Conflict`](crate::ErrorKind::Conflict)
    /// when this claim is no longer current (the lease expired and the job
    /// was made ready or taken by another worker): roll back then.
    ///
    /// The job is kept in `finished_jobs` (without an output) whatever the
    /// worker's history setting; a job cancelled meanwhile is kept as
    /// cancelled.
    ///
    /// Once this succeeds the worker does not complete the job again when
    /// the handler returns `Ok`; if the transaction then rolls back anyway,
    /// the job stays running until its lease expires and then runs again.
    pub async fn complete_tx<E: Executor + ?Sized>(&self, tx: &E) -> Result<()> {
        let n = crate::tx::execute(
            tx,
            &self.complete_sql,
            &[(&self.id, Type::INT8), (&self.attempt, Type::INT4)],
        )
        .await
        .map_err(|e| Error::pg(Origin::Queue, "completing a job in transaction", e))?;
        if n == 0 {
            return Err(Error::new(
                Origin::Conflict,
                format!(
                    "job {} attempt {}: the claim was lost (lease expired); roll back",
                    self.id, self.attempt
                ),
            )
            .at(Stage::Queue));
        }
        self.completed.store(true, Ordering::Release);
        Ok(())
    }
}
