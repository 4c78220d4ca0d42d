//! [`ChangeEvent`]: one row change, whatever feed it came from.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Origin, Result};

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Op {
    /// A row was inserted: `new` is set.
    Insert,
    /// A row was updated: `new` is set, `old` depends on the feed.
    Update,
    /// A row was deleted: `old` is set.
    Delete,
    /// The table was truncated: neither `old` nor `new`.
    Truncate,
    /// A row as it was read by a snapshot or backfill of the table (WAL
    /// feed, feature `wal`: "Snapshots and backfill" in its module docs),
    /// not a change: `new` is set. Apply it as an upsert.
    Read,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Read => "read",
        })
    }
}

impl FromStr for Op {
    type Err = Error;

    /// Parses `insert`, `update`, `delete`, `truncate` or `read`.
    fn from_str(s: &str) -> Result<Op> {
        match s {
            "insert" => Ok(Op::Insert),
            "update" => Ok(Op::Update),
            "delete" => Ok(Op::Delete),
            "truncate" => Ok(Op::Truncate),
            "read" => Ok(Op::Read),
            other => Err(Error::new(
                Origin::Config,
                format!("{other:?} is not an operation (insert, update, delete, truncate, read)"),
            )),
        }
    }
}

/// One change of one row (or a `TRUNCATE` of a table), with the row decoded
/// as `T` (any serde type; `serde_json::Value` by default).
///
/// The same shape comes from the trigger feed (as the JSON payload of a
/// durable channel, so `durable.subscribe::<ChangeEvent<Row>>(..)` reads it)
/// and from the WAL feed. Its JSON form has the keys `op`, `schema`,
/// `table`, `old`, `new`, `xid`, `changed_at` and `committed_at`; times are
/// RFC 3339 strings in UTC.
///
/// ```
/// use pg_pubsub::changes::{ChangeEvent, Op};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: i64 }
///
/// let json = r#"{"op":"insert","schema":"public","table":"orders",
///                "old":null,"new":{"id":7},"xid":745}"#;
/// let change: ChangeEvent<Order> = serde_json::from_str(json)?;
/// assert_eq!(change.op, Op::Insert);
/// assert_eq!(change.new.map(|o| o.id), Some(7));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChangeEvent<T = serde_json::Value> {
    /// What happened.
    pub op: Op,
    /// The table's schema (unquoted).
    pub schema: String,
    /// The table's name (unquoted).
    pub table: String,
    /// The row before an update or delete (which columns: see the feed).
    #[serde(default = "none")]
    pub old: Option<T>,
    /// The row after an insert or update.
    #[serde(default = "none")]
    pub new: Option<T>,
    /// The transaction's id: the 64-bit `xid8` from triggers, the 32-bit
    /// xid the server sends from the WAL.
    #[serde(default)]
    pub xid: Option<u64>,
    /// When the change was made (`clock_timestamp()` in the trigger).
    #[serde(default, with = "rfc3339")]
    pub changed_at: Option<SystemTime>,
    /// When its transaction committed (WAL feed only).
    #[serde(default, with = "rfc3339")]
    pub committed_at: Option<SystemTime>,
    /// Set when `old` and `new` hold only the row's primary key: a trigger
    /// feed in NOTIFY mode whose event would not fit in a notification
    /// (8000 bytes). Read the row from the table. Absent from the JSON
    /// when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub key_only: bool,
    /// Set when `old` and `new` were left out: a NOTIFY event that would
    /// not fit in 8000 bytes even with the primary key alone (a long or
    /// escape-heavy key, or an update carrying it twice), or a trigger
    /// whose column filter no longer matches its table (see the module
    /// docs). `op`, `schema`, `table`, `xid` and `changed_at` are still
    /// set; read the table to learn what changed. Absent from the JSON
    /// when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub rows_omitted: bool,
    /// The table's columns with their types, in table order: set by the WAL
    /// feed (from its Relation message; shared by the table's events), absent
    /// from trigger feed events (ask [`Changes::columns`](crate::changes::Changes::columns)).
    /// Absent from the JSON when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Arc<[Column]>>,
}

