//! Who holds back the xmin horizon, and when to say so.
//!
//! A claim leaves the job's `ready` version at the head of the claim index.
//! VACUUM removes such entries only once no snapshot can still see them:
//! while one transaction of the database stays open (an idle `BEGIN`, a
//! long report, a prepared transaction) or a replication slot holds an
//! `xmin`, they pile up and every claim walks over all of them (one
//! idle-in-transaction session: 6 index buffers per claim, 580 after 30,000
//! claims). A claim cannot skip them: the index marks an entry dead only
//! when no snapshot needs it. So the worker names the holder instead, as a
//! [`QueueEvent::HorizonHeld`](crate::event::QueueEvent::HorizonHeld), and
//! [`Queue::horizon_holder`] answers on demand.

use std::time::Duration;

use super::Queue;
use crate::error::{Origin, Result};

/// What holds the horizon back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HolderKind {
    /// A session of this database with an open transaction or snapshot.
    Session,
    /// A prepared transaction (`PREPARE TRANSACTION`) of this database.
    PreparedTransaction,
    /// A replication slot with an `xmin` (a standby's `hot_standby_feedback`).
    ReplicationSlot,
}

/// The oldest transaction, prepared transaction or slot holding back the
/// xmin horizon of the database: what VACUUM cannot clean up behind.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HorizonHolder {
    /// What it is.
    pub kind: HolderKind,
    /// The backend's process id (a session, or a slot's active walsender).
    pub pid: Option<i32>,
    /// The session's `application_name`, the prepared transaction's gid,
    /// or the slot's name.
    pub name: String,
    /// The session's state (`idle in transaction`, `active`, ...).
    pub state: Option<String>,
    /// How many transactions ago its horizon was taken.
    pub xid_age: u64,
    /// How long its transaction has been open (unknown for slots).
    pub age: Option<Duration>,
}

impl HorizonHolder {
    /// Whether this holder is worth a warning: open for `after` or more
    /// and at least 1,000 transactions behind (a slot: 10,000 behind).
    pub fn is_held(&self, after: Duration) -> bool {
        match (self.kind, self.age) {
            (HolderKind::ReplicationSlot, _) => self.xid_age >= 10_000,
            (_, Some(age)) => age >= after && self.xid_age >= 1_000,
            (_, None) => false,
        }
    }

    /// Identifies the holder across checks (a new transaction of the same
    /// session is the same holder, reported again only later).
    fn key(&self) -> (HolderKind, Option<i32>, &str) {
        (self.kind, self.pid, &self.name)
    }
}

/// The holder with the oldest horizon, from every session of this database
/// (but the asking one), its prepared transactions and every slot.
const HOLDER_SQL: &str = "\
SELECT kind, pid, name, state, xid_age::int8, age_secs FROM (
  SELECT 'session' AS kind, a.pid, a.application_name AS name, a.state,
         greatest(age(a.backend_xmin), age(a.backend_xid)) AS xid_age,
         extract(epoch FROM now() - a.xact_start)::float8 AS age_secs
    FROM pg_stat_activity a
   WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
     AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
  UNION ALL
  SELECT 'prepared', NULL, p.gid, NULL, age(p.transaction),
         extract(epoch FROM now() - p.prepared)::float8
    FROM pg_prepared_xacts p WHERE p.database = current_database()
  UNION ALL
  SELECT 'slot', s.active_pid, s.slot_name, NULL, age(s.xmin), NULL
    FROM pg_replication_slots s WHERE s.xmin IS NOT NULL
) h ORDER BY xid_age DESC NULLS LAST LIMIT 1";

/// Runs [`HOLDER_SQL`] on `client`.
pub(super) async fn find_holder(
    client: &tokio_postgres::Client,
) -> Result<Option<HorizonHolder>, tokio_postgres::Error> {
    // Unnamed (one round trip, nothing left behind): also behind a
    // transaction pooler.
    Ok(client
        .query_typed(HOLDER_SQL, &[])
        .await?
        .first()
        .map(holder_from))
}

