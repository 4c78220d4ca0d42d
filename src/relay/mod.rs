//! Relays to brokers: a durable channel (as a consumer group) or a WAL
//! feed (table changes and outbox messages) published to NATS JetStream
//! (feature `relay-nats`), Redis Streams (`relay-redis`) or RabbitMQ
//! (`relay-amqp`), for when a team outgrows one PostgreSQL as its bus:
//! the transactional outbox, without a separate service.
//!
//! ```no_run
//! # #[cfg(feature = "relay-nats")]
//! # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
//! use pg_pubsub::relay::{NatsSink, Source};
//!
//! let sink = NatsSink::connect("nats://127.0.0.1:4222").await?;
//! let relay = pubsub
//!     .relay(Source::durable("orders", "to-nats"), sink)
//!     .subject("orders.{key}")
//!     .key_field("customer_id")
//!     .dead_letter("orders_dead")
//!     .await?;
//! // ... until the process stops:
//! println!("{:?}", relay.stats());
//! relay.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! * **At least once.** The source is acked only after the broker
//!   confirmed: a JetStream publish ack, a RabbitMQ publisher confirm of a
//!   persistent message, a Redis `XADD` reply. Acks are cumulative and
//!   stop at the first message not confirmed. After a crash, a take-over
//!   or a lost connection, what was in flight is published again: while
//!   catching up, the batch being published and the one before it, whose
//!   acks are written meanwhile (the next batch is read meanwhile too).
//! * **Stable ids.** Each message carries an id of its source event that
//!   is the same every time it is relayed ([`Outgoing::id`]): `Nats-Msg-Id`
//!   (JetStream drops a replay within the stream's duplicate window, so
//!   NATS gets each message **once**), AMQP `message_id`, the Redis entry's
//!   `id` field. Consumers of RabbitMQ and Redis drop replays by it.
//! * **Headers.** [`HEADER_POSITION`] (the durable position or the WAL
//!   LSN), [`HEADER_PUBLISHED_AT`] (RFC 3339) and [`HEADER_ORIGIN`]: NATS
//!   and AMQP headers, Redis stream fields.
//! * **Order.** A batch is published in source order on one connection and
//!   its confirms awaited together, so a subject (routing key, stream)
//!   gets its messages in order while nothing fails; a message retried
//!   after a failure may arrive again after later ones.
//! * **One active relay per source.** A durable source is a consumer group:
//!   the group's election ([`Listen::single_listener`](crate::Listen::single_listener))
//!   keeps one relay active, and a standby takes over from the group's last
//!   ack when it dies (SIGKILL included). A WAL source runs in standby mode
//!   ([`WalFeedBuilder::standby`](crate::changes::wal::WalFeedBuilder::standby)):
//!   the server streams a slot to one session at a time.
//! * **Broker down.** A publish the broker did not confirm (unreachable,
//!   timed out, no stream yet) is retried with backoff
//!   ([`RelayBuilder::backoff`]), forever, from the same position: nothing
//!   is acked past it.
//! * **Poison messages.** A message the broker refuses for good (too
//!   large, ...), one whose subject cannot be rendered (no `{key}` field),
//!   and one refused [`max_refusals`](RelayBuilder::max_refusals) times
//!   while the broker confirmed the messages after it, goes to the
//!   dead-letter durable channel ([`RelayBuilder::dead_letter`]) as a JSON
//!   object (`id`, `position`, `published_at`, `origin`, `subject`, `sink`,
//!   `error`, and `payload`, or `payload_hex` when not UTF-8), and the relay
//!   moves on. The source is acked past it only once the dead letter is
//!   stored.
//!
//! # Subjects
//!
//! The [`SubjectTemplate`] names where each message goes: the NATS
//! subject, the Redis stream key, the AMQP routing key (on the exchange
//! given to [`AmqpSink`]): `orders.{channel}`, `db.{table}.{op}`,
//! `orders.{key}` with [`RelayBuilder::key_field`].
//!
//! # Stats and metrics
//!
//! [`Relay::stats`] counts what was relayed, dead-lettered and retried,
//! and the lag: from the newest settled message's publish to its
//! confirm. With the `metrics` feature, the same are
//! `pgpubsub_relay_messages_total`, `pgpubsub_relay_dead_lettered_total`,
//! `pgpubsub_relay_retries_total` and `pgpubsub_relay_lag_seconds`, by
//! `relay` (the origin).

