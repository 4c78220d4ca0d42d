//! Leases: an election held in a table row (`<schema>.leases`), for where
//! no server session is ours to hold an advisory lock on (behind a pooler
//! in transaction mode).
//!
//! One statement acquires or renews: it inserts the row, or takes it over
//! when it is ours or has expired by the server's clock, and returns the
//! term (which grows on every change of holder). The holder renews every
//! third of the lease and considers it lost once the lease has passed
//! since its last successful attempt was *sent*: the server stamped the
//! expiry after that, so nobody else can hold it before then. Releasing
//! makes it expire now; a standby then takes it at its next try.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::types::Type;

use crate::client::PgPubSub;
use crate::error::{Error, Origin, Result};
use crate::exec::Exec;
use crate::schema::SchemaName;

/// What one attempt to acquire or renew came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Ours, in this term.
    Won(u64),
    /// Someone else holds it and it has not expired.
    Refused,
    /// The statement failed or timed out: nothing is known.
    Failed,
}

/// Whether the lease is held, as far as this holder can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Standby,
    /// Held in `term` until `until` (local clock) unless renewed.
    Held {
        term: u64,
        until: Instant,
    },
}

/// A holder's decisions, without I/O: when to try next, and whether it
/// holds the lease now.
#[derive(Debug)]
pub(crate) struct Plan {
    state: State,
    duration: Duration,
    retry: Duration,
    next: Instant,
    /// It held the lease at some point (so release it at the end).
    won: bool,
}

impl Plan {
    pub(crate) fn new(duration: Duration, retry: Duration, now: Instant) -> Plan {
        Plan {
            state: State::Standby,
            duration,
            retry,
            next: now,
            won: false,
        }
    }

    /// An attempt sent at `sent` ended at `now` with `outcome`.
    pub(crate) fn attempted(&mut self, sent: Instant, now: Instant, outcome: Outcome) {
        let renew = self.duration / 3;
        match outcome {
            Outcome::Won(term) => {
                self.state = State::Held {
                    term,
                    until: sent + self.duration,
                };
                self.won = true;
                self.next = (sent + renew).max(now);
            }
            Outcome::Refused => {
                self.state = State::Standby;
                self.next = now + self.retry;
            }
            // A holder keeps the lease until it runs out, retrying sooner.
            Outcome::Failed => self.next = now + self.retry.min(renew),
        }
        self.expire(now);
    }

    /// Drops a lease whose time ran out.
    fn expire(&mut self, now: Instant) {
        if let State::Held { until, .. } = self.state {
            if now >= until {
                self.state = State::Standby;
            }
        }
    }

    /// The term held at `now`, if any.
    pub(crate) fn term(&mut self, now: Instant) -> Option<u64> {
        self.expire(now);
        match self.state {
            State::Held { term, .. } => Some(term),
            State::Standby => None,
        }
    }

    /// When to try next.
    pub(crate) fn next_attempt(&self) -> Instant {
        self.next
    }

    /// When to look again: the next attempt, or the lease running out
    /// before it.
    pub(crate) fn next_wake(&self) -> Instant {
        match self.state {
            State::Held { until, .. } => until.min(self.next),
            State::Standby => self.next,
        }
    }

    /// How long an attempt sent at `sent` may take: a holder's must end
    /// before the lease does (its answer would come too late to keep it).
    pub(crate) fn give_up_at(&self, sent: Instant) -> Instant {
        match self.state {
            State::Held { until, .. } => until,
            State::Standby => sent + self.duration,
        }
    }

    pub(crate) fn ever_won(&self) -> bool {
        self.won
    }
}

/// The holder's view of a lease: the term while it holds it. Dropping
/// every clone releases the lease.
#[derive(Clone)]
pub(crate) struct LeaseWatch {
    rx: watch::Receiver<Option<u64>>,
}

impl LeaseWatch {
    /// The term while held, `None` standing by.
    pub(crate) fn term(&self) -> Option<u64> {
        *self.rx.borrow()
    }

    /// Forgets the changes seen so far.
    pub(crate) fn mark_unchanged(&mut self) {
        self.rx.mark_unchanged();
    }

