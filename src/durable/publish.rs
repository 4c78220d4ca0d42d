//! Publishing to durable channels: through the pool, batched, or in the
//! caller's transaction.

use std::future::Future;
use std::time::Instant;

use tokio_postgres::types::Type;

use super::quiet::QuietFlags;
use super::{Durable, SchemaName};
use crate::channel::ChannelName;
use crate::error::{Error, Origin, Result};
use crate::payload::Encode;
use crate::tx::Executor;

/// Messages per `publish_many` statement in [`Durable::publish_batch`].
const BATCH_SIZE: usize = 1000;

/// The publish statements of one schema, and the quiet flags they need.
#[derive(Debug)]
pub(super) struct Publisher {
    /// Inserts and reads the channel's quiet flag; notifies in the
    /// transaction only if `$3` and the channel is not quiet. Returns
    /// whether a wake-up is due. For channels whose flag is not known.
    check: String,
    /// Inserts only.
    plain: String,
    /// Inserts and notifies in the transaction.
    notify: String,
    quiet: QuietFlags,
    /// `durable_published_total` handles, per channel.
    published: crate::record::Published,
}

impl Publisher {
    /// The `publish` SQL function's insert as plain statements: a PL/pgSQL
    /// call costs about a quarter of the insert's throughput, a
    /// data-modifying CTE a tenth, the quiet-flag lookup another tenth.
    pub(super) fn new(schema: &SchemaName) -> Publisher {
        let s = schema.as_str();
        let wake = schema.wake_channel();
        let insert = format!(
            "INSERT INTO {s}.messages (part, channel, payload) \
             SELECT r.cur, $1, $2 FROM {s}.rotation r"
        );
        Publisher {
            check: format!(
                "WITH m AS ({insert}) \
                 SELECT q.due, CASE WHEN q.due AND $3 THEN pg_notify('{wake}', $1) END \
                 FROM (SELECT NOT EXISTS (SELECT 1 FROM {s}.channels c \
                       WHERE c.channel = $1 AND c.quiet) AS due) q"
            ),
            notify: format!("{insert} RETURNING pg_notify('{wake}', $1)"),
            plain: insert,
            quiet: QuietFlags::default(),
            published: Default::default(),
        }
    }
}

impl Durable {
    fn publish_sql(&self) -> String {
        format!("SELECT {}.publish($1, $2)", self.schema.as_str())
    }

