//! [`Listen`]: a subscription request, with this subscription's options.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;

use crate::client::PgPubSub;
use crate::config::ListenOptions;
use crate::error::Result;
use crate::payload::Decode;
use crate::subscription::Subscription;

/// A subscription to one channel, from [`PgPubSub::listen`]: set options,
/// then `.await` it for the [`Subscription`].
///
/// Unset options take the instance defaults
/// ([`Builder::single_listener`](crate::Builder::single_listener),
/// [`Builder::filtered`](crate::Builder::filtered)). A channel is either
/// elected or not within one instance: while it has subscriptions of one
/// mode, a subscription asking for the other fails with
/// [`ErrorKind::Config`](crate::ErrorKind::Config). Filtering may differ
/// between subscriptions of one channel.
///
/// ```no_run
/// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
/// use pg_pubsub::Text;
/// // One instance, one listener session: `jobs` is elected, `cache` is broadcast.
/// let jobs = pubsub.listen::<Text>("jobs").single_listener(true).await?;
/// let cache = pubsub.listen::<Text>("cache").filtered(true).await?;
/// # Ok(()) }
/// ```
#[must_use = "a subscription request does nothing until it is awaited"]
pub struct Listen<'a, T> {
    pubsub: &'a PgPubSub,
    channel: &'a str,
    options: ListenOptions,
    decode: PhantomData<fn() -> T>,
}

impl<'a, T: Decode> Listen<'a, T> {
    pub(crate) fn new(pubsub: &'a PgPubSub, channel: &'a str) -> Self {
        Listen {
            pubsub,
            channel,
            options: ListenOptions::default(),
            decode: PhantomData,
        }
    }

    /// Whether one instance among all on the database delivers this channel
    /// (see [`Builder::single_listener`](crate::Builder::single_listener)).
    pub fn single_listener(mut self, elected: bool) -> Self {
        self.options.single_listener = Some(elected);
        self
    }

    /// Whether this subscription skips messages this instance published
    /// (see [`Builder::filtered`](crate::Builder::filtered)).
    pub fn filtered(mut self, filtered: bool) -> Self {
        self.options.filtered = Some(filtered);
        self
    }
}

impl<'a, T: Decode> IntoFuture for Listen<'a, T> {
    type Output = Result<Subscription<T>>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.pubsub.subscribe(self.channel, self.options))
    }
}
