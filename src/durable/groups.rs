//! Observing groups and removing old messages.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;

use super::position::Position;
use super::store::position_of;
use super::Durable;
use crate::channel::ChannelName;
use crate::error::{Error, Origin, Result};

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
    /// age before some group had read them.
    pub expired: u64,
    /// Partitions emptied (`TRUNCATE`), for all channels of the schema.
    pub truncated: u64,
    /// Messages still needed that were carried into the current partition
    /// so that theirs could be emptied (all channels).
    pub carried: u64,
    /// Messages removed whose `xid` is from no transaction of this
    /// cluster (restored or replicated rows), all channels. No batch can
    /// hold them, so they are removed with their partition, and counted as
    /// lost for every group that had not passed them.
    pub foreign: u64,
    /// Partitions left in place because more than 1000 of their messages
    /// are still needed (a group is behind, or a channel has no group:
    /// those are logged as a warning).
    pub blocked: u64,
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
                c.query_p(&sql, &[(&ch, Type::TEXT)]).await
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

    /// Removes `group` from `channel` (its cursor no longer holds messages
    /// back), with its lease, if it had one (consumed behind a pooler in
    /// transaction mode).
    pub async fn remove_group(&self, channel: &str, group: &str) -> Result<bool> {
        let channel = ChannelName::new(channel)?;
        let s = self.schema.as_str();
        let sql = format!(
            "WITH lease AS (DELETE FROM {s}.leases WHERE name = $3) \
             DELETE FROM {s}.groups WHERE channel = $1 AND group_name = $2"
        );
        let ch = channel.as_str();
        let lease = crate::schema::election_channel(&self.schema, ch, group);
        self.with_client("removing a durable group", |c| async move {
            let params: &crate::tx::Params = &[
                (&ch, Type::TEXT),
                (&group, Type::TEXT),
                (&lease, Type::TEXT),
            ];
            Ok(c.execute_p(&sql, params).await? == 1)
        })
        .await
    }

    /// Runs a rotation (see the [module docs](super#retention-by-rotation)):
    /// records `max_age` as `channel`'s maximum age when it has none
    /// (`None` keeps the recorded one), switches publishers to an empty
    /// partition, then empties (`TRUNCATE`) every other partition whose
    /// messages every group of their channel has acked or that are older
    /// than their channel's maximum age. A group that had not read an
    /// expired message is told how many it lost
    /// ([`DurableDelivery::Truncated`](super::DurableDelivery::Truncated)).
    /// Messages of a channel without any group are kept for its maximum
    /// age, or one day when it has none. Counts in [`Retained::acked`] and
    /// [`Retained::expired`] are `channel`'s; the removal covers every
    /// channel of the schema. Waits for a retention that another session
    /// runs. Active consumers run it on their channel on their own
    /// ([`ConsumerBuilder::retain_every`](super::ConsumerBuilder::retain_every)),
    /// skipping a round when another one runs; call it yourself when no
    /// consumer runs.
    ///
    /// A channel has one maximum age: it removes messages for every group.
    /// A `max_age` other than the recorded one fails with
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) and changes nothing; change it for every group
    /// with [`set_max_age`](Self::set_max_age).
    pub async fn retain(&self, channel: &str, max_age: Option<Duration>) -> Result<Retained> {
        self.retain_with(channel, max_age, true).await
    }

    /// [`retain`](Self::retain); without `wait`, returns zeros at once when
    /// another session runs a retention.
    pub(crate) async fn retain_with(
        &self,
        channel: &str,
        max_age: Option<Duration>,
        wait: bool,
    ) -> Result<Retained> {
        let channel = ChannelName::new(channel)?;
        let max_age_secs = max_age.map(|d| d.as_secs_f64());
        let s = self.schema.as_str();
        let rotate = format!("SELECT {s}.rotate($1)");
        let sql = format!(
            "SELECT acked, expired, truncated, carried, foreign_rows, blocked, unclaimed_channels \
             FROM {s}.retain($1, make_interval(secs => $2), $3)"
        );
        let ch = channel.as_str();
        let row = self
            .with_client("durable retention", |c| async move {
                // Two transactions: a partition is emptied only once
                // publishers have been told to write elsewhere.
                c.execute_p(&rotate, &[(&wait, Type::BOOL)]).await?;
                c.query_one_p(
                    &sql,
                    &[
                        (&ch, Type::TEXT),
                        (&max_age_secs, Type::FLOAT8),
                        (&wait, Type::BOOL),
                    ],
                )
                .await
            })
            .await
            .map_err(max_age_conflict)?;
        let count = |i: usize| {
            u64::try_from(row.get::<_, i64>(i))
                .map_err(|e| Error::new(Origin::Durable, "negative count").with_source(e))
        };
        let small = |i: usize| {
            u64::try_from(row.get::<_, i32>(i))
                .map_err(|e| Error::new(Origin::Durable, "negative count").with_source(e))
        };
        let unclaimed: Vec<String> = row.get(6);
        if !unclaimed.is_empty() {
            tracing::warn!(
                schema = %self.schema,
                channels = ?unclaimed,
                "durable retention: channels without any consumer group keep a partition \
                 from being emptied (their messages stay for their max age, one day by \
                 default; subscribe a group or set a max age)"
            );
        }
        Ok(Retained {
            acked: count(0)?,
            expired: count(1)?,
            truncated: small(2)?,
            carried: count(3)?,
            foreign: count(4)?,
            blocked: small(5)?,
        })
    }

    /// Sets (`None`: clears) `channel`'s maximum age, for every group of it
    /// (see [`retain`](Self::retain)). Takes effect at the next rotation.
    pub async fn set_max_age(&self, channel: &str, max_age: Option<Duration>) -> Result<()> {
        let channel = ChannelName::new(channel)?;
        let max_age_secs = max_age.map(|d| d.as_secs_f64());
        let sql = format!(
            "INSERT INTO {}.channels AS c (channel, max_age) \
             VALUES ($1, make_interval(secs => $2)) \
             ON CONFLICT (channel) DO UPDATE SET max_age = EXCLUDED.max_age",
            self.schema.as_str()
        );
        let ch = channel.as_str();
        self.with_client("setting the durable max age", |c| async move {
            c.execute_p(&sql, &[(&ch, Type::TEXT), (&max_age_secs, Type::FLOAT8)])
                .await?;
            Ok(())
        })
        .await
    }

    /// Records `max_age` as `channel`'s when it has none, and fails with
    /// [`ErrorKind::Config`] when it has another one: a consumer checks
    /// this before it starts.
    pub(crate) async fn claim_max_age(&self, channel: &str, max_age: Duration) -> Result<()> {
        let channel = ChannelName::new(channel)?;
        let secs = max_age.as_secs_f64();
        let s = self.schema.as_str();
        let sql = format!(
            "WITH ins AS (INSERT INTO {s}.channels AS c (channel, max_age) \
                          VALUES ($1, make_interval(secs => $2)) \
                          ON CONFLICT (channel) DO UPDATE SET max_age = EXCLUDED.max_age \
                          WHERE c.max_age IS NULL RETURNING c.max_age) \
             SELECT coalesce((SELECT max_age FROM ins), \
                             (SELECT max_age FROM {s}.channels WHERE channel = $1)) \
                    = make_interval(secs => $2), \
                    (SELECT max_age::text FROM {s}.channels WHERE channel = $1)"
        );
        let ch = channel.as_str();
        let row = self
            .with_client("checking the durable max age", |c| async move {
                c.query_one_p(&sql, &[(&ch, Type::TEXT), (&secs, Type::FLOAT8)])
                    .await
            })
            .await?;
        if row.get::<_, Option<bool>>(0) == Some(true) {
            return Ok(());
        }
        let recorded: Option<String> = row.get(1);
        Err(Error::new(
            Origin::Config,
            format!(
                "durable channel {ch:?} has max_age {}, not {max_age:?}: a max age is per \
                 channel and removes messages for every group; change it for all with \
                 Durable::set_max_age",
                recorded.as_deref().unwrap_or("(another)")
            ),
        ))
    }
}

/// A `retain` that asked for another max age than the channel's (SQLSTATE
/// `PGPS2` from the SQL function) is a configuration error.
fn max_age_conflict(e: Error) -> Error {
    if e.code().is_some_and(|c| c.code() == "PGPS2") {
        let message = e
            .as_db_error()
            .map(|d| format!("{}: {}", d.message(), d.hint().unwrap_or_default()))
            .unwrap_or_default();
        return Error::new(Origin::Config, message).with_source(e);
    }
    e
}
