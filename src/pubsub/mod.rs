//! The core: LISTEN/NOTIFY. Channel names and the wire format, publishing
//! (`notify`), the listener task (`driver/`: one connection, reconnects,
//! elections, fan-out) and the subscriber side (a bounded inbox per
//! subscription, decoded in the consumer's task). Durable channels, the
//! queue and change feeds build on it; nothing here knows of them.

pub mod channel;
pub(crate) mod driver;
pub mod election;
pub(crate) mod frame;
pub(crate) mod inbox;
pub(crate) mod listen;
pub(crate) mod message;
pub(crate) mod publish;
pub(crate) mod subscription;
pub(crate) mod truncate;
pub mod wire;
