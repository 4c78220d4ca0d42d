//! # pg-pubsub: PostgreSQL LISTEN/NOTIFY as a reliable message bus
//!
//! ```no_run
//! use futures::StreamExt;
//! use pg_pubsub::{Delivery, PgPubSub};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug)]
//! struct Order { id: u64 }
//!
//! # async fn demo() -> Result<(), pg_pubsub::Error> {
//! let pubsub = PgPubSub::connect("postgres://postgres@localhost/postgres").await?;
//! let mut orders = pubsub.listen::<Order>("orders").await?;
//! pubsub.notify("orders", &Order { id: 1 }).await?;
//! match orders.next().await {
//!     Some(Delivery::Message(m)) => println!("got {:?} from pid {}", m.payload(), m.process_id()),
//!     Some(Delivery::Gap(gap)) => println!("{gap}: re-read state"),
//!     other => println!("{other:?}"),
//! }
//! pubsub.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Architecture
//!
//! ```text
//!              ┌──────────────────────── PgPubSub (Clone) ───────────────────────┐
//!  core        │ listen ─▶ listener task ─▶ one connection; registry; fan-out    │
//!  (pubsub/)   │             └─▶ inbox ─▶ Subscription<T> (Stream, decodes)      │
//!              │ notify ─▶ pool (or the caller's transaction)                    │
//!              ├─────────────────────────────────────────────────────────────────┤
//!  capabilities│ durable() ─▶ Durable: tables + snapshot ticks, consumer groups  │
//!              │ queue()/worker() ─▶ Queue, Worker: SKIP LOCKED claims, retries  │
//!              │ changes() ─▶ trigger feeds into durable channels or NOTIFY      │
//!              │ wal_feed() ─▶ own replication connection (feature `wal`)        │
//!              │ relay() ─▶ a durable group or WAL feed into a broker (Sink)     │
//!              ├─────────────────────────────────────────────────────────────────┤
//!  plumbing    │ schema/ (migrations, installer) · exec (pool, timeout, cancel)  │
//!              │ services (stopped in order by shutdown) · wake task (NOTIFY     │
//!              │ after commit, merged) · events per capability · errors · TLS    │
//!              └─────────────────────────────────────────────────────────────────┘
//! ```
//!
//! * The core knows nothing of the capabilities. They use it through two
//!   seams: a wake-up is a plain notification on `<schema>_wake` or
//!   `<schema>_jobs`, and "one active consumer" is an elected subscription
//!   ([`Listen::single_listener`]) on a derived channel name (behind a
//!   pooler in transaction mode, a lease row of that name instead).
//! * One task (`src/pubsub/driver/`) owns the listener connection: it serves
//!   `listen`/drop/shutdown commands, batches `LISTEN`/`UNLISTEN` into one
//!   round trip, health-checks the session, and reconnects forever with
//!   backoff, re-`LISTEN`ing every channel before telling each subscriber
//!   about the [`Gap`].
//! * Each [`Subscription`] has its own bounded queue. A full queue drops and
//!   counts ([`Delivery::Lagged`]); the listener never waits for a consumer.
//!   Payloads are decoded in the consumer's task, not the listener's.
//! * Publishing never touches the listener connection: [`PgPubSub::notify`]
//!   uses the pool; [`PgPubSub::notify_tx`] uses the caller's transaction.
//! * One shape for every call that sends or subscribes, in every
//!   capability: the payload's type picks its encoding (`&value` of any
//!   `serde` type is JSON, [`Text`] is as is; [`Encode`], [`Decode`]); a
//!   call returns a request whose options are methods, sent when awaited
//!   (`listen::<T>(ch).single_listener(true).await`,
//!   `enqueue(q, &job).delay(d).await`); `_tx` writes in the caller's
//!   transaction ([`Executor`]), `_batch` sends many.
//! * Every table and function lives in one schema ([`schema`]): numbered
//!   migrations plus per-capability function scripts, checksummed, applied
//!   lazily or by [`PgPubSub::migrate`].
//!
//! ## Source layout
//!
//! ```text
//! src/lib.rs        this overview; the public re-exports
//! src/client.rs     PgPubSub and its Builder: the handle every capability hangs off
//! src/pubsub/       the core: channel names, wire format, publish, subscriptions,
//!                   driver/ (listener task: connection, registry, per-channel
//!                   state machines in role.rs, election SQL)
//! src/schema/       SchemaName, migrations/*.sql, functions/*.sql, the installer
//! src/durable/      durable channels: mod.rs (handle, docs), store.rs (every
//!                   statement), consumer.rs (builder), reader.rs (read loop),
//!                   acks.rs (ack flusher), subscription.rs (the Stream),
//!                   wakeups.rs (per-channel wake-up dispatch), groups, publish,
//!                   plan.rs (the read loop's decisions, without I/O),
//!                   role.rs (active or standby: election or lease)
//! src/queue/        work queue: handle, enqueue, worker (runner, attempt,
//!                   completer, vacuum), admin, control (cancel, pause,
//!                   finished jobs), outcome (what handlers return)
//! src/cron/         periodic jobs: mod.rs (API), slot.rs (slots, DST and
//!                   catch-up, pure), scheduler.rs (the service), store.rs
//! src/changes/      trigger feeds (trigger.rs) and the WAL feed (wal/);
//!                   store.rs: the trigger feeds' statements
//! src/relay/        relays to brokers: mod.rs (builder, handle, docs), source.rs
//!                   (durable group, WAL feed), run.rs (the loop), plan.rs (its
//!                   retry/dead-letter decisions, without I/O), subject.rs,
//!                   sink.rs (the Sink trait) and one file per broker
//! src/admin/        the operator's view: mod.rs (handle, serializable types),
//!                   store.rs (statements the capabilities lack)
//! src/ui/           feature `ui`: router (mod.rs), api.rs (JSON), pages.rs
//!                   (maud), auth.rs (token, sessions, CSRF), history.rs (charts)
//! src/metrics/      feature `metrics`: names, the Prometheus recorder, the
//!                   database gauges read on scrape (store.rs: statements)
//! src/record.rs     what the tasks record for metrics (empty without the feature)
//! src/exec.rs       how every pooled statement runs: timeout, backoff, cancel on
//!                   the server, connection detached when a statement may still run;
//!                   prepared once per connection, or unnamed behind a transaction pooler
//! src/lease.rs      elections in a table row, for transaction poolers (and
//!                   their plan, without I/O)
//! src/service.rs    the workers, consumers and feeds a handle started, stopped
//!                   in order by its shutdown
//! src/tx.rs         Executor: the caller's connection or transaction (`*_tx`)
//! src/payload.rs    Text, Encode, Decode: the type decides JSON or text
//! src/{config,connect,tls,error,event,stats,wake,signal}.rs   plumbing
//! src/testing/      throwaway PostgreSQL clusters (feature `testing`)
//! src/bin/          the `pg-pubsub` CLI (feature `cli`)
//! ```
//!
//! ## TLS
//!
//! With the `tls` feature, the `sslmode` (`disable` to `verify-full`) and
//! `sslrootcert` of the connection string are honoured as libpq does, for
//! the listener and the pool: see [`SslMode`], [`Builder::ssl_mode`],
//! [`Builder::ssl_root_cert`] and [`Builder::tls`], and the README's TLS
//! section for what each mode checks.
//!
//! ## Logging
//!
//! The crate logs through [`tracing`](https://docs.rs/tracing) under the
//! target `pg_pubsub` (e.g. `RUST_LOG=pg_pubsub=debug` with
//! `tracing-subscriber`'s `EnvFilter`): lost connections and failures at
//! `warn`/`error`, reconnects at `info`, every [`ConnectionEvent`] at
//! `debug`. Programs should act on events and deliveries, not on logs.
//!
//! ## Errors
//!
//! One [`Error`] type, with separate axes: [`Error::kind`] says what went
//! wrong ([`ErrorKind::InvalidName`], [`ErrorKind::Limit`],
//! [`ErrorKind::Connect`], [`ErrorKind::Server`], [`ErrorKind::Timeout`],
//! ...), [`Error::stage`] where ([`Stage::Listen`], [`Stage::Durable`],
//! [`Stage::Queue`], ...), [`Error::is_connection`] whether the server was
//! lost or unreachable (so a retry may succeed), and
//! [`Error::may_have_committed`] whether a failed call may still have taken
//! effect; [`Error::code`] and [`Error::as_db_error`] give the server's
//! SQLSTATE and error. The underlying error is the `source()`.
//!
//! ## Modules
//! * [`durable`]: durable channels (a table, snapshot ticks, consumer groups).
//! * [`queue`]: work queue (jobs done once across a fleet, retries, dead jobs).
//! * [`changes`]: change feeds (row changes from triggers and from the WAL).
//! * [`cron`]: periodic jobs (cron or interval schedules in the database,
//!   fired once per slot by the workers).
//! * [`relay`]: relays from a durable channel or a WAL feed to NATS
//!   JetStream, Redis Streams or RabbitMQ (one feature per broker).
//! * [`admin`]: the operator's view: listings and actions across capabilities.
//! * `ui` (feature `ui`): the dashboard and admin API, an axum router.
//! * [`schema`]: the schema's name, migrations and installer.
//! * [`channel`]: channel names and their limits.
//! * [`wire`]: the payload format, and the size limit.
//! * [`election`]: the single-listener protocol (lock keys, control messages).
//! * [`config`]: [`Backoff`] and the option defaults (set via [`Builder`]).
//! * [`event`]: connection events ([`ConnectionEvent`]) and each capability's
//!   own event stream ([`event::DurableEvent`], [`event::QueueEvent`], [`event::WalEvent`]).
//! * [`stats`]: counters for metrics ([`PgPubSub::stats`]).
//! * `metrics` (feature `metrics`): the same and more as Prometheus
//!   metrics, through the `metrics` facade, with database-wide gauges
//!   (queue depths, group lag, slot lag) read on scrape.
//! * `testing` (feature `testing`): throwaway PostgreSQL clusters for tests.
//!
//! ## Single listener
//!
//! A subscription made with [`Listen::single_listener`] (or on an
//! instance with [`Builder::single_listener`]) elects its channel: one
//! instance among all that elect it on the same database delivers it, and
//! hands over on shutdown. The protocol (advisory locks on the listener
//! session, control messages on `pg_pubsub_election`) is documented in
//! [`election`], so other languages can take part.
//!
//! ## Extending
//!
//! Later features build on seams rather than on changes to the core: the
//! [`Gap`] signal (a durable channel replays from its table when it sees
//! one), publishing inside the caller's transaction ([`PgPubSub::notify_tx`],
//! so a row and its event commit together), per-subscription election
//! ([`Listen::single_listener`] on any channel name, e.g. one per
//! consumer group, gives "one active consumer" with hand-over and take-over
//! gaps for free), and the per-channel state machines in `pubsub/driver/role.rs`
//! (a new kind of channel on the listener session is another `State` with
//! its own `Step`s).
//!
//! ## Delivery guarantees
//! LISTEN/NOTIFY is at-most-once: notifications sent while nobody listens
//! are lost by the server. This crate never loses one silently: after a
//! reconnect every subscription gets a [`Delivery::Gap`]
//! ([`GapCause::Reconnect`]), a new leader of an elected channel that took
//! over without a hand-over gets one too ([`GapCause::TakeOver`]), and a slow
//! subscriber gets [`Delivery::Lagged`] with the count it missed.

