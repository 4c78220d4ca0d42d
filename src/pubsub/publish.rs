//! Publishing: through the pool, in batches, or inside the caller's transaction.

use std::collections::HashSet;
use std::future::Future;

use tokio_postgres::types::Type;

use crate::channel::ChannelName;
use crate::client::PgPubSub;
use crate::error::{Error, Origin, Result};
use crate::payload::Encode;
use crate::tx::Executor;
use crate::wire;

const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";
/// [`NOTIFY_SQL`] on the pool: no row, and nothing sent, on a read-only
/// server. PostgreSQL accepts NOTIFY in a read-only transaction, so a
/// primary fenced read-only by failover tooling (still up, its pooled
/// sessions still open) would take notifications that no listener, moved
/// to the new primary, ever hears.
const NOTIFY_POOLED_SQL: &str =
    "SELECT pg_notify($1, $2) WHERE current_setting('transaction_read_only') = 'off'";
/// One statement, one transaction: `pg_notify` runs in array order (no row
/// on a read-only server, as above).
const NOTIFY_MANY_SQL: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p \
     WHERE current_setting('transaction_read_only') = 'off'";

/// A pooled notify found its server read-only: a connection error, so the
/// call is retried (and its connection replaced: the next one finds the primary).
fn read_only(what: &str) -> Error {
    Error::new(
        Origin::Notify,
        format!(
            "{what}: the server is read-only (a standby, or a primary demoted or fenced by a \
             failover); nothing was sent"
        ),
    )
    .connection()
    .nothing_done()
}
/// Notifications per batch statement.
const BATCH_SIZE: usize = 1000;

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

    /// Publishes `payload` on `channel` through the pool: `&value` for any
    /// `serde` type (sent as JSON), or [`Text`](crate::Text) (sent as is).
    ///
    /// Checked before anything is sent: the channel name, the payload size
    /// (under 8000 bytes) and that the payload has no NUL byte. Fails with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) after the notify timeout when the server is
    /// unreachable.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
    /// use pg_pubsub::Text;
    /// pubsub.notify("orders", &serde_json::json!({"id": 1})).await?;
    /// pubsub.notify("log", Text("plain words")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn notify<P: Encode>(&self, channel: &str, payload: P) -> Result<()> {
        let channel = ChannelName::new(channel)?;
        let body = payload.encode()?;
        let payload = wire::encode(self.origin_tag(&channel), &body)?;
        self.check_open()?;
        self.inner
            .exec
            .run_with("notify", |client| async move {
                let pg = |e| Error::pg(Origin::Notify, "notify", e);
                let sent = client
                    .execute_p(
                        NOTIFY_POOLED_SQL,
                        &[(&channel.as_str(), Type::TEXT), (&&*payload, Type::TEXT)],
                    )
                    .await
                    .map_err(pg)?;
                if sent == 0 {
                    return Err(read_only("notify"));
                }
                Ok(())
            })
            .await
    }

    /// Publishes many payloads on `channel` (each as in [`notify`](Self::notify):
    /// `&value` as JSON, [`Text`](crate::Text) as is), a thousand per round trip
    /// and transaction. Every payload is delivered, in order, even repeated
    /// ones (the server merges equal payloads within one transaction, so a
    /// batch is split where a payload repeats). All payloads are checked
    /// (size, NUL bytes) before any is sent: a bad one fails the call with
    /// its index (`payload #i`, from 0) and nothing is sent. Returns how many
    /// were sent; a later server error says how many went out before it.
    pub fn notify_batch<I>(
        &self,
        channel: &str,
        payloads: I,
    ) -> impl Future<Output = Result<usize>> + Send + '_
    where
        I: IntoIterator,
        I::Item: Encode,
    {
        // Encoded before the future exists: it holds owned texts only, so it
        // is `Send` whatever the payloads borrow.
        let prepared = ChannelName::new(channel).and_then(|channel| {
            let origin = self.origin_tag(&channel);
            let payloads = payloads
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    p.encode()
                        .and_then(|text| wire::encode(origin, &text).map(|p| p.into_owned()))
                        .map_err(|e| e.context(format!("payload #{i}")))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((channel, payloads))
        });
        async move {
            let (channel, payloads) = prepared?;
            self.check_open()?;
            let mut sent = 0;
            for chunk in split_batches(&payloads) {
                let n = chunk.len();
                let channel = &channel;
                self.inner
                    .exec
                    .run_with("notify_batch", |client| async move {
                        let pg = |e| Error::pg(Origin::Notify, "notify_batch", e);
                        let done = client
                            .execute_p(
                                NOTIFY_MANY_SQL,
                                &[(&channel.as_str(), Type::TEXT), (&chunk, Type::TEXT_ARRAY)],
                            )
                            .await
                            .map_err(pg)?;
                        if done == 0 && !chunk.is_empty() {
                            return Err(read_only("notify_batch"));
                        }
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
    }

    /// Publishes `payload` (as in [`notify`](Self::notify)) inside the
    /// caller's transaction (or on the caller's connection): delivered when
    /// it commits, never if it rolls back.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub, mut client: tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let tx = client.transaction().await?;
    /// tx.execute("UPDATE orders SET state = 'paid' WHERE id = 1", &[]).await?;
    /// pubsub.notify_tx(&tx, "orders", &serde_json::json!({"id": 1, "state": "paid"})).await?;
    /// tx.commit().await?; // the notification is sent now
    /// # Ok(()) }
    /// ```
    pub async fn notify_tx<E, P>(&self, executor: &E, channel: &str, payload: P) -> Result<()>
    where
        E: Executor + ?Sized,
        P: Encode,
    {
        let channel = ChannelName::new(channel)?;
        let body = payload.encode()?;
        let payload = wire::encode(self.origin_tag(&channel), &body)?;
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
