//! [`DurableSubscription`]: the stream a consumer reads.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::message::{Acks, DurableDelivery};
use super::reader::{ConsumerStats, Counts};
use super::Durable;
use crate::channel::ChannelName;
use crate::error::Result;
use crate::event::DurableEvent;

/// A consumer group member: a [`Stream`] of [`DurableDelivery`] items.
///
/// Messages arrive only while this is the group's active consumer. Acks
/// are cumulative and written in the background; call
/// [`close`](Self::close) to stop and write the last ones (dropping also
/// stops, and writes them if the pool is still open). The stream ends when
/// the [`PgPubSub`](crate::PgPubSub) shuts down.
pub struct DurableSubscription<T> {
    pub(super) durable: Durable,
    pub(super) channel: ChannelName,
    pub(super) group: Arc<str>,
    pub(super) election: String,
    /// Behind a pooler in transaction mode, the group's lease.
    pub(super) lease: Option<crate::lease::LeaseWatch>,
    pub(super) acks: Arc<Acks>,
    pub(super) counts: Arc<Counts>,
    pub(super) rx: mpsc::Receiver<Vec<DurableDelivery<T>>>,
    /// The rest of the page being handed out.
    pub(super) page: std::collections::VecDeque<DurableDelivery<T>>,
    pub(super) stop: Arc<watch::Sender<bool>>,
    pub(super) task: Option<JoinHandle<()>>,
    pub(super) flusher: Option<JoinHandle<()>>,
}

impl<T> DurableSubscription<T> {
    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The elected channel that decides the group's active consumer (see
    /// [`election_channel`](super::election_channel)).
    pub fn election_channel(&self) -> &str {
        &self.election
    }

    /// Whether this instance is the group's active consumer now.
    pub fn is_active(&self) -> bool {
        self.activity().is_active()
    }

    /// What tells whether this instance is active, from another task (a
    /// relay's stats, while the relay's task owns the subscription).
    pub(crate) fn activity(&self) -> Activity {
        Activity {
            lease: self.lease.clone(),
            pubsub: self.durable.pubsub.clone(),
            election: self.election.clone(),
        }
    }

    /// Events of the durable consumers of this subscription's
    /// [`PgPubSub`](crate::PgPubSub) (see [`Durable::events`]).
    pub fn events(&self) -> crate::event::Events<DurableEvent> {
        self.durable.events()
    }

    /// What this consumer did so far: how often it looked for messages,
    /// and how often it was woken to.
    pub fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            reads: self.counts.reads.load(Ordering::Relaxed),
            wakeups: self.counts.wakeups.load(Ordering::Relaxed),
        }
    }

    /// Writes the acks given so far to the group's cursor now.
    pub async fn flush(&self) -> Result<()> {
        self.ack_writer().flush().await
    }

    /// Writes this subscription's acks from another task: the relay acks
    /// one batch while it reads the next.
    pub(crate) fn ack_writer(&self) -> AckWriter {
        AckWriter {
            durable: self.durable.clone(),
            acks: self.acks.clone(),
        }
    }

    /// Stops consuming (handing the group to a standby) after writing the
    /// acks given so far.
    pub async fn close(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            // It may wait to hand us a message nobody will read.
            task.abort();
            let _ = task.await;
        }
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.await;
        }
        // The flusher tried once; a failure is reported here.
        self.flush().await
    }

    /// The next item; `None` once the stream ended.
    pub async fn recv(&mut self) -> Option<DurableDelivery<T>> {
        futures::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<DurableDelivery<T>>> {
        loop {
            if let Some(item) = self.page.pop_front() {
                return Poll::Ready(Some(item));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(page)) => self.page = page.into(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Whether a subscription is its group's active consumer: it holds the
/// group's lease behind a pooler, else it leads the group's election.
pub(crate) struct Activity {
    lease: Option<crate::lease::LeaseWatch>,
    pubsub: crate::PgPubSub,
    election: String,
}

impl Activity {
    pub(crate) fn is_active(&self) -> bool {
        match &self.lease {
            Some(lease) => lease.term().is_some(),
            None => self.pubsub.is_leader(&self.election),
        }
    }
}

/// What [`DurableSubscription::flush`] needs, apart from the stream.
pub(crate) struct AckWriter {
    durable: Durable,
    acks: Arc<Acks>,
}

impl AckWriter {
    /// Writes the acks given so far to the group's cursor now.
    pub(crate) async fn flush(&self) -> Result<()> {
        match self.acks.take() {
            Some(p) => self
                .durable
                .write_ack(&self.acks, p)
                .await
                .inspect_err(|_| {
                    self.acks.restore(p);
                }),
            None => Ok(()),
        }
    }
}

// Nothing in it is pinned: the page buffer and channel move freely.
impl<T> Unpin for DurableSubscription<T> {}

impl<T> Stream for DurableSubscription<T> {
    type Item = DurableDelivery<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_item(cx)
    }
}

impl<T> Drop for DurableSubscription<T> {
    fn drop(&mut self) {
        // The reader drops its subscriptions (releasing the election) and
        // the flusher writes the last acks.
        let _ = self.stop.send(true);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl<T> fmt::Debug for DurableSubscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableSubscription")
            .field("channel", &self.channel)
            .field("group", &self.group)
            .field("election", &self.election)
            .finish()
    }
}
