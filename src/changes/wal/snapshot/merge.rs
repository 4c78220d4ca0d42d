//! How a chunk of rows read from a table merges into the stream, without
//! I/O: which changes the stream delivered that the chunk's snapshot did
//! not see, and so which rows of the chunk would be stale.
//!
//! The rule (DBLog's watermarks, made exact with the chunk's snapshot):
//! a chunk is handed over at its watermark `H`, a message written after
//! the chunk's snapshot was taken. Every transaction the snapshot sees
//! committed before it was taken, so it reached the stream before `H`.
//! A row of the chunk is dropped (the stream's version wins) when a
//! transaction delivered before `H` touched its key and either
//! * came after the previous watermark of the table (the chunk's window:
//!   the row already went out as a change), or
//! * is not visible to the chunk's snapshot (it committed before `H` but
//!   after, or while, the snapshot was taken; a commit is in the WAL
//!   before other sessions see it, so such a transaction can even be
//!   delivered before the snapshot was taken).
//!
//! Changes after `H` come after the chunk's rows, so they apply on top.
//! Changes seen by the snapshot are forgotten once a chunk is merged
//! (every later snapshot sees them too); unseen ones are kept until a
//! chunk's snapshot sees them.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::changes::{ChangeEvent, Op};

/// What a snapshot (`pg_current_snapshot()`) sees, by 32-bit xid (what
/// pgoutput sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Visibility {
    xmax: u32,
    xip: HashSet<u32>,
    /// Sees no transaction at all (see [`Visibility::none`]).
    blind: bool,
}

impl Visibility {
    /// Parses `pg_snapshot` text: `xmin:xmax:xip1,xip2,...` (64-bit xids).
    pub(crate) fn parse(text: &str) -> Result<Visibility, String> {
        let bad = || format!("{text:?} is not a pg_snapshot");
        let mut parts = text.split(':');
        let (Some(_xmin), Some(xmax), Some(xip), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let low = |s: &str| s.parse::<u64>().map(|x| x as u32).map_err(|_| bad());
        let xip = if xip.is_empty() {
            HashSet::new()
        } else {
            xip.split(',').map(low).collect::<Result<_, _>>()?
        };
        Ok(Visibility {
            xmax: low(xmax)?,
            xip,
            blind: false,
        })
    }

    /// A snapshot that sees nothing: every tracked change makes its row
    /// stale (the safe side, for a snapshot that could not be read).
    pub(crate) fn none() -> Visibility {
        Visibility {
            xmax: 0,
            xip: HashSet::new(),
            blind: true,
        }
    }

    /// Whether a committed transaction `xid` is visible to the snapshot:
    /// it started before the snapshot's `xmax` and was not running then.
    /// Modulo-2^32 comparison, as the server does for 32-bit xids.
    pub(crate) fn sees(&self, xid: u32) -> bool {
        !self.blind && (xid.wrapping_sub(self.xmax) as i32) < 0 && !self.xip.contains(&xid)
    }
}

/// A change the stream delivered to a tracked table.
#[derive(Debug, Clone)]
struct Seen {
    xid: u32,
    /// The key (JSON text of the key columns' values); `None`: every row
    /// (a truncate).
    key: Option<String>,
    /// Delivered after the table's last watermark.
    in_window: bool,
}

#[derive(Debug, Default)]
struct Track {
    key_columns: Vec<String>,
    seen: Vec<Seen>,
}

/// The changes delivered to the tables being read, since their tracking
/// began.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    tables: HashMap<(String, String), Track>,
}

/// A row's key as text: the JSON array of its key columns' values (a
/// missing column is `null`).
pub(crate) fn key_of(row: &Value, key_columns: &[String]) -> String {
    let values: Vec<&Value> = key_columns
        .iter()
        .map(|c| row.get(c).unwrap_or(&Value::Null))
        .collect();
    serde_json::to_string(&values).unwrap_or_default()
}

impl Tracker {
    /// Starts tracking the changes of `table` (again: what was tracked
    /// is forgotten).
    pub(crate) fn begin(&mut self, table: (String, String), key_columns: Vec<String>) {
        self.tables.insert(
            table,
            Track {
                key_columns,
                seen: Vec::new(),
            },
        );
    }

    /// Stops tracking `table`.
    pub(crate) fn end(&mut self, table: &(String, String)) {
        self.tables.remove(table);
    }

    /// Whether any table is tracked.
    pub(crate) fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Records a change of transaction `xid` the stream delivers.
    pub(crate) fn observe(&mut self, xid: u32, event: &ChangeEvent<Value>) {
        // Lookups by (schema, table) without allocating per change would
        // need a borrowed key type; a tracked table is the rare case.
        let Some(track) = self
            .tables
            .get_mut(&(event.schema.clone(), event.table.clone()))
        else {
            return;
        };
        let mut push = |key| {
            track.seen.push(Seen {
                xid,
                key,
                in_window: true,
            })
        };
        match event.op {
            Op::Truncate => push(None),
            _ => {
                // An update that changes the key carries the old key too.
                for row in [&event.old, &event.new].into_iter().flatten() {
                    let key = key_of(row, &track.key_columns);
                    push(Some(key));
                }
            }
        }
    }

