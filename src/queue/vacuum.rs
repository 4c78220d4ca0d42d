//! Vacuuming the jobs table from the worker, between autovacuum runs.
//!
//! Every claimed job leaves a dead entry at the head of the claim index
//! (its `ready` version), and every finished one a dead row. Until VACUUM
//! removes them, each claim walks over them: after a few million jobs
//! between two autovacuum runs (`autovacuum_naptime` is a minute by
//! default, and only server-wide), one claim took 28 times as long as on a
//! fresh table. So a worker vacuums the table itself, as [`Plan`] decides:
//! after every [`MIN_JOBS`] jobs it finished (more once the table holds
//! many live jobs, since a vacuum reads every index whole), and when its
//! queue falls quiet with at least [`IDLE_MIN_JOBS`] finished since the
//! last one. `VACUUM (SKIP_LOCKED)`: a vacuum already under way (another
//! worker's, autovacuum's) is not waited for.
//!
//! VACUUM needs the table's owner (or the database owner, or a superuser):
//! without that, the worker says so once and leaves it to autovacuum.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::context::Ctx;

/// Jobs a worker finishes between two of its vacuums, at least.
const MIN_JOBS: u64 = 5_000;
/// Of the live jobs in the table: the threshold grows with them.
const LIVE_SHARE: f64 = 0.05;
/// Jobs finished since the last vacuum that make a quiet moment worth one.
const IDLE_MIN_JOBS: u64 = 500;
/// No job finished for this long: the queue is quiet.
const IDLE_AFTER: Duration = Duration::from_millis(200);

/// When to vacuum: counts the jobs finished since the last vacuum.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    since: u64,
    threshold: u64,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            since: 0,
            threshold: MIN_JOBS,
        }
    }
}

impl Plan {
    /// `n` more jobs finished; true if it is time to vacuum.
    pub(super) fn finished(&mut self, n: u64) -> bool {
        self.since = self.since.saturating_add(n);
        self.since >= self.threshold
    }

    /// Whether a quiet moment should be used for a vacuum.
    pub(super) fn idle(&self) -> bool {
        self.since >= IDLE_MIN_JOBS
    }

    /// A vacuum ran (or was skipped); `live` is the table's live jobs.
    pub(super) fn vacuumed(&mut self, live: u64) {
        self.since = 0;
        self.threshold = MIN_JOBS.max((live as f64 * LIVE_SHARE) as u64);
    }
}

/// Vacuums as the counts of finished jobs arriving on `rx` call for;
/// ends when the sender (the completer) is gone.
pub(super) async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<u64>) {
    let mut plan = Plan::default();
    let mut allowed = None;
    loop {
        let due = if plan.idle() {
            match tokio::time::timeout(IDLE_AFTER, rx.recv()).await {
                Ok(Some(n)) => plan.finished(n),
                Ok(None) => return,
                Err(_) => true, // quiet
            }
        } else {
            match rx.recv().await {
                Some(n) => plan.finished(n),
                None => return,
            }
        };
        if !due {
            continue;
        }
        if allowed.is_none() {
            allowed = Some(may_vacuum(&ctx).await);
        }
        if allowed != Some(true) {
            return; // the completer ignores a closed channel
        }
        let started = std::time::Instant::now();
        match vacuum(&ctx).await {
            Ok(live) => {
                tracing::debug!(queue = %ctx.name, live, took = ?started.elapsed(), "pg-pubsub: vacuumed the jobs table");
                plan.vacuumed(live);
            }
            Err(e) => {
                tracing::warn!(queue = %ctx.name, %e, "pg-pubsub: vacuuming the jobs table failed");
                plan.vacuumed(0);
            }
        }
    }
}

/// Whether this session may vacuum the jobs table; says so once if not.
async fn may_vacuum(ctx: &Ctx) -> bool {
    let sql = &ctx.sql.may_vacuum;
    let res = ctx
        .with_client("checking vacuum rights", |client| async move {
            Ok(client.query_one(sql.as_str(), &[]).await?.get::<_, bool>(0))
        })
        .await;
    match res {
        Ok(true) => true,
        Ok(false) => {
            tracing::info!(queue = %ctx.name, "pg-pubsub: this role does not own the jobs table, so the worker leaves vacuuming it to autovacuum");
            false
        }
        Err(e) => {
            tracing::warn!(queue = %ctx.name, %e, "pg-pubsub: could not check the right to vacuum the jobs table; leaving it to autovacuum");
            false
        }
    }
}

/// `VACUUM (SKIP_LOCKED)` of the jobs table; returns its live rows after.
async fn vacuum(ctx: &Ctx) -> crate::error::Result<u64> {
    let (vacuum, live) = (&ctx.sql.vacuum, &ctx.sql.live_jobs);
    ctx.with_client("vacuuming the jobs table", |client| async move {
        // Not in a transaction block: a simple query of its own.
        client.batch_execute(vacuum).await?;
        let n: i64 = client.query_one(live.as_str(), &[]).await?.get(0);
        Ok(n.max(0) as u64)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_min_jobs() {
        let mut plan = Plan::default();
        assert!(!plan.finished(MIN_JOBS - 1));
        assert!(plan.finished(1));
        plan.vacuumed(0);
        assert!(!plan.idle());
        assert!(!plan.finished(1));
    }

    #[test]
    fn threshold_grows_with_live_jobs() {
        let mut plan = Plan::default();
        plan.vacuumed(1_000_000);
        assert!(!plan.finished(MIN_JOBS));
        assert!(plan.finished(50_000 - MIN_JOBS));
        plan.vacuumed(10);
        assert!(plan.finished(MIN_JOBS), "back to the minimum");
    }

    #[test]
    fn quiet_moment_needs_some_jobs() {
        let mut plan = Plan::default();
        assert!(!plan.idle());
        plan.finished(IDLE_MIN_JOBS - 1);
        assert!(!plan.idle());
        plan.finished(1);
        assert!(plan.idle());
        plan.vacuumed(0);
        assert!(!plan.idle());
    }
}
