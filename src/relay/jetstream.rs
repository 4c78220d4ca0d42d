//! NATS JetStream: `Nats-Msg-Id` from the source id (the stream's
//! duplicate window drops replays), each publish's JetStream ack awaited.

use std::time::Duration;

use async_nats::jetstream::context::{Publish, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::HeaderMap;
use futures::future::{join_all, BoxFuture};

use super::sink::{
    Confirm, Outgoing, Sink, SinkError, HEADER_ORIGIN, HEADER_POSITION, HEADER_PUBLISHED_AT,
};
use super::url::redact;
use crate::error::{Error, Origin, Result};

/// Publishes to NATS JetStream (feature `relay-nats`). The subjects must
/// belong to a stream (created beforehand, with a duplicate window longer
/// than a relay's longest outage plus its take-over time: 2 minutes by
/// default); until one exists, publishes are retried.
pub struct NatsSink {
    js: jetstream::Context,
    client: async_nats::Client,
    url: String,
}

impl NatsSink {
    /// Connects to `url` (`nats://host:port`, with `user:password@` if
    /// needed). The client reconnects by itself after a loss; publishes
    /// meanwhile time out and are retried.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| {
                Error::new(
                    Origin::Broker,
                    format!("connecting to NATS at {}", redact(url)),
                )
                .with_source(e)
            })?;
        let mut sink = NatsSink::new(client);
        sink.url = redact(url);
        Ok(sink)
    }

    /// Wraps a connected client (its options: TLS, credentials, ...).
    pub fn new(client: async_nats::Client) -> Self {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        NatsSink {
            js,
            client,
            url: "nats".to_owned(),
        }
    }

    /// How long to wait for each JetStream ack before retrying. Default 5 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.js.set_timeout(timeout);
        self
    }

    /// The JetStream context, e.g. to create the stream.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

fn classify(e: PublishError) -> SinkError {
    let permanent = match e.kind() {
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => true,
        PublishErrorKind::Other => std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|js| js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM),
        _ => false,
    };
    let what = match e.kind() {
        PublishErrorKind::StreamNotFound => {
            "NATS: no JetStream stream takes this subject (create one)".to_owned()
        }
        _ => "NATS JetStream publish".to_owned(),
    };
    if permanent {
        SinkError::permanent(what).with_source(e)
    } else {
        SinkError::retryable(what).with_source(e)
    }
}

impl Sink for NatsSink {
    fn publish<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> BoxFuture<'a, Vec<Result<Confirm, SinkError>>> {
        Box::pin(async move {
            let max_payload = self.client.server_info().max_payload;
            // Sent in order on the one connection, then the acks awaited together.
            let mut pending = Vec::with_capacity(batch.len());
            for m in batch {
                if max_payload > 0 && m.payload.len() > max_payload {
                    pending.push(Err(SinkError::permanent(format!(
                        "NATS: {} bytes is over the server's max_payload of {max_payload}",
                        m.payload.len()
                    ))));
                    continue;
                }
                let mut headers = HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, m.id.as_str());
                headers.insert(HEADER_POSITION, m.position.as_str());
                headers.insert(HEADER_PUBLISHED_AT, m.published_at_rfc3339().as_str());
                headers.insert(HEADER_ORIGIN, &*m.origin);
                let publish = Publish::build().payload(m.payload.clone()).headers(headers);
                pending.push(
                    self.js
                        .send_publish(m.subject.clone(), publish)
                        .await
                        .map_err(classify),
                );
            }
            join_all(pending.into_iter().map(|p| async move {
                match p {
                    Ok(ack) => match ack.await {
                        Ok(ack) if ack.duplicate => Ok(Confirm::Duplicate),
                        Ok(_) => Ok(Confirm::Stored),
                        Err(e) => Err(classify(e)),
                    },
                    Err(e) => Err(e),
                }
            }))
            .await
        })
    }

    fn describe(&self) -> String {
        format!("NATS JetStream at {}", self.url)
    }
}
