//! Redis Streams: one `XADD` per message, pipelined, with the source id,
//! position, publish time and origin as fields beside the payload.

use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError};

use super::sink::{Confirm, Outgoing, Sink, SinkError};
use super::url::redact;
use crate::error::{Error, Origin, Result};

/// Field of each stream entry holding the source id ([`Outgoing::id`]).
pub const FIELD_ID: &str = "id";
/// Field holding the payload.
pub const FIELD_PAYLOAD: &str = "payload";
/// Field holding the source position.
pub const FIELD_POSITION: &str = "position";
/// Field holding the publish time (RFC 3339).
pub const FIELD_PUBLISHED_AT: &str = "published_at";
/// Field holding the origin.
pub const FIELD_ORIGIN: &str = "origin";

/// Appends to Redis Streams (feature `relay-redis`): the rendered subject
/// is the stream's key; each entry has the fields [`FIELD_ID`],
/// [`FIELD_PAYLOAD`], [`FIELD_POSITION`], [`FIELD_PUBLISHED_AT`] and
/// [`FIELD_ORIGIN`]. Redis has no duplicate detection: a message in
/// flight when a relay died is appended again, with the same `id` field
/// (consumers drop replays by it). The reply to `XADD` is the confirm:
/// durability is the server's (`appendonly`, `appendfsync`).
pub struct RedisSink {
    conn: ConnectionManager,
    url: String,
}

impl RedisSink {
    /// Connects to `url` (`redis://host:port/db`). The connection is
    /// re-established by itself after a loss; publishes meanwhile fail and
    /// are retried.
    pub async fn connect(url: &str) -> Result<Self> {
        let failed = |e: RedisError| {
            Error::new(
                Origin::Broker,
                format!("connecting to Redis at {}", redact(url)),
            )
            .with_source(e)
        };
        let client = redis::Client::open(url).map_err(failed)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(5))
            .set_number_of_retries(1)
            .set_max_delay(1000);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(failed)?;
        Ok(RedisSink {
            conn,
            url: redact(url),
        })
    }

    async fn add_one(&self, m: &Outgoing) -> Result<Confirm, SinkError> {
        let mut conn = self.conn.clone();
        xadd(m)
            .query_async::<redis::Value>(&mut conn)
            .await
            .map(|_| Confirm::Stored)
            .map_err(classify)
    }
}

fn xadd(m: &Outgoing) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&m.subject)
        .arg("*")
        .arg(FIELD_ID)
        .arg(&m.id)
        .arg(FIELD_POSITION)
        .arg(&m.position)
        .arg(FIELD_PUBLISHED_AT)
        .arg(m.published_at_rfc3339())
        .arg(FIELD_ORIGIN)
        .arg(&*m.origin)
        .arg(FIELD_PAYLOAD)
        .arg(m.payload.as_ref());
    cmd
}

/// Whether the server refused the command itself (a key that is not a
/// stream, ...): sending it again cannot help. Out of memory can.
fn classify(e: RedisError) -> SinkError {
    let refused = matches!(
        e.kind(),
        ErrorKind::ResponseError | ErrorKind::TypeError | ErrorKind::ExtensionError
    ) && e.code() != Some("OOM");
    if refused {
        SinkError::permanent("Redis refused XADD").with_source(e)
    } else {
        SinkError::retryable("Redis XADD").with_source(e)
    }
}

impl Sink for RedisSink {
    fn publish<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> BoxFuture<'a, Vec<Result<Confirm, SinkError>>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for m in batch {
                pipe.add_command(xadd(m));
            }
            let mut conn = self.conn.clone();
            match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
                Ok(replies) if replies.len() == batch.len() => {
                    batch.iter().map(|_| Ok(Confirm::Stored)).collect()
                }
                Ok(_) => batch
                    .iter()
                    .map(|_| Err(SinkError::retryable("Redis: a reply is missing")))
                    .collect(),
                Err(e) => {
                    let e = classify(e);
                    if e.is_retryable() {
                        return batch.iter().map(|_| Err(e.clone())).collect();
                    }
                    // One command was refused: which one (and whether the
                    // others were added) is only known one by one.
                    let mut answers = Vec::with_capacity(batch.len());
                    for m in batch {
                        answers.push(self.add_one(m).await);
                    }
                    answers
                }
            }
        })
    }

    fn describe(&self) -> String {
        format!("Redis at {}", self.url)
    }
}