#[cfg(feature = "relay-nats")]
mod jetstream;
mod plan;
#[cfg(feature = "relay-amqp")]
mod rabbitmq;
#[cfg(feature = "relay-redis")]
mod redis_streams;
mod run;
mod sink;
mod source;
mod subject;
mod url;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

#[cfg(feature = "relay-nats")]
pub use jetstream::NatsSink;
#[cfg(feature = "relay-amqp")]
pub use rabbitmq::AmqpSink;
#[cfg(feature = "relay-redis")]
pub use redis_streams::{
    RedisSink, FIELD_ID, FIELD_ORIGIN, FIELD_PAYLOAD, FIELD_POSITION, FIELD_PUBLISHED_AT,
};
// The brokers' clients, for their own options (TLS, credentials) and to
// create streams and queues.
#[cfg(feature = "relay-nats")]
pub use async_nats;
#[cfg(feature = "relay-amqp")]
pub use lapin;
#[cfg(feature = "relay-redis")]
pub use redis;
pub use sink::{
    Confirm, Outgoing, Sink, SinkError, HEADER_ORIGIN, HEADER_POSITION, HEADER_PUBLISHED_AT,
};
pub use source::Source;
use subject::Kind;
pub use subject::SubjectTemplate;
pub use url::connect_sink;

use crate::config::Backoff;
use crate::error::{Error, Origin, Result};
use crate::PgPubSub;

/// The dead-letter channel when none is given.
pub const DEFAULT_DEAD_LETTER: &str = "pgpubsub_relay_dead";

impl PgPubSub {
    /// A relay from `source` to `sink`; await the returned builder (after
    /// setting options on it) to start it. See [`relay`](crate::relay).
    pub fn relay(&self, source: Source, sink: impl Sink) -> RelayBuilder {
        RelayBuilder {
            pubsub: self.clone(),
            source,
            sink: Arc::new(sink),
            subject: None,
            message_subject: None,
            key_field: None,
            dead_letter: None,
            origin: None,
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
                jitter: 0.3,
            },
            max_refusals: 10,
            batch_size: 512,
            ack_interval: Duration::from_millis(100),
        }
    }
}

/// Options of a relay; from [`PgPubSub::relay`], started when awaited.
#[must_use = "a relay does nothing until awaited"]
pub struct RelayBuilder {
    pubsub: PgPubSub,
    source: Source,
    sink: Arc<dyn Sink>,
    subject: Option<String>,
    message_subject: Option<String>,
    key_field: Option<String>,
    dead_letter: Option<String>,
    origin: Option<String>,
    backoff: Backoff,
    max_refusals: u32,
    batch_size: usize,
    ack_interval: Duration,
}

impl RelayBuilder {
    /// Where each durable message or WAL change goes ([`SubjectTemplate`]).
    /// Default: `{channel}` for a durable source, `{schema}.{table}.{op}`
    /// for the changes of a WAL source.
    pub fn subject(mut self, template: &str) -> Self {
        self.subject = Some(template.to_owned());
        self
    }

    /// Where each logical message of a WAL source goes (outbox messages
    /// from [`emit_tx`](crate::changes::wal::emit_tx)). Default: `{prefix}`.
    pub fn message_subject(mut self, template: &str) -> Self {
        self.message_subject = Some(template.to_owned());
        self
    }

    /// The payload field (dotted for nested objects: `customer.id`) that
    /// `{key}` stands for. For a WAL change, a field of its `new` row
    /// (`old` for a delete).
    pub fn key_field(mut self, field: &str) -> Self {
        self.key_field = Some(field.to_owned());
        self
    }

    /// The durable channel poison messages go to. Default
    /// [`DEFAULT_DEAD_LETTER`].
    pub fn dead_letter(mut self, channel: &str) -> Self {
        self.dead_letter = Some(channel.to_owned());
        self
    }

    /// The origin header's value (and the relay's name in metrics).
    /// Default: `pg-pubsub/CHANNEL/GROUP` or `pg-pubsub/wal/SLOT`.
    pub fn origin(mut self, origin: &str) -> Self {
        self.origin = Some(origin.to_owned());
        self
    }

