//! Publishing: through the pool, in batches, or inside the caller's transaction.

use std::collections::HashSet;

use serde::Serialize;
use tokio_postgres::types::Type;

use crate::channel::ChannelName;
use crate::client::PgPubSub;
use crate::error::{Error, Origin, Result};
use crate::tx::Executor;
use crate::wire;

const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";
/// One statement, one transaction: `pg_notify` runs in array order.
const NOTIFY_MANY_SQL: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";
/// Notifications per batch statement.
const BATCH_SIZE: usize = 1000;

/// `value` as JSON text, or a `Serialize` error keeping serde's as its source.
pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| {
        Error::new(
            Origin::Serialize,
            format!("payload did not serialize to JSON: {e}"),
        )
        .with_source(e)
    })
}

impl PgPubSub {
    /// This instance's origin, when a subscription of its own filters `channel`.
    fn origin_tag(&self, channel: &ChannelName) -> Option<uuid::Uuid> {
        let tagged = self.inner.opts.filtered
            || self
                .inner
                .filtering
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(channel);
        tagged.then_some(self.inner.origin)
    }

    /// Publishes `value` as JSON on `channel` through the pool.
    ///
    /// Checked before anything is sent: the channel name, the payload size
    /// (under 8000 bytes) and that the payload has no NUL byte. Fails with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) after the notify timeout when the server is
    /// unreachable.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
    /// pubsub.notify("orders", &serde_json::json!({"id": 1})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn notify<T: Serialize + ?Sized>(&self, channel: &str, value: &T) -> Result<()> {
        self.notify_raw(channel, &to_json(value)?).await
    }

    /// Publishes `payload` as is (any text) on `channel` through the pool.
    pub async fn notify_raw(&self, channel: &str, payload: &str) -> Result<()> {
        let channel = ChannelName::new(channel)?;
        let payload = wire::encode(self.origin_tag(&channel), payload)?;
        self.check_open()?;
        self.inner
            .exec
            .run(Origin::Notify, "notify", |client| async move {
                let stmt = client.prepare_cached(NOTIFY_SQL).await?;
                client
                    .execute(&stmt, &[&channel.as_str(), &&*payload])
                    .await?;
                Ok(())
            })
            .await
    }

    /// Publishes many text payloads on `channel`, a thousand per round trip
    /// and transaction. Every payload is delivered, in order, even repeated
    /// ones (the server merges equal payloads within one transaction, so a
    /// batch is split where a payload repeats). All payloads are checked
    /// (size, NUL bytes) before any is sent: a bad one fails the call with
    /// its index (`payload #i`, from 0) and nothing is sent. Returns how many
    /// were sent; a later server error says how many went out before it.
    pub async fn notify_batch<I, S>(&self, channel: &str, payloads: I) -> Result<usize>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let channel = ChannelName::new(channel)?;
        let origin = self.origin_tag(&channel);
        let items: Vec<S> = payloads.into_iter().collect();
        let payloads = items
            .iter()
            .enumerate()
            .map(|(i, p)| {
                wire::encode(origin, p.as_ref()).map_err(|e| e.context(format!("payload #{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.check_open()?;
        let mut sent = 0;
        for chunk in split_batches(&payloads) {
            let n = chunk.len();
            let channel = &channel;
            self.inner
                .exec
                .run(Origin::Notify, "notify_batch", |client| async move {
                    let stmt = client.prepare_cached(NOTIFY_MANY_SQL).await?;
                    client.execute(&stmt, &[&channel.as_str(), &chunk]).await?;
                    Ok(())
                })
                .await
                .map_err(|e| {
                    e.context(format!(
                        "{sent} of this batch's {} were sent before it",
                        payloads.len()
                    ))
                })?;
            sent += n;
        }
        Ok(sent)
    }

    /// Publishes `value` as JSON inside the caller's transaction (or on the
    /// caller's connection): delivered when it commits, never if it rolls back.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub, mut client: tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let tx = client.transaction().await?;
    /// tx.execute("UPDATE orders SET state = 'paid' WHERE id = 1", &[]).await?;
    /// pubsub.notify_tx(&tx, "orders", &serde_json::json!({"id": 1, "state": "paid"})).await?;
    /// tx.commit().await?; // the notification is sent now
    /// # Ok(()) }
    /// ```
    pub async fn notify_tx<E, T>(&self, executor: &E, channel: &str, value: &T) -> Result<()>
    where
        E: Executor + ?Sized,
        T: Serialize + ?Sized,
    {
        self.notify_raw_tx(executor, channel, &to_json(value)?)
            .await
    }

    /// [`notify_tx`](Self::notify_tx) with a text payload.
    pub async fn notify_raw_tx<E: Executor + ?Sized>(
        &self,
        executor: &E,
        channel: &str,
        payload: &str,
    ) -> Result<()> {
        let channel = ChannelName::new(channel)?;
        let payload = wire::encode(self.origin_tag(&channel), payload)?;
        crate::tx::execute(
            executor,
            NOTIFY_SQL,
            &[
                (&channel.as_str(), Type::TEXT),
                (&payload.as_ref(), Type::TEXT),
            ],
        )
        .await
        .map(drop)
        .map_err(|e| Error::pg(Origin::Notify, "notify in transaction", e))
    }
}

/// Splits into statements of at most [`BATCH_SIZE`] with no payload twice in one.
fn split_batches(payloads: &[impl AsRef<str>]) -> Vec<Vec<&str>> {
    let mut batches = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut seen = HashSet::new();
    for p in payloads.iter().map(AsRef::as_ref) {
        if current.len() == BATCH_SIZE || !seen.insert(p) {
            batches.push(std::mem::take(&mut current));
            seen.clear();
            seen.insert(p);
        }
        current.push(p);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_on_repeats_and_size() {
        let p: Vec<String> = ["a", "b", "a", "c", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            split_batches(&p),
            vec![vec!["a", "b"], vec!["a", "c"], vec!["c"]]
        );
        let many: Vec<String> = (0..2500).map(|i| i.to_string()).collect();
        let sizes: Vec<usize> = split_batches(&many).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
    }
}
