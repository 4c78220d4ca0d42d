//! [`Ctx`]: what a worker's tasks (runner, attempts, completer, vacuum) share.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::store::Sql;
use super::Queue;

/// What a worker's tasks share.
pub(super) struct Ctx {
    pub(super) queue: Queue,
    pub(super) name: Arc<str>,
    pub(super) sql: Sql,
    pub(super) retry_base: Duration,
    pub(super) retry_max: Duration,
    /// Claims handed to the completer and not yet written: their leases
    /// are still extended, so a slow completion cannot make them run again.
    pub(super) completing: std::sync::Mutex<HashSet<(i64, i32)>>,
}

impl Ctx {
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
