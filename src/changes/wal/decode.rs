//! pgoutput (protocol version 1) messages → transaction bounds, logical
//! messages and [`ChangeEvent`]s whose rows are the JSON `to_json(row)`
//! gives (the trigger feed's shape).
//!
//! pgoutput sends each value as its type's text output. Turning that into
//! `to_json`'s JSON needs the type's category (domains look through to
//! their base type, arrays and composites recurse), which the stream task
//! reads from the catalog when a Relation message arrives ([`TYPES_SQL`]);
//! the decoder then keeps one resolved [`Shape`] per column.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::conn::pg_time;
use crate::changes::{ChangeEvent, Column, Lsn, Op};

/// How a type's text output becomes JSON (PostgreSQL's `json_categorize_type`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Shape {
    Bool,
    /// int2/4/8, float4/8, numeric: a JSON number, unless the text is not
    /// one (`NaN`, `Infinity`): then a string.
    Number,
    /// `timestamp`: ISO text with `T` between date and time.
    Timestamp,
    /// `timestamptz`: as `Timestamp`, and the offset as `+HH:MM`.
    TimestampTz,
    Json,
    /// Everything else (text, enums, ranges, uuid, bytea, date, ...): the text.
    Text,
    /// An array of `Shape`, elements separated by the delimiter.
    Array(Box<Shape>, u8),
    /// A composite type's fields, by name.
    Composite(Arc<[(String, Shape)]>),
}

/// What the catalog says about one type (a row of [`TYPES_SQL`]).
#[derive(Debug, Clone)]
pub(crate) struct TypeRow {
    pub(crate) oid: u32,
    /// `pg_type.typtype`: b(ase), c(omposite), d(omain), e(num), r(ange), ...
    pub(crate) typtype: char,
    pub(crate) category: char,
    pub(crate) elem: u32,
    pub(crate) base: u32,
    pub(crate) delim: u8,
    pub(crate) name: String,
    pub(crate) fields: Vec<(String, u32)>,
}

/// The catalog query for [`TypeRow`]s: `$1` the type oids.
pub(crate) const TYPES_SQL: &str =
    "SELECT t.oid, t.typtype::text, t.typcategory::text, t.typelem, \
       t.typbasetype, t.typdelim::text, format_type(t.oid, NULL), \
       COALESCE(ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = t.typrelid \
                AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum), '{}'), \
       COALESCE(ARRAY(SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = t.typrelid \
                AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum), '{}') \
     FROM pg_type t WHERE t.oid = ANY($1::oid[])";

impl TypeRow {
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> TypeRow {
        let first = |s: String| s.chars().next().unwrap_or(' ');
        let names: Vec<String> = row.get(7);
        let oids: Vec<u32> = row.get(8);
        TypeRow {
            oid: row.get(0),
            typtype: first(row.get(1)),
            category: first(row.get(2)),
            elem: row.get(3),
            base: row.get(4),
            delim: row.get::<_, String>(5).bytes().next().unwrap_or(b','),
            name: row.get(6),
            fields: names.into_iter().zip(oids).collect(),
        }
    }

    /// A type the catalog does not have (any more): text.
    pub(crate) fn unknown(oid: u32) -> TypeRow {
        TypeRow {
            oid,
            typtype: ' ',
            category: ' ',
            elem: 0,
            base: 0,
            delim: b',',
            name: String::new(),
            fields: Vec::new(),
        }
    }

    /// The types this one refers to (element, base, fields).
    pub(crate) fn refs(&self) -> impl Iterator<Item = u32> + '_ {
        [self.elem, self.base]
            .into_iter()
            .chain(self.fields.iter().map(|(_, t)| *t))
            .filter(|&t| t != 0)
    }
}

// Type OIDs (pg_type.h); stable across PostgreSQL versions.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;
const JSONB: u32 = 3802;

/// Resolves `oid` to a shape through `types` (domains to their base,
/// arrays and composites recursively). Unknown types are text.
pub(crate) fn shape(types: &HashMap<u32, TypeRow>, oid: u32) -> Shape {
    shape_at(types, oid, 0)
}

