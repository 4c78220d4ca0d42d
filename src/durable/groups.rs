//! Observing groups and removing old messages.

use std::time::{Duration, SystemTime};

use super::consumer::position_of;
use super::position::Position;
use super::Durable;
use crate::channel::ChannelName;
use crate::error::{Error, ErrorKind, Result};

/// One consumer group of a channel, from [`Durable::groups`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group's name.
    pub group: String,
    /// Its cursor: the last acked position.
    pub position: Position,
    /// When its cursor last moved (or it was created).
    pub acked_at: SystemTime,
    /// Messages stored and not yet acked by it (committed ones, ticked or not).
    pub lag_messages: u64,
    /// Publish time of its oldest unacked message (`None`: caught up).
    pub oldest_unacked: Option<SystemTime>,
}

impl GroupInfo {
    /// How old its oldest unacked message is (zero when caught up).
    pub fn lag_age(&self) -> Duration {
        self.oldest_unacked
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default()
    }
}

/// What one [`Durable::retain`] call removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Retained {
    /// Messages of the channel removed because every group had acked them.
    pub acked: u64,
    /// Messages of the channel removed for being older than the maximum
    /// age (some groups may not have read them).
    pub expired: u64,
    /// Partitions emptied (`TRUNCATE`), for all channels of the schema.
    pub truncated: u64,
    /// Messages still needed that were carried into the current partition
    /// so that theirs could be emptied (all channels).
    pub carried: u64,
}

impl Durable {
    /// The groups of `channel`, with their cursor and lag. Counting the lag
    /// reads every unacked message: meant for dashboards, not hot loops.
    pub async fn groups(&self, channel: &str) -> Result<Vec<GroupInfo>> {
        let channel = ChannelName::new(channel)?;
        let s = self.schema.as_str();
        let sql = format!(
            "SELECT g.group_name, g.tick_id, g.xid, g.seq, g.acked_at, l.n, l.oldest \
             FROM {s}.groups g, \
             LATERAL (SELECT {s}.snap_before(g.channel, g.tick_id) AS pv, \
                             {s}.snap_at(g.channel, g.tick_id) AS nx) sn, \
             LATERAL (SELECT count(*) AS n, min(m.published_at) AS oldest FROM {s}.messages m \
                      WHERE m.channel = g.channel \
                        AND NOT {s}.passed(m.xid, m.seq, g.xid, g.seq, sn.pv, sn.nx)) l \
             WHERE g.channel = $1 ORDER BY g.group_name"
        );
        let ch = channel.as_str();
        let rows = self
            .with_client("listing durable groups", |c| async move {
                c.query(&sql, &[&ch]).await
            })
            .await?;
        rows.iter()
            .map(|r| {
                Ok(GroupInfo {
                    group: r.get(0),
                    position: position_of(r, 1)?,
                    acked_at: r.get(4),
                    lag_messages: u64::try_from(r.get::<_, i64>(5)).unwrap_or(0),
                    oldest_unacked: r.get(6),
                })
            })
            .collect()
    }

    /// Removes `group` from `channel` (its cursor no longer holds messages back).
    pub async fn remove_group(&self, channel: &str, group: &str) -> Result<bool> {
        let channel = ChannelName::new(channel)?;
        let sql = format!(
            "DELETE FROM {}.groups WHERE channel = $1 AND group_name = $2",
            self.schema.as_str()
        );
        let ch = channel.as_str();
        self.with_client("removing a durable group", |c| async move {
            Ok(c.execute(&sql, &[&ch, &group]).await? == 1)
        })
        .await
    }

    /// Runs a rotation (see the [module docs](super#retention-by-rotation)):
    /// records `max_age` as `channel`'s maximum age (`None` keeps the one
    /// recorded before; `UPDATE pgpubsub.channels SET max_age = NULL`
    /// clears it), switches publishers
    /// to an empty partition, then empties (`TRUNCATE`) every other
    /// partition whose messages every group of their channel has acked or
    /// that are older than their channel's maximum age. A group that had
    /// not read an expired message is told how many it lost
    /// ([`DurableDelivery::Truncated`](super::DurableDelivery::Truncated)).
    /// Messages of a channel without any group are kept (up to its maximum
    /// age). Counts in [`Retained::acked`] and [`Retained::expired`] are
    /// `channel`'s; the removal covers every channel of the schema.
    /// Active consumers run it on their channel on their own
    /// ([`ConsumerBuilder::retain_every`](super::ConsumerBuilder::retain_every));
    /// call it yourself when no consumer runs.
    pub async fn retain(&self, channel: &str, max_age: Option<Duration>) -> Result<Retained> {
        let channel = ChannelName::new(channel)?;
        let max_age_secs = max_age.map(|d| d.as_secs_f64());
        let s = self.schema.as_str();
        let rotate = format!("SELECT {s}.rotate()");
        let sql = format!(
            "SELECT acked, expired, truncated, carried \
             FROM {s}.retain($1, make_interval(secs => $2))"
        );
        let ch = channel.as_str();
        let row = self
            .with_client("durable retention", |c| async move {
                // Two transactions: a partition is emptied only once
                // publishers have been told to write elsewhere.
                c.execute(&rotate, &[]).await?;
                c.query_one(&sql, &[&ch, &max_age_secs]).await
            })
            .await?;
        let count = |i: usize| {
            u64::try_from(row.get::<_, i64>(i))
                .map_err(|e| Error::new(ErrorKind::Durable, "negative count").with_source(e))
        };
        Ok(Retained {
            acked: count(0)?,
            expired: count(1)?,
            truncated: u64::try_from(row.get::<_, i32>(2))
                .map_err(|e| Error::new(ErrorKind::Durable, "negative count").with_source(e))?,
            carried: count(3)?,
        })
    }
}
