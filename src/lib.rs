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
//! * One task ([`driver`](crate::driver) module, private) owns the listener
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
//! * `testing` (feature `testing`): throwaway PostgreSQL clusters for tests.
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
pub use subscription::Subscription;

pub use deadpool_postgres;
pub use tokio_postgres;
