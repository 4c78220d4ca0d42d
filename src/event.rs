//! Events, for logs, metrics and tests: [`ConnectionEvent`]s of the
//! listener connection on [`PgPubSub::events`](crate::PgPubSub::events),
//! and each capability's on its own stream ([`DurableEvent`],
//! [`QueueEvent`], [`WalEvent`]).
//!
//! Why separate streams: every stream is bounded and lossy (a slow reader
//! gets a `Lagged`/`EventsLagged` count instead of slowing the crate
//! down), so a burst of job or WAL events must not push connection events
//! out of a reader's buffer, nor the other way round. Nothing in the crate
//! relies on these streams for its own coordination.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

use crate::channel::ChannelName;

/// Something that happened to the listener connection or a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The listener connection is up (the first time). Sent while
    /// `connect()` runs, before any [`EventStream`] can exist, so only the
    /// tracing log shows it; afterwards [`PgPubSub::listener_pid`](crate::PgPubSub::listener_pid)
    /// tells the same.
    Connected {
        /// Backend PID of the listener session.
        process_id: i32,
    },
    /// The listener connection was lost; reconnecting starts at once.
    Disconnected {
        /// The error, with the server's text when it sent one.
        reason: Arc<str>,
    },
    /// A reconnect attempt failed; the next one follows after `retry_in`.
    ReconnectFailed {
        /// 1 for the first attempt after the loss.
        attempt: u32,
        /// Why it failed.
        error: Arc<str>,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// The listener is back and listening on every channel again; each
    /// subscription has been sent a [`Gap`](crate::Gap).
    Reconnected {
        /// Backend PID of the new listener session.
        process_id: i32,
        /// Attempts it took.
        attempts: u32,
        /// Time from loss to listening again.
        downtime: Duration,
    },
    /// The server confirmed `LISTEN` on a channel.
    Listening {
        /// The channel.
        channel: ChannelName,
    },
    /// The last subscriber of a channel went away and `UNLISTEN` was confirmed.
    Unlistened {
        /// The channel.
        channel: ChannelName,
    },
    /// A subscriber's queue is full: messages for it are being dropped (it
    /// will see [`Delivery::Lagged`](crate::Delivery::Lagged)). Reported once per run of drops.
    SlowConsumer {
        /// The channel.
        channel: ChannelName,
    },
    /// Single listener: this instance took the channel's lock and now
    /// listens and delivers (it announced so on the control channel).
    LockAcquired {
        /// The channel.
        channel: ChannelName,
    },
    /// Single listener: another instance leads the channel; this one stands by
    /// and retries. Reported when standing by begins.
    Standby {
        /// The channel.
        channel: ChannelName,
    },
    /// Single listener: the lock went with the lost session; this instance
    /// no longer delivers the channel until it wins the lock again.
    LockLost {
        /// The channel.
        channel: ChannelName,
        /// Why the session was lost.
        reason: Arc<str>,
    },
    /// Single listener: this instance gave the lock up (last subscriber gone,
    /// or shutdown) and woke the standbys.
    LockReleased {
        /// The channel.
        channel: ChannelName,
    },
    /// Single listener: this instance cannot win the channel's lock, yet the
    /// session holding it is not a leader of this channel (it does not hold
    /// the channel's witness lock): a key collision with another channel, or
    /// a foreign advisory lock on the same key. Nobody may be delivering
    /// the channel. Reported once, after two probes in a row saw it.
    ElectionBlocked {
        /// The channel.
        channel: ChannelName,
        /// Backend PID of the session holding the lock.
        holder_pid: i32,
    },
    /// This event stream itself fell behind and missed this many events.
    EventsLagged {
        /// Events missed.
        missed: u64,
    },
    /// [`shutdown`](crate::PgPubSub::shutdown) finished.
    ShutDown,
}

/// A stream of [`ConnectionEvent`]s, from [`PgPubSub::events`](crate::PgPubSub::events).
///
/// Bounded: a reader that falls behind gets [`ConnectionEvent::EventsLagged`]
/// instead of slowing the listener down.
pub struct EventStream {
    inner: BroadcastStream<ConnectionEvent>,
}

impl EventStream {
    pub(crate) fn new(rx: broadcast::Receiver<ConnectionEvent>) -> Self {
        EventStream {
            inner: BroadcastStream::new(rx),
        }
    }
}

impl Stream for EventStream {
    type Item = ConnectionEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|item| {
            item.map(|res| match res {
                Ok(event) => event,
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    ConnectionEvent::EventsLagged { missed }
                }
            })
        })
    }
}

