//! The broker side of a relay: what a sink is given and what it answers.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;

/// Header (or field) naming the message's place in its source: a durable
/// channel's position (`tick/xid/seq`) or a WAL change's LSN.
pub const HEADER_POSITION: &str = "Pg-Pubsub-Position";
/// Header (or field) with the time the source event was published
/// (durable: its transaction's `now()`; WAL: the commit time), RFC 3339.
pub const HEADER_PUBLISHED_AT: &str = "Pg-Pubsub-Published-At";
/// Header (or field) naming the relay's source (see [`RelayBuilder::origin`](super::RelayBuilder::origin)).
pub const HEADER_ORIGIN: &str = "Pg-Pubsub-Origin";

/// One message for a broker, as the relay hands it to a [`Sink`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outgoing {
    /// A stable id of the source event: the same every time the event is
    /// relayed again (after a crash, a take-over, a retry), so brokers and
    /// consumers can drop replays. Durable: `CHANNEL:TICK/XID/SEQ`; WAL:
    /// `wal:COMMIT_LSN:INDEX` (the change's index in its transaction).
    pub id: String,
    /// Where it goes: the relay's subject template, rendered for it.
    pub subject: String,
    /// The payload, as published (durable) or as a JSON change event (WAL).
    pub payload: bytes::Bytes,
    /// Its place in the source (see [`HEADER_POSITION`]).
    pub position: String,
    /// When it was published in PostgreSQL.
    pub published_at: SystemTime,
    /// The relay's origin (see [`HEADER_ORIGIN`]).
    pub origin: Arc<str>,
}

impl Outgoing {
    /// [`published_at`](Self::published_at) in RFC 3339, as the headers carry it.
    pub fn published_at_rfc3339(&self) -> String {
        humantime::format_rfc3339_micros(self.published_at).to_string()
    }
}

/// Why a broker did not confirm a message.
#[derive(Clone)]
pub struct SinkError {
    retryable: bool,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl SinkError {
    /// A failure that may heal: the broker is down or unreachable, timed
    /// out, or has no stream for the subject yet. The relay retries the
    /// message (and those after it) with backoff, keeping its position.
    pub fn retryable(message: impl Into<String>) -> Self {
        SinkError {
            retryable: true,
            message: message.into(),
            source: None,
        }
    }

    /// The broker refused this message for good (too large, invalid
    /// subject): it goes to the relay's dead-letter channel.
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError {
            retryable: false,
            message: message.into(),
            source: None,
        }
    }

    /// Keeps `source` as the cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Whether retrying may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkError")
            .field("retryable", &self.retryable)
            .field("message", &self.message)
            .field("source", &self.source.as_ref().map(|s| s.to_string()))
            .finish()
    }
}

impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// What the broker said of one message.
#[derive(Debug, Clone)]
pub enum Confirm {
    /// Stored by the broker (persisted as the broker defines it).
    Stored,
    /// The broker recognised it as a replay of one it already has (NATS
    /// JetStream's duplicate window) and kept one copy.
    Duplicate,
}

/// A broker a relay publishes to. One implementation per broker
/// ([`NatsSink`](super::NatsSink), [`RedisSink`](super::RedisSink),
/// [`AmqpSink`](super::AmqpSink)); implement it to relay elsewhere.
///
/// [`publish`](Self::publish) sends a batch and waits for the broker to
/// confirm each message: the relay acks its source up to the first
/// message that is not confirmed, and never before. Send the batch in
/// order (one connection, one after the other, awaiting the confirms
/// together) so that per-subject order holds while nothing fails.
pub trait Sink: Send + Sync + 'static {
    /// Publishes `batch` and answers for each message, in order (the
    /// answer has `batch.len()` entries).
    fn publish<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> BoxFuture<'a, Vec<Result<Confirm, SinkError>>>;

    /// The broker's name and address for logs, without credentials.
    fn describe(&self) -> String;
}
