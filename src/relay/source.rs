//! The PostgreSQL side of a relay: a durable channel read as a consumer
//! group, or a WAL feed; what each item becomes, and acking it.

use std::time::SystemTime;

use futures::FutureExt;

use super::subject::{Fields, SubjectTemplate};
use crate::durable::{DurableDelivery, DurableMessage, DurableSubscription};
use crate::Text;

/// Where a relay reads from; see [`PgPubSub::relay`](crate::PgPubSub::relay).
#[non_exhaustive]
pub enum Source {
    /// A durable channel, read as a consumer group: one relay of the group
    /// is active at a time (the group's election), a standby takes over
    /// from the group's last ack.
    Durable {
        /// The channel.
        channel: String,
        /// The consumer group (the relay's position lives in it).
        group: String,
    },
    /// A WAL feed: table changes and logical messages, in commit order.
    /// Build it with [`PgPubSub::wal_feed`](crate::PgPubSub::wal_feed)
    /// (slot, tables, message prefix); the relay starts it in standby mode,
    /// so the server lets one relay stream the slot at a time.
    #[cfg(feature = "wal")]
    Wal(crate::changes::wal::WalFeedBuilder),
}

impl Source {
    /// A durable channel read as consumer `group`.
    pub fn durable(channel: &str, group: &str) -> Source {
        Source::Durable {
            channel: channel.to_owned(),
            group: group.to_owned(),
        }
    }

    /// A WAL feed (see [`Source::Wal`]).
    #[cfg(feature = "wal")]
    pub fn wal(feed: crate::changes::wal::WalFeedBuilder) -> Source {
        Source::Wal(feed)
    }

    pub(crate) fn is_wal(&self) -> bool {
        !matches!(self, Source::Durable { .. })
    }
}

/// How far the source may be acked once an item is settled.
pub(crate) enum AckToken {
    Durable(DurableMessage<()>),
    #[cfg(feature = "wal")]
    Wal(crate::changes::Lsn),
}

/// One source event on its way to the broker.
pub(crate) struct Item {
    pub(crate) id: String,
    pub(crate) position: String,
    pub(crate) published_at: SystemTime,
    pub(crate) payload: bytes::Bytes,
    /// The rendered subject, or why it cannot be (dead-lettered).
    pub(crate) subject: Result<String, String>,
    /// Set on the items after which the source may be acked.
    pub(crate) ack: Option<AckToken>,
}

/// What renders subjects.
pub(crate) struct Render {
    /// For durable messages and WAL changes.
    pub(crate) template: SubjectTemplate,
    /// For WAL logical messages.
    pub(crate) message_template: SubjectTemplate,
    pub(crate) key_field: Option<String>,
}

impl Render {
    fn subject(&self, fields: Fields<'_>, payload: &[u8]) -> Result<String, String> {
        let template = match fields.prefix {
            Some(_) => &self.message_template,
            None => &self.template,
        };
        // The payload is parsed only for `{key}`, and only when the
        // source has no row of its own.
        let parsed;
        let mut fields = fields;
        if template.uses_key() && fields.row.is_none() {
            parsed = serde_json::from_slice::<serde_json::Value>(payload).ok();
            fields.row = parsed.as_ref();
        }
        template.render(&fields, self.key_field.as_deref())
    }
}

/// A started source.
pub(crate) enum Reader {
    Durable(DurableSubscription<Text>),
    #[cfg(feature = "wal")]
    Wal(wal::WalReader),
}

/// Acks a source from the relay loop, while the reader reads the next
/// batch.
pub(crate) enum Acker {
    Durable(crate::durable::AckWriter),
    #[cfg(feature = "wal")]
    Wal(crate::changes::wal::WalAcker),
}

impl Acker {
    /// Acks the source up to `token` (cumulative).
    pub(crate) fn ack(&self, token: &AckToken) {
        match (self, token) {
            (_, AckToken::Durable(m)) => m.ack(),
            #[cfg(feature = "wal")]
            (Acker::Wal(w), AckToken::Wal(lsn)) => w.ack(*lsn),
            #[cfg(feature = "wal")]
            (Acker::Durable(_), AckToken::Wal(_)) => {}
        }
    }

