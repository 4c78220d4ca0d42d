//! [`Ctx`]: what a worker's tasks (runner, attempts, completer, vacuum)
//! share. Narrow on purpose: the executor, the statements and the event
//! bus; not the handle (the tasks cannot reach the listener or the pool
//! other than through the executor).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::store::Sql;
use crate::error::{Origin, Result};
use crate::event::{Bus, QueueEvent};
use crate::exec::{Conn, Exec};

/// What a worker's tasks share.
pub(super) struct Ctx {
    pub(super) exec: Exec,
    /// The schema's wake-up channel for jobs.
    pub(super) jobs_channel: String,
    pub(super) events: Bus<QueueEvent>,
    pub(super) name: Arc<str>,
    pub(super) sql: Sql,
    pub(super) retry_base: Duration,
    pub(super) retry_max: Duration,
    /// How long finished jobs are kept (zero: completed ones are not).
    pub(super) history: Duration,
    /// A horizon holder open this long is reported.
    pub(super) horizon_after: Duration,
    /// Claims handed to the completer and not yet written: their leases
    /// are still extended, so a slow completion cannot make them run again.
    pub(super) completing: std::sync::Mutex<HashSet<(i64, i32)>>,
    /// Signalled after each batch of completions is written: a worker of
    /// a limited queue claims again then (the jobs no longer count).
    pub(super) completed: tokio::sync::Notify,
    /// The queue's metric handles (nothing without the `metrics` feature).
    pub(super) metrics: crate::record::QueueMetrics,
}

impl Ctx {
    /// Runs `f` on a pooled connection (the schema was installed before
    /// the worker started).
    pub(super) async fn with_client<R, F, Fut>(&self, stage: &'static str, f: F) -> Result<R>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<R, tokio_postgres::Error>>,
    {
        self.exec.run(Origin::Queue, stage, f).await
    }

    /// Runs `f` on the set of claims being completed.
    pub(super) fn completing<R>(&self, f: impl FnOnce(&mut HashSet<(i64, i32)>) -> R) -> R {
        // A panic elsewhere cannot leave the set half-changed: use it anyway.
        let mut set = self
            .completing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut set)
    }
}
