//! Subject templates: `orders.{table}.{op}`, `events.{key}`.

use std::fmt;

use crate::error::{Error, Origin, Result};

/// What kind of message a template is rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A durable channel's message: `{channel}`.
    Durable,
    /// A WAL table change: `{schema}`, `{table}`, `{op}`.
    Change,
    /// A WAL logical message: `{prefix}`.
    Message,
}

/// What a relay's source fills a template with.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Fields<'a> {
    pub(crate) channel: Option<&'a str>,
    pub(crate) schema: Option<&'a str>,
    pub(crate) table: Option<&'a str>,
    pub(crate) op: Option<&'a str>,
    pub(crate) prefix: Option<&'a str>,
    /// The JSON object `{key}` reads its field from.
    pub(crate) row: Option<&'a serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Channel,
    Schema,
    Table,
    Op,
    Prefix,
    Key,
}

/// A parsed subject template (routing key, stream name).
///
/// Placeholders: `{channel}` (durable channel), `{schema}`, `{table}`,
/// `{op}` (`insert`, `update`, `delete`, `truncate`) of a WAL change,
/// `{prefix}` of a WAL message (which has a template of its own,
/// [`RelayBuilder::message_subject`](super::RelayBuilder::message_subject)), and `{key}`: the value of the payload's
/// field named by [`RelayBuilder::key_field`](super::RelayBuilder::key_field)
/// (for a WAL change, the field of its `new` row, or `old` for a delete).
/// `{{` and `}}` are literal braces. In a substituted value, `.`, `*`,
/// `>` and whitespace become `_`: a value never adds a token to a NATS
/// subject or a topic routing key, nor a wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    text: String,
    parts: Vec<Part>,
}

impl SubjectTemplate {
    /// Parses `template`; fails with [`ErrorKind::Config`](crate::ErrorKind::Config)
    /// on an unknown placeholder or an unclosed brace.
    pub fn parse(template: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::new(
                Origin::Config,
                format!("subject template {template:?}: {why}"),
            )
        };
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err(bad("a '}' without its '{' (write '}}' for a brace)")),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(bad("a '{' is not closed")),
                        }
                    }
                    let part = match name.as_str() {
                        "channel" => Part::Channel,
                        "schema" => Part::Schema,
                        "table" => Part::Table,
                        "op" => Part::Op,
                        "prefix" => Part::Prefix,
                        "key" => Part::Key,
                        other => {
                            return Err(bad(&format!(
                                "unknown placeholder {{{other}}} (known: channel, schema, \
                                 table, op, prefix, key)"
                            )))
                        }
                    };
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(part);
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if parts.is_empty() {
            return Err(bad("empty"));
        }
        Ok(SubjectTemplate {
            text: template.to_owned(),
            parts,
        })
    }

    /// Whether the template uses `{key}`.
    pub(crate) fn uses_key(&self) -> bool {
        self.parts.contains(&Part::Key)
    }

    /// Placeholders messages of this kind can never fill (checked when a
    /// relay is built, so a typo fails at start rather than dead-letters
    /// every message).
    pub(crate) fn check_for(&self, kind: Kind) -> Result<()> {
        let unfillable = self.parts.iter().find_map(|p| match (p, kind) {
            (Part::Lit(_) | Part::Key, _)
            | (Part::Channel, Kind::Durable)
            | (Part::Schema | Part::Table | Part::Op, Kind::Change)
            | (Part::Prefix, Kind::Message) => None,
            (_, Kind::Durable) => {
                Some("{schema}, {table}, {op} or {prefix} (durable messages have none)")
            }
            (_, Kind::Change) => Some("{channel} or {prefix} (table changes have none)"),
            (_, Kind::Message) => {
                Some("{channel}, {schema}, {table} or {op} (WAL messages have none)")
            }
        });
        match unfillable {
            Some(what) => Err(Error::new(
                Origin::Config,
                format!("subject template {:?} uses {what}", self.text),
            )),
            None => Ok(()),
        }
    }

    /// The subject for one message; `key_field` names the field `{key}`
    /// reads. An error says what is missing (the message is then
    /// dead-lettered: it will never render).
    pub(crate) fn render(
        &self,
        fields: &Fields<'_>,
        key_field: Option<&str>,
    ) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            let (name, value) = match part {
                Part::Lit(s) => {
                    out.push_str(s);
                    continue;
                }
                Part::Channel => ("channel", fields.channel.map(str::to_owned)),
                Part::Schema => ("schema", fields.schema.map(str::to_owned)),
                Part::Table => ("table", fields.table.map(str::to_owned)),
                Part::Op => ("op", fields.op.map(str::to_owned)),
                Part::Prefix => ("prefix", fields.prefix.map(str::to_owned)),
                Part::Key => ("key", key_value(fields.row, key_field)?),
            };
            let Some(value) = value else {
                return Err(format!(
                    "this message has no {{{name}}} for the subject template {:?}",
                    self.text
                ));
            };
            if value.is_empty() {
                return Err(format!(
                    "{{{name}}} is empty in the subject template {:?}",
                    self.text
                ));
            }
            out.extend(value.chars().map(|c| match c {
                '.' | '*' | '>' => '_',
                c if c.is_whitespace() => '_',
                c => c,
            }));
        }
        Ok(out)
    }
}