fn shape_at(types: &HashMap<u32, TypeRow>, oid: u32, depth: usize) -> Shape {
    match oid {
        BOOL => return Shape::Bool,
        INT2 | INT4 | INT8 | FLOAT4 | FLOAT8 | NUMERIC => return Shape::Number,
        TIMESTAMP => return Shape::Timestamp,
        TIMESTAMPTZ => return Shape::TimestampTz,
        JSON | JSONB => return Shape::Json,
        _ => {}
    }
    let Some(t) = types.get(&oid).filter(|_| depth < 32) else {
        return Shape::Text;
    };
    match t.typtype {
        'd' => shape_at(types, t.base, depth + 1),
        'c' => Shape::Composite(
            t.fields
                .iter()
                .map(|(name, ty)| (name.clone(), shape_at(types, *ty, depth + 1)))
                .collect(),
        ),
        _ if t.category == 'A' && t.elem != 0 => {
            let delim = types.get(&t.elem).map_or(b',', |e| e.delim);
            Shape::Array(Box::new(shape_at(types, t.elem, depth + 1)), delim)
        }
        _ => Shape::Text,
    }
}

/// A column of a relation, as the last Relation message described it.
#[derive(Debug, Clone)]
struct Col {
    name: String,
    shape: Shape,
}

#[derive(Debug, Clone)]
struct Relation {
    schema: String,
    table: String,
    cols: Vec<Col>,
    /// Part of the replica identity, per column.
    keys: Vec<bool>,
    /// The columns as events carry them.
    columns: Arc<[Column]>,
}

/// Relations seen on this stream (pgoutput sends each before its first
/// change in a session, and again when it changes).
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    relations: HashMap<u32, Relation>,
    /// Type names from Type messages (non-built-in types), for types the
    /// catalog no longer has.
    type_names: HashMap<u32, String>,
}

/// A Relation message, before its types are known.
#[derive(Debug)]
pub(crate) struct RawRelation {
    id: u32,
    schema: String,
    table: String,
    /// (name, type oid, key)
    cols: Vec<(String, u32, bool)>,
}

impl RawRelation {
    /// The type oids its columns use.
    pub(crate) fn type_oids(&self) -> Vec<u32> {
        self.cols.iter().map(|c| c.1).collect()
    }
}

/// What one pgoutput message decodes into.
#[derive(Debug)]
pub(crate) enum Decoded {
    Begin {
        final_lsn: Lsn,
        xid: u32,
        commit_time: SystemTime,
    },
    Commit {
        lsn: Lsn,
        end_lsn: Lsn,
        commit_time: SystemTime,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    Change(ChangeEvent<Value>),
    /// A truncate lists several tables.
    Truncate(Vec<ChangeEvent<Value>>),
    /// A relation's description: look its types up, then
    /// [`Decoder::add_relation`].
    Relation(RawRelation),
    /// Bookkeeping (Type, Origin): nothing to deliver.
    Nothing,
}

/// Why a message could not be decoded.
#[derive(Debug)]
pub(crate) struct DecodeFailure(pub(crate) String);

type R<T> = Result<T, DecodeFailure>;

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn short() -> DecodeFailure {
        DecodeFailure("pgoutput message ends early".into())
    }
    fn u8(&mut self) -> R<u8> {
        let (&b, rest) = self.buf.split_first().ok_or_else(Self::short)?;
        self.buf = rest;
        Ok(b)
    }
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Self::short());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn i16(&mut self) -> R<i16> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn cstr(&mut self) -> R<String> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(Self::short)?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
}

/// One column value of a TupleData.
enum Cell<'a> {
    Null,
    /// An unchanged TOASTed value the server did not send.
    Unchanged,
    Text(&'a [u8]),
}

fn tuple<'a>(r: &mut Reader<'a>) -> R<Vec<Cell<'a>>> {
    let n = r.i16()?;
    let mut cells = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        cells.push(match r.u8()? {
            b'n' => Cell::Null,
            b'u' => Cell::Unchanged,
            b't' | b'b' => {
                let len = r.u32()? as usize;
                Cell::Text(r.take(len)?)
            }
            other => {
                return Err(DecodeFailure(format!(
                    "unknown tuple column kind {:?}",
                    other as char
                )))
            }
        });
    }
    Ok(cells)
}