    /// Delays between publishes while the broker does not confirm.
    /// Default 100 ms doubling up to 5 s.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often a message may fail while the broker confirms the ones
    /// after it before it is dead-lettered. Default 10.
    pub fn max_refusals(mut self, n: u32) -> Self {
        self.max_refusals = n.max(1);
        self
    }

    /// Messages published (and awaiting their confirm) at once. Default 512.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How often a durable source's acks are written to its group's
    /// cursor (and so how much a relay that dies publishes again: what the
    /// broker confirmed within the last interval). Default 100 ms. A WAL
    /// source acks at its feed's
    /// [`ack_interval`](crate::changes::wal::WalFeedBuilder::ack_interval).
    pub fn ack_interval(mut self, interval: Duration) -> Self {
        self.ack_interval = interval;
        self
    }

    async fn start(self) -> Result<Relay> {
        let wal = self.source.is_wal();
        let template = match &self.subject {
            Some(t) => SubjectTemplate::parse(t)?,
            None if wal => SubjectTemplate::parse("{schema}.{table}.{op}")?,
            None => SubjectTemplate::parse("{channel}")?,
        };
        template.check_for(if wal { Kind::Change } else { Kind::Durable })?;
        let message_template =
            SubjectTemplate::parse(self.message_subject.as_deref().unwrap_or("{prefix}"))?;
        if wal {
            message_template.check_for(Kind::Message)?;
        }
        for t in [&template, &message_template] {
            if t.uses_key() && self.key_field.is_none() {
                return Err(Error::new(
                    Origin::Config,
                    format!("the subject template {t} uses {{key}}: set a key field"),
                ));
            }
        }
        let dead_channel = self
            .dead_letter
            .clone()
            .unwrap_or_else(|| DEFAULT_DEAD_LETTER.to_owned());
        crate::ChannelName::new(&dead_channel)?;
        let durable = self.pubsub.durable();
        #[cfg(feature = "wal")]
        let mut wal_role = None;
        let (reader, origin, election) = match self.source {
            Source::Durable { channel, group } => {
                let sub = durable
                    .subscribe::<crate::Text>(&channel, &group)
                    .poll_interval(Duration::from_millis(500))
                    .ack_interval(self.ack_interval)
                    .await?;
                let election = Some(sub.activity());
                let origin = format!("pg-pubsub/{channel}/{group}");
                (source::Reader::Durable(sub), origin, election)
            }
            #[cfg(feature = "wal")]
            Source::Wal(feed) => {
                let slot = feed.slot_name().to_owned();
                let feed = start_wal(feed.standby(true), self.backoff).await?;
                wal_role = Some((feed.events(), slot.clone()));
                let origin = format!("pg-pubsub/wal/{slot}");
                (
                    source::Reader::Wal(source::wal::WalReader::new(feed)),
                    origin,
                    None,
                )
            }
        };
        let origin: Arc<str> = Arc::from(self.origin.unwrap_or(origin));
        let counters = Arc::new(run::Counters::default());
        let stop = Arc::new(watch::Sender::new(false));
        let render = source::Render {
            template,
            message_template,
            key_field: self.key_field,
        };
        let runner = run::Runner {
            sink: self.sink.clone(),
            origin: origin.clone(),
            dead_letter: durable,
            dead_channel,
            plan: plan::RetryPlan::new(self.backoff, self.max_refusals),
            backoff: self.backoff,
            batch_size: self.batch_size,
            counters: counters.clone(),
            stop: stop.subscribe(),
            metrics: crate::record::RelayMetrics::new(&origin),
        };
        let stopper = stop.clone();
        let registration = self.pubsub.inner.services.register("relay", move |_| {
            stopper.send_replace(true);
        })?;
        #[cfg(feature = "wal")]
        if let Some((events, slot)) = wal_role {
            tokio::spawn(track_wal_role(
                events,
                slot,
                counters.clone(),
                stop.subscribe(),
            ));
        }
        let task = tokio::spawn(async move {
            let result = runner.run(reader, render).await;
            drop(registration);
            result
        });
        Ok(Relay {
            election,
            origin,
            sink: self.sink.describe(),
            counters,
            stop,
            task: Some(task),
        })
    }
}