/// The `{key}` value: the field `key_field` of `row`, a string or a number
/// (a dotted name reads nested objects: `customer.id`).
fn key_value(
    row: Option<&serde_json::Value>,
    key_field: Option<&str>,
) -> Result<Option<String>, String> {
    let Some(field) = key_field else {
        return Err("the subject template uses {key} but the relay has no key field".to_owned());
    };
    let Some(mut v) = row else {
        return Err(format!(
            "{{key}}: the payload is not a JSON object with a field {field:?}"
        ));
    };
    for name in field.split('.') {
        v = match v.get(name) {
            Some(inner) => inner,
            None => return Err(format!("{{key}}: the payload has no field {field:?}")),
        };
    }
    match v {
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Number(n) => Ok(Some(n.to_string())),
        serde_json::Value::Bool(b) => Ok(Some(b.to_string())),
        other => Err(format!(
            "{{key}}: the field {field:?} is {other}, not a string or a number"
        )),
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for SubjectTemplate {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SubjectTemplate::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_every_placeholder() {
        let t = SubjectTemplate::parse("db.{schema}.{table}.{op}").expect("parse");
        let f = Fields {
            schema: Some("public"),
            table: Some("orders"),
            op: Some("insert"),
            ..Fields::default()
        };
        assert_eq!(
            t.render(&f, None).expect("render"),
            "db.public.orders.insert"
        );
        let t = SubjectTemplate::parse("orders.{channel}").expect("parse");
        let f = Fields {
            channel: Some("ord"),
            ..Fields::default()
        };
        assert_eq!(t.render(&f, None).expect("render"), "orders.ord");
    }

    #[test]
    fn key_reads_a_payload_field_and_cannot_add_tokens() {
        let t = SubjectTemplate::parse("c.{key}").expect("parse");
        let row = json!({"customer": {"id": 42}, "name": "a.b *>c"});
        let f = Fields {
            row: Some(&row),
            ..Fields::default()
        };
        assert_eq!(t.render(&f, Some("customer.id")).expect("nested"), "c.42");
        assert_eq!(
            t.render(&f, Some("name")).expect("sanitised"),
            "c.a_b__>c".replace('>', "_")
        );
        assert!(t.render(&f, Some("missing")).is_err());
        assert!(t.render(&f, None).is_err());
        let f = Fields::default();
        assert!(t.render(&f, Some("name")).is_err());
    }

    #[test]
    fn rejects_bad_templates() {
        assert!(SubjectTemplate::parse("a.{nope}").is_err());
        assert!(SubjectTemplate::parse("a.{table").is_err());
        assert!(SubjectTemplate::parse("a}").is_err());
        assert!(SubjectTemplate::parse("").is_err());
        let t = SubjectTemplate::parse("lit{{x}}").expect("escaped braces");
        assert_eq!(
            t.render(&Fields::default(), None).expect("render"),
            "lit{x}"
        );
    }

    #[test]
    fn checks_placeholders_against_the_source() {
        let t = SubjectTemplate::parse("{table}.{op}").expect("parse");
        assert!(t.check_for(Kind::Change).is_ok());
        assert!(t.check_for(Kind::Durable).is_err());
        assert!(t.check_for(Kind::Message).is_err());
        let t = SubjectTemplate::parse("orders.{channel}.{key}").expect("parse");
        assert!(t.check_for(Kind::Durable).is_ok());
        assert!(t.check_for(Kind::Change).is_err());
        assert!(t.uses_key());
        let t = SubjectTemplate::parse("out.{prefix}.{key}").expect("parse");
        assert!(t.check_for(Kind::Message).is_ok());
    }
}
