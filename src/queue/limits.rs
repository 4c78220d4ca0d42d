//! Per-queue limits, stored in `queue_limits` and enforced by the claim
//! of every worker of the fleet (see `claim_limited` in
//! `functions/limits.sql`).

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{check_queue, Queue};
use crate::error::{Error, Origin, Result};

/// The limits of one queue, for [`Queue::set_limits`]; each is off unless
/// set. They hold across every worker and process of the queue.
///
/// ```no_run
/// # async fn demo(queue: pg_pubsub::queue::Queue) -> Result<(), pg_pubsub::Error> {
/// use pg_pubsub::queue::Limits;
/// use std::time::Duration;
/// let limits = Limits::new()
///     .concurrency(3)
///     .per_key(1)
///     .rate(100, Duration::from_secs(60));
/// queue.set_limits("emails", limits).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Jobs of the queue running at once, at most.
    pub concurrency: Option<u32>,
    /// Running jobs per key ([`Enqueue::key`](super::Enqueue::key)), at
    /// most. 1 runs each key's jobs one at a time, in claim order.
    pub per_key: Option<u32>,
    /// Jobs started per interval, at most.
    pub rate: Option<Rate>,
}

/// A rate limit: at most `count` jobs started per `per`, in fixed windows
/// (a window opens at the first start after the previous one closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Starts per window.
    pub count: u32,
    /// The window's length.
    pub per: Duration,
}

impl Limits {
    /// No limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `n` jobs of the queue running at once (claimed and not yet
    /// completed or failed, including those a worker prefetched).
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// At most `n` running jobs per key; jobs without a key are not
    /// limited by it.
    pub fn per_key(mut self, n: u32) -> Self {
        self.per_key = Some(n);
        self
    }

    /// At most `count` starts per `per`.
    pub fn rate(mut self, count: u32, per: Duration) -> Self {
        self.rate = Some(Rate { count, per });
        self
    }

    /// Whether no limit is set.
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    fn check(&self) -> Result<()> {
        let fits = |n: Option<u32>| n.is_none_or(|n| n >= 1 && n <= i32::MAX as u32);
        let rate_ok = self
            .rate
            .is_none_or(|r| fits(Some(r.count)) && r.per >= Duration::from_millis(1));
        if !fits(self.concurrency) || !fits(self.per_key) || !rate_ok {
            return Err(Error::new(
                Origin::Config,
                "queue limits must be at least 1 (and fit an i32), a rate's interval at least 1 ms",
            ));
        }
        Ok(())
    }
}

/// Reads the limit columns `concurrency, per_key, rate_count, rate_interval
/// (in seconds)` starting at column `at` of `row`.
pub(super) fn from_row(row: &tokio_postgres::Row, at: usize) -> Limits {
    let n = |i: usize| row.get::<_, Option<i32>>(at + i).map(|n| n.max(1) as u32);
    let secs: Option<f64> = row.get(at + 3);
    Limits {
        concurrency: n(0),
        per_key: n(1),
        rate: n(2).zip(secs).map(|(count, secs)| Rate {
            count,
            per: Duration::from_secs_f64(secs.max(0.001)),
        }),
    }
}

impl Queue {
    /// Sets the limits of `queue` (replacing any it had; [`Limits::new`]
    /// removes them). Running workers take them up at their next poll
    /// ([`WorkerBuilder::poll_interval`](super::WorkerBuilder::poll_interval)),
    /// new ones at once. A queue without limits is claimed as fast as
    /// before; one with limits serialises its claims across the fleet (one
    /// short statement each).
    pub async fn set_limits(&self, queue: &str, limits: Limits) -> Result<()> {
        check_queue(queue)?;
        limits.check()?;
        let t = self.obj("queue_limits");
        if limits.is_none() {
            let sql = format!("DELETE FROM {t} WHERE queue = $1");
            return self
                .with_client("removing queue limits", |client| async move {
                    client
                        .execute_p(&sql, &[(&queue, Type::TEXT)])
                        .await
                        .map(drop)
                })
                .await;
        }
        let sql = format!(
            "INSERT INTO {t} AS l (queue, concurrency, per_key, rate_count, rate_interval) \
             VALUES ($1, $2, $3, $4, make_interval(secs => $5::float8)) \
             ON CONFLICT (queue) DO UPDATE SET concurrency = excluded.concurrency, \
               per_key = excluded.per_key, rate_count = excluded.rate_count, \
               rate_interval = excluded.rate_interval, updated_at = now(), \
               window_start = CASE WHEN l.rate_interval IS NOT DISTINCT FROM excluded.rate_interval \
                              THEN l.window_start END"
        );
        let int = |n: Option<u32>| n.map(|n| n as i32);
        let (c, k, r) = (
            int(limits.concurrency),
            int(limits.per_key),
            int(limits.rate.map(|r| r.count)),
        );
        let secs = limits.rate.map(|r| r.per.as_secs_f64());
        self.with_client("setting queue limits", |client| async move {
            client
                .execute_p(
                    &sql,
                    &[
                        (&queue, Type::TEXT),
                        (&c, Type::INT4),
                        (&k, Type::INT4),
                        (&r, Type::INT4),
                        (&secs, Type::FLOAT8),
                    ],
                )
                .await
                .map(drop)
        })
        .await
    }

    /// The limits of `queue` ([`Limits::is_none`] when it has none).
    pub async fn limits(&self, queue: &str) -> Result<Limits> {
        check_queue(queue)?;
        let sql = format!(
            "SELECT concurrency, per_key, rate_count, \
               extract(epoch FROM rate_interval)::float8 FROM {} WHERE queue = $1",
            self.obj("queue_limits")
        );
        self.with_client("reading queue limits", |client| async move {
            let row = client.query_opt_p(&sql, &[(&queue, Type::TEXT)]).await?;
            Ok(row.map(|r| from_row(&r, 0)).unwrap_or_default())
        })
        .await
    }
}
