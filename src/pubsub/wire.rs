//! The wire format: what a payload looks like on the server.
//!
//! By default a payload is sent exactly as given (JSON for `&value`, any
//! text for [`Text`](crate::Text), through [`notify`]). When the sender has origin tagging on (needed to
//! filter its own messages), the payload carries a 40-byte header:
//!
//! ```text
//! pgps:1:<origin>:<body>
//! ```
//!
//! where `<origin>` is the sending [`PgPubSub`](crate::PgPubSub) instance's
//! UUID as 32 lower-case hex digits without dashes, and `<body>` is the
//! payload proper. A receiver strips the header when the payload starts with
//! `pgps:1:`, then 32 lower-case hex digits, then `:`; anything else
//! (upper-case hex included) is a plain payload, delivered whole.
//! Both kinds decode the same way for typed subscribers.
//!
//! [`notify`]: crate::PgPubSub::notify

use std::borrow::Cow;

use uuid::Uuid;

use crate::error::{Error, Origin, Result};

/// The largest payload PostgreSQL accepts, in bytes (it must be shorter than 8000).
pub const MAX_PAYLOAD_BYTES: usize = 7999;

const MAGIC: &str = "pgps:1:";
/// Bytes the origin header adds to a payload.
pub const HEADER_BYTES: usize = MAGIC.len() + 32 + 1;

/// Builds the payload to send, tagged with `origin` when given, and checks it.
pub(crate) fn encode(origin: Option<Uuid>, body: &str) -> Result<Cow<'_, str>> {
    // The header holds no NUL, so the body's offset is the one to report.
    check_nul(body)?;
    let payload = match origin {
        None => Cow::Borrowed(body),
        Some(origin) => {
            let mut s = String::with_capacity(HEADER_BYTES + body.len());
            s.push_str(MAGIC);
            s.push_str(origin.simple().encode_lower(&mut Uuid::encode_buffer()));
            s.push(':');
            s.push_str(body);
            Cow::Owned(s)
        }
    };
    check_size(&payload, origin.is_some())?;
    Ok(payload)
}

/// Checks that `payload` can be sent as is, without an origin header: no NUL
/// byte ([`ErrorKind::Limit`](crate::ErrorKind::Limit)) and at most [`MAX_PAYLOAD_BYTES`]
/// ([`ErrorKind::Limit`](crate::ErrorKind::Limit)). The notify methods run the same checks.
///
/// ```
/// use pg_pubsub::{wire, ErrorKind};
/// assert!(wire::check_payload("hello").is_ok());
/// assert_eq!(wire::check_payload("a\0b").unwrap_err().kind(), ErrorKind::Limit);
/// ```
pub fn check_payload(payload: &str) -> Result<()> {
    check_nul(payload)?;
    check_size(payload, false)
}

/// PostgreSQL text cannot hold NUL: the server would refuse it (SQLSTATE 22021).
fn check_nul(body: &str) -> Result<()> {
    // `find` on a char uses memchr: payloads are scanned at memory speed.
    match body.find('\0') {
        None => Ok(()),
        Some(at) => Err(Error::new(
            Origin::Limit,
            format!("payload contains a NUL byte at byte {at}; PostgreSQL text cannot hold one"),
        )),
    }
}

fn check_size(payload: &str, tagged: bool) -> Result<()> {
    if payload.len() <= MAX_PAYLOAD_BYTES {
        return Ok(());
    }
    let header = if tagged {
        format!(" (including the {HEADER_BYTES}-byte origin header)")
    } else {
        String::new()
    };
    Err(Error::new(
        Origin::Limit,
        format!(
            "payload is {} bytes{header}; PostgreSQL accepts at most {MAX_PAYLOAD_BYTES}",
            payload.len()
        ),
    ))
}

/// Splits a received payload into its origin (if tagged) and body.
pub(crate) fn decode(payload: &str) -> (Option<Uuid>, &str) {
    match origin_hex(payload.as_bytes()).and_then(|hex| Uuid::try_parse_ascii(hex).ok()) {
        Some(origin) => (Some(origin), &payload[HEADER_BYTES..]),
        None => (None, payload),
    }
}

/// The origin's 32 hex digits when `payload` starts with a header.
pub(crate) fn origin_hex(payload: &[u8]) -> Option<&[u8; 32]> {
    let header = payload.get(..HEADER_BYTES)?;
    if !header.starts_with(MAGIC.as_bytes()) || header[HEADER_BYTES - 1] != b':' {
        return None;
    }
    let hex: &[u8; 32] = header[MAGIC.len()..HEADER_BYTES - 1].try_into().ok()?;
    // Only the documented form: lower-case hex, no dashes.
    hex.iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        .then_some(hex)
}

/// Whether `payload` starts with an origin header.
pub(crate) fn is_tagged(payload: &[u8]) -> bool {
    origin_hex(payload).is_some()
}

/// `origin` as it appears in a header.
pub(crate) fn hex(origin: Uuid) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(
        origin
            .simple()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn round_trip_and_plain() {
        let origin = Uuid::new_v4();
        let tagged = encode(Some(origin), r#"{"a":1}"#).unwrap();
        assert_eq!(tagged.len(), HEADER_BYTES + 7);
        assert_eq!(decode(&tagged), (Some(origin), r#"{"a":1}"#));
        assert_eq!(decode(r#"{"a":1}"#), (None, r#"{"a":1}"#));
        assert_eq!(decode("pgps:1:nothex:x"), (None, "pgps:1:nothex:x"));
        assert_eq!(decode(""), (None, ""));
    }

    #[test]
    fn size_limit_is_exact() {
        assert!(encode(None, &"x".repeat(7999)).is_ok());
        let err = encode(None, &"x".repeat(8000)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Limit);
        assert!(err.to_string().contains("8000 bytes"), "{err}");
        let body = "x".repeat(7999 - HEADER_BYTES);
        assert!(encode(Some(Uuid::new_v4()), &body).is_ok());
        assert!(encode(Some(Uuid::new_v4()), &format!("{body}x")).is_err());
    }

    #[test]
    fn nul_is_refused_before_sending() {
        for origin in [None, Some(Uuid::new_v4())] {
            let err = encode(origin, "ab\0cd").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Limit);
            assert!(err.to_string().contains("at byte 2"), "{err}");
        }
        let err = check_payload("\0").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Limit);
        assert_eq!(
            check_payload(&"x".repeat(8000)).unwrap_err().kind(),
            ErrorKind::Limit
        );
        assert!(check_payload(&"é".repeat(3999)).is_ok());
    }

    #[test]
    fn only_lower_case_origins_are_headers() {
        let origin = Uuid::new_v4();
        let lower = format!("pgps:1:{}:body", origin.simple());
        assert_eq!(decode(&lower), (Some(origin), "body"));
        let upper = format!("pgps:1:{}:body", origin.simple().to_string().to_uppercase());
        assert_eq!(decode(&upper), (None, upper.as_str()));
        let hyphenated = format!("pgps:1:{}:body", &origin.hyphenated().to_string()[..32]);
        assert_eq!(decode(&hyphenated), (None, hyphenated.as_str()));
    }
}
