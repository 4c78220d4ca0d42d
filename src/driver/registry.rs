//! Which channels have subscribers, what the server is listening to, and
//! fan-out of received notifications to subscriber queues.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::Arc;
use std::task::Waker;

use tokio::sync::oneshot;
use tokio_postgres::Notification;
use uuid::Uuid;

use crate::channel::ChannelName;
use crate::error::{Error, Result};
use crate::message::{Gap, Received};
use crate::queue::{Pushed, Queue};

pub(crate) type SubId = u64;
pub(crate) type Reply = oneshot::Sender<Result<()>>;

struct Subscriber {
    id: SubId,
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Channel {
    subs: Vec<Subscriber>,
    /// `listen` calls waiting for the server to confirm.
    waiters: Vec<Reply>,
    /// The server has confirmed LISTEN on this session.
    listening: bool,
    /// A LISTEN/UNLISTEN for it is in flight.
    in_flight: bool,
}

impl Channel {
    fn wanted(&self) -> bool {
        !self.subs.is_empty()
    }
}

/// One change to send to the server.
pub(crate) struct Change {
    pub channel: ChannelName,
    pub listen: bool,
}

/// What dispatching one notification led to.
pub(crate) enum Dispatched {
    Delivered,
    /// A subscriber's queue just became full.
    SlowConsumer(ChannelName),
}

#[derive(Default)]
pub(crate) struct Registry {
    channels: HashMap<ChannelName, Channel>,
    /// Something changed since the last `plan`.
    dirty: bool,
    /// Drop messages tagged with this origin (the instance's own).
    filter_origin: Option<Uuid>,
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Registry {
    pub(crate) fn new(filter_origin: Option<Uuid>) -> Self {
        Registry {
            filter_origin,
            ..Registry::default()
        }
    }

    /// Adds a subscriber; `reply` is answered once the server listens
    /// (at once when already listening, or when offline).
    pub(crate) fn subscribe(
        &mut self,
        channel: ChannelName,
        id: SubId,
        queue: Arc<Queue>,
        reply: Reply,
        connected: bool,
    ) {
        self.dirty = true;
        let ch = self.channels.entry(channel).or_default();
        ch.subs.push(Subscriber { id, queue });
        if !connected || (ch.listening && !ch.in_flight) {
            // Offline: registered, takes effect (with a gap) on reconnect.
            let _ = reply.send(Ok(()));
        } else {
            ch.waiters.push(reply);
        }
    }

    pub(crate) fn unsubscribe(&mut self, channel: &str, id: SubId) {
        if let Some(ch) = self.channels.get_mut(channel) {
            ch.subs.retain(|s| s.id != id);
            self.dirty = true;
        }
    }

    /// Changes needed to make the server match the subscriptions; marks them in flight.
    /// Also answers waiters whose channel is confirmed and forgets unused channels.
    pub(crate) fn plan(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        if !std::mem::take(&mut self.dirty) {
            return changes;
        }
        self.channels.retain(|name, ch| {
            if ch.in_flight {
                return true;
            }
            if ch.wanted() != ch.listening {
                ch.in_flight = true;
                changes.push(Change {
                    channel: name.clone(),
                    listen: ch.wanted(),
                });
            } else if ch.listening {
                for w in ch.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            ch.wanted() || ch.listening
        });
        changes
    }

    /// The server confirmed `changes`.
    pub(crate) fn confirmed(&mut self, changes: &[Change]) {
        self.dirty = true;
        for change in changes {
            if let Some(ch) = self.channels.get_mut(change.channel.as_str()) {
                ch.in_flight = false;
                ch.listening = change.listen;
            }
        }
    }

    /// The server refused `changes`: their subscribers are told and removed.
    pub(crate) fn refused(&mut self, changes: &[Change], err: &Error) {
        self.dirty = true;
        for change in changes {
            if let Some(ch) = self.channels.get_mut(change.channel.as_str()) {
                ch.in_flight = false;
                if change.listen {
                    for w in ch.waiters.drain(..) {
                        let _ = w.send(Err(Error::new(err.kind(), err.to_string())));
                    }
                    for s in ch.subs.drain(..) {
                        s.queue.close();
                    }
                }
            }
        }
    }

    /// The connection is gone: nothing is listened to any more. Waiting
    /// `listen` calls return (registered; they take effect on reconnect).
    pub(crate) fn connection_lost(&mut self) {
        self.dirty = true;
        for ch in self.channels.values_mut() {
            ch.listening = false;
            ch.in_flight = false;
            for w in ch.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
        self.channels.retain(|_, ch| ch.wanted());
    }

    /// Channels to listen to on a new connection; marks them listening.
    pub(crate) fn relisten_all(&mut self) -> Vec<ChannelName> {
        self.channels.retain(|_, ch| ch.wanted());
        self.channels
            .iter_mut()
            .map(|(name, ch)| {
                ch.listening = true;
                name.clone()
            })
            .collect()
    }

    /// Sends a gap marker to every subscriber.
    pub(crate) fn gap(&self, gap: &Gap) {
        for s in self.channels.values().flat_map(|ch| &ch.subs) {
            s.queue.push_gap(gap.clone());
        }
    }

    /// Ends every subscription and fails waiting `listen` calls.
    pub(crate) fn shut_down(&mut self) {
        for ch in self.channels.values_mut() {
            for w in ch.waiters.drain(..) {
                let _ = w.send(Err(Error::shut_down()));
            }
            for s in ch.subs.drain(..) {
                s.queue.close();
            }
        }
        self.channels.clear();
    }

    /// Fans a notification out to the channel's subscribers.
    /// Wakers of consumers to wake are collected in `wake`.
    pub(crate) fn dispatch(&self, note: Notification, wake: &mut Vec<Waker>) -> Dispatched {
        let Some((name, ch)) = self.channels.get_key_value(note.channel()) else {
            return Dispatched::Delivered;
        };
        if ch.subs.is_empty() {
            return Dispatched::Delivered;
        }
        let received = Received::new(Arc::new(note));
        if self.filter_origin.is_some() && received.origin() == self.filter_origin {
            return Dispatched::Delivered;
        }
        let mut slow = false;
        for s in &ch.subs {
            if let Pushed::Dropped { first: true } = s.queue.push(received.clone(), wake) {
                slow = true;
            }
        }
        if slow {
            Dispatched::SlowConsumer(name.clone())
        } else {
            Dispatched::Delivered
        }
    }
}