    /// Waits for the next change; false once the lease task ended (the
    /// handle shut down).
    pub(crate) async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// The statements of a lease, for one schema.
struct Sql {
    acquire: String,
    release: String,
}

impl Sql {
    fn new(s: &str) -> Sql {
        Sql {
            acquire: format!(
                "INSERT INTO {s}.leases AS l (name, holder, expires_at) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
                   term = l.term + (l.holder <> EXCLUDED.holder)::int, \
                   expires_at = EXCLUDED.expires_at, renewed_at = now(), \
                   acquired_at = CASE WHEN l.holder = EXCLUDED.holder THEN l.acquired_at \
                                 ELSE now() END \
                 WHERE l.holder = EXCLUDED.holder OR l.expires_at < now() \
                 RETURNING term"
            ),
            release: format!(
                "UPDATE {s}.leases SET expires_at = '-infinity' WHERE name = $1 AND holder = $2"
            ),
        }
    }
}

/// Starts holding (or standing by for) lease `name` in `schema` (installed
/// already), as a service of the handle: its shutdown releases the lease.
pub(crate) fn start(pubsub: &PgPubSub, schema: &SchemaName, name: &str) -> Result<LeaseWatch> {
    let opts = &pubsub.inner.opts;
    let (duration, retry) = (opts.lease_duration, opts.lock_retry_interval);
    let (tx, rx) = watch::channel(None);
    let stop = Arc::new(watch::Sender::new(false));
    let registration = {
        let stop = stop.clone();
        pubsub.inner.services.register("lease", move |_| {
            stop.send_replace(true);
        })?
    };
    let holder = Holder {
        exec: pubsub.exec().clone(),
        sql: Sql::new(schema.as_str()),
        name: name.to_owned(),
        id: uuid::Uuid::new_v4().to_string(),
        duration,
    };
    let mut stopped = stop.subscribe();
    tokio::spawn(async move {
        let _registration = registration;
        holder
            .run(Plan::new(duration, retry, Instant::now()), tx, &mut stopped)
            .await;
        drop(stop);
    });
    Ok(LeaseWatch { rx })
}

struct Holder {
    exec: Exec,
    sql: Sql,
    name: String,
    id: String,
    duration: Duration,
}

impl Holder {
    async fn run(
        &self,
        mut plan: Plan,
        tx: watch::Sender<Option<u64>>,
        stop: &mut watch::Receiver<bool>,
    ) {
        // Warned once per run of failures, not at every retry.
        let mut failing = false;
        let publish = |plan: &mut Plan| {
            let term = plan.term(Instant::now());
            tx.send_if_modified(|t| std::mem::replace(t, term) != term);
        };
        'attempts: loop {
            let sent = Instant::now();
            let attempt = tokio::time::timeout_at(plan.give_up_at(sent), self.acquire());
            let outcome = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                () = tx.closed() => break,
                res = attempt => match res {
                    Ok(Ok(Some(term))) => Outcome::Won(term),
                    Ok(Ok(None)) => Outcome::Refused,
                    Ok(Err(e)) => {
                        if !failing {
                            tracing::warn!(lease = %self.name, "pg-pubsub: lease attempt failed (retrying): {e}");
                        }
                        Outcome::Failed
                    }
                    Err(_) => Outcome::Failed,
                },
            };
            if (outcome == Outcome::Failed) != failing {
                failing = !failing;
                if !failing {
                    tracing::info!(lease = %self.name, "pg-pubsub: lease attempts succeed again");
                }
            }
            plan.attempted(sent, Instant::now(), outcome);
            publish(&mut plan);
            while Instant::now() < plan.next_attempt() {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break 'attempts,
                    () = tx.closed() => break 'attempts,
                    () = tokio::time::sleep_until(plan.next_wake()) => publish(&mut plan),
                }
            }
        }
        tx.send_replace(None);
        if plan.ever_won() {
            if let Err(e) = self.release().await {
                tracing::warn!(lease = %self.name, "pg-pubsub: releasing a lease failed (it expires by itself): {e}");
            }
        }
    }

    /// Acquires or renews; the term when ours.
    async fn acquire(&self) -> Result<Option<u64>> {
        let secs = self.duration.as_secs_f64();
        let (sql, name, id) = (&self.sql.acquire, self.name.as_str(), self.id.as_str());
        let row = self
            .exec
            .run(Origin::Durable, "renewing a lease", |c| async move {
                c.query_opt_p(
                    sql,
                    &[
                        (&name, Type::TEXT),
                        (&id, Type::TEXT),
                        (&secs, Type::FLOAT8),
                    ],
                )
                .await
            })
            .await?;
        row.map(|r| {
            u64::try_from(r.get::<_, i64>(0))
                .map_err(|e| Error::new(Origin::Durable, "negative lease term").with_source(e))
        })
        .transpose()
    }

    async fn release(&self) -> Result<()> {
        let (sql, name, id) = (&self.sql.release, self.name.as_str(), self.id.as_str());
        self.exec
            .run(Origin::Durable, "releasing a lease", |c| async move {
                c.execute_p(sql, &[(&name, Type::TEXT), (&id, Type::TEXT)])
                    .await
                    .map(drop)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(9);
    const R: Duration = Duration::from_millis(500);

    #[test]
    fn a_standby_retries_at_the_retry_interval() {
        let t0 = Instant::now();
        let mut p = Plan::new(D, R, t0);
        assert_eq!(p.next_attempt(), t0);
        p.attempted(t0, t0, Outcome::Refused);
        assert_eq!(p.term(t0), None);
        assert_eq!(p.next_attempt(), t0 + R);
        assert!(!p.ever_won());
    }

    #[test]
    fn a_holder_renews_every_third_and_holds_from_the_send_time() {
        let t0 = Instant::now();
        let mut p = Plan::new(D, R, t0);
        let back = t0 + Duration::from_millis(40);
        p.attempted(t0, back, Outcome::Won(3));
        assert_eq!(p.term(back), Some(3));
        assert_eq!(p.next_attempt(), t0 + D / 3);
        assert_eq!(p.give_up_at(back), t0 + D);
        assert!(p.ever_won());
        // Not renewed: lost exactly when the lease (counted from the send) ends.
        assert_eq!(p.term(t0 + D - Duration::from_millis(1)), Some(3));
        assert_eq!(p.term(t0 + D), None);
    }

    #[test]
    fn a_failed_renewal_keeps_the_lease_until_it_runs_out() {
        let t0 = Instant::now();
        let mut p = Plan::new(D, R, t0);
        p.attempted(t0, t0, Outcome::Won(1));
        let t1 = t0 + D / 3;
        p.attempted(t1, t1 + Duration::from_secs(1), Outcome::Failed);
        assert_eq!(p.term(t1 + Duration::from_secs(1)), Some(1));
        assert_eq!(p.next_attempt(), t1 + Duration::from_secs(1) + R);
        assert_eq!(p.next_wake(), p.next_attempt());
        // A renewal that answers after the end is too late.
        p.attempted(t1, t0 + D, Outcome::Failed);
        assert_eq!(p.term(t0 + D), None);
    }

    #[test]
    fn a_holder_wakes_when_its_lease_runs_out_before_the_next_try() {
        let t0 = Instant::now();
        let mut p = Plan::new(Duration::from_millis(300), Duration::from_secs(5), t0);
        p.attempted(t0, t0, Outcome::Won(1));
        let t1 = t0 + Duration::from_millis(100);
        p.attempted(t1, t1, Outcome::Failed);
        // Retry at min(retry, a third) = 100 ms; the lease ends at 300 ms.
        assert_eq!(p.next_wake(), t1 + Duration::from_millis(100));
        let mut q = Plan::new(Duration::from_millis(300), Duration::from_secs(5), t0);
        q.attempted(t0, t0 + Duration::from_millis(250), Outcome::Won(1));
        assert_eq!(q.next_wake(), t0 + Duration::from_millis(250));
    }

    #[test]
    fn refused_after_holding_stands_by_with_a_new_term_later() {
        let t0 = Instant::now();
        let mut p = Plan::new(D, R, t0);
        p.attempted(t0, t0, Outcome::Won(1));
        p.attempted(t0 + D, t0 + D, Outcome::Refused);
        assert_eq!(p.term(t0 + D), None);
        let t2 = t0 + D * 2;
        p.attempted(t2, t2, Outcome::Won(3));
        assert_eq!(p.term(t2), Some(3));
    }
}
