//! [`Subscription`]: a stream of one channel's deliveries.

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::channel::ChannelName;
use crate::driver::{Command, SubId};
use crate::inbox::{Entry, Queue};
use crate::message::{DecodeError, Delivery, Message, Received};
use crate::stats::Board;

pub(crate) type Decoder<T> = fn(&str) -> Result<T, serde_json::Error>;

/// A subscriber to one channel: a [`Stream`] of [`Delivery`] items.
///
/// Several subscriptions to one channel share a single `LISTEN`. Dropping
/// the last one issues `UNLISTEN`. Each subscription has its own bounded
/// queue; if the consumer falls behind, messages *for this subscription* are
/// dropped and reported as [`Delivery::Lagged`], never blocking the listener.
/// The stream ends after [`PgPubSub::shutdown`](crate::PgPubSub::shutdown).
///
/// ```no_run
/// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
/// use futures::StreamExt;
/// use pg_pubsub::Delivery;
///
/// #[derive(serde::Deserialize, Debug)]
/// struct Order { id: u64 }
///
/// let mut orders = pubsub.listen::<Order>("orders").await?;
/// while let Some(delivery) = orders.next().await {
///     match delivery {
///         Delivery::Message(m) => println!("order {}", m.payload().id),
///         Delivery::Gap(_) => println!("reconnected: re-read state"),
///         other => println!("{other:?}"),
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Subscription<T> {
    channel: ChannelName,
    id: SubId,
    queue: Arc<Queue>,
    local: VecDeque<Entry>,
    decode: Decoder<T>,
    cmds: mpsc::UnboundedSender<Command>,
    board: Arc<Board>,
    _payload: PhantomData<fn() -> T>,
}

impl<T> Subscription<T> {
    pub(crate) fn new(
        channel: ChannelName,
        id: SubId,
        queue: Arc<Queue>,
        decode: Decoder<T>,
        cmds: mpsc::UnboundedSender<Command>,
        board: Arc<Board>,
    ) -> Self {
        Subscription {
            channel,
            id,
            queue,
            local: VecDeque::new(),
            decode,
            cmds,
            board,
            _payload: PhantomData,
        }
    }

    /// The channel this subscription listens to.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The next delivery; `None` once the [`PgPubSub`](crate::PgPubSub) was shut down.
    pub async fn recv(&mut self) -> Option<Delivery<T>>
    where
        T: Send + Sync + 'static,
    {
        self.next().await
    }

    fn convert(&self, entry: Entry) -> Delivery<T>
    where
        T: Send + Sync + 'static,
    {
        match entry {
            Entry::Message(received) => match received.decode(self.decode) {
                Ok(payload) => Delivery::Message(Message::new(received, payload)),
                Err(error) => Delivery::Undecodable(DecodeError::new(received, error)),
            },
            Entry::Lagged(n) => Delivery::Lagged(n),
            Entry::Gap(gap) => Delivery::Gap(gap),
            // Its last notification (`poll_next` yields the others).
            Entry::Run(run, _, end) => {
                self.convert(Entry::Message(Received::InRun(run, end.saturating_sub(1))))
            }
        }
    }
}

impl<T: Send + Sync + 'static> Stream for Subscription<T> {
    type Item = Delivery<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery<T>>> {
        let this = &mut *self;
        loop {
            // A run yields its notifications one by one; the last one
            // takes the entry's reference.
            if let Some(Entry::Run(run, start, end)) = this.local.front_mut() {
                if *end - *start > 1 {
                    let received = Received::InRun(run.clone(), *start);
                    *start += 1;
                    return Poll::Ready(Some(this.convert(Entry::Message(received))));
                }
            }
            if let Some(entry) = this.local.pop_front() {
                return Poll::Ready(Some(this.convert(entry)));
            }
            match this.queue.poll_take(cx, &mut this.local) {
                Poll::Ready(true) => continue,
                Poll::Ready(false) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        self.board.leave(&self.channel);
        // Fails only when the listener task is gone, and then there is nothing to undo.
        let _ = self.cmds.send(Command::Unsubscribe {
            channel: self.channel.clone(),
            id: self.id,
        });
    }
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("id", &self.id)
            .finish()
    }
}
