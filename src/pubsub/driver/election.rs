//! SQL for changes on the listener session, including the single-listener
//! election (the protocol is documented in the public `election` module).

use tokio_postgres::SimpleQueryMessage;

use super::role::Step;
use crate::channel::ChannelName;

pub(crate) use crate::election::CONTROL_CHANNEL;
use crate::election::{LOCK_SEED, WITNESS_SEED};

/// A string literal that means the same whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// `hashtextextended(channel, seed)`: a 64-bit key other languages can compute.
fn key(channel: &str, seed: i64) -> String {
    format!("hashtextextended({}, {seed})", literal(channel))
}

/// The two-int4 form of a 64-bit key (high half, low half): a lock space
/// apart from the application's one-key (`bigint`) advisory locks.
fn lock_args(key: &str) -> String {
    format!("({key} >> 32)::int4, {key}::bit(32)::int4")
}

/// Matches a granted `pg_locks` row of `key` in the two-int4 space, for `alias`.
fn holds(alias: &str, key: &str) -> String {
    format!(
        "{alias}.locktype = 'advisory' AND {alias}.granted AND {alias}.objsubid = 2 \
         AND {alias}.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND {alias}.classid = (({key} >> 32) & 4294967295)::oid \
         AND {alias}.objid = ({key} & 4294967295)::oid"
    )
}

fn notify_control(kind: &str, channel: &ChannelName) -> String {
    format!(
        "SELECT pg_notify('{CONTROL_CHANNEL}', {});",
        literal(&format!("{kind}:{}", channel.as_str()))
    )
}

fn unlock(channel: &ChannelName) -> String {
    format!(
        "SELECT pg_advisory_unlock({}), pg_advisory_unlock({});",
        lock_args(&key(channel.as_str(), WITNESS_SEED)),
        lock_args(&key(channel.as_str(), LOCK_SEED)),
    )
}

/// `LISTEN "a";` for a new session.
pub(crate) fn listen_sql<'a>(channels: impl IntoIterator<Item = &'a ChannelName>) -> String {
    let mut sql = String::new();
    for channel in channels {
        sql.push_str(&format!("LISTEN {};", channel.quoted()));
    }
    sql
}

/// One simple-query string for `steps`: one round trip. Everything but the
/// unlocks commits in one transaction *before* the unlocks, so a `stopped:`
/// (or `release:`) is in the notification queue before any standby can win
/// the lock and announce itself: every session sees the two in that order.
/// A leader's `LISTEN` and its `ready` announcement commit together: the
/// previous leader stops at that message and the new one starts after it.
/// `probe` adds the collision probe for the channels tried here.
pub(crate) fn steps_sql(steps: &[(ChannelName, Step)], probe: bool) -> String {
    let mut sql = String::new();
    let mut unlocks = String::new();
    let mut tried = Vec::new();
    for (channel, step) in steps {
        let quoted = channel.quoted();
        match step {
            Step::Listen => sql.push_str(&format!("LISTEN {quoted};")),
            Step::Unlisten => sql.push_str(&format!("UNLISTEN {quoted};")),
            Step::Announce => {
                sql.push_str(&format!("LISTEN {quoted};"));
                sql.push_str(&notify_control("ready", channel));
            }
            Step::TryLock => {
                // The witness is taken only with the lock (CASE evaluates in order).
                sql.push_str(&format!(
                    "SELECT 'lock', {}, CASE WHEN pg_try_advisory_lock({}) \
                     THEN pg_try_advisory_lock({}) IS NOT NULL ELSE false END;",
                    literal(channel.as_str()),
                    lock_args(&key(channel.as_str(), LOCK_SEED)),
                    lock_args(&key(channel.as_str(), WITNESS_SEED)),
                ));
                tried.push(channel);
            }
            Step::Release => {
                sql.push_str(&format!("UNLISTEN {quoted};"));
                sql.push_str(&notify_control("stopped", channel));
                unlocks.push_str(&unlock(channel));
            }
        }
    }
    if probe && !tried.is_empty() {
        sql.push_str(&probe_sql(tried));
    }
    if unlocks.is_empty() {
        sql
    } else {
        format!("BEGIN;{sql}COMMIT;{unlocks}")
    }
}

/// Unlock and wake the standbys (the `LISTEN` is left alone: the leader keeps
/// delivering until its successor's `ready:`).
pub(crate) fn release_sql(channels: &[ChannelName]) -> String {
    let notes: String = channels
        .iter()
        .map(|c| notify_control("release", c))
        .collect();
    let unlocks: String = channels.iter().map(unlock).collect();
    format!("BEGIN;{notes}COMMIT;{unlocks}")
}