/// Maps a row of [`HOLDER_SQL`].
fn holder_from(row: &tokio_postgres::Row) -> HorizonHolder {
    let kind = match row.get::<_, &str>(0) {
        "prepared" => HolderKind::PreparedTransaction,
        "slot" => HolderKind::ReplicationSlot,
        _ => HolderKind::Session,
    };
    let age: Option<f64> = row.get(5);
    HorizonHolder {
        kind,
        pid: row.get(1),
        name: row.get::<_, Option<String>>(2).unwrap_or_default(),
        state: row.get(3),
        xid_age: row.get::<_, Option<i64>>(4).unwrap_or(0).max(0) as u64,
        age: age
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64),
    }
}

impl Queue {
    /// The oldest transaction or slot holding back the xmin horizon of the
    /// database, if any: while it is open, every claim walks over the
    /// entries of every job claimed since (claims get slower with each
    /// job), and VACUUM cannot help. Needs `pg_read_all_stats` (or a
    /// superuser) to see other roles' sessions.
    pub async fn horizon_holder(&self) -> Result<Option<HorizonHolder>> {
        self.pubsub
            .exec()
            .run(
                Origin::Queue,
                "finding the xmin horizon",
                |client| async move { find_holder(&client).await },
            )
            .await
    }
}

/// Identifies a holder across checks.
type HolderKey = (HolderKind, Option<i32>, String);

/// When to report a holder: once when it is first seen held, then at most
/// every `every` while it stays the oldest.
#[derive(Debug)]
pub(super) struct Reporter {
    after: Duration,
    every: Duration,
    /// The last holder reported, and when.
    last: Option<(HolderKey, tokio::time::Instant)>,
}

impl Reporter {
    pub(super) fn new(after: Duration, every: Duration) -> Self {
        Reporter {
            after,
            every,
            last: None,
        }
    }

    /// Whether `holder`, seen `now`, should be reported.
    pub(super) fn should_report(
        &mut self,
        holder: Option<&HorizonHolder>,
        now: tokio::time::Instant,
    ) -> bool {
        let Some(h) = holder.filter(|h| h.is_held(self.after)) else {
            self.last = None;
            return false;
        };
        let (kind, pid, name) = h.key();
        let same = self.last.as_ref().is_some_and(|((k, p, n), at)| {
            *k == kind && *p == pid && n == name && now < *at + self.every
        });
        if same {
            return false;
        }
        self.last = Some(((kind, pid, name.to_owned()), now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(pid: i32, age_secs: u64, xid_age: u64) -> HorizonHolder {
        HorizonHolder {
            kind: HolderKind::Session,
            pid: Some(pid),
            name: "psql".into(),
            state: Some("idle in transaction".into()),
            xid_age,
            age: Some(Duration::from_secs(age_secs)),
        }
    }

    #[test]
    fn held_needs_both_time_and_transactions() {
        let after = Duration::from_secs(60);
        assert!(session(1, 61, 1_000).is_held(after));
        assert!(!session(1, 59, 50_000).is_held(after), "young");
        assert!(!session(1, 600, 10).is_held(after), "nothing piled up");
        let slot = HorizonHolder {
            kind: HolderKind::ReplicationSlot,
            age: None,
            ..session(2, 0, 20_000)
        };
        assert!(slot.is_held(after));
    }

    #[test]
    fn reports_once_then_again_after_the_period_or_for_another_holder() {
        let t0 = tokio::time::Instant::now();
        let mut r = Reporter::new(Duration::from_secs(60), Duration::from_secs(300));
        let a = session(1, 120, 5_000);
        assert!(r.should_report(Some(&a), t0));
        assert!(!r.should_report(Some(&a), t0 + Duration::from_secs(10)));
        let b = session(2, 120, 5_000);
        assert!(r.should_report(Some(&b), t0 + Duration::from_secs(20)));
        assert!(r.should_report(Some(&b), t0 + Duration::from_secs(400)));
        // Released, then held again: reported again.
        assert!(!r.should_report(None, t0 + Duration::from_secs(401)));
        assert!(r.should_report(Some(&b), t0 + Duration::from_secs(402)));
    }
}