impl Decoder {
    /// Decodes one pgoutput message (the bytes of an XLogData).
    pub(crate) fn decode(&mut self, data: &Bytes) -> R<Decoded> {
        let mut r = Reader { buf: data };
        match r.u8()? {
            b'B' => {
                let final_lsn = Lsn(r.u64()?);
                let time = r.u64()? as i64;
                let xid = r.u32()?;
                Ok(Decoded::Begin {
                    final_lsn,
                    xid,
                    commit_time: pg_time(time),
                })
            }
            b'C' => {
                let _flags = r.u8()?;
                let lsn = Lsn(r.u64()?);
                let end_lsn = Lsn(r.u64()?);
                let time = r.u64()? as i64;
                Ok(Decoded::Commit {
                    lsn,
                    end_lsn,
                    commit_time: pg_time(time),
                })
            }
            b'M' => {
                let flags = r.u8()?;
                let lsn = Lsn(r.u64()?);
                let prefix = r.cstr()?;
                let len = r.u32()? as usize;
                let start = data.len() - r.buf.len();
                r.take(len)?;
                Ok(Decoded::Message {
                    transactional: flags & 1 == 1,
                    lsn,
                    prefix,
                    content: data.slice(start..start + len),
                })
            }
            b'R' => {
                let id = r.u32()?;
                let schema = r.cstr()?;
                let table = r.cstr()?;
                let _replica_identity = r.u8()?;
                let n = r.i16()?;
                let mut cols = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n {
                    let flags = r.u8()?;
                    let name = r.cstr()?;
                    let type_oid = r.u32()?;
                    let _typmod = r.u32()?;
                    cols.push((name, type_oid, flags & 1 == 1));
                }
                Ok(Decoded::Relation(RawRelation {
                    id,
                    schema,
                    table,
                    cols,
                }))
            }
            b'Y' => {
                let oid = r.u32()?;
                let namespace = r.cstr()?;
                let name = r.cstr()?;
                self.type_names.insert(oid, format!("{namespace}.{name}"));
                Ok(Decoded::Nothing)
            }
            b'O' => Ok(Decoded::Nothing),
            b'I' => {
                let rel = self.relation(r.u32()?)?;
                expect(&mut r, b'N')?;
                let new = row(rel, &tuple(&mut r)?, false);
                let mut ev = event(Op::Insert, rel);
                ev.new = Some(new);
                Ok(Decoded::Change(ev))
            }
            b'U' => {
                let rel = self.relation(r.u32()?)?;
                let mut old = None;
                let mut kind = r.u8()?;
                if kind == b'K' || kind == b'O' {
                    old = Some(row(rel, &tuple(&mut r)?, kind == b'K'));
                    kind = r.u8()?;
                }
                if kind != b'N' {
                    return Err(DecodeFailure(format!(
                        "update: expected 'N', got {:?}",
                        kind as char
                    )));
                }
                let new = row(rel, &tuple(&mut r)?, false);
                let mut ev = event(Op::Update, rel);
                ev.old = old;
                ev.new = Some(new);
                Ok(Decoded::Change(ev))
            }
            b'D' => {
                let rel = self.relation(r.u32()?)?;
                let kind = r.u8()?;
                if kind != b'K' && kind != b'O' {
                    return Err(DecodeFailure(format!(
                        "delete: expected 'K' or 'O', got {:?}",
                        kind as char
                    )));
                }
                let old = row(rel, &tuple(&mut r)?, kind == b'K');
                let mut ev = event(Op::Delete, rel);
                ev.old = Some(old);
                Ok(Decoded::Change(ev))
            }
            b'T' => {
                let n = r.u32()?;
                let _options = r.u8()?;
                // n comes from the wire: each relation takes 4 bytes of it.
                let mut events = Vec::with_capacity((n as usize).min(r.buf.len() / 4));
                for _ in 0..n {
                    let rel = self.relation(r.u32()?)?;
                    events.push(event(Op::Truncate, rel));
                }
                Ok(Decoded::Truncate(events))
            }
            other => Err(DecodeFailure(format!(
                "unknown pgoutput message {:?}",
                other as char
            ))),
        }
    }