#![warn(missing_docs)]

// The operator's view: listings and actions across capabilities.
pub mod admin;
// Capabilities (each a folder: handle and docs in mod.rs, statements in its
// store, one file per background task).
pub mod changes;
pub mod cron;
pub mod durable;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod queue;
pub mod relay;
pub mod schema;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "ui")]
pub mod ui;

// The core: LISTEN/NOTIFY (src/pubsub/).
mod pubsub;
pub use pubsub::{channel, election, wire};
use pubsub::{driver, inbox, listen, message, subscription, truncate};

// Plumbing shared by the core and the capabilities.
mod client;
pub mod config;
mod connect;
mod error;
pub mod event;
mod exec;
mod lease;
mod payload;
mod record;
mod service;
#[cfg(feature = "signal")]
mod signal;
pub mod stats;
mod tls;
mod tx;
mod wake;

pub use channel::ChannelName;
pub use client::{Builder, IntoConfig, PgPubSub};
pub use config::Backoff;
pub use connect::SslMode;
pub use error::{Error, ErrorKind, Result, Stage};
pub use event::{ConnectionEvent, EventStream};
pub use listen::Listen;
pub use message::{DecodeError, Delivery, Gap, GapCause, Message};
pub use payload::{Decode, Encode, Text};
pub use stats::{ChannelStats, Stats};
pub use subscription::Subscription;
pub use tx::Executor;

pub use bytes;
pub use deadpool_postgres;
pub use serde_json;
pub use tokio_postgres;
