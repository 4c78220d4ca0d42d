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
//!     Some(Delivery::Gap(_)) => println!("listener reconnected: re-read state"),
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
//!       │                          │   registry: channel → subscriber queues
//!       │                          └─ fan-out ──▶ Queue ──▶ Subscription<T> (Stream, decodes)
//!       └── notify ──▶ deadpool pool (or the caller's transaction)
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
//! ## Modules
//! * [`channel`]: channel names and their limits.
//! * [`wire`]: the payload format, and the size limit.
//! * [`config`]: [`Backoff`] and the option defaults (set via [`Builder`]).
//! * [`event`]: connection events ([`ConnectionEvent`]).
//! * [`stats`]: counters for metrics ([`PgPubSub::stats`]).
//! * `testing` (feature `testing`): throwaway PostgreSQL clusters for tests.
//!
//! Private, by file: `client.rs` ([`PgPubSub`], [`Builder`]), `publish.rs`
//! (notify paths), `subscription.rs` and `queue.rs` (the consumer side),
//! `message.rs` ([`Delivery`] and friends), `error.rs`, and `driver/`:
//! `mod.rs` (task loop, reconnect, shutdown), `live.rs` (one connection),
//! `registry.rs` (channels, subscribers, roles, fan-out), `election.rs`
//! (the SQL, including the single-listener protocol below).
//!
//! ## Single listener
//!
//! With [`Builder::single_listener`], each channel is led by one instance
//! among all that enable it on the same database; only the leader `LISTEN`s
//! to it and delivers. The protocol, so other languages can take part:
//!
//! * Lock: `pg_try_advisory_lock(1885827187, hashtext(channel))`, a session
//!   lock taken on the listener session itself. `1885827187` is `'pgps'`;
//!   the two-key form keeps these locks apart from one-key (`bigint`) locks.
//! * A new leader runs `LISTEN "channel"` and
//!   `pg_notify('pg_pubsub_election', 'ready:' || channel)` in one transaction,
//!   and handles the channel's messages only from its own `ready:` on (its
//!   session may still read older ones, committed before it listened).
//! * A leader that shuts down unlocks, sends `release:<channel>` on
//!   `pg_pubsub_election`, keeps delivering until it receives the
//!   `ready:<channel>` of its successor, then `UNLISTEN`s. Both sessions
//!   read the one notification queue in commit order, so the two cut at the
//!   same message: nothing is lost or handled twice. Standbys retry when
//!   they see `release:`, and every [`Builder::lock_retry_interval`]
//!   (default 500 ms) in case a leader died without releasing.
//! * The lock and the `LISTEN` live in one session, so when the session ends
//!   (process killed, backend terminated, network lost) both end together.
//!   A reconnected instance holds nothing and competes again; it never
//!   re-acquires a lock it holds (session locks stack).
//!
//! ## Extending
//!
//! Later features build on three seams rather than on changes to the core:
//! the [`Gap`] signal (a durable channel replays from its table when it sees
//! one), publishing inside the caller's transaction ([`PgPubSub::notify_in`],
//! so a row and its event commit together), and per-channel roles in the
//! listener's registry (`Plain`, `Standby`, `Leader` today; a work queue or a
//! change feed is another role with its own `Change`s on the listener session).
//!
//! ## Delivery guarantees
//! LISTEN/NOTIFY is at-most-once: notifications sent while the listener is
//! disconnected are lost by the server. This crate never loses one silently:
//! after a reconnect every subscription gets a [`Delivery::Gap`], and a slow
//! subscriber gets [`Delivery::Lagged`] with the count it missed.

#![warn(missing_docs)]

pub mod channel;
mod client;
pub mod config;
mod driver;
mod error;
pub mod event;
mod message;
mod publish;
mod queue;
#[cfg(feature = "signal")]
mod signal;
pub mod stats;
mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use channel::ChannelName;
pub use client::{Builder, IntoConfig, PgPubSub};
pub use config::Backoff;
pub use error::{Error, ErrorKind, Result};
pub use event::{ConnectionEvent, EventStream};
pub use message::{DecodeError, Delivery, Gap, Message};
pub use publish::Executor;
pub use stats::{ChannelStats, Stats};
pub use subscription::Subscription;

pub use deadpool_postgres;
pub use tokio_postgres;