    /// Keeps a relation, its columns' types resolved through `types` (the
    /// catalog's rows for them and the types they refer to).
    pub(crate) fn add_relation(&mut self, raw: RawRelation, types: &HashMap<u32, TypeRow>) {
        let name = |oid: u32| {
            types
                .get(&oid)
                .filter(|t| !t.name.is_empty())
                .map(|t| t.name.clone())
                .or_else(|| self.type_names.get(&oid).cloned())
                .unwrap_or_else(|| format!("oid {oid}"))
        };
        let columns: Arc<[Column]> = raw
            .cols
            .iter()
            .map(|(n, oid, key)| Column::new(n.clone(), name(*oid), *oid, *key))
            .collect();
        let cols = raw
            .cols
            .iter()
            .map(|(n, oid, _)| Col {
                name: n.clone(),
                shape: shape(types, *oid),
            })
            .collect();
        let keys = raw.cols.iter().map(|c| c.2).collect();
        self.relations.insert(
            raw.id,
            Relation {
                schema: raw.schema,
                table: raw.table,
                cols,
                keys,
                columns,
            },
        );
    }

    fn relation(&self, id: u32) -> R<&Relation> {
        self.relations.get(&id).ok_or_else(|| {
            DecodeFailure(format!(
                "change for relation {id} before its Relation message"
            ))
        })
    }
}

fn event(op: Op, rel: &Relation) -> ChangeEvent<Value> {
    let mut ev = ChangeEvent::new(op, rel.schema.as_str(), rel.table.as_str());
    ev.columns = Some(rel.columns.clone());
    ev
}

fn expect(r: &mut Reader<'_>, tag: u8) -> R<()> {
    let got = r.u8()?;
    if got == tag {
        Ok(())
    } else {
        Err(DecodeFailure(format!(
            "expected {:?}, got {:?}",
            tag as char, got as char
        )))
    }
}

/// A tuple as a JSON object. `key_only`: an identity-key tuple ('K'), where
/// only the replica identity's columns are meaningful. Unchanged TOASTed
/// columns are left out.
fn row(rel: &Relation, cells: &[Cell<'_>], key_only: bool) -> Value {
    let mut obj = Map::new();
    for ((col, key), cell) in rel.cols.iter().zip(&rel.keys).zip(cells) {
        if key_only && !key {
            continue;
        }
        match cell {
            Cell::Unchanged => {}
            Cell::Null => {
                obj.insert(col.name.clone(), Value::Null);
            }
            Cell::Text(bytes) => {
                let text = String::from_utf8_lossy(bytes);
                obj.insert(col.name.clone(), to_json(&col.shape, &text));
            }
        }
    }
    Value::Object(obj)
}

/// A value's text output as `to_json` renders it.
pub(crate) fn to_json(shape: &Shape, text: &str) -> Value {
    match shape {
        Shape::Bool => Value::Bool(text == "t"),
        // Integers (most values) without the JSON parser; NaN and
        // ±Infinity have no JSON number: they stay strings.
        Shape::Number => match text.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => text
                .parse::<serde_json::Number>()
                .map(Value::Number)
                .unwrap_or_else(|_| Value::String(text.to_owned())),
        },
        Shape::Timestamp => Value::String(xsd_timestamp(text, false)),
        Shape::TimestampTz => Value::String(xsd_timestamp(text, true)),
        Shape::Json => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        Shape::Text => Value::String(text.to_owned()),
        Shape::Array(element, delim) => {
            let mut p = Parser::new(text);
            p.skip_bounds();
            match p.array(element, *delim) {
                Some(v) if p.done() => v,
                _ => Value::String(text.to_owned()),
            }
        }
        Shape::Composite(fields) => {
            composite(text, fields).unwrap_or_else(|| Value::String(text.to_owned()))
        }
    }
}

