//! [`Position`]: where a message sits in a durable channel's delivery order.

use std::error::Error as StdError;
use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

use crate::error::{Error, Origin, Result};

/// The place of a message in its channel's delivery order:
/// `(tick, xid, seq)`, compared in that order.
///
/// `tick` is the batch the message was delivered in, `xid` the publishing
/// transaction (`xid8`), `seq` its number from the `messages_seq`
/// sequence. Every group sees the same positions in the same order; a
/// group's cursor is the position of the last message it acked (every
/// message at or before it counts as acked).
///
/// Printed and parsed as `tick/xid/seq`:
///
/// ```
/// use pg_pubsub::durable::Position;
/// let p: Position = "3/745/12".parse()?;
/// assert_eq!(p.to_string(), "3/745/12");
/// assert!(p < "4/700/1".parse()?);
/// # Ok::<(), pg_pubsub::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The tick (batch) id, per channel, from 1; 0 is "before the first tick".
    pub tick: i64,
    /// The publishing transaction's id (`xid8`, epoch-extended).
    pub xid: u64,
    /// The message's number within the schema's sequence.
    pub seq: i64,
}

impl Position {
    /// Before every message: a group starting here reads everything retained.
    pub const EARLIEST: Position = Position {
        tick: 0,
        xid: 0,
        seq: 0,
    };

    /// The end of batch `tick`: everything delivered in it or before is passed.
    pub fn end_of_tick(tick: i64) -> Position {
        Position {
            tick,
            xid: u64::MAX,
            seq: i64::MAX,
        }
    }

    /// Before every message of batch `tick`.
    pub(crate) fn start_of_tick(tick: i64) -> Position {
        Position {
            tick,
            xid: 0,
            seq: 0,
        }
    }

    /// The `xid` as a statement parameter.
    pub(crate) fn xid8(&self) -> Xid8 {
        Xid8(self.xid)
    }
}

/// An `xid8` in PostgreSQL's binary form (a big-endian `uint8`): no text
/// conversion on either side, which costs noticeably per row on a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Xid8(pub(crate) u64);

impl<'a> FromSql<'a> for Xid8 {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into()?;
        Ok(Xid8(u64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "xid8"
    }
}

impl ToSql for Xid8 {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "xid8"
    }

    to_sql_checked!();
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tick, self.xid, self.seq)
    }
}

impl FromStr for Position {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::new(
                Origin::Config,
                format!("{s:?} is not a position (expected tick/xid/seq, e.g. 3/745/12)"),
            )
        };
        let mut parts = s.split('/');
        let (Some(t), Some(x), Some(q), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let tick: i64 = t.parse().map_err(|_| bad())?;
        let xid: u64 = x.parse().map_err(|_| bad())?;
        let seq: i64 = q.parse().map_err(|_| bad())?;
        if tick < 0 || seq < 0 {
            return Err(bad());
        }
        Ok(Position { tick, xid, seq })
    }
}

/// A `pg_snapshot` kept in PostgreSQL's binary form, handed back as is:
/// as a parameter it costs the server no parsing (a text parameter cast to
/// `pg_snapshot` in a filter is parsed again for every row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot(Vec<u8>);

impl<'a> FromSql<'a> for Snapshot {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Snapshot(raw.to_vec()))
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "pg_snapshot"
    }
}

impl ToSql for Snapshot {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "pg_snapshot"
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let p = Position::end_of_tick(7);
        assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
        assert!(Position::EARLIEST < p);
        assert!(
            p < Position {
                tick: 8,
                xid: 1,
                seq: 1
            }
        );
        for bad in ["", "1/2", "1/2/3/4", "a/2/3", "-1/2/3", "1/-2/3"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }
}