/// What the durable consumers started from one [`PgPubSub`](crate::PgPubSub)
/// report, from [`Durable::events`](crate::durable::Durable::events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DurableEvent {
    /// This instance became the active consumer of
    /// `group` on `channel` (it delivers from the group's last ack).
    Active {
        /// The durable channel.
        channel: ChannelName,
        /// The consumer group.
        group: Arc<str>,
    },
    /// This instance stands by for `group` on `channel`
    /// (another instance is active, or this one lost the election); it takes
    /// over when the active one goes away.
    Standby {
        /// The durable channel.
        channel: ChannelName,
        /// The consumer group.
        group: Arc<str>,
    },
    /// Max-age retention removed `lost` messages of
    /// `channel` before `group` read them. Sent when the group's active
    /// consumer learns of it, together with the in-stream
    /// [`DurableDelivery::Truncated`](crate::durable::DurableDelivery::Truncated).
    Truncated {
        /// The durable channel.
        channel: ChannelName,
        /// The consumer group.
        group: Arc<str>,
        /// Messages the group will never see.
        lost: u64,
    },
    /// Automatic retention (a rotation), run by an
    /// active consumer of `channel` in this instance, emptied partitions
    /// or removed messages of `channel`. Not sent when it did nothing.
    Retained {
        /// The durable channel whose consumer ran it.
        channel: ChannelName,
        /// Messages of `channel` every group had acked.
        acked: u64,
        /// Messages of `channel` older than the maximum age.
        expired: u64,
        /// Partitions emptied, for all channels of the schema.
        truncated: u64,
        /// Messages still needed, carried into the current partition.
        carried: u64,
    },
    /// This event stream fell behind and missed this many events.
    Lagged {
        /// Events missed.
        missed: u64,
    },
}

/// What the workers started from one [`PgPubSub`](crate::PgPubSub) report,
/// from [`Queue::events`](crate::queue::Queue::events) or
/// [`Worker::events`](crate::queue::Worker::events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueEvent {
    /// A job's attempt failed; it runs again after `retry_in`. Also sent
    /// by the worker that found a job whose lease expired (its worker died
    /// or lost its connection): `retry_in` is zero, the error says so.
    JobRetried {
        /// The queue.
        queue: Arc<str>,
        /// The job.
        job_id: i64,
        /// The attempt that failed (from 1).
        attempt: i32,
        /// The handler's error (or panic) text.
        error: Arc<str>,
        /// The delay before the next attempt.
        retry_in: Duration,
    },
    /// A job failed its last attempt, or its lease expired on its last
    /// attempt, and is now dead (in `dead_jobs`).
    JobDead {
        /// The queue.
        queue: Arc<str>,
        /// The job.
        job_id: i64,
        /// Attempts made.
        attempts: i32,
        /// The last error.
        error: Arc<str>,
    },
    /// A job was cancelled ([`Queue::cancel`](crate::queue::Queue::cancel))
    /// while this worker ran or held it, and has now ended as cancelled
    /// (in `finished_jobs`, never retried).
    JobCancelled {
        /// The queue.
        queue: Arc<str>,
        /// The job.
        job_id: i64,
        /// The attempt that was running.
        attempt: i32,
    },
    /// A worker found its queue paused or resumed ([`Queue::pause`](crate::queue::Queue::pause)):
    /// it claims nothing while paused. Sent by each worker when it notices.
    PauseChanged {
        /// The queue.
        queue: Arc<str>,
        /// Paused now (or resumed).
        paused: bool,
    },
    /// A worker found, when it vacuumed the jobs table, that a transaction
    /// or slot holds back the xmin horizon: VACUUM cannot remove the
    /// entries of claimed jobs behind it, so every claim gets slower until
    /// it ends (see [`Queue::horizon_holder`](crate::queue::Queue::horizon_holder)).
    /// Sent once per holder, and again every 5 minutes while it stays.
    HorizonHeld {
        /// The worker's queue.
        queue: Arc<str>,
        /// The oldest holder.
        holder: crate::queue::HorizonHolder,
    },
    /// This event stream fell behind and missed this many events.
    Lagged {
        /// Events missed.
        missed: u64,
    },
}