/// A column of a change's table and its type, so a consumer can decode a
/// value without guessing (see the module docs for each type's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Column {
    /// The column's name.
    pub name: String,
    /// Its type as `format_type(oid, NULL)` prints it: `integer`, `numeric`,
    /// `timestamp with time zone`, `integer[]`, `shop.mood` (a type outside
    /// the search path is schema-qualified).
    #[serde(rename = "type")]
    pub type_name: String,
    /// The type's oid (fixed for built-in types; a database's own for others).
    pub type_oid: u32,
    /// Part of the replica identity (WAL feed) or of the primary key
    /// ([`Changes::columns`](crate::changes::Changes::columns)).
    #[serde(default)]
    pub key: bool,
}

impl Column {
    pub(crate) fn new(name: String, type_name: String, type_oid: u32, key: bool) -> Column {
        Column {
            name,
            type_name,
            type_oid,
            key,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn none<T>() -> Option<T> {
    None
}

impl<T> ChangeEvent<T> {
    /// A change with no rows and no times, for feeds to fill in.
    #[cfg_attr(not(feature = "wal"), allow(dead_code))] // the WAL feed builds its events with it
    pub(crate) fn new(op: Op, schema: impl Into<String>, table: impl Into<String>) -> Self {
        ChangeEvent {
            op,
            schema: schema.into(),
            table: table.into(),
            old: None,
            new: None,
            xid: None,
            changed_at: None,
            committed_at: None,
            key_only: false,
            rows_omitted: false,
            columns: None,
        }
    }

    /// The same change with its rows replaced (decoded into another type).
    #[cfg_attr(not(feature = "wal"), allow(dead_code))]
    pub(crate) fn with_rows<U>(self, old: Option<U>, new: Option<U>) -> ChangeEvent<U> {
        ChangeEvent {
            op: self.op,
            schema: self.schema,
            table: self.table,
            old,
            new,
            xid: self.xid,
            changed_at: self.changed_at,
            committed_at: self.committed_at,
            key_only: self.key_only,
            rows_omitted: self.rows_omitted,
            columns: self.columns,
        }
    }

    /// Whether the event does not carry the whole (filtered) rows, so the
    /// consumer must read the table for them: [`key_only`](Self::key_only)
    /// or [`rows_omitted`](Self::rows_omitted).
    pub fn must_reread(&self) -> bool {
        self.key_only || self.rows_omitted
    }

    /// The row as it is after the change (`new`), or as it was before a
    /// delete (`old`).
    pub fn row(&self) -> Option<&T> {
        self.new.as_ref().or(self.old.as_ref())
    }
}

/// A position in the WAL: a log sequence number, printed as PostgreSQL
/// does (`16/B374D848`).
///
/// ```
/// use pg_pubsub::changes::Lsn;
/// let lsn: Lsn = "16/B374D848".parse()?;
/// assert_eq!(u64::from(lsn), 0x16_B374_D848);
/// assert_eq!(lsn.to_string(), "16/B374D848");
/// # Ok::<(), pg_pubsub::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> u64 {
        lsn.0
    }
}

impl From<u64> for Lsn {
    fn from(n: u64) -> Lsn {
        Lsn(n)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = Error;

    fn from_str(s: &str) -> Result<Lsn> {
        let bad = || {
            Error::new(
                Origin::Config,
                format!("{s:?} is not an LSN (expected hex `X/Y`, e.g. 16/B374D848)"),
            )
        };
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Lsn, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `Option<SystemTime>` as an RFC 3339 string (any offset in, UTC out).
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_micros(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => humantime::parse_rfc3339_weak(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_and_rejects_garbage() {
        for text in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        for bad in ["", "16", "16/", "x/1", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn change_event_json_round_trip() {
        let mut change = ChangeEvent::<serde_json::Value>::new(Op::Update, "s", "t");
        change.old = Some(serde_json::json!({"id": 1}));
        change.new = Some(serde_json::json!({"id": 2}));
        change.changed_at =
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000));
        let json = serde_json::to_string(&change).unwrap();
        assert!(
            json.contains(r#""changed_at":"1970-01-01T00:00:01.500000Z""#),
            "{json}"
        );
        let back: ChangeEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, change);
    }
}
