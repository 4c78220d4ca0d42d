//! The single-listener election protocol, so that other languages (or a
//! monitoring query) can take part.
//!
//! An elected channel (see [`Listen::single_listener`](crate::Listen::single_listener))
//! is delivered by one instance, its *leader*, among all that elect it on
//! the same database. Everything below happens on each instance's listener
//! session.
//!
//! * **Keys.** `k = hashtextextended(channel, 1885827187)` ([`LOCK_SEED`],
//!   `'pgps'`) is the 64-bit lock key, and
//!   `w = hashtextextended(channel, 1885827191)` ([`WITNESS_SEED`], `'pgpw'`)
//!   the witness key. Both are taken in the two-int4 form
//!   `pg_try_advisory_lock((k >> 32)::int4, k::bit(32)::int4)`, a lock space
//!   apart from one-key (`bigint`) advisory locks. A leader holds both; the
//!   witness lets a standby tell a real leader of its channel from a
//!   64-bit key collision or an unrelated lock on the same key, which it
//!   reports as [`ConnectionEvent::ElectionBlocked`](crate::ConnectionEvent::ElectionBlocked).
//! * **Winning.** A standby tries for the lock (and, only if granted, the
//!   witness). The winner runs `LISTEN "channel"` and
//!   `pg_notify('pg_pubsub_election', 'ready:' || channel)` in one
//!   transaction, and handles the channel's messages only from its own
//!   `ready:` on (its session may still read older ones, committed before it
//!   listened: they are the previous leader's).
//! * **Graceful hand-over** (shutdown). The leader commits
//!   `release:<channel>` on the control channel, *then* unlocks, and keeps
//!   delivering until it reads a `ready:<channel>` from a session that
//!   holds the channel's lock (checked in `pg_locks`: a `ready:` from
//!   anyone else is ignored). Every session reads the one notification
//!   queue in commit order, so both cut at the same message: nothing is lost
//!   or handled twice. If nobody is ready within the hand-over timeout, it
//!   commits `stopped:<channel>` and delivers up to that message.
//! * **Dropping a channel** (last subscription gone). The leader commits
//!   `UNLISTEN` and `stopped:<channel>` together, then unlocks.
//! * **Take-over gap.** A new leader's subscriptions get a
//!   [`Gap`](crate::Gap) with [`GapCause::TakeOver`](crate::GapCause::TakeOver)
//!   unless, in queue order before its own `ready:`, it read a `release:`
//!   not followed by another session's `ready:` or a `stopped:`. So a crash,
//!   a lost connection, a hand-over timeout and the very first election
//!   (no known previous leader) give a gap; a graceful hand-over does not.
//! * **Retries.** Standbys retry at once on `release:` and `stopped:`
//!   (once more shortly after, in case the unlock had not happened yet),
//!   and every [`Builder::lock_retry_interval`](crate::Builder::lock_retry_interval)
//!   in case a leader died without a word.
//! * **Sessions.** The locks and the `LISTEN` live in one session, so when
//!   the session ends (process killed, backend terminated, network lost)
//!   they end together. A reconnected instance holds nothing and competes
//!   again; it never re-takes a lock it holds (session locks stack).
//!
//! What this trusts: anyone who can `NOTIFY` on the database can send
//! control messages. A forged `ready:` is ignored; a forged `release:` or
//! `stopped:` only makes standbys try for the lock early, or report a gap
//! that was not one (a forged `release:` just before a real crash can hide
//! that crash's gap). Restrict who may connect with roles and `pg_hba.conf`.

/// Channel on which leaders announce releases, stops and take-overs
/// (reserved: `listen` refuses it).
pub const CONTROL_CHANNEL: &str = "pg_pubsub_election";

/// Seed of the election lock key: `hashtextextended(channel, LOCK_SEED)`.
pub const LOCK_SEED: i64 = 0x7067_7073;

/// Seed of the witness lock key: `hashtextextended(channel, WITNESS_SEED)`.
pub const WITNESS_SEED: i64 = 0x7067_7077;

/// A query for the backend PID of the session leading channel `$1` (no row
/// when nobody holds its lock). Its `application_name` and client address
/// are in `pg_stat_activity`.
///
/// ```no_run
/// # async fn demo(client: tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
/// let leader: Option<i32> = client
///     .query_opt(pg_pubsub::election::LEADER_PID_SQL, &[&"jobs"])
///     .await?
///     .map(|row| row.get(0));
/// # Ok(()) }
/// ```
pub const LEADER_PID_SQL: &str = "SELECT l.pid FROM pg_locks l, \
     (SELECT hashtextextended($1::text, 1885827187) AS k) key \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND l.classid = ((key.k >> 32) & 4294967295)::oid \
     AND l.objid = (key.k & 4294967295)::oid";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_numbers() {
        assert_eq!(LOCK_SEED, 1885827187);
        assert_eq!(WITNESS_SEED, 1885827191);
        assert!(LEADER_PID_SQL.contains(&LOCK_SEED.to_string()));
    }
}
