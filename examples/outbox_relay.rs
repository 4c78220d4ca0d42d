//! An outbox relay: reads the messages that transactions wrote into the WAL
//! with [`emit_tx`](pg_pubsub::changes::wal::emit_tx) under a prefix, and
//! republishes each to a durable channel, acking the WAL only after the
//! durable publish committed (at-least-once: a crash between the two
//! publishes again, it never loses).
//!
//! Run it in as many processes as you like: the server lets one stream use
//! a replication slot at a time, so one relays and the others stand by
//! (`standby(true)`) and take over when it goes away.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@localhost/app \
//!   cargo run --example outbox_relay --features wal -- SLOT PREFIX CHANNEL
//! ```
//!
//! A writer, in its own transaction:
//!
//! ```text
//! let tx = client.transaction().await?;
//! tx.execute("INSERT INTO orders ...", &[]).await?;
//! pg_pubsub::changes::wal::emit_tx(&tx, "outbox.", br#"{"order": 7}"#).await?;
//! tx.commit().await?; // the relay sees it now; on rollback, never
//! ```

use futures::StreamExt;
use pg_pubsub::changes::wal::{WalFeed, WalItem};
use pg_pubsub::PgPubSub;
use pg_pubsub::Text;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL to the database to relay from")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [slot, prefix, channel] = args.as_slice() else {
        return Err("usage: outbox_relay SLOT PREFIX CHANNEL".into());
    };
    relay(&url, slot, prefix, channel).await?;
    Ok(())
}

/// Relays messages under `prefix` from slot `slot` to durable `channel`
/// until the stream ends. Prints `relaying` once elected.
pub async fn relay(
    url: &str,
    slot: &str,
    prefix: &str,
    channel: &str,
) -> Result<(), pg_pubsub::Error> {
    let pubsub = PgPubSub::connect(url).await?;
    let durable = pubsub.durable();
    durable.install().await?;
    let mut feed: WalFeed = pubsub
        .wal_feed(slot)
        .tables(&[]) // no table changes, messages only
        .messages(prefix)
        .standby(true)
        .start()
        .await?;
    println!("relaying {slot}");

    // A transaction's messages, published together when it commits.
    let mut batch: Vec<String> = Vec::new();
    while let Some(item) = feed.next().await {
        match item {
            WalItem::Message(m) => {
                let Ok(text) = String::from_utf8(m.payload.to_vec()) else {
                    eprintln!("skipping a non-UTF-8 message at {}", m.lsn);
                    continue;
                };
                if m.transactional {
                    batch.push(text);
                } else {
                    durable.publish(channel, Text(&text)).await?;
                    feed.ack(m.lsn);
                }
            }
            // After a reconnect a transaction is streamed again from its
            // Begin: what was collected of it before is dropped.
            WalItem::Begin { .. } => batch.clear(),
            WalItem::Commit { end_lsn, .. } => {
                if !batch.is_empty() {
                    let n = durable
                        .publish_batch(channel, batch.drain(..).map(Text))
                        .await?;
                    println!("relayed {n}");
                }
                // Only now may the slot forget this transaction.
                feed.ack(end_lsn);
            }
            WalItem::Error(e) => eprintln!("stream lost, reconnecting: {e}"),
            // The commit's ack passes these too: never without a word.
            WalItem::Undecodable { lsn, error, .. } => {
                eprintln!("skipping an unreadable item at {lsn}: {error}");
            }
            WalItem::Change { lsn, event } => {
                // `tables(&[])` asks for none; a publication changed by
                // hand could still send some.
                eprintln!(
                    "not relaying a change of {}.{} at {lsn}",
                    event.schema, event.table
                );
            }
            other => eprintln!("not relaying {other:?}"),
        }
    }
    Ok(())
}