    /// Merges a chunk of `rows` of `table` read under `snapshot`, at its
    /// watermark: returns the rows to hand over, and starts the table's
    /// next window.
    pub(crate) fn merge(
        &mut self,
        table: &(String, String),
        snapshot: &Visibility,
        rows: Vec<Value>,
    ) -> Vec<Value> {
        let Some(track) = self.tables.get_mut(table) else {
            return rows;
        };
        let stale = |s: &Seen| s.in_window || !snapshot.sees(s.xid);
        let mut drop_all = false;
        let mut dropped = HashSet::new();
        for s in track.seen.iter().filter(|s| stale(s)) {
            match &s.key {
                None => drop_all = true,
                Some(k) => {
                    dropped.insert(k.as_str());
                }
            }
        }
        let kept = if drop_all {
            Vec::new()
        } else {
            rows.into_iter()
                .filter(|r| !dropped.contains(key_of(r, &track.key_columns).as_str()))
                .collect()
        };
        // Seen by this snapshot: seen by every later one too.
        track.seen.retain(|s| !snapshot.sees(s.xid));
        for s in &mut track.seen {
            s.in_window = false;
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t() -> (String, String) {
        ("public".to_owned(), "t".to_owned())
    }

    fn change(op: Op, old: Option<Value>, new: Option<Value>) -> ChangeEvent<Value> {
        let mut e = ChangeEvent::new(op, "public", "t");
        e.old = old;
        e.new = new;
        e
    }

    fn rows(ids: &[i64]) -> Vec<Value> {
        ids.iter().map(|id| json!({"id": id, "v": "x"})).collect()
    }

    fn ids(rows: &[Value]) -> Vec<i64> {
        rows.iter().filter_map(|r| r["id"].as_i64()).collect()
    }

    #[test]
    fn snapshots_parse_and_see_by_xid() {
        let s = Visibility::parse("100:110:102,105").unwrap();
        assert!(s.sees(99) && s.sees(101) && s.sees(109));
        assert!(!s.sees(102) && !s.sees(105) && !s.sees(110) && !s.sees(200));
        let empty = Visibility::parse("7:7:").unwrap();
        assert!(empty.sees(6) && !empty.sees(7));
        // 64-bit xids past one epoch compare by their low 32 bits.
        let wrapped = Visibility::parse(&format!("{0}:{0}:", (1u64 << 32) + 5)).unwrap();
        assert!(wrapped.sees(4) && wrapped.sees(u32::MAX) && !wrapped.sees(5));
        for bad in ["", "1:2", "a:b:", "1:2:3:4", "1:2:x"] {
            assert!(Visibility::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rows_changed_in_the_window_or_unseen_by_the_snapshot_are_dropped() {
        let mut tr = Tracker::default();
        tr.begin(t(), vec!["id".to_owned()]);
        let snap = Visibility::parse("50:60:55").unwrap();
        // Seen by the snapshot, but in the window: the change went out.
        tr.observe(40, &change(Op::Update, None, Some(json!({"id": 1}))));
        // Not seen by the snapshot (running when it was taken).
        tr.observe(55, &change(Op::Delete, Some(json!({"id": 2})), None));
        // Another table: ignored.
        let mut other = change(Op::Insert, None, Some(json!({"id": 3})));
        other.table = "u".to_owned();
        tr.observe(41, &other);
        let kept = tr.merge(&t(), &snap, rows(&[1, 2, 3, 4]));
        assert_eq!(ids(&kept), [3, 4]);

        // Next window: xid 55 is still unseen by a snapshot that does not
        // see it, and forgotten once one does.
        let still = Visibility::parse("55:70:55").unwrap();
        assert_eq!(ids(&tr.merge(&t(), &still, rows(&[2, 5]))), [5]);
        let later = Visibility::parse("80:80:").unwrap();
        assert_eq!(ids(&tr.merge(&t(), &later, rows(&[2, 5]))), [2, 5]);
    }

    #[test]
    fn a_key_change_drops_both_keys_and_a_truncate_drops_all() {
        let mut tr = Tracker::default();
        tr.begin(t(), vec!["id".to_owned()]);
        tr.observe(
            10,
            &change(Op::Update, Some(json!({"id": 1})), Some(json!({"id": 9}))),
        );
        let snap = Visibility::parse("20:20:").unwrap();
        assert_eq!(ids(&tr.merge(&t(), &snap, rows(&[1, 2, 9]))), [2]);
        tr.observe(21, &change(Op::Truncate, None, None));
        assert!(tr.merge(&t(), &snap, rows(&[3])).is_empty());
        // The truncate (unseen by that snapshot) is kept until one sees it.
        let after = Visibility::parse("30:30:").unwrap();
        assert_eq!(ids(&tr.merge(&t(), &after, rows(&[3]))), [3]);
    }

    #[test]
    fn composite_keys_compare_by_all_columns() {
        let cols = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(
            key_of(&json!({"b": "x", "a": 1, "v": 2}), &cols),
            r#"[1,"x"]"#
        );
        assert_eq!(key_of(&json!({"a": 1}), &cols), "[1,null]");
        let mut tr = Tracker::default();
        tr.begin(t(), cols);
        tr.observe(
            1,
            &change(Op::Delete, Some(json!({"a": 1, "b": "x"})), None),
        );
        let kept = tr.merge(
            &t(),
            &Visibility::parse("5:5:").unwrap(),
            vec![json!({"a": 1, "b": "x"}), json!({"a": 1, "b": "y"})],
        );
        assert_eq!(kept, vec![json!({"a": 1, "b": "y"})]);
    }
}
