//! What a subscription yields: messages and, in order with them, the signals
//! that something may be missing.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use crate::{frame, truncate, wire};

/// A notification as received.
///
/// A channel's only subscriber owns its notifications outright (no
/// reference count, no decode cache: the common case and the hot path);
/// several subscribers share the run it came in, and one decoded value.
/// Queue entries stay small: measured, a 64-byte inline entry made fan-out
/// to ten subscribers use ~20% more CPU than a pointer; a `Note` is 40 bytes.
#[derive(Clone)]
pub(crate) enum Received {
    Own(Note),
    /// The `n`th notification of a shared run.
    InRun(Arc<Run>, u32),
    /// Made by hand ([`Message::for_test`]), not received.
    Made(Box<Made>),
}

/// What a test double carries instead of a notification.
#[derive(Clone)]
pub(crate) struct Made {
    channel: String,
    body: String,
}

/// A notification frame (see [`frame`]): a slice of the buffer its run of
/// frames was copied into, so it needs no allocation of its own. The
/// origin is parsed again on the rare call that needs it rather than stored.
#[derive(Clone)]
pub(crate) struct Note {
    frame: Bytes,
    channel_len: u8,
    /// The payload starts with this crate's origin header.
    tagged: bool,
}

impl Note {
    /// `frame` is one whole frame that [`frame::parse`] accepted.
    pub(crate) fn new(frame: Bytes, channel_len: u8) -> Self {
        let tagged = wire::is_tagged(frame::payload_bytes(&frame, channel_len.into()));
        Note {
            frame,
            channel_len,
            tagged,
        }
    }

    fn channel(&self) -> &str {
        // Checked when parsed.
        std::str::from_utf8(frame::channel_bytes(&self.frame, self.channel_len.into()))
            .unwrap_or_default()
    }

    fn payload(&self) -> &str {
        // Checked when parsed.
        std::str::from_utf8(frame::payload_bytes(&self.frame, self.channel_len.into()))
            .unwrap_or_default()
    }

    fn is_from(&self, origin: &[u8; 32]) -> bool {
        self.tagged && wire::origin_hex(self.payload().as_bytes()) == Some(origin)
    }

    fn body(&self) -> &str {
        let payload = self.payload();
        match self.tagged {
            true => payload.get(wire::HEADER_BYTES..).unwrap_or_default(),
            false => payload,
        }
    }
}

/// Notifications of one channel received together, shared by its
/// subscribers: one allocation and one queue entry per run and subscriber,
/// and one reference count per message, taken in the consumer's task.
pub(crate) struct Run {
    notes: Vec<Note>,
    /// Each note's value, decoded by the first subscriber to read it.
    decoded: Box<[OnceLock<Box<dyn Any + Send + Sync>>]>,
}

impl Run {
    pub(crate) fn new(notes: Vec<Note>) -> Self {
        let decoded = notes.iter().map(|_| OnceLock::new()).collect();
        Run { notes, decoded }
    }

    pub(crate) fn len(&self) -> u32 {
        // A run is at most a read's worth of notifications.
        self.notes.len() as u32
    }

    pub(crate) fn is_from(&self, i: u32, origin: &[u8; 32]) -> bool {
        self.notes
            .get(i as usize)
            .is_some_and(|note| note.is_from(origin))
    }
}

impl Received {
    fn note(&self) -> Option<&Note> {
        match self {
            Received::Own(note) => Some(note),
            Received::InRun(run, i) => run.notes.get(*i as usize),
            Received::Made(_) => None,
        }
    }

    pub(crate) fn origin(&self) -> Option<Uuid> {
        let note = self.note()?;
        note.tagged
            .then(|| wire::decode(note.payload()).0)
            .flatten()
    }

    /// Whether it carries this origin (without parsing it as a UUID).
    pub(crate) fn is_from(&self, origin: &[u8; 32]) -> bool {
        self.note().is_some_and(|note| note.is_from(origin))
    }

    /// The bytes of the frame (for copying a subset of a run).
    pub(crate) fn frame(&self) -> Option<(&Bytes, u8)> {
        self.note().map(|n| (&n.frame, n.channel_len))
    }

    fn channel(&self) -> &str {
        match (self, self.note()) {
            (Received::Made(made), _) => &made.channel,
            (_, Some(note)) => note.channel(),
            (_, None) => "",
        }
    }

    pub(crate) fn body(&self) -> &str {
        match (self, self.note()) {
            (Received::Made(made), _) => &made.body,
            (_, Some(note)) => note.body(),
            (_, None) => "",
        }
    }

    /// The shared decode cache of this notification, if it has one.
    fn slot(&self) -> Option<&OnceLock<Box<dyn Any + Send + Sync>>> {
        match self {
            Received::InRun(run, i) => run.decoded.get(*i as usize),
            Received::Own(_) | Received::Made(_) => None,
        }
    }

