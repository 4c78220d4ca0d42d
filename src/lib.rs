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
//!  PgPubSub (Clone) ──commands──▶ listener task ──▶ dedicated connection (poll_message)
//!       │                          │   registry: channel → plain | elected state
//!       │                          └─ fan-out ──▶ inbox ──▶ Subscription<T> (Stream, decodes)
//!       ├── notify ──▶ deadpool pool (or the caller's transaction)
//!       ├── durable() ─▶ pool: tables + snapshot ticks; wake-ups and the
//!       │                one-consumer-per-group election go through the listener
//!       ├── queue() / worker() ─▶ pool: jobs claimed with SKIP LOCKED, deleted
//!       │                          in batches, the table vacuumed by workers;
//!       │                          wake-ups through the listener
//!       ├── changes() ─▶ triggers on users' tables publish ChangeEvents into
//!       │                durable channels (or NOTIFY); read through durable()
//!       ├── wal_feed() ─▶ own replication connection (feature `wal`):
//!       │                pgoutput from a slot, acked to the server on ack()
//!       └── wake task ─▶ pool: NOTIFY after publish()/enqueue() committed,
//!                        merged across concurrent publishers
//! ```
//!
//! * One task (private module `driver`, in `src/driver/`) owns the listener
//!   connection and everything about it: it serves `listen`/drop/shutdown
//!   commands, batches `LISTEN`/`UNLISTEN` into one round trip, health-checks
//!   the session, and reconnects forever with backoff, re-`LISTEN`ing every
//!   channel before telling each subscriber about the [`Gap`].
//! * Each [`Subscription`] has its own bounded queue. A full queue drops and
//!   counts ([`Delivery::Lagged`]); the listener never waits for a consumer.
//!   Payloads are decoded in the consumer's task, not the listener's.
//! * Publishing never touches the listener connection: [`PgPubSub::notify`]
//!   uses the pool; [`PgPubSub::notify_in`] uses the caller's transaction.
//!
//! ## TLS
//!
//! With the `tls` feature (rustls, `ring` provider), the `sslmode` of the
//! URL or key=value string is honoured as libpq does, for the listener and
//! the pool alike: `disable`; `prefer` (the default: TLS when the server
//! offers it, unverified); `require` (TLS, unverified, or chain-verified
//! when `sslrootcert` is given); `verify-ca` (chain, any host name);
//! `verify-full` (chain and host name). `sslrootcert=PATH` names a PEM file
//! of trusted CAs; without it, or with `sslrootcert=system`, the Mozilla
//! roots and the platform's are trusted. [`Builder::ssl_mode`] and
//! [`Builder::ssl_root_cert`] do the same in code, `Builder::tls_config`
//! takes an own `rustls::ClientConfig` and [`Builder::tls`] any
//! `MakeTlsConnect`. Without the feature, a mode that needs TLS is a
//! [`ErrorKind::Config`] error and `prefer` connects in plain text.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pg_pubsub::Error> {
//! let pubsub = pg_pubsub::PgPubSub::connect(
//!     "postgres://app@db.example.com/app?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
//! )
//! .await?;
//! # Ok(()) }
//! ```
//!
//! ## Errors
//!
//! [`Error::kind`] says which stage failed ([`ErrorKind::Connect`],
//! [`ErrorKind::Authentication`], [`ErrorKind::Tls`], [`ErrorKind::Listen`],
//! [`ErrorKind::Notify`], [`ErrorKind::Timeout`], ...);
//! [`Error::is_connection`] whether the server was lost or unreachable (so a
//! retry may succeed); [`Error::code`] and [`Error::as_db_error`] give the
//! server's SQLSTATE and error. The underlying error is the `source()`.
//!
//! ## Modules
//! * [`channel`]: channel names and their limits.
//! * [`wire`]: the payload format, and the size limit.
//! * [`config`]: [`Backoff`] and the option defaults (set via [`Builder`]).
//! * [`durable`]: durable channels (a table, snapshot ticks, consumer groups).
//! * [`queue`]: work queue (jobs done once across a fleet, retries, dead jobs).
//! * [`changes`]: change feeds (row changes from triggers and from the WAL).
//! * [`election`]: the single-listener protocol (lock keys, control messages).
//! * [`event`]: connection events ([`ConnectionEvent`]) and each capability's
//!   own event stream ([`event::DurableEvent`], [`event::QueueEvent`], [`event::WalEvent`]).
//! * [`stats`]: counters for metrics ([`PgPubSub::stats`]).
//! * `testing` (feature `testing`): throwaway PostgreSQL clusters for tests.
//!
//! Private, by file: `client.rs` ([`PgPubSub`], [`Builder`]), `publish.rs`
//! (notify paths), `subscription.rs` and `inbox.rs` (the consumer side: a subscriber's bounded queue),
//! `message.rs` ([`Delivery`] and friends), `truncate.rs` (short `Debug` of
//! payloads), `wake.rs` (wake-ups sent after commit, merged), `exec.rs` (how every pooled
//! statement runs: timeout, backoff, cancel on the server), `service.rs` (the
//! workers, consumers and feeds a handle started, stopped by its shutdown), `error.rs`, `connect.rs` (what to connect to: `sslmode`,
//! the connector for listener and pool), `tls.rs` (rustls), and `driver/`:
//! `mod.rs` (task loop, reconnect, shutdown), `live.rs` (one connection),
//! `registry.rs` (channels, subscribers, fan-out), `role.rs` (the per-channel
//! state machines: plain and elected), `election.rs` (the SQL).
//!
//! ## Single listener
//!
//! A subscription made with [`ListenOptions::single_listener`] (or on an
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
//! one), publishing inside the caller's transaction ([`PgPubSub::notify_in`],
//! so a row and its event commit together), per-subscription election
//! ([`ListenOptions::single_listener`] on any channel name, e.g. one per
//! consumer group, gives "one active consumer" with hand-over and take-over
//! gaps for free), and the per-channel state machines in `driver/role.rs`
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

pub mod changes;
pub mod channel;
mod client;
pub mod config;
mod connect;
mod driver;
pub mod durable;
pub mod election;
mod error;
pub mod event;
mod exec;
mod inbox;
mod message;
mod publish;
pub mod queue;
mod service;
#[cfg(feature = "signal")]
mod signal;
pub mod stats;
mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;
mod truncate;
mod wake;
pub mod wire;

pub use channel::ChannelName;
pub use client::{Builder, IntoConfig, PgPubSub};
pub use config::{Backoff, ListenOptions};
pub use connect::SslMode;
pub use error::{Error, ErrorKind, Result};
pub use event::{ConnectionEvent, EventStream};
pub use message::{DecodeError, Delivery, Gap, GapCause, Message};
pub use publish::Executor;
pub use stats::{ChannelStats, Stats};
pub use subscription::Subscription;

pub use deadpool_postgres;
pub use tokio_postgres;
