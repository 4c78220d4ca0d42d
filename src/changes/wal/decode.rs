//! pgoutput (protocol version 1) row messages → [`ChangeEvent`]s with JSON rows.
//!
//! `pgwire-replication` decodes Begin, Commit and logical messages itself and
//! hands the rest over raw: Relation, Type, Origin, Insert, Update, Delete and
//! Truncate, which this module parses.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::changes::{ChangeEvent, Op};

/// A column of a relation, as the last Relation message described it.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    type_oid: u32,
    /// Part of the replica identity (flag bit 1).
    key: bool,
}

#[derive(Debug, Clone)]
struct Relation {
    schema: String,
    table: String,
    columns: Vec<Column>,
}

/// Relations seen on this stream (pgoutput sends each before its first
/// change in a session, and again when it changes).
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    relations: HashMap<u32, Relation>,
}

/// What one raw pgoutput message decodes into.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Zero or more changes (a truncate lists several tables).
    Changes(Vec<ChangeEvent<Value>>),
    /// Bookkeeping (Relation, Type, Origin): nothing to deliver.
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
    pub(crate) fn decode(&mut self, data: &[u8]) -> R<Decoded> {
        let mut r = Reader { buf: data };
        match r.u8()? {
            b'R' => {
                let id = r.u32()?;
                let schema = r.cstr()?;
                let table = r.cstr()?;
                let _replica_identity = r.u8()?;
                let n = r.i16()?;
                let mut columns = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n {
                    let flags = r.u8()?;
                    let name = r.cstr()?;
                    let type_oid = r.u32()?;
                    let _typmod = r.u32()?;
                    columns.push(Column {
                        name,
                        type_oid,
                        key: flags & 1 == 1,
                    });
                }
                self.relations.insert(
                    id,
                    Relation {
                        schema,
                        table,
                        columns,
                    },
                );
                Ok(Decoded::Nothing)
            }
            // Type, Origin: nothing a consumer needs (types come as OIDs).
            b'Y' | b'O' => Ok(Decoded::Nothing),
            b'I' => {
                let rel = self.relation(r.u32()?)?;
                expect(&mut r, b'N')?;
                let new = row(rel, &tuple(&mut r)?, false);
                let mut ev = ChangeEvent::new(Op::Insert, &rel.schema, &rel.table);
                ev.new = Some(new);
                Ok(Decoded::Changes(vec![ev]))
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
                let mut ev = ChangeEvent::new(Op::Update, &rel.schema, &rel.table);
                ev.old = old;
                ev.new = Some(new);
                Ok(Decoded::Changes(vec![ev]))
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
                let mut ev = ChangeEvent::new(Op::Delete, &rel.schema, &rel.table);
                ev.old = Some(old);
                Ok(Decoded::Changes(vec![ev]))
            }
            b'T' => {
                let n = r.u32()?;
                let _options = r.u8()?;
                // n comes from the wire: each relation takes 4 bytes of it.
                let mut events = Vec::with_capacity((n as usize).min(r.buf.len() / 4));
                for _ in 0..n {
                    let rel = self.relation(r.u32()?)?;
                    events.push(ChangeEvent::new(Op::Truncate, &rel.schema, &rel.table));
                }
                Ok(Decoded::Changes(events))
            }
            other => Err(DecodeFailure(format!(
                "unknown pgoutput message {:?}",
                other as char
            ))),
        }
    }

    fn relation(&self, id: u32) -> R<&Relation> {
        self.relations.get(&id).ok_or_else(|| {
            DecodeFailure(format!(
                "change for relation {id} before its Relation message"
            ))
        })
    }
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
    let mut obj = Map::with_capacity(cells.len());
    for (col, cell) in rel.columns.iter().zip(cells) {
        if key_only && !col.key {
            continue;
        }
        match cell {
            Cell::Unchanged => {}
            Cell::Null => {
                obj.insert(col.name.clone(), Value::Null);
            }
            Cell::Text(bytes) => {
                let text = String::from_utf8_lossy(bytes);
                obj.insert(col.name.clone(), to_json(col.type_oid, &text));
            }
        }
    }
    Value::Object(obj)
}