    fn process_id(&self) -> i32 {
        self.note().map_or(0, |note| frame::process_id(&note.frame))
    }

    /// Decodes the body; when the channel has several subscribers, the first
    /// to decode as `T` keeps the value here for the others to read.
    /// `Ok(None)`: the value is in the shared cache ([`Self::cached`]).
    pub(crate) fn decode<T: Send + Sync + 'static>(
        &self,
        decode: fn(&str) -> Result<T, serde_json::Error>,
    ) -> Result<Option<T>, serde_json::Error> {
        let Some(slot) = self.slot() else {
            return decode(self.body()).map(Some);
        };
        match slot.get() {
            Some(any) if any.is::<T>() => Ok(None),
            // Another subscriber decoded it as another type.
            Some(_) => decode(self.body()).map(Some),
            None => {
                let value: Box<dyn Any + Send + Sync> = Box::new(decode(self.body())?);
                match slot.set(value) {
                    Ok(()) => Ok(None),
                    // Another subscriber was first: read its value if it is a `T`.
                    Err(_) if self.cached::<T>().is_some() => Ok(None),
                    Err(mine) => Ok(mine.downcast::<T>().ok().map(|b| *b)),
                }
            }
        }
    }

    /// The shared decoded value, when [`Self::decode`] put a `T` there.
    fn cached<T: 'static>(&self) -> Option<&T> {
        self.slot()?.get()?.downcast_ref::<T>()
    }
}

/// Copies `kept` out of its run's buffer when it holds less than half of
/// the run's `of` notifications (a filtered or lagging subscriber took a
/// few): what a subscriber queues then pins no more than about twice its
/// own size.
pub(crate) fn compact(kept: &mut [Received], of: usize) {
    if kept.len() * 2 >= of {
        return;
    }
    let mut buf = bytes::BytesMut::new();
    for r in kept.iter() {
        if let Some((frame, _)) = r.frame() {
            buf.extend_from_slice(frame);
        }
    }
    let frames = buf.freeze();
    let mut off = 0;
    for r in kept.iter_mut() {
        let Some((frame, channel_len)) = r.frame() else {
            continue;
        };
        let len = frame.len();
        // Its own copy, decoded by this subscriber alone (a rare path).
        *r = Received::Own(Note::new(frames.slice(off..off + len), channel_len));
        off += len;
    }
}

/// One notification, with its payload decoded as `T`.
///
/// For `listen::<Text>` subscriptions `T` is [`Text`](crate::Text).
pub struct Message<T> {
    received: Received,
    /// `None`: the value is shared, in `received`'s cache.
    payload: Option<T>,
}

impl<T: 'static> Message<T> {
    /// `payload` is `None` only when `received` holds a `T` (see `Received::decode`).
    pub(crate) fn new(received: Received, payload: Option<T>) -> Self {
        Message { received, payload }
    }

    /// A message to unit-test a subscriber's handling with, without a
    /// server: `payload` as if decoded from `raw`, sent on `channel` by
    /// backend 0, with no origin.
    ///
    /// ```
    /// let m = pg_pubsub::Message::for_test("orders", 7u32, "7");
    /// assert_eq!((m.channel(), *m.payload(), m.raw()), ("orders", 7, "7"));
    /// ```
    pub fn for_test(channel: &str, payload: T, raw: impl Into<String>) -> Message<T> {
        Message {
            received: Received::Made(Box::new(Made {
                channel: channel.to_owned(),
                body: raw.into(),
            })),
            payload: Some(payload),
        }
    }

    /// The channel it was sent on.
    pub fn channel(&self) -> &str {
        self.received.channel()
    }

    /// The decoded payload.
    pub fn payload(&self) -> &T {
        match &self.payload {
            Some(t) => t,
            None => self
                .received
                .cached()
                .expect("a shared payload is cached as its own type"),
        }
    }

    /// Takes the decoded payload. Subscribers of one channel share one decoded
    /// value, so this clones unless this subscription is the channel's only one.
    pub fn into_payload(self) -> T
    where
        T: Clone,
    {
        match self.payload {
            Some(t) => t,
            None => self.payload().clone(),
        }
    }

    /// The payload text as sent, without this crate's origin header if it had one.
    pub fn raw(&self) -> &str {
        self.received.body()
    }

    /// The backend PID of the session that sent it.
    ///
    /// This names a pooled connection or the publisher's transaction, not a
    /// process; use [`origin`](Message::origin) to tell publishers apart.
    pub fn process_id(&self) -> i32 {
        self.received.process_id()
    }

    /// The sending [`PgPubSub`](crate::PgPubSub) instance, when the sender tagged it
    /// (see the [`wire`] module for the format).
    pub fn origin(&self) -> Option<Uuid> {
        self.received.origin()
    }
}

