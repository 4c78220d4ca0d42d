//! What a durable subscription yields, and acknowledging it.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio_postgres::types::Type;

use super::position::{Position, Xid8};
use crate::channel::ChannelName;
use crate::error::{Error, Origin, Result};
use crate::schema::SchemaName;
use crate::tx::Executor;

/// One item of a [`DurableSubscription`](super::DurableSubscription).
#[derive(Debug)]
#[non_exhaustive]
pub enum DurableDelivery<T> {
    /// A message, decoded.
    Message(DurableMessage<T>),
    /// A message whose payload did not decode as `T`. Ack it like any
    /// other to move past it.
    Undecodable {
        /// The message, with its payload as text.
        message: DurableMessage<String>,
        /// Why it did not decode.
        error: Arc<serde_json::Error>,
    },
    /// Max-age retention removed this many messages of the channel before
    /// this group read them (see [`Durable::retain`](super::Durable::retain)).
    Truncated {
        /// Messages the group will never see.
        lost: u64,
    },
}

/// A message of a durable channel: payload, position, publish time, and
/// [`ack`](Self::ack).
pub struct DurableMessage<T> {
    pub(crate) payload: T,
    pub(crate) position: Position,
    pub(crate) published_at: SystemTime,
    pub(crate) acks: Arc<Acks>,
}

impl<T> DurableMessage<T> {
    /// A message to unit-test a consumer's handling with, without a server:
    /// published now at `position` on channel `test` for group `test`.
    /// [`ack`](Self::ack) on it does nothing visible; `ack_tx` would
    /// update no row.
    ///
    /// ```
    /// use pg_pubsub::durable::{DurableMessage, Position};
    /// let m = DurableMessage::for_test("hi".to_owned(), Position { tick: 1, xid: 7, seq: 1 });
    /// assert_eq!(m.payload(), "hi");
    /// m.ack();
    /// ```
    pub fn for_test(payload: T, position: Position) -> DurableMessage<T> {
        let channel = ChannelName::new("test").expect("a valid channel name");
        DurableMessage {
            payload,
            position,
            published_at: SystemTime::now(),
            acks: Arc::new(Acks::new(
                &SchemaName::default(),
                channel,
                Arc::from("test"),
            )),
        }
    }

    /// The decoded payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// Takes the payload.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// Where it is in the channel's delivery order.
    pub fn position(&self) -> Position {
        self.position
    }

    /// When its transaction started (`now()` in the publisher's transaction).
    pub fn published_at(&self) -> SystemTime {
        self.published_at
    }

    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.acks.channel
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.acks.group
    }

    /// Acknowledges this message **and every message before it** in
    /// delivery order. Written to the group's cursor in the background,
    /// batched (see [`ConsumerBuilder::ack_interval`](super::ConsumerBuilder::ack_interval));
    /// [`DurableSubscription::flush`](super::DurableSubscription::flush)
    /// waits for it. Acks never move the cursor backwards.
    pub fn ack(&self) {
        self.acks.ack(self.position);
    }

    /// Acknowledges (like [`ack`](Self::ack)) inside the caller's
    /// transaction: the group's cursor moves if and only if `tx` commits,
    /// together with whatever else `tx` did, so work done in the same
    /// database happens exactly once. Any [`Executor`]: tokio-postgres' or
    /// deadpool's transaction (or client, to ack on its own).
    pub async fn ack_tx<E: Executor + ?Sized>(&self, tx: &E) -> Result<()> {
        let p = self.acks.ack_params(self.position);
        crate::tx::execute(tx, &self.acks.ack_sql, &p.typed())
            .await
            .map(drop)
            .map_err(|e| Error::pg(Origin::Durable, "acknowledging in transaction", e))
    }

    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> DurableMessage<U> {
        DurableMessage {
            payload: f(self.payload),
            position: self.position,
            published_at: self.published_at,
            acks: self.acks,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for DurableMessage<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableMessage")
            .field("channel", &self.acks.channel)
            .field("group", &self.acks.group)
            .field("position", &self.position)
            .field("published_at", &self.published_at)
            .field("payload", &self.payload)
            .finish()
    }
}

/// A subscription's acknowledgements: the highest position acked and not
/// yet written, shared by its messages and its flusher.
pub(crate) struct Acks {
    pub(crate) channel: ChannelName,
    pub(crate) group: Arc<str>,
    pub(crate) ack_sql: String,
    pending: Mutex<Option<Position>>,
    pub(crate) notify: Notify,
}

/// Parameters of the ack statement, owned.
pub(crate) struct AckParams {
    channel: String,
    group: String,
    tick: i64,
    xid: Xid8,
    seq: i64,
}

impl AckParams {
    pub(crate) fn typed(&self) -> [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 5] {
        [
            (&self.channel, Type::TEXT),
            (&self.group, Type::TEXT),
            (&self.tick, Type::INT8),
            (&self.xid, Type::XID8),
            (&self.seq, Type::INT8),
        ]
    }
}

impl Acks {
    pub(crate) fn new(schema: &SchemaName, channel: ChannelName, group: Arc<str>) -> Self {
        let s = schema.as_str();
        Acks {
            channel,
            group,
            // The row comparison keeps the cursor monotone whatever the
            // order in which flushes and ack_tx transactions commit.
            ack_sql: format!(
                "UPDATE {s}.groups SET tick_id = $3, xid = $4, seq = $5, acked_at = now() \
                 WHERE channel = $1 AND group_name = $2 \
                 AND (tick_id, xid, seq) < ($3, $4, $5)"
            ),
            pending: Mutex::new(None),
            notify: Notify::new(),
        }
    }

    pub(crate) fn ack_params(&self, p: Position) -> AckParams {
        AckParams {
            channel: self.channel.as_str().to_owned(),
            group: self.group.to_string(),
            tick: p.tick,
            xid: p.xid8(),
            seq: p.seq,
        }
    }

    fn ack(&self, p: Position) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let first = pending.is_none();
        if pending.is_none_or(|q| q < p) {
            *pending = Some(p);
        }
        drop(pending);
        // The flusher only needs waking for the first ack since its last write.
        if first {
            self.notify.notify_one();
        }
    }

    /// Takes what is pending.
    pub(crate) fn take(&self) -> Option<Position> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Puts back what a failed flush took (unless a newer ack came meanwhile).
    pub(crate) fn restore(&self, p: Position) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_none_or(|q| q < p) {
            *pending = Some(p);
        }
    }
}
