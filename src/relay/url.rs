//! A sink from a URL: `nats://`, `redis://`, `amqp://` (as the CLI takes them).

use super::sink::Sink;
use crate::error::{Error, Origin, Result};

/// Connects the sink a URL names: `nats://` (feature `relay-nats`),
/// `redis://` (`relay-redis`), `amqp://` or `amqps://` (`relay-amqp`,
/// publishing to the default exchange: the rendered subject is the queue's
/// name). Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) for
/// another scheme or one whose feature is off, and with
/// [`ErrorKind::Broker`](crate::ErrorKind::Broker) when the broker cannot
/// be reached.
pub async fn connect_sink(url: &str) -> Result<Box<dyn Sink>> {
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        #[cfg(feature = "relay-nats")]
        "nats" | "tls" => Ok(Box::new(super::NatsSink::connect(url).await?)),
        #[cfg(feature = "relay-redis")]
        "redis" | "rediss" => Ok(Box::new(super::RedisSink::connect(url).await?)),
        #[cfg(feature = "relay-amqp")]
        "amqp" | "amqps" => Ok(Box::new(super::AmqpSink::connect(url, "").await?)),
        _ => Err(Error::new(
            Origin::Config,
            format!(
                "no relay sink for {scheme:?} URLs (nats:// needs feature relay-nats, \
                 redis:// relay-redis, amqp:// relay-amqp)"
            ),
        )),
    }
}

impl Sink for Box<dyn Sink> {
    fn publish<'a>(
        &'a self,
        batch: &'a [super::Outgoing],
    ) -> futures::future::BoxFuture<'a, Vec<Result<super::Confirm, super::SinkError>>> {
        (**self).publish(batch)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// `url` without its password.
#[cfg_attr(
    not(any(
        feature = "relay-nats",
        feature = "relay-redis",
        feature = "relay-amqp"
    )),
    allow(dead_code)
)]
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_credentials() {
        assert_eq!(super::redact("nats://u:p@h:1"), "nats://***@h:1");
        assert_eq!(super::redact("redis://h:1/0"), "redis://h:1/0");
    }
}