    /// Publishes `payload` on durable `channel`, in a transaction of its
    /// own: `&value` for any `serde` type (stored as JSON), or
    /// [`Text`](crate::Text) (stored as is). Any size. Installs the schema
    /// on first use.
    ///
    /// While other publishes of this handle are in flight, the wake-up
    /// `NOTIFY` is sent after the commit, in a transaction shared with
    /// whatever the handle publishes meanwhile, so concurrent publishers do
    /// not each take the cluster-wide notify lock; alone, it is sent in the
    /// transaction (one round trip less before consumers hear of it).
    pub async fn publish<P: Encode>(&self, channel: &str, payload: P) -> Result<()> {
        let payload = payload.encode()?;
        let payload: &str = &payload;
        let channel = ChannelName::new(channel)?;
        let name = channel.as_str();
        let p = &*self.publisher;
        let quiet = p.quiet.get(name, Instant::now());
        let publishing = self.pubsub.inner.wakes.start_publish();
        let now = publishing.alone();
        let due = self
            .with_client("durable publish", |client| async move {
                use tokio_postgres::types::Type;
                let three: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
                    (&name, Type::TEXT),
                    (&payload, Type::TEXT),
                    (&now, Type::BOOL),
                ];
                let two = &three[..2];
                match quiet {
                    None => {
                        let rows = client.query_p(&p.check, &three).await?;
                        // One row, as `query_one` would insist.
                        let due = rows.first().is_some_and(|row| row.get::<_, bool>(0));
                        p.quiet.set(name, !due, Instant::now());
                        Ok(due && !now)
                    }
                    Some(false) if now => {
                        client.execute_p(&p.notify, two).await?;
                        Ok(false)
                    }
                    Some(quiet) => {
                        client.execute_p(&p.plain, two).await?;
                        Ok(!quiet)
                    }
                }
            })
            .await?;
        drop(publishing);
        p.published.add(name, 1);
        // Committed: the wake-up follows, merged with concurrent publishers'.
        if due {
            self.pubsub
                .inner
                .wakes
                .wake_after_commit(self.schema.wake_channel(), channel.as_str().to_owned());
        }
        Ok(())
    }

    /// Publishes many payloads on `channel` (each as in
    /// [`publish`](Self::publish)), in order, a thousand per
    /// statement and transaction (one wake-up per transaction). Returns how
    /// many were published; an error says how many were before it.
    pub fn publish_batch<I>(
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
            let texts = payloads
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    p.encode()
                        .map(|text| text.into_owned())
                        .map_err(|e| e.context(format!("payload #{i}")))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((channel, texts))
        });
        async move {
            let (channel, texts) = prepared?;
            let sql = format!("SELECT {}.publish_many($1, $2)", self.schema.as_str());
            let mut sent = 0;
            for chunk in texts.chunks(BATCH_SIZE) {
                let texts: Vec<&str> = chunk.iter().map(AsRef::as_ref).collect();
                let (sql, channel) = (&sql, &channel);
                self.with_client("durable publish_batch", |client| async move {
                    client
                        .execute_p(
                            sql,
                            &[(&channel.as_str(), Type::TEXT), (&texts, Type::TEXT_ARRAY)],
                        )
                        .await?;
                    Ok(())
                })
                .await
                .map_err(|e| e.context(format!("{sent} were published before it")))?;
                self.publisher.published.add(channel.as_str(), chunk.len());
                sent += chunk.len();
            }
            Ok(sent)
        }
    }

    /// Publishes `payload` (as in [`publish`](Self::publish)) inside the
    /// caller's transaction: stored and delivered if it commits, never if
    /// it rolls back. The schema must be installed already
    /// ([`install`](Self::install)), since installing inside a caller's
    /// transaction would tie the DDL to it.
    pub async fn publish_tx<E, P>(&self, tx: &E, channel: &str, payload: P) -> Result<()>
    where
        E: Executor + ?Sized,
        P: Encode,
    {
        let payload = payload.encode()?;
        let payload: &str = &payload;
        let channel = ChannelName::new(channel)?;
        crate::tx::execute(
            tx,
            &self.publish_sql(),
            &[(&channel.as_str(), Type::TEXT), (&payload, Type::TEXT)],
        )
        .await
        .map_err(|e| Error::pg(Origin::Durable, "durable publish in transaction", e))?;
        // Counted when the insert ran: the caller's transaction may still roll back.
        self.publisher.published.add(channel.as_str(), 1);
        Ok(())
    }

    /// Makes `channel` quiet (publish without `NOTIFY`, consumers find new
    /// messages by polling only) or not. Quiet channels avoid the
    /// cluster-wide lock a notifying commit takes, for heavy writers.
    /// Publishers of this `Durable` follow the change at once, those of
    /// other processes within a second (they remember the flag that long).
    pub async fn set_quiet(&self, channel: &str, quiet: bool) -> Result<()> {
        let channel = ChannelName::new(channel)?;
        let sql = format!(
            "INSERT INTO {}.channels (channel, quiet) VALUES ($1, $2) \
             ON CONFLICT (channel) DO UPDATE SET quiet = EXCLUDED.quiet",
            self.schema.as_str()
        );
        let channel = &channel;
        self.with_client("durable set_quiet", |client| async move {
            client
                .execute_p(
                    &sql,
                    &[(&channel.as_str(), Type::TEXT), (&quiet, Type::BOOL)],
                )
                .await?;
            Ok(())
        })
        .await?;
        self.publisher
            .quiet
            .set(channel.as_str(), quiet, Instant::now());
        Ok(())
    }
}
