//! Every statement a consumer runs: group creation, cursor, tick, read,
//! range scan and ack, and the mapping of their rows.

use std::time::SystemTime;

use tokio_postgres::types::Type;

use super::consumer::Start;
use super::message::Acks;
use super::position::{Position, Snapshot, Xid8};
use super::Durable;
use crate::channel::ChannelName;
use crate::error::{Error, Origin, Result, Stage};
use crate::tx::Params;

impl Durable {
    pub(super) async fn start_position(
        &self,
        channel: &ChannelName,
        start: Start,
    ) -> Result<Position> {
        Ok(match start {
            Start::Earliest => Position::EARLIEST,
            Start::After(p) => p,
            Start::Latest => match self.tick(channel.as_str()).await? {
                0 => Position::EARLIEST,
                t => Position::end_of_tick(t),
            },
            Start::Time(at) => {
                let sql = format!(
                    "SELECT coalesce(max(tick_id), 0) FROM {}.ticks WHERE channel = $1 AND created_at < $2",
                    self.schema.as_str()
                );
                let ch = channel.as_str();
                let t: i64 = self
                    .with_client("durable start time", |c| async move {
                        let row = c
                            .query_one_p(&sql, &[(&ch, Type::TEXT), (&at, Type::TIMESTAMPTZ)])
                            .await?;
                        Ok(row.get(0))
                    })
                    .await?;
                Position::end_of_tick(t)
            }
        })
    }

