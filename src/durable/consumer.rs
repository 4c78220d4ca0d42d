//! Consuming a durable channel as a group: [`ConsumerBuilder`],
//! [`DurableSubscription`] and the task that reads for it.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use super::acks::flush_loop;
use super::message::Acks;
use super::plan::ReadPlan;
use super::position::Position;
use super::reader::{Counts, Reader};
use super::role::Role;
use super::subscription::DurableSubscription;
use super::Durable;
use crate::channel::ChannelName;
use crate::error::{Error, Origin, Result};
use crate::payload::Decode;
use crate::schema::election_channel;
use crate::Text;

/// The longest group name accepted, in bytes.
const MAX_GROUP_BYTES: usize = 200;

/// Where a new group starts. An existing group always continues from its
/// cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Start {
    /// The oldest retained message (the default).
    Earliest,
    /// After everything already committed.
    Latest,
    /// After this position.
    After(Position),
    /// With the first batch ticked at or after this time (messages
    /// published shortly before it may be included).
    Time(SystemTime),
}

/// A consumer of a durable channel in a group, from [`Durable::subscribe`]:
/// set options, then `.await` it for the [`DurableSubscription`].
#[must_use = "a consumer does nothing until it is awaited"]
pub struct ConsumerBuilder<T> {
    durable: Durable,
    channel: String,
    group: String,
    start: Start,
    poll_interval: Duration,
    max_poll_interval: Option<Duration>,
    batch_size: usize,
    ack_interval: Duration,
    retain_every: Option<Duration>,
    max_age: Option<Duration>,
    decode: super::reader::Decode<T>,
}

/// An idle consumer's poll interval grows up to this many times the
/// configured one (see [`ConsumerBuilder::max_poll_interval`]).
const IDLE_BACKOFF: u32 = 8;

/// How often an active consumer runs retention by default.
const RETAIN_EVERY: Duration = Duration::from_secs(30);

impl Durable {
    /// Joins `group` on `channel`: `subscribe::<T>` decodes payloads as
    /// JSON into `T`, `subscribe::<Text>` gives them as is
    /// ([`Text`]). Await the returned [`ConsumerBuilder`],
    /// after setting options on it if needed (a new group starts at the
    /// earliest message).
    ///
    /// ```no_run
    /// # async fn demo(durable: pg_pubsub::durable::Durable) -> Result<(), pg_pubsub::Error> {
    /// use pg_pubsub::durable::Start;
    /// #[derive(serde::Deserialize)]
    /// struct Order { id: u64 }
    /// let orders = durable.subscribe::<Order>("orders", "billing").await?;
    /// let audit = durable
    ///     .subscribe::<pg_pubsub::Text>("orders", "audit")
    ///     .start(Start::Latest)
    ///     .batch_size(100)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn subscribe<T: Decode>(&self, channel: &str, group: &str) -> ConsumerBuilder<T> {
        ConsumerBuilder {
            durable: self.clone(),
            channel: channel.to_owned(),
            group: group.to_owned(),
            start: Start::Earliest,
            poll_interval: Duration::from_secs(1),
            max_poll_interval: None,
            batch_size: 1000,
            ack_interval: Duration::from_millis(100),
            retain_every: Some(RETAIN_EVERY),
            max_age: None,
            decode: T::decode_owned,
        }
    }
}

impl<T: Decode> IntoFuture for ConsumerBuilder<T> {
    type Output = Result<DurableSubscription<T>>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start_consumer())
    }
}

impl<T: Decode> ConsumerBuilder<T> {
    /// Where the group starts if it does not exist yet. Default: [`Start::Earliest`].
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// How often to look for new messages without a wake-up. Default: 1 s.
    /// An idle consumer backs off up to
    /// [`max_poll_interval`](Self::max_poll_interval).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The longest an idle consumer waits between looks without a
    /// wake-up: each look that found nothing after a wait without one
    /// doubles the wait, from [`poll_interval`](Self::poll_interval) up
    /// to this; a wake-up, a reconnect, a change of role or a message
    /// found sets it back. It bounds the latency of a
    /// [quiet](Durable::set_quiet) channel (published without wake-ups)
    /// after an idle period, and of a message whose wake-up was lost.
    /// `Some(poll_interval)` turns the backoff off. Default: `None`, 8
    /// times the poll interval (8 s by default); behind a pooler in
    /// transaction mode, where no wake-up comes, the poll interval (no
    /// backoff).
    pub fn max_poll_interval(mut self, interval: Option<Duration>) -> Self {
        self.max_poll_interval = interval;
        self
    }