/// What the WAL feeds started from one [`PgPubSub`](crate::PgPubSub)
/// report, from `WalFeed::events` (feature `wal`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalEvent {
    /// The replication stream of `slot` is up (first time or
    /// after a loss); it streams from the last ack.
    Streaming {
        /// The replication slot.
        slot: Arc<str>,
        /// Where the server starts (the last ack, or the slot's confirmed
        /// position the first time).
        from: crate::changes::Lsn,
    },
    /// The replication stream of `slot` was lost; reconnecting
    /// after `retry_in` (forever, with the crate's [`Backoff`](crate::Backoff)).
    Disconnected {
        /// The replication slot.
        slot: Arc<str>,
        /// Why.
        reason: Arc<str>,
        /// Attempt number since the last good stream (from 1).
        attempt: u32,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// The slot holds more WAL than the configured warning level
    /// (`pg_current_wal_lsn() - confirmed_flush_lsn`). Reported at each
    /// check while above it.
    Lag {
        /// The replication slot.
        slot: Arc<str>,
        /// Bytes of WAL the slot keeps.
        lag_bytes: u64,
        /// The configured warning level.
        warn_bytes: u64,
    },
    /// This event stream fell behind and missed this many events.
    Lagged {
        /// Events missed.
        missed: u64,
    },
    /// A snapshot or backfill of a table in the feed of `slot` made
    /// progress: the consumer acked a chunk of its rows (`finished`:
    /// every row was read).
    Snapshot {
        /// The replication slot.
        slot: Arc<str>,
        /// The request's id (`wal_snapshots.id`).
        id: i64,
        /// The table.
        table: Arc<str>,
        /// Rows read so far (before the merge dropped those the stream
        /// carried).
        rows: u64,
        /// Every row was read.
        finished: bool,
    },
    /// A snapshot or backfill was given up: its table cannot be read any
    /// more (dropped, its primary key removed, ...). Recorded in
    /// `wal_snapshots.error`.
    SnapshotFailed {
        /// The replication slot.
        slot: Arc<str>,
        /// The request's id.
        id: i64,
        /// The table.
        table: Arc<str>,
        /// Why.
        reason: Arc<str>,
    },
}

/// An event type with a variant for "the reader missed `missed` events".
pub trait Lagging: Clone + Send + 'static {
    #[doc(hidden)]
    fn lagged(missed: u64) -> Self;
}

impl Lagging for DurableEvent {
    fn lagged(missed: u64) -> Self {
        DurableEvent::Lagged { missed }
    }
}

impl Lagging for QueueEvent {
    fn lagged(missed: u64) -> Self {
        QueueEvent::Lagged { missed }
    }
}

impl Lagging for WalEvent {
    fn lagged(missed: u64) -> Self {
        WalEvent::Lagged { missed }
    }
}

/// A stream of a capability's events ([`DurableEvent`], [`QueueEvent`],
/// [`WalEvent`]) from now on. Bounded like [`EventStream`]: a reader that
/// falls behind gets a `Lagged { missed }` item.
pub struct Events<E> {
    inner: BroadcastStream<E>,
}

impl<E: Lagging> Stream for Events<E> {
    type Item = E;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<E>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|item| {
            item.map(|res| match res {
                Ok(event) => event,
                Err(BroadcastStreamRecvError::Lagged(missed)) => E::lagged(missed),
            })
        })
    }
}

impl<E> std::fmt::Debug for Events<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

/// One capability's event bus, kept in the handle's shared state.
#[derive(Clone)]
pub(crate) struct Bus<E> {
    tx: broadcast::Sender<E>,
}

impl<E: Lagging + std::fmt::Debug> Bus<E> {
    pub(crate) fn new(capacity: usize) -> Self {
        Bus {
            tx: broadcast::channel(capacity).0,
        }
    }

    pub(crate) fn emit(&self, event: E) {
        tracing::debug!(?event, "pg-pubsub event");
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(event);
    }

    pub(crate) fn subscribe(&self) -> Events<E> {
        Events {
            inner: BroadcastStream::new(self.tx.subscribe()),
        }
    }
}

/// The capabilities' buses of one handle.
pub(crate) struct Buses {
    pub(crate) durable: Bus<DurableEvent>,
    pub(crate) queue: Bus<QueueEvent>,
    #[cfg_attr(not(feature = "wal"), allow(dead_code))]
    pub(crate) wal: Bus<WalEvent>,
}

impl Buses {
    pub(crate) fn new(capacity: usize) -> Self {
        Buses {
            durable: Bus::new(capacity),
            queue: Bus::new(capacity),
            wal: Bus::new(capacity),
        }
    }
}