/// ISO output (`2026-11-22 03:48:36.5+00`, DateStyle ISO) as `to_json`'s
/// XSD form (`2026-11-22T03:48:36.5+00:00`); `infinity` as it is.
fn xsd_timestamp(text: &str, tz: bool) -> String {
    let Some(space) = text.find(' ') else {
        return text.to_owned();
    };
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, " BC"),
        None => (text, ""),
    };
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str(&body[..space]);
    out.push('T');
    out.push_str(&body[space + 1..]);
    if tz {
        // The offset is the last `+`/`-` of the time part: `+HH` gets `:00`.
        if let Some(sign) = out[space + 1..].rfind(['+', '-']) {
            if out.len() - (space + 1 + sign) == 3 {
                out.push_str(":00");
            }
        }
    }
    out.push_str(bc);
    out
}

/// A cursor over an array or record literal.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            s: text.as_bytes(),
            i: 0,
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn done(&self) -> bool {
        self.i == self.s.len()
    }
    /// `[1:3]={...}`: explicit bounds, which `to_json` drops.
    fn skip_bounds(&mut self) {
        if self.peek() == Some(b'[') {
            if let Some(eq) = self.s.iter().position(|&b| b == b'=') {
                self.i = eq + 1;
            }
        }
    }
    /// A double-quoted item with backslash escapes.
    fn quoted(&mut self) -> Option<String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'\\' => {
                    out.push(*self.s.get(self.i + 1)?);
                    self.i += 2;
                }
                b'"' => {
                    self.i += 1;
                    // A record doubles quotes inside quotes.
                    if self.peek() == Some(b'"') {
                        out.push(b'"');
                        self.i += 1;
                        continue;
                    }
                    return String::from_utf8(out).ok();
                }
                c => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }
    fn array(&mut self, element: &Shape, delim: u8) -> Option<Value> {
        if self.peek()? != b'{' {
            return None;
        }
        self.i += 1;
        let mut items = Vec::new();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(Value::Array(items));
        }
        loop {
            let item = match self.peek()? {
                b'{' => self.array(element, delim)?,
                b'"' => to_json(element, &self.quoted()?),
                _ => {
                    let start = self.i;
                    while let Some(c) = self.peek() {
                        if c == delim || c == b'}' {
                            break;
                        }
                        self.i += 1;
                    }
                    let raw = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                    if raw == "NULL" {
                        Value::Null
                    } else {
                        to_json(element, raw.trim())
                    }
                }
            };
            items.push(item);
            match self.peek()? {
                b'}' => {
                    self.i += 1;
                    return Some(Value::Array(items));
                }
                c if c == delim => self.i += 1,
                _ => return None,
            }
        }
    }
}