    /// Messages per page handed to the stream. Reading a backlog, a query
    /// reads up to eight pages and up to ten may be buffered ahead of the
    /// consumer: lower it for very large payloads. Default: 1000.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size;
        self
    }

    /// How long acks are gathered before the cursor is written. Default: 100 ms.
    pub fn ack_interval(mut self, interval: Duration) -> Self {
        self.ack_interval = interval;
        self
    }

    /// How often this consumer, while it is its group's active one, runs
    /// [`Durable::retain`] on the channel with [`max_age`](Self::max_age):
    /// messages every group acked are removed without anyone scheduling
    /// it. Several active consumers of the channel (one per group) doing it
    /// is harmless: one that finds a retention running skips its round
    /// rather than wait, so reads never queue behind retention.
    /// `None`: never (run `retain` yourself). Default: every 30 s.
    pub fn retain_every(mut self, interval: Option<Duration>) -> Self {
        self.retain_every = interval;
        self
    }

    /// With [`retain_every`](Self::retain_every), also remove messages
    /// published longer ago than this, read or not; groups that had not
    /// read them get [`DurableDelivery::Truncated`](super::DurableDelivery::Truncated). Default: `None` (keep
    /// everything some group still needs). The max age is the channel's,
    /// for every group: awaiting the consumer records it when the
    /// channel has none and fails with [`ErrorKind::Config`](crate::ErrorKind::Config) when it has
    /// another one ([`Durable::set_max_age`] changes it).
    pub fn max_age(mut self, age: Option<Duration>) -> Self {
        self.max_age = age;
        self
    }

    /// Creates the group if needed and starts consuming. Returns at once:
    /// the stream yields messages while this instance is the group's
    /// active consumer ([`DurableSubscription::is_active`]).
    async fn start_consumer(self) -> Result<DurableSubscription<T>> {
        let channel = ChannelName::new(&self.channel)?;
        if self.group.is_empty() || self.group.contains('\0') || self.group.len() > MAX_GROUP_BYTES
        {
            return Err(Error::new(
                Origin::InvalidName,
                format!("group name must be 1 to {MAX_GROUP_BYTES} bytes, without NUL"),
            ));
        }
        if self.batch_size == 0 || self.batch_size > i32::MAX as usize {
            return Err(Error::new(Origin::Config, "batch_size must be at least 1"));
        }
        if self.poll_interval.is_zero()
            || self.ack_interval.is_zero()
            || self.retain_every.is_some_and(|d| d.is_zero())
        {
            return Err(Error::new(
                Origin::Config,
                "poll_interval, ack_interval and retain_every must be above zero",
            ));
        }
        let durable = self.durable;
        // Behind a pooler in transaction mode: no LISTEN, so no wake-ups
        // (poll only) and a lease row instead of the listener's election.
        let pooled = durable.pubsub.is_transaction_pooled();
        durable.install().await?;
        if let Some(age) = self.max_age {
            durable.claim_max_age(channel.as_str(), age).await?;
        }
        let start = durable.start_position(&channel, self.start).await?;
        durable.create_group(&channel, &self.group, start).await?;

        let pubsub = durable.pubsub.clone();
        let election = election_channel(&durable.schema, channel.as_str(), &self.group);
        let (wake, role) = if pooled {
            let lease = crate::lease::start(&pubsub, &durable.schema, &election)?;
            (None, Role::Leased(lease))
        } else {
            // Leadership is read from the handle's shared state (not the
            // lossy public events): watched first, so no change can be missed.
            let watch = pubsub.inner.leading.watch(&election);
            let wake = pubsub
                .inner
                .durable_wakeups
                .register(&pubsub, &durable.schema, channel.as_str())
                .await?;
            let subscription = pubsub
                .listen::<Text>(&election)
                .single_listener(true)
                .filtered(false)
                .await?;
            let role = Role::Elected {
                leading: pubsub.inner.leading.clone(),
                election: election.clone(),
                subscription,
                watch,
            };
            (Some(wake), role)
        };
        let lease = match &role {
            Role::Leased(lease) => Some(lease.clone()),
            Role::Elected { .. } => None,
        };
        // Without wake-ups, backing off would only delay: poll at the poll
        // interval unless told otherwise.
        let max_poll_interval = match self.max_poll_interval {
            Some(max) => max,
            None if pooled => self.poll_interval,
            None => self.poll_interval.saturating_mul(IDLE_BACKOFF),
        };
        let group: Arc<str> = Arc::from(self.group.as_str());
        let acks = Arc::new(Acks::new(&durable.schema, channel.clone(), group.clone()));
        let counts = Arc::new(Counts::default());
        // Pages, not messages: one channel operation per page read. Two pages
        // buffered: the next one is read while the consumer works.
        let (out, rx) = mpsc::channel(2);
        let stop_tx = Arc::new(watch::Sender::new(false));
        let stop = stop_tx.subscribe();
        let reader = Reader {
            durable: durable.clone(),
            channel: channel.clone(),
            group: group.clone(),
            plan: ReadPlan::new(
                self.batch_size,
                self.poll_interval,
                max_poll_interval.max(self.poll_interval),
            ),
            decode: self.decode,
            acks: acks.clone(),
            counts: counts.clone(),
            delivered: crate::record::Count::durable_delivered(channel.as_str(), &group),
            out,
            stop: stop.clone(),
            retain_every: self.retain_every,
            max_age: self.max_age,
            active: None,
        };
        // Both tasks are stopped by the handle's shutdown too, which waits
        // for the flusher to write the last acks.
        let stopper = |stop: &Arc<watch::Sender<bool>>| {
            let stop = stop.clone();
            move |_| {
                stop.send_replace(true);
            }
        };
        let services = &pubsub.inner.services;
        let reading = services.register("durable consumer", stopper(&stop_tx))?;
        let flushing = services.register("durable ack flusher", stopper(&stop_tx))?;
        let mut stopped = stop.clone();
        let task = tokio::spawn(async move {
            // A reader blocked handing over a page nobody reads stops too.
            tokio::select! {
                () = reader.run(wake, role) => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            drop(reading);
        });
        let flush = flush_loop(durable.clone(), acks.clone(), self.ack_interval, stop);
        let flusher = tokio::spawn(async move {
            flush.await;
            drop(flushing);
        });
        Ok(DurableSubscription {
            durable,
            channel,
            group,
            election,
            lease,
            acks,
            counts,
            rx,
            page: std::collections::VecDeque::new(),
            stop: stop_tx,
            task: Some(task),
            flusher: Some(flusher),
        })
    }
}
