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
//! last one. `VACUUM (SKIP_LOCKED, TRUNCATE false)`: a vacuum already
//! under way (another worker's, autovacuum's) is not waited for, and the
//! file is not shrunk (that takes an exclusive lock on the hot table). A vacuum reads every index
//! whole, so on a table holding a large backlog it costs far more than the
//! jobs it cleans up after: the next one waits [`REST`] times as long as
//! the last one took (at most a tenth of a connection's time spent
//! vacuuming; 84 vacuums of 200 ms took as long as draining 400k jobs).
//!
//! VACUUM needs the table's owner (or the database owner, or a superuser):
//! without that, the worker says so once and leaves it to autovacuum. A
//! check that fails (a restarting server) is asked again next time.
//!
//! Each time it is due, the worker also looks for what holds back the
//! xmin horizon (see [`horizon`](super::horizon)) and reports it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::context::Ctx;
use super::horizon::{find_holder, Reporter};
use crate::event::QueueEvent;

/// Jobs a worker finishes between two of its vacuums, at least.
const MIN_JOBS: u64 = 5_000;
/// Of the live jobs in the table: the threshold grows with them.
const LIVE_SHARE: f64 = 0.05;
/// Jobs finished since the last vacuum that make a quiet moment worth one.
const IDLE_MIN_JOBS: u64 = 500;
/// No job finished for this long: the queue is quiet.
const IDLE_AFTER: Duration = Duration::from_millis(200);
/// After a vacuum, the next one waits this many times as long as it took.
const REST: u32 = 9;

/// When to vacuum: counts the jobs finished since the last vacuum.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    since: u64,
    threshold: u64,
    /// No vacuum before this (the rest after the last one).
    rested_at: Option<Instant>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            since: 0,
            threshold: MIN_JOBS,
            rested_at: None,
        }
    }
}

impl Plan {
    /// `n` more jobs finished by `now`; true if it is time to vacuum.
    pub(super) fn finished(&mut self, n: u64, now: Instant) -> bool {
        self.since = self.since.saturating_add(n);
        self.since >= self.threshold && self.rest_left(now).is_zero()
    }

    /// Whether a quiet moment should be used for a vacuum.
    pub(super) fn idle(&self) -> bool {
        self.since >= IDLE_MIN_JOBS
    }

    /// How long until the rest after the last vacuum is over.
    pub(super) fn rest_left(&self, now: Instant) -> Duration {
        self.rested_at
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now))
    }

    /// A vacuum that took `took` ended at `now` (or was skipped: zero);
    /// `live` is the table's live jobs.
    pub(super) fn vacuumed(&mut self, live: u64, took: Duration, now: Instant) {
        self.since = 0;
        self.threshold = MIN_JOBS.max((live as f64 * LIVE_SHARE) as u64);
        self.rested_at = Some(now + took * REST);
    }
}

/// Whether this worker may vacuum: asked until the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rights {
    Unknown,
    Allowed,
    Denied,
}

impl Rights {
    /// The state after a check: an error leaves it unknown (asked again).
    fn after(self, check: Option<bool>) -> Rights {
        match (self, check) {
            (Rights::Unknown, Some(true)) => Rights::Allowed,
            (Rights::Unknown, Some(false)) => Rights::Denied,
            (state, _) => state,
        }
    }
}

/// How often a holder that stays the oldest is reported again.
const HORIZON_REPEAT: Duration = Duration::from_secs(300);

/// Vacuums as the counts of finished jobs arriving on `rx` call for;
/// ends when the sender (the completer) is gone.
pub(super) async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<u64>) {
    let mut plan = Plan::default();
    let mut rights = Rights::Unknown;
    let mut reporter = Reporter::new(ctx.horizon_after, HORIZON_REPEAT);
    loop {
        let due = if plan.idle() {
            let quiet = IDLE_AFTER.max(plan.rest_left(Instant::now()));
            match tokio::time::timeout(quiet, rx.recv()).await {
                Ok(Some(n)) => plan.finished(n, Instant::now()),
                Ok(None) => return,
                Err(_) => true, // quiet, and rested
            }
        } else {
            match rx.recv().await {
                Some(n) => plan.finished(n, Instant::now()),
                None => return,
            }
        };
        if !due {
            continue;
        }
        check_horizon(&ctx, &mut reporter).await;
        if rights == Rights::Unknown {
            rights = rights.after(may_vacuum(&ctx).await);
        }
        if rights != Rights::Allowed {
            // Denied for good, or unknown for now: counted again from zero.
            plan.vacuumed(0, Duration::ZERO, Instant::now());
            continue;
        }
        let started = Instant::now();
        let res = vacuum(&ctx).await;
        let (now, took) = (Instant::now(), started.elapsed());
        match res {
            Ok(live) => {
                tracing::debug!(queue = %ctx.name, live, ?took, "pg-pubsub: vacuumed the jobs table");
                plan.vacuumed(live, took, now);
            }
            Err(e) => {
                tracing::warn!(queue = %ctx.name, %e, "pg-pubsub: vacuuming the jobs table failed");
                plan.vacuumed(0, took, now);
            }
        }
    }
}