/// A record literal `(1,"a b",)` as an object of `fields` (an empty field
/// is NULL).
fn composite(text: &str, fields: &[(String, Shape)]) -> Option<Value> {
    let mut p = Parser::new(text);
    if p.peek()? != b'(' {
        return None;
    }
    p.i += 1;
    let mut obj = Map::new();
    let mut n = 0;
    loop {
        let value = match p.peek()? {
            b'"' => Some(p.quoted()?),
            b',' | b')' => None,
            _ => {
                let start = p.i;
                while let Some(c) = p.peek() {
                    if c == b',' || c == b')' {
                        break;
                    }
                    p.i += 1;
                }
                Some(std::str::from_utf8(&p.s[start..p.i]).ok()?.to_owned())
            }
        };
        let (name, shape) = match fields.get(n) {
            Some((name, shape)) => (name.clone(), shape),
            None => (format!("f{}", n + 1), &Shape::Text),
        };
        obj.insert(name, value.map_or(Value::Null, |v| to_json(shape, &v)));
        n += 1;
        match p.peek()? {
            b')' => {
                p.i += 1;
                return p.done().then_some(Value::Object(obj));
            }
            b',' => p.i += 1,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_map_like_to_json() {
        assert_eq!(to_json(&Shape::Number, "42"), json!(42));
        assert_eq!(to_json(&Shape::Bool, "f"), json!(false));
        assert_eq!(to_json(&Shape::Number, "NaN"), json!("NaN"));
        assert_eq!(to_json(&Shape::Number, "-Infinity"), json!("-Infinity"));
        assert_eq!(to_json(&Shape::Number, "1.10"), json!(1.1));
        assert_eq!(to_json(&Shape::Json, r#"{"a": [1]}"#), json!({"a": [1]}));
        assert_eq!(to_json(&Shape::Text, "\\x00ff"), json!("\\x00ff"));
        assert_eq!(
            to_json(&Shape::TimestampTz, "2026-11-22 03:48:36.5+00"),
            json!("2026-11-22T03:48:36.5+00:00")
        );
        assert_eq!(
            to_json(&Shape::TimestampTz, "2026-11-22 03:48:36-05:30"),
            json!("2026-11-22T03:48:36-05:30")
        );
        assert_eq!(
            to_json(&Shape::TimestampTz, "0044-03-15 12:00:00+00 BC"),
            json!("0044-03-15T12:00:00+00:00 BC")
        );
        assert_eq!(
            to_json(&Shape::Timestamp, "2026-11-22 03:48:36"),
            json!("2026-11-22T03:48:36")
        );
        assert_eq!(to_json(&Shape::TimestampTz, "infinity"), json!("infinity"));
    }

    #[test]
    fn arrays_nest_and_drop_bounds() {
        let ints = Shape::Array(Box::new(Shape::Number), b',');
        assert_eq!(to_json(&ints, "{1,NULL,3}"), json!([1, null, 3]));
        assert_eq!(to_json(&ints, "{}"), json!([]));
        assert_eq!(to_json(&ints, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(&ints, "[0:1]={5,6}"), json!([5, 6]));
        let texts = Shape::Array(Box::new(Shape::Text), b',');
        assert_eq!(
            to_json(&texts, r#"{"a b","c\"d",e,"NULL"}"#),
            json!(["a b", "c\"d", "e", "NULL"])
        );
        assert_eq!(to_json(&ints, "{1,2"), json!("{1,2"));
    }

    #[test]
    fn composites_become_objects() {
        let fields: Arc<[(String, Shape)]> = vec![
            ("n".to_owned(), Shape::Number),
            ("label".to_owned(), Shape::Text),
            ("tags".to_owned(), Shape::Array(Box::new(Shape::Text), b',')),
            ("gone".to_owned(), Shape::Text),
        ]
        .into();
        let shape = Shape::Composite(fields);
        assert_eq!(
            to_json(&shape, r#"(1.5,"say ""hi""","{a,""b c""}",)"#),
            json!({"n": 1.5, "label": "say \"hi\"", "tags": ["a", "b c"], "gone": null})
        );
        assert_eq!(to_json(&shape, "(1"), json!("(1"));
    }

    /// pgoutput messages, built as the server sends them.
    fn msg(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    #[test]
    fn messages_decode_into_bounds_changes_and_logical_messages() {
        let mut d = Decoder::default();
        let begin = msg(&[
            b"B",
            &7u64.to_be_bytes(),
            &1_000_000i64.to_be_bytes(),
            &42u32.to_be_bytes(),
        ]);
        match d.decode(&begin).unwrap() {
            Decoded::Begin {
                final_lsn,
                xid,
                commit_time,
            } => {
                assert_eq!((final_lsn, xid), (Lsn(7), 42));
                assert_eq!(commit_time, pg_time(1_000_000));
            }
            other => panic!("{other:?}"),
        }
        // Relation 9: public.t (id int8 key, v text).
        let rel = msg(&[
            b"R",
            &9u32.to_be_bytes(),
            b"public\0t\0d",
            &2i16.to_be_bytes(),
            &[1],
            b"id\0",
            &INT8.to_be_bytes(),
            &(-1i32).to_be_bytes(),
            &[0],
            b"v\0",
            &25u32.to_be_bytes(),
            &(-1i32).to_be_bytes(),
        ]);
        let Decoded::Relation(raw) = d.decode(&rel).unwrap() else {
            panic!("relation")
        };
        assert_eq!(raw.type_oids(), vec![INT8, 25]);
        d.add_relation(raw, &HashMap::new());
        let insert = msg(&[
            b"I",
            &9u32.to_be_bytes(),
            b"N",
            &2i16.to_be_bytes(),
            b"t",
            &2u32.to_be_bytes(),
            b"17",
            b"t",
            &2u32.to_be_bytes(),
            b"hi",
        ]);
        let Decoded::Change(ev) = d.decode(&insert).unwrap() else {
            panic!("insert")
        };
        assert_eq!((ev.op, ev.table.as_str()), (Op::Insert, "t"));
        assert_eq!(ev.new, Some(serde_json::json!({"id": 17, "v": "hi"})));
        let columns = ev.columns.expect("columns");
        assert_eq!((columns[0].name.as_str(), columns[0].key), ("id", true));
        assert_eq!(columns[1].type_name, "oid 25", "no catalog row: the oid");
        // A delete with the identity key: only the key column; NULL for the rest.
        let delete = msg(&[
            b"D",
            &9u32.to_be_bytes(),
            b"K",
            &2i16.to_be_bytes(),
            b"t",
            &2u32.to_be_bytes(),
            b"17",
            b"n",
        ]);
        let Decoded::Change(ev) = d.decode(&delete).unwrap() else {
            panic!("delete")
        };
        assert_eq!(ev.old, Some(serde_json::json!({"id": 17})));
        // An update that left a TOASTed value out.
        let update = msg(&[
            b"U",
            &9u32.to_be_bytes(),
            b"N",
            &2i16.to_be_bytes(),
            b"t",
            &2u32.to_be_bytes(),
            b"18",
            b"u",
        ]);
        let Decoded::Change(ev) = d.decode(&update).unwrap() else {
            panic!("update")
        };
        assert_eq!(
            (ev.old, ev.new),
            (None, Some(serde_json::json!({"id": 18})))
        );
        let message = msg(&[
            b"M",
            &[1],
            &8u64.to_be_bytes(),
            b"app.x\0",
            &3u32.to_be_bytes(),
            b"abc",
        ]);
        match d.decode(&message).unwrap() {
            Decoded::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                assert!(transactional);
                assert_eq!(
                    (lsn, prefix.as_str(), &content[..]),
                    (Lsn(8), "app.x", &b"abc"[..])
                );
            }
            other => panic!("{other:?}"),
        }
        let commit = msg(&[
            b"C",
            &[0],
            &7u64.to_be_bytes(),
            &9u64.to_be_bytes(),
            &5i64.to_be_bytes(),
        ]);
        assert!(matches!(
            d.decode(&commit).unwrap(),
            Decoded::Commit {
                lsn: Lsn(7),
                end_lsn: Lsn(9),
                ..
            }
        ));
        // Unknown relation, truncated message, unknown tag: failures, not panics.
        let orphan = msg(&[b"I", &10u32.to_be_bytes(), b"N", &0i16.to_be_bytes()]);
        assert!(d.decode(&orphan).is_err());
        assert!(d.decode(&msg(&[b"B", &[0, 1]])).is_err());
        assert!(d.decode(&msg(&[b"Z"])).is_err());
    }

    #[test]
    fn shapes_look_through_domains_and_arrays() {
        let row = |oid, typtype, category, elem, base| TypeRow {
            oid,
            typtype,
            category,
            elem,
            base,
            delim: b',',
            name: String::new(),
            fields: Vec::new(),
        };
        let mut types = HashMap::new();
        types.insert(90_001, row(90_001, 'd', 'N', 0, NUMERIC));
        types.insert(90_002, row(90_002, 'b', 'A', 90_001, 0));
        types.insert(90_003, row(90_003, 'e', 'E', 0, 0));
        types.insert(90_004, row(90_004, 'r', 'R', 0, 0));
        assert_eq!(shape(&types, 90_001), Shape::Number);
        assert_eq!(
            shape(&types, 90_002),
            Shape::Array(Box::new(Shape::Number), b',')
        );
        assert_eq!(shape(&types, 90_003), Shape::Text);
        assert_eq!(shape(&types, 90_004), Shape::Text);
        assert_eq!(
            shape(&types, 26),
            Shape::Text,
            "oid is not a number in to_json"
        );
        assert!(types[&90_002].refs().eq([90_001]));
    }
}