    /// Writes a durable source's acks now rather than at its next ack
    /// interval (a WAL feed sends its own at its interval). A failure
    /// leaves them to the interval's write.
    pub(crate) async fn flush(&self) {
        match self {
            Acker::Durable(writer) => {
                if let Err(e) = writer.flush().await {
                    tracing::debug!(target: "pg_pubsub", "relay: writing acks failed: {e}");
                }
            }
            #[cfg(feature = "wal")]
            Acker::Wal(_) => {}
        }
    }
}

/// What a source reports besides items.
#[derive(Default)]
pub(crate) struct Read {
    pub(crate) items: Vec<Item>,
    /// Acks that belong to earlier batches (a commit whose changes were
    /// all in them): given once those are settled, before these items.
    pub(crate) ack_first: Option<AckToken>,
    /// Messages retention removed before the relay read them.
    pub(crate) lost: u64,
    /// The source ended (its handle shut down).
    pub(crate) ended: bool,
}

impl Reader {
    /// Waits for at least one item, then takes what is ready, up to `max`.
    pub(crate) async fn next_batch(&mut self, max: usize, render: &Render) -> Read {
        match self {
            Reader::Durable(sub) => durable_batch(sub, max, render).await,
            #[cfg(feature = "wal")]
            Reader::Wal(w) => w.next_batch(max, render).await,
        }
    }

    /// What acks this source while it reads on.
    pub(crate) fn acker(&self) -> Acker {
        match self {
            Reader::Durable(sub) => Acker::Durable(sub.ack_writer()),
            #[cfg(feature = "wal")]
            Reader::Wal(w) => Acker::Wal(w.feed.acker()),
        }
    }

    /// Stops reading after writing the acks given so far.
    pub(crate) async fn close(self) -> crate::Result<()> {
        match self {
            Reader::Durable(sub) => sub.close().await,
            #[cfg(feature = "wal")]
            Reader::Wal(w) => w.feed.close().await,
        }
    }
}

async fn durable_batch(sub: &mut DurableSubscription<Text>, max: usize, render: &Render) -> Read {
    let mut read = Read::default();
    let Some(first) = sub.recv().await else {
        read.ended = true;
        return read;
    };
    let mut next = Some(first);
    while let Some(delivery) = next.take() {
        match delivery {
            DurableDelivery::Message(m) => read.items.push(durable_item(m, render)),
            DurableDelivery::Truncated { lost } => read.lost += lost,
            // Text always decodes; anything else is not a message.
            _ => {}
        }
        if read.items.len() >= max {
            break;
        }
        next = sub.recv().now_or_never().flatten();
    }
    read
}

fn durable_item(m: DurableMessage<Text>, render: &Render) -> Item {
    let channel = m.channel().as_str().to_owned();
    let position = m.position().to_string();
    let published_at = m.published_at();
    let mut text = String::new();
    let token = m.map(|Text(s)| text = s);
    let payload = bytes::Bytes::from(text.into_bytes());
    let subject = render.subject(
        Fields {
            channel: Some(&channel),
            ..Fields::default()
        },
        &payload,
    );
    Item {
        id: format!("{channel}:{position}"),
        position,
        published_at,
        payload,
        subject,
        ack: Some(AckToken::Durable(token)),
    }
}

#[cfg(feature = "wal")]
pub(crate) mod wal {
    use std::time::SystemTime;

    use futures::{FutureExt, StreamExt};

    use super::{AckToken, Item, Read, Render};
    use crate::changes::wal::{WalFeed, WalItem};
    use crate::changes::{Lsn, Op};
    use crate::relay::subject::Fields;

    /// A WAL feed and the transaction being read.
    pub(crate) struct WalReader {
        pub(crate) feed: WalFeed<serde_json::Value>,
        /// The current transaction's commit LSN and time, and the index of
        /// its next relayed item (what makes a stable id).
        txn: Option<(Lsn, SystemTime, u64)>,
    }