/// Payloads show their first 256 bytes: a log line stays a line.
impl<T: fmt::Debug + 'static> fmt::Debug for Message<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let payload: &dyn fmt::Debug = match (self.payload() as &dyn Any).downcast_ref::<String>() {
            Some(text) => &truncate::Text(text),
            None => &truncate::Value {
                value: self.payload(),
                raw_len: self.raw().len(),
            },
        };
        f.debug_struct("Message")
            .field("channel", &self.channel())
            .field("payload", payload)
            .field("process_id", &self.process_id())
            .field("origin", &self.origin())
            .finish()
    }
}

/// A payload that did not decode as the subscription's type.
/// The subscription goes on with the next message.
pub struct DecodeError {
    received: Received,
    error: serde_json::Error,
}

impl DecodeError {
    pub(crate) fn new(received: Received, error: serde_json::Error) -> Self {
        DecodeError { received, error }
    }

    /// The channel it was sent on.
    pub fn channel(&self) -> &str {
        self.received.channel()
    }

    /// The payload text that failed to decode.
    pub fn raw(&self) -> &str {
        self.received.body()
    }

    /// The backend PID of the session that sent it.
    pub fn process_id(&self) -> i32 {
        self.received.process_id()
    }

    /// Why decoding failed.
    pub fn error(&self) -> &serde_json::Error {
        &self.error
    }
}

/// The payload shows its first 256 bytes: a log line stays a line.
impl fmt::Debug for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodeError")
            .field("channel", &self.channel())
            .field("raw", &truncate::Text(self.raw()))
            .field("error", &self.error.to_string())
            .finish()
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "payload on channel {:?} did not decode: {}",
            self.channel(),
            self.error
        )
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Notifications may have been missed here: the listener connection was
/// lost, or this instance took over an elected channel whose previous
/// leader did not hand it over. Delivered before anything received
/// afterwards, once the channel is listened to again, so a consumer that
/// re-reads its state on a gap misses nothing sent after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    cause: GapCause,
    reason: Arc<str>,
}

/// Why a [`Gap`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GapCause {
    /// The listener connection was lost and is back.
    Reconnect {
        /// From the last moment the old connection was known to work (a
        /// message or an answered statement) to listening again.
        downtime: Duration,
    },
    /// This instance became leader of an elected channel without a graceful
    /// hand-over from the previous leader: it crashed, lost its connection,
    /// stopped with nobody taking over in time, or no previous leader is
    /// known (the first election also gives this gap). How long nobody
    /// delivered is not known.
    TakeOver,
}

impl Gap {
    pub(crate) fn new(cause: GapCause, reason: impl Into<Arc<str>>) -> Self {
        Gap {
            cause,
            reason: reason.into(),
        }
    }

    /// Why it happened.
    pub fn cause(&self) -> GapCause {
        self.cause
    }

    /// How long nothing was received, when known (reconnects).
    pub fn downtime(&self) -> Option<Duration> {
        match self.cause {
            GapCause::Reconnect { downtime } => Some(downtime),
            GapCause::TakeOver => None,
        }
    }

    /// A human-readable explanation (for a reconnect, the connection error).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Folds a following gap of the same cause into this one.
    pub(crate) fn absorb(&mut self, next: &Gap) -> bool {
        match (&mut self.cause, next.cause) {
            (GapCause::Reconnect { downtime }, GapCause::Reconnect { downtime: more }) => {
                *downtime += more;
                true
            }
            (GapCause::TakeOver, GapCause::TakeOver) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cause {
            GapCause::Reconnect { downtime } => write!(
                f,
                "listener reconnected after {downtime:?} ({}); messages may have been missed",
                self.reason
            ),
            GapCause::TakeOver => write!(f, "{}", self.reason),
        }
    }
}

/// One item of a [`Subscription`](crate::Subscription) stream.
#[non_exhaustive]
pub enum Delivery<T> {
    /// A notification.
    Message(Message<T>),
    /// A payload that did not decode; the stream goes on.
    Undecodable(DecodeError),
    /// This many notifications were dropped here because this subscriber's
    /// queue was full (the consumer was too slow). Other subscribers are not affected.
    Lagged(u64),
    /// Notifications may have been missed: see [`Gap::cause`].
    Gap(Gap),
}

impl<T: fmt::Debug + 'static> fmt::Debug for Delivery<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delivery::Message(m) => f.debug_tuple("Message").field(m).finish(),
            Delivery::Undecodable(e) => f.debug_tuple("Undecodable").field(e).finish(),
            Delivery::Lagged(n) => f.debug_tuple("Lagged").field(n).finish(),
            Delivery::Gap(g) => f.debug_tuple("Gap").field(g).finish(),
        }
    }
}

impl<T> Delivery<T> {
    /// The message, if this is one.
    pub fn message(self) -> Option<Message<T>> {
        match self {
            Delivery::Message(m) => Some(m),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn queued_messages_stay_small() {
        // A queue holds up to its capacity of these (65,536 by default).
        assert!(std::mem::size_of::<crate::inbox::Entry>() <= 40);
    }
}
