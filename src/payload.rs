//! How a value becomes a payload and back: the type decides.
//!
//! Every call that sends (`notify`, `publish`, `enqueue`, their `_tx` and
//! `_batch` forms) takes an [`Encode`] value, and every call that receives
//! (`listen`, `durable().subscribe`) is typed by a [`Decode`] type:
//!
//! * a reference to any `serde` type travels as JSON:
//!   `notify("orders", &order)`, `listen::<Order>("orders")`;
//! * [`Text`] travels as is: `notify("log", Text("plain words"))`,
//!   `listen::<Text>("log")`.
//!
//! So there are no `_raw` variants: the payload's type says which it is.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Origin, Result};

/// A payload sent and received as is, not as JSON: `Text("hello")` to send,
/// `Text` (owning a `String`) to receive.
///
/// ```
/// use pg_pubsub::Text;
/// let sent = Text("plain words");
/// let received: Text = Text::from("plain words".to_owned());
/// assert_eq!(received, *sent);
/// assert_eq!(received.into_string(), "plain words");
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text<S = String>(pub S);

impl Text<String> {
    /// The text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<S: AsRef<str>> Text<S> {
    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }
}

impl<S: AsRef<str>> Deref for Text<S> {
    type Target = str;

    fn deref(&self) -> &str {
        self.0.as_ref()
    }
}

impl<S: AsRef<str>> AsRef<str> for Text<S> {
    fn as_ref(&self) -> &str {
        self.0.as_ref()
    }
}

impl From<String> for Text {
    fn from(text: String) -> Text {
        Text(text)
    }
}

impl From<Text> for String {
    fn from(text: Text) -> String {
        text.0
    }
}

impl<S: AsRef<str>> fmt::Debug for Text<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<S: AsRef<str>> fmt::Display for Text<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<S: AsRef<str>> PartialEq<str> for Text<S> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl<S: AsRef<str>> PartialEq<&str> for Text<S> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<S: AsRef<str>> PartialEq<String> for Text<S> {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

mod sealed {
    pub trait Sealed {}
    impl<T: serde::Serialize + ?Sized> Sealed for &T {}
    impl<S: AsRef<str>> Sealed for super::Text<S> {}
    pub trait SealedDecode {}
    impl<T: serde::de::DeserializeOwned> SealedDecode for T {}
    impl SealedDecode for super::Text {}
}

/// A value that can be sent as a payload: `&T` for any `T: Serialize`
/// (as JSON), or [`Text`] (as is). Sealed.
pub trait Encode: sealed::Sealed {
    /// The payload text.
    #[doc(hidden)]
    fn encode(&self) -> Result<Cow<'_, str>>;
}

impl<T: Serialize + ?Sized> Encode for &T {
    fn encode(&self) -> Result<Cow<'_, str>> {
        to_json(*self).map(Cow::Owned)
    }
}

impl<S: AsRef<str>> Encode for Text<S> {
    fn encode(&self) -> Result<Cow<'_, str>> {
        Ok(Cow::Borrowed(self.as_str()))
    }
}

/// A type payloads can be received as: any `T: DeserializeOwned` (from
/// JSON), or [`Text`] (as is). Sealed.
pub trait Decode: sealed::SealedDecode + Sized + Send + Sync + 'static {
    /// Decodes borrowed text.
    #[doc(hidden)]
    fn decode(text: &str) -> std::result::Result<Self, serde_json::Error>;

    /// Decodes owned text; on failure the text comes back with the error,
    /// so a large payload is never copied.
    #[doc(hidden)]
    fn decode_owned(text: String) -> std::result::Result<Self, (String, serde_json::Error)> {
        Self::decode(&text).map_err(|e| (text, e))
    }
}

impl<T: DeserializeOwned + Send + Sync + 'static> Decode for T {
    fn decode(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl Decode for Text {
    fn decode(text: &str) -> std::result::Result<Self, serde_json::Error> {
        Ok(Text(text.to_owned()))
    }

    fn decode_owned(text: String) -> std::result::Result<Self, (String, serde_json::Error)> {
        Ok(Text(text))
    }
}

/// `value` as JSON text, or a `Serialize` error keeping serde's as its source.
pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| {
        Error::new(
            Origin::Serialize,
            format!("payload did not serialize to JSON: {e}"),
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u64,
    }

    #[test]
    fn the_type_decides_the_encoding() {
        assert_eq!(Encode::encode(&&Order { id: 1 }).unwrap(), r#"{"id":1}"#);
        assert_eq!(Encode::encode(&"x").unwrap(), r#""x""#);
        assert_eq!(Encode::encode(&Text("x")).unwrap(), "x");
        assert_eq!(Order::decode(r#"{"id":2}"#).unwrap(), Order { id: 2 });
        assert_eq!(String::decode(r#""x""#).unwrap(), "x");
        assert!(String::decode("x").is_err());
        assert_eq!(Text::decode("x").unwrap(), "x");
        let (back, _) = Order::decode_owned("nope".to_owned()).unwrap_err();
        assert_eq!(back, "nope");
    }
}