    impl WalReader {
        pub(crate) fn new(feed: WalFeed<serde_json::Value>) -> Self {
            WalReader { feed, txn: None }
        }

        pub(crate) async fn next_batch(&mut self, max: usize, render: &Render) -> Read {
            let mut read = Read::default();
            loop {
                // Wait for the first item; then take what is ready.
                let item = if read.items.is_empty() {
                    match self.feed.next().await {
                        Some(item) => item,
                        None => {
                            read.ended = true;
                            return read;
                        }
                    }
                } else {
                    match self.feed.next().now_or_never() {
                        Some(Some(item)) => item,
                        Some(None) | None => return read,
                    }
                };
                self.take(item, &mut read, render);
                if read.items.len() >= max {
                    return read;
                }
            }
        }

        fn take(&mut self, item: WalItem<serde_json::Value>, read: &mut Read, render: &Render) {
            match item {
                WalItem::Begin {
                    final_lsn,
                    commit_time,
                    ..
                } => self.txn = Some((final_lsn, commit_time, 0)),
                WalItem::Change { lsn, event } => {
                    let (id, published_at) = self.next_id(lsn);
                    let payload = serde_json::to_vec(&event).unwrap_or_default();
                    let row = match event.op {
                        Op::Delete => event.old.as_ref(),
                        _ => event.new.as_ref(),
                    };
                    let op = event.op.to_string();
                    let subject = render.subject(
                        Fields {
                            schema: Some(&event.schema),
                            table: Some(&event.table),
                            op: Some(&op),
                            row,
                            ..Fields::default()
                        },
                        &payload,
                    );
                    read.items.push(Item {
                        id,
                        position: lsn.to_string(),
                        published_at,
                        payload: payload.into(),
                        subject,
                        ack: None,
                    });
                }
                WalItem::Message(m) => {
                    let (id, published_at, ack) = if m.transactional {
                        let (id, at) = self.next_id(m.lsn);
                        (id, at, None)
                    } else {
                        // Delivered at once, outside any transaction.
                        (
                            format!("wal:{}:0", m.lsn),
                            SystemTime::now(),
                            Some(AckToken::Wal(m.lsn)),
                        )
                    };
                    let subject = render.subject(
                        Fields {
                            prefix: Some(&m.prefix),
                            ..Fields::default()
                        },
                        &m.payload,
                    );
                    read.items.push(Item {
                        id,
                        position: m.lsn.to_string(),
                        published_at,
                        payload: m.payload,
                        subject,
                        ack,
                    });
                }
                WalItem::Commit { end_lsn, .. } => {
                    self.txn = None;
                    match read.items.last_mut() {
                        Some(last) => last.ack = Some(AckToken::Wal(end_lsn)),
                        // Its changes are in the batch being relayed while
                        // this one is read.
                        None => read.ack_first = Some(AckToken::Wal(end_lsn)),
                    }
                }
                WalItem::Undecodable { lsn, error, raw } => {
                    let (id, published_at) = self.next_id(lsn);
                    let payload = raw
                        .and_then(|e| serde_json::to_vec(&e).ok())
                        .unwrap_or_default();
                    read.items.push(Item {
                        id,
                        position: lsn.to_string(),
                        published_at,
                        payload: payload.into(),
                        subject: Err(format!("undecodable WAL change: {error}")),
                        ack: None,
                    });
                }
                WalItem::Error(e) => {
                    // The feed streams again from the last ack: the
                    // transaction starts over with its Begin.
                    tracing::warn!(target: "pg_pubsub", "relay: WAL stream lost, resuming: {e}");
                    self.txn = None;
                }
            }
        }

        /// The stable id of the next item of the current transaction.
        fn next_id(&mut self, lsn: Lsn) -> (String, SystemTime) {
            match &mut self.txn {
                Some((commit, at, index)) => {
                    let id = format!("wal:{commit}:{index}");
                    *index += 1;
                    (id, *at)
                }
                // Not inside a transaction (cannot happen with pgoutput):
                // the item's own LSN is unique.
                None => (format!("wal:{lsn}:0"), SystemTime::now()),
            }
        }
    }
}
