//! RabbitMQ: persistent messages with `message_id`, on a channel in
//! publisher-confirm mode; each confirm awaited.

use std::time::{Duration, UNIX_EPOCH};

use futures::future::{join_all, BoxFuture};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::sink::{
    Confirm, Outgoing, Sink, SinkError, HEADER_ORIGIN, HEADER_POSITION, HEADER_PUBLISHED_AT,
};
use super::url::redact;
use crate::error::{Error, Origin, Result};

/// How long a connection attempt or a confirm may take before the
/// publish is retried.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes to RabbitMQ (feature `relay-amqp`) on `exchange` with the
/// rendered subject as routing key: persistent (`delivery_mode` 2),
/// `message_id` = the source id, `timestamp` = the publish time, headers
/// [`HEADER_POSITION`], [`HEADER_PUBLISHED_AT`], [`HEADER_ORIGIN`],
/// `mandatory` (a message no queue takes is retried, not dropped). The
/// channel is in confirm mode: the source is acked after the broker's ack.
/// A lost connection is opened again at the next publish. RabbitMQ keeps
/// duplicates (a message in flight when a relay died is published again
/// with the same `message_id`).
pub struct AmqpSink {
    url: String,
    exchange: String,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl AmqpSink {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`) to publish on
    /// `exchange` (`""`: the default exchange, where the routing key is a
    /// queue's name).
    pub async fn connect(url: &str, exchange: &str) -> Result<Self> {
        let sink = AmqpSink {
            url: url.to_owned(),
            exchange: exchange.to_owned(),
            channel: Mutex::new(None),
        };
        let opened = sink.open().await.map_err(|e| {
            Error::new(
                Origin::Broker,
                format!("connecting to RabbitMQ at {}", redact(url)),
            )
            .with_source(e)
        })?;
        *sink.channel.lock().await = Some(opened);
        Ok(sink)
    }

    /// Connection properties running lapin on the current tokio runtime
    /// (lapin's own default runtime is not built), for connections of
    /// your own to the same broker.
    pub fn connection_properties() -> ConnectionProperties {
        ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current())
    }

    async fn open(&self) -> std::result::Result<(Connection, Channel), SinkError> {
        let options = Self::connection_properties();
        let open = async {
            let conn = Connection::connect(&self.url, options).await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>((conn, channel))
        };
        match tokio::time::timeout(TIMEOUT, open).await {
            Ok(Ok(opened)) => Ok(opened),
            Ok(Err(e)) => Err(SinkError::retryable("RabbitMQ: connecting").with_source(e)),
            Err(_) => Err(SinkError::retryable(format!(
                "RabbitMQ: connecting took over {TIMEOUT:?}"
            ))),
        }
    }

    /// The open channel, opening one if the last was lost.
    async fn channel(&self) -> std::result::Result<Channel, SinkError> {
        let mut guard = self.channel.lock().await;
        if let Some((conn, channel)) = guard.as_ref() {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        *guard = None;
        let (conn, channel) = self.open().await?;
        *guard = Some((conn, channel.clone()));
        Ok(channel)
    }

    fn properties(m: &Outgoing) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (name, value) in [
            (HEADER_POSITION, m.position.clone()),
            (HEADER_PUBLISHED_AT, m.published_at_rfc3339()),
            (HEADER_ORIGIN, m.origin.to_string()),
        ] {
            headers.insert(ShortString::from(name), AMQPValue::LongString(value.into()));
        }
        let timestamp = m
            .published_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(m.id.clone()))
            .with_timestamp(timestamp)
            .with_headers(headers)
    }
}

impl Sink for AmqpSink {
    fn publish<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> BoxFuture<'a, Vec<Result<Confirm, SinkError>>> {
        Box::pin(async move {
            let channel = match self.channel().await {
                Ok(c) => c,
                Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
            };
            let mut pending = Vec::with_capacity(batch.len());
            for m in batch {
                let sent = channel
                    .basic_publish(
                        &self.exchange,
                        &m.subject,
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &m.payload,
                        Self::properties(m),
                    )
                    .await;
                pending.push(sent);
            }
            let answers = join_all(pending.into_iter().map(|sent| async move {
                let confirm = match sent {
                    Ok(confirm) => confirm,
                    Err(e) => return Err(SinkError::retryable("RabbitMQ: publish").with_source(e)),
                };
                match tokio::time::timeout(TIMEOUT, confirm).await {
                    Ok(Ok(Confirmation::Ack(None))) => Ok(Confirm::Stored),
                    Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                        Err(SinkError::retryable(format!(
                            "RabbitMQ: no queue takes routing key {:?} on exchange {:?} ({})",
                            returned.delivery.routing_key.as_str(),
                            self.exchange,
                            returned.reply_text.as_str()
                        )))
                    }
                    Ok(Ok(Confirmation::Nack(_))) => Err(SinkError::retryable(
                        "RabbitMQ: the broker nacked the message",
                    )),
                    Ok(Ok(Confirmation::NotRequested)) => Err(SinkError::retryable(
                        "RabbitMQ: the channel is not in confirm mode",
                    )),
                    Ok(Err(e)) => Err(SinkError::retryable("RabbitMQ: confirm").with_source(e)),
                    Err(_) => Err(SinkError::retryable(format!(
                        "RabbitMQ: no confirm within {TIMEOUT:?}"
                    ))),
                }
            }))
            .await;
            if answers.iter().any(|a| a.is_err()) && !channel.status().connected() {
                // Opened again at the next publish.
                *self.channel.lock().await = None;
            }
            answers
        })
    }

    fn describe(&self) -> String {
        format!(
            "RabbitMQ at {} exchange {:?}",
            redact(&self.url),
            self.exchange
        )
    }
}
