//! What a subscription yields: messages and, in order with them, the signals
//! that something may be missing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Notification;
use uuid::Uuid;

use crate::wire;

/// A notification as received, shared between the subscribers of a channel.
#[derive(Clone)]
pub(crate) struct Received {
    note: Arc<Notification>,
    origin: Option<Uuid>,
    body_start: usize,
}

impl Received {
    pub(crate) fn new(note: Arc<Notification>) -> Self {
        let (origin, body) = wire::decode(note.payload());
        let body_start = note.payload().len() - body.len();
        Received {
            note,
            origin,
            body_start,
        }
    }

    pub(crate) fn origin(&self) -> Option<Uuid> {
        self.origin
    }

    fn channel(&self) -> &str {
        self.note.channel()
    }

    pub(crate) fn body(&self) -> &str {
        &self.note.payload()[self.body_start..]
    }

    fn process_id(&self) -> i32 {
        self.note.process_id()
    }
}

/// One notification, with its payload decoded as `T`.
///
/// For [`listen_raw`](crate::PgPubSub::listen_raw) subscriptions `T` is `String`.
pub struct Message<T> {
    received: Received,
    payload: T,
}

impl<T> Message<T> {
    pub(crate) fn new(received: Received, payload: T) -> Self {
        Message { received, payload }
    }

    /// The channel it was sent on.
    pub fn channel(&self) -> &str {
        self.received.channel()
    }

    /// The decoded payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// Takes the decoded payload.
    pub fn into_payload(self) -> T {
        self.payload
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
    /// (see [`wire`](crate::wire)).
    pub fn origin(&self) -> Option<Uuid> {
        self.received.origin
    }
}

impl<T: fmt::Debug> fmt::Debug for Message<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("channel", &self.channel())
            .field("payload", &self.payload)
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

impl fmt::Debug for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodeError")
            .field("channel", &self.channel())
            .field("raw", &self.raw())
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

/// The listener connection was lost and is back: notifications sent in between
/// were not received. Delivered after the channel is listened to again, so a
/// consumer that re-reads its state on a gap misses nothing sent after it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Gap {
    /// How long the listener was not listening.
    pub downtime: Duration,
    /// Why the connection was lost.
    pub reason: Arc<str>,
}

/// One item of a [`Subscription`](crate::Subscription) stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum Delivery<T> {
    /// A notification.
    Message(Message<T>),
    /// A payload that did not decode; the stream goes on.
    Undecodable(DecodeError),
    /// This many notifications were dropped here because this subscriber's
    /// queue was full (the consumer was too slow). Other subscribers are not affected.
    Lagged(u64),
    /// Notifications may have been missed while the connection was down.
    Gap(Gap),
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