/// Tells standbys that nobody took over these channels (hand-over timeout).
pub(crate) fn stopped_sql(channels: &[ChannelName]) -> String {
    channels
        .iter()
        .map(|c| notify_control("stopped", c))
        .collect()
}

/// Channels whose lock is held by a session that does not hold the
/// witness: a key collision, or someone else's lock on our key.
fn probe_sql(channels: Vec<&ChannelName>) -> String {
    let list: Vec<String> = channels.iter().map(|c| literal(c.as_str())).collect();
    let lock = format!("hashtextextended(c, {LOCK_SEED})");
    let witness = format!("hashtextextended(c, {WITNESS_SEED})");
    format!(
        "SELECT 'suspect', c, l.pid::text FROM unnest(ARRAY[{}]::text[]) AS c, pg_locks l \
         WHERE {} AND l.pid <> pg_backend_pid() AND NOT EXISTS \
         (SELECT 1 FROM pg_locks w WHERE w.pid = l.pid AND {});",
        list.join(","),
        holds("l", &lock),
        holds("w", &witness),
    )
}

/// Whether backend `pid` holds the election lock of `channel`.
pub(crate) fn holder_sql(channel: &str, pid: i32) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = {pid} AND {});",
        holds("l", &key(channel, LOCK_SEED))
    )
}

/// What a `steps_sql` answer says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    /// Channels whose lock was granted.
    pub granted: Vec<String>,
    /// Channels whose lock a non-leader holds, with that backend's PID.
    pub suspects: Vec<(String, i32)>,
    /// The primary check ([`PRIMARY_CHECK`]) found the server in recovery
    /// or read-only.
    pub read_only: bool,
}

/// Appended to every health check: a listener must sit on the primary. A
/// server that was demoted (restarted as a standby) drops the session
/// anyway, but one fenced read-only by failover tooling keeps it open while
/// publishers moved on: the listener would hear nothing, silently.
pub(crate) const PRIMARY_CHECK: &str =
    "SELECT 'primary', pg_is_in_recovery()::text, current_setting('transaction_read_only');";

pub(crate) fn parse_answer(rows: &[SimpleQueryMessage]) -> Answer {
    let mut answer = Answer::default();
    for m in rows {
        // `get` panics past the last column.
        let SimpleQueryMessage::Row(row) = m else {
            continue;
        };
        if row.len() != 3 {
            continue;
        }
        match (row.get(0), row.get(1), row.get(2)) {
            (Some("lock"), Some(ch), Some("t")) => answer.granted.push(ch.to_owned()),
            (Some("primary"), Some(recovery), Some(read_only)) => {
                answer.read_only = recovery == "true" || read_only == "on";
            }
            (Some("suspect"), Some(ch), Some(pid)) => {
                if let Ok(pid) = pid.parse() {
                    answer.suspects.push((ch.to_owned(), pid));
                }
            }
            _ => {}
        }
    }
    answer
}

/// Whether the first row of an answer is `t`.
pub(crate) fn is_true(rows: &[SimpleQueryMessage]) -> bool {
    rows.iter().any(|m| match m {
        SimpleQueryMessage::Row(row) => !row.is_empty() && row.get(0) == Some("t"),
        _ => false,
    })
}

/// A control message: `<kind>:<channel>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control<'a> {
    /// The leader unlocked and keeps delivering until a successor is ready.
    Release(&'a str),
    /// The leader stopped delivering; nobody took over.
    Stopped(&'a str),
    /// The sender listens and leads from this message on.
    Ready(&'a str),
}

pub(crate) fn parse_control(payload: &str) -> Option<Control<'_>> {
    let (kind, channel) = payload.split_once(':')?;
    match kind {
        "release" => Some(Control::Release(channel)),
        "stopped" => Some(Control::Stopped(channel)),
        "ready" => Some(Control::Ready(channel)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal(r"a'b\c"), r"E'a''b\\c'");
    }

    #[test]
    fn releases_commit_before_unlocking() {
        let ch = ChannelName::new("jobs").unwrap();
        let sql = steps_sql(&[(ch.clone(), Step::Release)], false);
        let commit = sql.find("COMMIT;").unwrap();
        assert!(sql.starts_with("BEGIN;"));
        assert!(sql.find("stopped:jobs").unwrap() < commit);
        assert!(sql.find("pg_advisory_unlock").unwrap() > commit);
        let plain = steps_sql(&[(ch, Step::Listen)], false);
        assert_eq!(plain, r#"LISTEN "jobs";"#);
    }

    #[test]
    fn control_messages_parse() {
        assert_eq!(parse_control("ready:a:b"), Some(Control::Ready("a:b")));
        assert_eq!(parse_control("stopped:x"), Some(Control::Stopped("x")));
        assert_eq!(parse_control("hello"), None);
        assert_eq!(parse_control("other:x"), None);
    }
}
