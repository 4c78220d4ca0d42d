//! Channel names: validation against the server's limits, and quoting.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Origin, Result};

/// The longest channel name PostgreSQL accepts, in bytes (`NAMEDATALEN - 1`).
pub const MAX_CHANNEL_BYTES: usize = 63;

/// A validated channel name: not empty, no NUL, at most 63 bytes.
///
/// Case and every other character are kept as given: the name is always sent
/// quoted, so `Orders` and `orders` are two channels, and a name such as
/// `a"; DROP TABLE x; --` is just a channel.
///
/// ```
/// use pg_pubsub::{ChannelName, ErrorKind};
/// assert_eq!(ChannelName::new("Orders")?.as_str(), "Orders");
/// let too_long = "x".repeat(64);
/// assert_eq!(ChannelName::new(&too_long).unwrap_err().kind(), ErrorKind::InvalidName);
/// # Ok::<(), pg_pubsub::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self> {
        if name.is_empty() {
            return Err(Error::new(Origin::InvalidName, "channel name is empty"));
        }
        if name.contains('\0') {
            return Err(Error::new(
                Origin::InvalidName,
                format!("channel name {name:?} contains a NUL byte"),
            ));
        }
        if name.len() > MAX_CHANNEL_BYTES {
            return Err(Error::new(
                Origin::InvalidName,
                format!(
                    "channel name is {} bytes long; PostgreSQL allows at most {MAX_CHANNEL_BYTES}",
                    name.len()
                ),
            ));
        }
        Ok(ChannelName(Arc::from(name)))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier, for `LISTEN`/`UNLISTEN`.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0.replace('"', "\"\""))
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl TryFrom<&str> for ChannelName {
    type Error = Error;
    fn try_from(name: &str) -> Result<Self> {
        ChannelName::new(name)
    }
}

impl TryFrom<String> for ChannelName {
    type Error = Error;
    fn try_from(name: String) -> Result<Self> {
        ChannelName::new(&name)
    }
}

impl TryFrom<&ChannelName> for ChannelName {
    type Error = Error;
    fn try_from(name: &ChannelName) -> Result<Self> {
        Ok(name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn limits_are_exact() {
        assert!(ChannelName::new(&"a".repeat(63)).is_ok());
        let err = ChannelName::new(&"a".repeat(64)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName);
        assert!(err.to_string().contains("64 bytes"), "{err}");
        // Bytes, not characters: 32 two-byte characters are 64 bytes.
        assert!(ChannelName::new(&"é".repeat(32)).is_err());
        assert_eq!(
            ChannelName::new("a\0b").unwrap_err().kind(),
            ErrorKind::InvalidName
        );
    }

    #[test]
    fn quoting_doubles_quotes() {
        let name = ChannelName::new(r#"a"; DROP TABLE x; --"#).unwrap();
        assert_eq!(name.quoted(), r#""a""; DROP TABLE x; --""#);
    }
}