/// Starts a WAL feed in standby mode, waiting for the slot; a lost or
/// refused connection (a PostgreSQL restart while standing by) is retried
/// with `backoff`, anything else (`wal_level`, rights) is returned.
#[cfg(feature = "wal")]
async fn start_wal(
    feed: crate::changes::wal::WalFeedBuilder,
    backoff: Backoff,
) -> Result<crate::changes::wal::WalFeed<serde_json::Value>> {
    let mut attempt = 1;
    loop {
        match feed.clone().start::<serde_json::Value>().await {
            // Class 57 (operator intervention): the server shuts down or
            // starts up; the replication client reports it as text.
            Err(e)
                if e.is_connection()
                    || e.kind() == crate::ErrorKind::Connect
                    || e.to_string().contains("SQLSTATE 57P") =>
            {
                attempt += 1;
                let delay = backoff.delay(attempt);
                tracing::warn!(target: "pg_pubsub", slot = feed.slot_name(),
                    "relay: starting the WAL feed failed, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// Keeps a WAL relay's `active` flag: its feed streams the slot, or lost
/// it (and retries: another relay may have it), until the relay stops.
#[cfg(feature = "wal")]
async fn track_wal_role(
    mut events: crate::event::Events<crate::event::WalEvent>,
    slot: String,
    counters: Arc<run::Counters>,
    mut stop: watch::Receiver<bool>,
) {
    use crate::event::WalEvent;
    use futures::StreamExt;
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            event = events.next() => event,
        };
        match event {
            Some(WalEvent::Streaming { slot: s, .. }) if *s == *slot => {
                counters.active.store(true, Ordering::Relaxed);
            }
            Some(WalEvent::Disconnected { slot: s, .. }) if *s == *slot => {
                counters.active.store(false, Ordering::Relaxed);
            }
            Some(_) => {}
            None => return,
        }
    }
}

impl IntoFuture for RelayBuilder {
    type Output = Result<Relay>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

/// A running relay. Dropping it stops it (what was settled is acked);
/// [`close`](Self::close) also waits until the source's acks are written.
pub struct Relay {
    /// A durable source's role: this relay is active while its consumer
    /// leads the group's election or holds its lease (a WAL source is
    /// active once it streams).
    election: Option<crate::durable::Activity>,
    origin: Arc<str>,
    sink: String,
    counters: Arc<run::Counters>,
    stop: Arc<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

/// What a relay did so far; from [`Relay::stats`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RelayStats {
    /// Messages the broker confirmed (stored or recognised as duplicates).
    pub relayed: u64,
    /// Of those, the ones the broker said it already had (NATS).
    pub duplicates: u64,
    /// Messages moved to the dead-letter channel.
    pub dead_lettered: u64,
    /// Publishes retried because the broker did not confirm.
    pub retries: u64,
    /// Batches read from the source.
    pub batches: u64,
    /// Durable messages that retention removed before the relay read them.
    pub lost: u64,
    /// Whether this relay is its source's active one (else standing by).
    pub active: bool,
    /// The position of the newest settled message.
    pub position: Option<String>,
    /// From the newest settled message's publish to its confirm: how far
    /// behind its source the relay was then.
    pub lag: Option<Duration>,
    /// When the newest message was settled.
    pub settled_at: Option<SystemTime>,
    /// The last reason the broker did not confirm.
    pub last_error: Option<String>,
}

impl Relay {
    /// Counters, position and lag (see [`RelayStats`]). Throughput is the
    /// rate of [`RelayStats::relayed`].
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let last = c.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        RelayStats {
            relayed: c.relayed.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            active: match &self.election {
                Some(activity) => activity.is_active(),
                None => c.active.load(Ordering::Relaxed),
            },
            position: last.as_ref().map(|l| l.position.clone()),
            lag: last.as_ref().map(|l| {
                l.settled_at
                    .duration_since(l.published_at)
                    .unwrap_or_default()
            }),
            settled_at: last.map(|l| l.settled_at),
            last_error: c
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// The origin: the relay's name in headers and metrics.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The broker, for logs.
    pub fn sink(&self) -> &str {
        &self.sink
    }

    /// Whether the relay task ended (the handle shut down, or the source ended).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops relaying: what is in flight is left unacked (it is published
    /// again by the next relay), the acks of what was settled are written.
    pub async fn close(mut self) -> Result<()> {
        self.stop.send_replace(true);
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| Error::new(Origin::Relay, format!("the relay task failed: {e}")))?,
            None => Ok(()),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("origin", &self.origin)
            .field("sink", &self.sink)
            .finish()
    }
}