    pub(super) async fn create_group(
        &self,
        channel: &ChannelName,
        group: &str,
        p: Position,
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO {}.groups (channel, group_name, tick_id, xid, seq) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            self.schema.as_str()
        );
        let (ch, xid) = (channel.as_str(), p.xid8());
        self.with_client("creating the durable group", |c| async move {
            c.execute_p(
                &sql,
                &[
                    (&ch, Type::TEXT),
                    (&group, Type::TEXT),
                    (&p.tick, Type::INT8),
                    (&xid, Type::XID8),
                    (&p.seq, Type::INT8),
                ],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// The group's cursor and its count of messages lost to max-age
    /// retention (reset to zero: the caller reports them).
    pub(super) async fn load_cursor(
        &self,
        channel: &ChannelName,
        group: &str,
    ) -> Result<(Position, i64)> {
        let s = self.schema.as_str();
        let sql = format!(
            "WITH old AS (SELECT tick_id, xid, seq, lost FROM {s}.groups \
                          WHERE channel = $1 AND group_name = $2 FOR UPDATE) \
             UPDATE {s}.groups g SET lost = 0 FROM old \
             WHERE g.channel = $1 AND g.group_name = $2 \
             RETURNING old.tick_id, old.xid, old.seq, old.lost"
        );
        let ch = channel.as_str();
        let row = self
            .with_client("loading the durable cursor", |c| async move {
                c.query_opt_p(&sql, &[(&ch, Type::TEXT), (&group, Type::TEXT)])
                    .await
            })
            .await?
            .ok_or_else(|| {
                Error::new(
                    Origin::Conflict,
                    format!("durable group {group:?} of {ch:?} does not exist (was it removed?)"),
                )
                .at(Stage::Durable)
            })?;
        Ok((position_of(&row, 0)?, row.get(3)))
    }

    fn tick_sql(&self) -> String {
        let s = self.schema.as_str();
        format!(
            "WITH old AS (SELECT lost FROM {s}.groups \
                          WHERE channel = $1 AND group_name = $2 AND lost > 0 FOR UPDATE), \
             upd AS (UPDATE {s}.groups g SET lost = 0 FROM old \
                     WHERE g.channel = $1 AND g.group_name = $2 RETURNING old.lost) \
             SELECT {s}.tick($1), coalesce((SELECT lost FROM upd), 0)"
        )
    }

    fn read_sql(&self) -> String {
        format!(
            "SELECT tick_id, xid, seq, published_at, payload \
             FROM {}.read($1, $2, $3, $4, $5)",
            self.schema.as_str()
        )
    }

    /// Ticks the channel and, in the same round trip, reports (and
    /// clears) the group's messages lost to max-age retention. Returns the
    /// channel's latest tick and the count lost.
    pub(super) async fn tick_and_take_lost(
        &self,
        channel: &ChannelName,
        group: &str,
    ) -> Result<(i64, i64)> {
        let sql = self.tick_sql();
        let ch = channel.as_str();
        let row = self
            .with_client("ticking the durable channel", |c| async move {
                c.query_one_p(&sql, &[(&ch, Type::TEXT), (&group, Type::TEXT)])
                    .await
            })
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// [`tick_and_take_lost`](Self::tick_and_take_lost) then
    /// [`read`](Self::read), pipelined: both statements leave in one write
    /// and the server runs them in order (each in its own transaction, so
    /// the read sees the new tick), one round trip instead of two between
    /// a wake-up and its messages. Returns the channel's latest tick, the
    /// count lost and the rows.
    pub(super) async fn tick_and_read(
        &self,
        channel: &ChannelName,
        group: &str,
        after: Position,
        limit: usize,
    ) -> Result<(i64, i64, Vec<Row>)> {
        let (tick_sql, read_sql) = (self.tick_sql(), self.read_sql());
        let (ch, xid) = (channel.as_str(), after.xid8());
        // Bounded by the caller's batch_size, which fits an i32.
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let (tick, rows) = self
            .with_client("ticking and reading the durable channel", |c| async move {
                let tick_params: &Params = &[(&ch, Type::TEXT), (&group, Type::TEXT)];
                let read_params: &Params = &[
                    (&ch, Type::TEXT),
                    (&after.tick, Type::INT8),
                    (&xid, Type::XID8),
                    (&after.seq, Type::INT8),
                    (&limit, Type::INT4),
                ];
                if c.unnamed() {
                    // A pooler in transaction mode may give the second
                    // statement of a pipeline another server connection
                    // before the first one ended: one after the other.
                    let tick = c.query_one_p(&tick_sql, tick_params).await?;
                    return Ok((tick, c.query_p(&read_sql, read_params).await?));
                }
                futures::try_join!(
                    c.query_one_p(&tick_sql, tick_params),
                    c.query_p(&read_sql, read_params)
                )
            })
            .await?;
        Ok((tick.get(0), tick.get(1), rows_of(&rows)?))
    }

    pub(super) async fn read(
        &self,
        channel: &ChannelName,
        after: Position,
        limit: usize,
    ) -> Result<Vec<Row>> {
        let sql = self.read_sql();
        let (ch, xid) = (channel.as_str(), after.xid8());
        // Bounded by the caller's batch_size, which fits an i32.
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows = self
            .with_client("reading the durable channel", |c| async move {
                c.query_p(
                    &sql,
                    &[
                        (&ch, Type::TEXT),
                        (&after.tick, Type::INT8),
                        (&xid, Type::XID8),
                        (&after.seq, Type::INT8),
                        (&limit, Type::INT4),
                    ],
                )
                .await
            })
            .await?;
        rows_of(&rows)
    }

    /// The bounds of batch `after.tick` when the rest of it after `after`
    /// is one plain range scan (see `range_of` in the schema script).
    pub(super) async fn range_of(
        &self,
        channel: &ChannelName,
        after: Position,
    ) -> Result<Option<Range>> {
        let sql = format!(
            "SELECT lo, snap FROM {}.range_of($1, $2, $3, $4)",
            self.schema.as_str()
        );
        let (ch, xid) = (channel.as_str(), after.xid8());
        let row = self
            .with_client("reading the durable batch bounds", |c| async move {
                c.query_opt_p(
                    &sql,
                    &[
                        (&ch, Type::TEXT),
                        (&after.tick, Type::INT8),
                        (&xid, Type::XID8),
                        (&after.seq, Type::INT8),
                    ],
                )
                .await
            })
            .await?;
        row.map(|r| {
            Ok(Range {
                tick: after.tick,
                lo: r.try_get(0).map_err(|e| {
                    Error::new(Origin::Durable, "the server sent an unreadable xid").with_source(e)
                })?,
                snap: r.try_get(1).map_err(|e| {
                    Error::new(Origin::Durable, "the server sent an unreadable snapshot")
                        .with_source(e)
                })?,
            })
        })
        .transpose()
    }

    /// Writes the group's cursor (never backwards).
    pub(super) async fn write_ack(&self, acks: &Acks, p: Position) -> Result<()> {
        let params = acks.ack_params(p);
        let sql = &acks.ack_sql;
        self.with_client("writing acks", |c| async move {
            c.execute_p(sql, &params.typed()).await?;
            Ok(())
        })
        .await
    }
}

/// Rows of `read()`: position, publish time, payload.
fn rows_of(rows: &[tokio_postgres::Row]) -> Result<Vec<Row>> {
    rows.iter()
        .map(|r| {
            Ok(Row {
                position: position_of(r, 0)?,
                published_at: r.get(3),
                payload: r.get(4),
            })
        })
        .collect()
}

/// Reads `(tick_id, xid, seq)` starting at column `at`.
pub(crate) fn position_of(row: &tokio_postgres::Row, at: usize) -> Result<Position> {
    let xid: Xid8 = row.try_get(at + 1).map_err(|e| {
        Error::new(Origin::Durable, "the server sent an unreadable xid").with_source(e)
    })?;
    Ok(Position {
        tick: row.get(at),
        xid: xid.0,
        seq: row.get(at + 2),
    })
}

/// A batch whose rest is one plain range scan: its tick, the previous
/// tick's xmax, and its own snapshot.
pub(super) struct Range {
    pub(super) tick: i64,
    pub(super) lo: Xid8,
    pub(super) snap: Snapshot,
}

pub(super) struct Row {
    pub(super) position: Position,
    pub(super) published_at: SystemTime,
    pub(super) payload: String,
}