// Type OIDs (pg_type.h); stable across PostgreSQL versions.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const JSONB: u32 = 3802;
const BOOL_ARRAY: u32 = 1000;
const INT2_ARRAY: u32 = 1005;
const INT4_ARRAY: u32 = 1007;
const TEXT_ARRAY: u32 = 1009;
const VARCHAR_ARRAY: u32 = 1015;
const INT8_ARRAY: u32 = 1016;
const FLOAT4_ARRAY: u32 = 1021;
const FLOAT8_ARRAY: u32 = 1022;
const NUMERIC_ARRAY: u32 = 1231;
const JSON_ARRAY: u32 = 199;
const JSONB_ARRAY: u32 = 3807;

/// A column's text output as JSON (see the module docs of
/// [`wal`](crate::changes::wal) for the mapping).
pub(crate) fn to_json(type_oid: u32, text: &str) -> Value {
    match type_oid {
        BOOL => Value::Bool(text == "t"),
        INT2 | INT4 | INT8 | OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        // NaN and ±Infinity have no JSON number: they stay strings.
        FLOAT4 | FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_owned())),
        JSON | JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        BOOL_ARRAY => array(text, BOOL),
        INT2_ARRAY | INT4_ARRAY | INT8_ARRAY => array(text, INT8),
        FLOAT4_ARRAY | FLOAT8_ARRAY => array(text, FLOAT8),
        JSON_ARRAY | JSONB_ARRAY => array(text, JSONB),
        // numeric elements stay strings, like numeric itself.
        TEXT_ARRAY | VARCHAR_ARRAY | NUMERIC_ARRAY => array(text, 0),
        _ => Value::String(text.to_owned()),
    }
}

/// A one-dimensional array literal (`{1,2,NULL}`, `{"a b","c\"d"}`) as a
/// JSON array of `element` values; anything else (several dimensions,
/// explicit bounds) stays the literal string.
fn array(text: &str, element: u32) -> Value {
    parse_array(text)
        .map(|items| {
            Value::Array(
                items
                    .into_iter()
                    .map(|item| match item {
                        Some(s) => to_json(element, &s),
                        None => Value::Null,
                    })
                    .collect(),
            )
        })
        .unwrap_or_else(|| Value::String(text.to_owned()))
}

fn parse_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Some(items);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let item = if chars.peek() == Some(&'"') {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next()? {
                    '\\' => s.push(chars.next()?),
                    '"' => break,
                    c => s.push(c),
                }
            }
            Some(s)
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return None; // nested dimension
                }
                s.push(c);
                chars.next();
            }
            (s != "NULL").then_some(s)
        };
        items.push(item);
        match chars.next() {
            None => return Some(items),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_and_arrays_map_to_json() {
        assert_eq!(to_json(INT4, "42"), json!(42));
        assert_eq!(to_json(BOOL, "f"), json!(false));
        assert_eq!(to_json(FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(to_json(1700, "1.10"), json!("1.10"));
        assert_eq!(to_json(JSONB, r#"{"a": [1]}"#), json!({"a": [1]}));
        assert_eq!(to_json(17, "\\x00ff"), json!("\\x00ff"));
        assert_eq!(to_json(INT4_ARRAY, "{1,NULL,3}"), json!([1, null, 3]));
        assert_eq!(
            to_json(TEXT_ARRAY, r#"{"a b","c\"d",e}"#),
            json!(["a b", "c\"d", "e"])
        );
        assert_eq!(to_json(INT4_ARRAY, "{}"), json!([]));
        assert_eq!(to_json(INT4_ARRAY, "{{1,2},{3,4}}"), json!("{{1,2},{3,4}}"));
    }
}
