//! SQL for changes on the listener session, including the single-listener
//! election. The lock key and control messages are part of the documented
//! protocol (see the crate docs, "Single listener"), so other languages can
//! take part.

use std::collections::HashSet;

use tokio_postgres::SimpleQueryMessage;

use super::registry::Change;
use crate::channel::ChannelName;

/// Control channel on which leaders announce releases and take-overs.
pub const CONTROL_CHANNEL: &str = "pg_pubsub_election";
/// First key of every election lock (`'pgps'` as a big-endian int4).
pub(crate) const LOCK_NAMESPACE: i32 = 0x7067_7073;

/// A string literal that means the same whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn lock_key(channel: &ChannelName) -> String {
    format!("{LOCK_NAMESPACE}, hashtext({})", literal(channel.as_str()))
}

fn control(kind: &str, channel: &ChannelName) -> String {
    format!(
        "SELECT pg_notify('{CONTROL_CHANNEL}', {});",
        literal(&format!("{kind}:{}", channel.as_str()))
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

/// One simple-query string for `changes`: one round trip, one transaction.
/// A leader's LISTEN and its `ready` announcement commit together: the
/// previous leader stops at that message and the new one starts after it.
pub(crate) fn changes_sql(changes: &[Change]) -> String {
    let mut sql = String::new();
    for change in changes {
        match change {
            Change::Listen { channel, elected } => {
                sql.push_str(&format!("LISTEN {};", channel.quoted()));
                if *elected {
                    sql.push_str(&control("ready", channel));
                }
            }
            Change::Unlisten(channel) => sql.push_str(&format!("UNLISTEN {};", channel.quoted())),
            Change::TryLock(channel) => sql.push_str(&format!(
                "SELECT {}, pg_try_advisory_lock({});",
                literal(channel.as_str()),
                lock_key(channel)
            )),
            Change::Release(channel) => {
                sql.push_str(&format!("UNLISTEN {};", channel.quoted()));
                sql.push_str(&release_sql(channel));
            }
        }
    }
    sql
}

/// Unlock and wake the standbys (the LISTEN is left alone).
pub(crate) fn release_sql(channel: &ChannelName) -> String {
    format!(
        "SELECT pg_advisory_unlock({});{}",
        lock_key(channel),
        control("release", channel)
    )
}

/// Channels whose lock `pg_try_advisory_lock` granted, from a `changes_sql` answer.
pub(crate) fn acquired(rows: &[SimpleQueryMessage]) -> HashSet<String> {
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) if row.len() == 2 && row.get(1) == Some("t") => {
                row.get(0).map(str::to_owned)
            }
            _ => None,
        })
        .collect()
}

/// A control message: `release:<channel>` or `ready:<channel>`.
pub(crate) enum Control<'a> {
    Release(&'a str),
    Ready(&'a str),
}

pub(crate) fn parse_control(payload: &str) -> Option<Control<'_>> {
    if let Some(ch) = payload.strip_prefix("release:") {
        Some(Control::Release(ch))
    } else {
        payload.strip_prefix("ready:").map(Control::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal(r"a'b\c"), r"E'a''b\\c'");
        let ch = ChannelName::new("jobs").unwrap();
        assert_eq!(
            changes_sql(&[Change::TryLock(ch)]),
            "SELECT E'jobs', pg_try_advisory_lock(1885827187, hashtext(E'jobs'));"
        );
    }
}
