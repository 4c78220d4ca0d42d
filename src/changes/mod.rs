//! Change feeds: row changes of tables as typed [`ChangeEvent`]s.
//!
//! Two sources, one event type:
//! * the **trigger feed**: triggers on a table write each change into a
//!   durable channel (at-least-once, replayable) or send it over NOTIFY;
//! * the **WAL feed** (feature `wal`): logical decoding of the write-ahead
//!   log through a replication slot, in commit order, resumable from the
//!   last ack.

mod event;

pub use event::{ChangeEvent, Lsn, Op};

#[cfg(feature = "wal")]
#[cfg_attr(docsrs, doc(cfg(feature = "wal")))]
pub mod wal;