/// Reports the oldest holder of the xmin horizon when it is worth it.
async fn check_horizon(ctx: &Ctx, reporter: &mut Reporter) {
    let found = ctx
        .with_client("finding the xmin horizon", |client| async move {
            find_holder(&client).await
        })
        .await;
    match found {
        Ok(holder) => {
            if reporter.should_report(holder.as_ref(), tokio::time::Instant::now()) {
                if let Some(holder) = holder {
                    tracing::warn!(queue = %ctx.name, ?holder, "pg-pubsub: a transaction holds back the xmin horizon: claims slow down until it ends");
                    ctx.events.emit(QueueEvent::HorizonHeld {
                        queue: ctx.name.clone(),
                        holder,
                    });
                }
            }
        }
        Err(e) => {
            tracing::debug!(queue = %ctx.name, %e, "pg-pubsub: could not look up the xmin horizon")
        }
    }
}

/// Whether this session may vacuum the jobs table (`None`: the check
/// failed); says so once if not.
async fn may_vacuum(ctx: &Ctx) -> Option<bool> {
    let sql = &ctx.sql.may_vacuum;
    let res = ctx
        .with_client("checking vacuum rights", |client| async move {
            let rows = client.query_p(sql, &[]).await?;
            Ok(rows.first().is_some_and(|row| row.get::<_, bool>(0)))
        })
        .await;
    match res {
        Ok(true) => Some(true),
        Ok(false) => {
            tracing::info!(queue = %ctx.name, "pg-pubsub: this role does not own the jobs table, so the worker leaves vacuuming it to autovacuum");
            Some(false)
        }
        Err(e) => {
            tracing::warn!(queue = %ctx.name, %e, "pg-pubsub: could not check the right to vacuum the jobs table; asking again next time");
            None
        }
    }
}

/// `VACUUM (SKIP_LOCKED, TRUNCATE false)` of the jobs table; returns its live rows after.
async fn vacuum(ctx: &Ctx) -> crate::error::Result<u64> {
    let (vacuum, live) = (&ctx.sql.vacuum, &ctx.sql.live_jobs);
    ctx.with_client("vacuuming the jobs table", |client| async move {
        // Not in a transaction block: a simple query of its own.
        client.batch_execute(vacuum).await?;
        let rows = client.query_p(live, &[]).await?;
        let n: i64 = rows.first().map_or(0, |row| row.get(0));
        Ok(n.max(0) as u64)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_min_jobs() {
        let (mut plan, now) = (Plan::default(), Instant::now());
        assert!(!plan.finished(MIN_JOBS - 1, now));
        assert!(plan.finished(1, now));
        plan.vacuumed(0, Duration::ZERO, now);
        assert!(!plan.idle());
        assert!(!plan.finished(1, now));
    }

    #[test]
    fn threshold_grows_with_live_jobs() {
        let (mut plan, now) = (Plan::default(), Instant::now());
        plan.vacuumed(1_000_000, Duration::ZERO, now);
        assert!(!plan.finished(MIN_JOBS, now));
        assert!(plan.finished(50_000 - MIN_JOBS, now));
        plan.vacuumed(10, Duration::ZERO, now);
        assert!(plan.finished(MIN_JOBS, now), "back to the minimum");
    }

    #[test]
    fn a_long_vacuum_is_followed_by_a_longer_rest() {
        let (mut plan, now) = (Plan::default(), Instant::now());
        plan.vacuumed(0, Duration::from_millis(200), now);
        assert_eq!(plan.rest_left(now), Duration::from_millis(1800));
        assert!(
            !plan.finished(MIN_JOBS * 10, now),
            "enough jobs, still resting"
        );
        let later = now + Duration::from_millis(1800);
        assert!(
            plan.finished(0, later),
            "rested: the jobs counted meanwhile make it due"
        );
    }

    #[test]
    fn a_failed_rights_check_is_asked_again() {
        assert_eq!(Rights::Unknown.after(None), Rights::Unknown);
        assert_eq!(Rights::Unknown.after(Some(true)), Rights::Allowed);
        assert_eq!(Rights::Unknown.after(Some(false)), Rights::Denied);
        assert_eq!(Rights::Denied.after(Some(true)), Rights::Denied);
    }

    #[test]
    fn quiet_moment_needs_some_jobs() {
        let (mut plan, now) = (Plan::default(), Instant::now());
        assert!(!plan.idle());
        plan.finished(IDLE_MIN_JOBS - 1, now);
        assert!(!plan.idle());
        plan.finished(1, now);
        assert!(plan.idle());
        plan.vacuumed(0, Duration::ZERO, now);
        assert!(!plan.idle());
    }
}
