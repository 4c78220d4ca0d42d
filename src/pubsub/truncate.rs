//! Short `Debug` output for payloads: a log line shows the start of a payload
//! (up to 8 KB from anyone who can NOTIFY), not all of it.

use std::fmt::{self, Write as _};

/// Bytes of a payload (or of its `Debug` text) shown before `… (N bytes)`.
pub(crate) const DEBUG_PAYLOAD_BYTES: usize = 256;

/// `text` quoted as by `Debug`, cut to [`DEBUG_PAYLOAD_BYTES`] on a char boundary.
pub(crate) struct Text<'a>(pub(crate) &'a str);

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.len() <= DEBUG_PAYLOAD_BYTES {
            return fmt::Debug::fmt(text, f);
        }
        let cut = floor_char_boundary(text, DEBUG_PAYLOAD_BYTES);
        fmt::Debug::fmt(&text[..cut], f)?;
        write!(f, "… ({} bytes)", text.len())
    }
}

/// A value's `Debug` text cut to [`DEBUG_PAYLOAD_BYTES`]; `raw_len` is the
/// size of the payload it was decoded from, shown when cut.
pub(crate) struct Value<'a, T: ?Sized> {
    pub(crate) value: &'a T,
    pub(crate) raw_len: usize,
}

impl<T: fmt::Debug + ?Sized> fmt::Debug for Value<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Capped {
            text: String::new(),
            cut: false,
        };
        let written = if f.alternate() {
            write!(out, "{:#?}", self.value)
        } else {
            write!(out, "{:?}", self.value)
        };
        // `Capped` stops the formatting with an error once it is full.
        if written.is_err() && !out.cut {
            return Err(fmt::Error);
        }
        f.write_str(&out.text)?;
        if out.cut {
            write!(f, "… ({} bytes)", self.raw_len)?;
        }
        Ok(())
    }
}

/// Keeps the first [`DEBUG_PAYLOAD_BYTES`], then fails to end the formatting early.
struct Capped {
    text: String,
    cut: bool,
}

impl fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = DEBUG_PAYLOAD_BYTES - self.text.len();
        if s.len() <= room {
            self.text.push_str(s);
            return Ok(());
        }
        self.text.push_str(&s[..floor_char_boundary(s, room)]);
        self.cut = true;
        Err(fmt::Error)
    }
}

/// The largest char boundary of `s` at or below `at` (`str::floor_char_boundary` is unstable).
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_plain_debug() {
        assert_eq!(format!("{:?}", Text("a\"b")), r#""a\"b""#);
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        // 'é' is 2 bytes: byte 256 falls inside one after the leading 'x'.
        let text = format!("x{}", "é".repeat(4000));
        let shown = format!("{:?}", Text(&text));
        assert!(shown.ends_with("\"… (8001 bytes)"), "{shown}");
        let quoted = shown.strip_suffix("… (8001 bytes)").unwrap();
        assert_eq!(quoted, format!("\"x{}\"", "é".repeat(127)));
    }

    #[test]
    fn long_debug_of_a_value_is_cut() {
        let value: Vec<u32> = (0..2000).collect();
        let shown = format!(
            "{:?}",
            Value {
                value: &value,
                raw_len: 9000
            }
        );
        assert!(shown.ends_with("… (9000 bytes)"), "{shown}");
        assert_eq!(shown.len(), DEBUG_PAYLOAD_BYTES + "… (9000 bytes)".len());
        let short = vec![1, 2];
        assert_eq!(
            format!(
                "{:?}",
                Value {
                    value: &short,
                    raw_len: 5
                }
            ),
            "[1, 2]"
        );
        assert_eq!(
            format!(
                "{:#?}",
                Value {
                    value: &short,
                    raw_len: 5
                }
            ),
            "[\n    1,\n    2,\n]"
        );
    }
}
