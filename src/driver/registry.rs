//! Which channels have subscribers, what the server is listening to, which
//! elected channels this instance leads, and fan-out of received
//! notifications to subscriber queues.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use tokio::sync::oneshot;
use tokio_postgres::Notification;
use uuid::Uuid;

use crate::channel::ChannelName;
use crate::error::{Error, Result};
use crate::event::ConnectionEvent;
use crate::message::{Gap, Received};
use crate::queue::Queue;

pub(crate) type SubId = u64;
pub(crate) type Reply = oneshot::Sender<Result<()>>;
/// Channels this instance currently leads, shared with the handles.
pub(crate) type Leading = Arc<Mutex<HashSet<ChannelName>>>;

struct Subscriber {
    id: SubId,
    queue: Arc<Queue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Every instance listens (no election).
    Plain,
    /// Elected channel; another session holds the lock (or we have not tried yet).
    Standby,
    /// Elected channel; this session holds its advisory lock.
    Leader,
}

struct Channel {
    subs: Vec<Subscriber>,
    /// `listen` calls waiting for the channel to settle.
    waiters: Vec<Reply>,
    /// The server has confirmed LISTEN on this session.
    listening: bool,
    /// A change for it is in flight.
    in_flight: bool,
    role: Role,
    /// Standby: a lock attempt is due.
    try_due: bool,
    /// Standby: at least one lock attempt was answered.
    attempted: bool,
    /// New leader: its own `ready:` has not come back yet. Messages before
    /// it were committed before it listened; the previous leader handles them.
    awaiting_ready: bool,
}

impl Channel {
    fn new(elected: bool) -> Self {
        Channel {
            subs: Vec::new(),
            waiters: Vec::new(),
            listening: false,
            in_flight: false,
            role: if elected { Role::Standby } else { Role::Plain },
            try_due: elected,
            attempted: false,
            awaiting_ready: false,
        }
    }

    fn wanted(&self) -> bool {
        !self.subs.is_empty()
    }

    /// The server state matches what its subscribers need.
    fn settled(&self) -> bool {
        !self.in_flight
            && match self.role {
                Role::Plain | Role::Leader => self.listening,
                Role::Standby => self.attempted && !self.try_due,
            }
    }
}

/// One change to make on the server.
pub(crate) enum Change {
    Listen {
        channel: ChannelName,
        elected: bool,
    },
    Unlisten(ChannelName),
    TryLock(ChannelName),
    /// UNLISTEN, unlock, and wake the standbys.
    Release(ChannelName),
}

#[derive(Default)]
pub(crate) struct Registry {
    channels: HashMap<ChannelName, Channel>,
    /// Something changed since the last `plan`.
    dirty: bool,
    /// Drop messages tagged with this origin (the instance's own).
    filter_origin: Option<Uuid>,
    /// Channels are elected (single listener).
    elected: bool,
    leading: Leading,
    /// Events for the driver to publish.
    pub events: Vec<ConnectionEvent>,
    /// Received, not yet delivered (see `flush`).
    staged: Vec<Notification>,
    /// Scratch space for `flush`, kept to reuse its allocation.
    run: Vec<Received>,
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Registry {
    pub(crate) fn new(filter_origin: Option<Uuid>, elected: bool, leading: Leading) -> Self {
        Registry {
            filter_origin,
            elected,
            leading,
            ..Registry::default()
        }
    }

    fn set_leading(&self, channel: &ChannelName, leads: bool) {
        let mut leading = self.leading.lock().unwrap_or_else(|e| e.into_inner());
        if leads {
            leading.insert(channel.clone());
        } else {
            leading.remove(channel);
        }
    }

    /// Adds a subscriber; `reply` is answered once the channel settles
    /// (at once when it already has, or when offline).
    pub(crate) fn subscribe(
        &mut self,
        channel: ChannelName,
        id: SubId,
        queue: Arc<Queue>,
        reply: Reply,
        connected: bool,
    ) {
        self.dirty = true;
        let elected = self.elected;
        let ch = self
            .channels
            .entry(channel)
            .or_insert_with(|| Channel::new(elected));
        ch.subs.push(Subscriber { id, queue });
        if !connected || ch.settled() {
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

    /// Changes needed to make the server match the subscriptions; marks them
    /// in flight. Also answers waiters of settled channels and forgets unused ones.
    pub(crate) fn plan(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        if !std::mem::take(&mut self.dirty) {
            return changes;
        }
        self.channels.retain(|name, ch| {
            if ch.in_flight {
                return true;
            }
            let change = match ch.role {
                Role::Plain if ch.wanted() != ch.listening => Some(if ch.wanted() {
                    Change::Listen {
                        channel: name.clone(),
                        elected: false,
                    }
                } else {
                    Change::Unlisten(name.clone())
                }),
                Role::Leader if !ch.wanted() => Some(Change::Release(name.clone())),
                Role::Leader if !ch.listening => Some(Change::Listen {
                    channel: name.clone(),
                    elected: true,
                }),
                Role::Standby if ch.wanted() && ch.try_due => Some(Change::TryLock(name.clone())),
                _ => None,
            };
            match change {
                Some(change) => {
                    ch.in_flight = true;
                    ch.awaiting_ready |= matches!(change, Change::Listen { elected: true, .. });
                    changes.push(change);
                }
                None if ch.settled() => {
                    for w in ch.waiters.drain(..) {
                        let _ = w.send(Ok(()));
                    }
                }
                None => {}
            }
            ch.wanted() || ch.listening || ch.role == Role::Leader
        });
        changes
    }

    /// The server carried out `changes`; `acquired` are the locks it granted.
    pub(crate) fn confirmed(&mut self, changes: Vec<Change>, acquired: &HashSet<String>) {
        self.dirty = true;
        for change in changes {
            let name = match &change {
                Change::Listen { channel, .. }
                | Change::Unlisten(channel)
                | Change::TryLock(channel)
                | Change::Release(channel) => channel.clone(),
            };
            let Some(ch) = self.channels.get_mut(name.as_str()) else {
                continue;
            };
            ch.in_flight = false;
            let event = match change {
                Change::Listen { .. } => {
                    ch.listening = true;
                    Some(ConnectionEvent::Listening {
                        channel: name.clone(),
                    })
                }
                Change::Unlisten(_) => {
                    ch.listening = false;
                    Some(ConnectionEvent::Unlistened {
                        channel: name.clone(),
                    })
                }
                Change::TryLock(_) => {
                    let was_attempted = ch.attempted;
                    ch.try_due = false;
                    ch.attempted = true;
                    if acquired.contains(name.as_str()) {
                        ch.role = Role::Leader;
                        Some(ConnectionEvent::LockAcquired {
                            channel: name.clone(),
                        })
                    } else if !was_attempted {
                        Some(ConnectionEvent::Standby {
                            channel: name.clone(),
                        })
                    } else {
                        None
                    }
                }
                Change::Release(_) => {
                    ch.listening = false;
                    ch.role = Role::Standby;
                    ch.try_due = true;
                    Some(ConnectionEvent::LockReleased {
                        channel: name.clone(),
                    })
                }
            };
            let leads = ch.role == Role::Leader;
            self.set_leading(&name, leads);
            self.events.extend(event);
        }
    }

    /// The server refused `changes` (the session is still up): their
    /// `listen` calls fail and their subscriptions end.
    pub(crate) fn refused(&mut self, changes: &[Change], err: &Error) {
        self.dirty = true;
        for change in changes {
            let (Change::Listen { channel, .. } | Change::Unlisten(channel)) = change else {
                continue;
            };
            if let Some(ch) = self.channels.get_mut(channel.as_str()) {
                ch.in_flight = false;
                if matches!(change, Change::Listen { .. }) {
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

    /// Standbys try for the lock again (retry timer, or a leader released).
    pub(crate) fn retry_locks(&mut self, only: Option<&str>) {
        for (name, ch) in &mut self.channels {
            if ch.role == Role::Standby && only.is_none_or(|o| o == name.as_str()) {
                ch.try_due = true;
                self.dirty = true;
            }
        }
    }

    /// The connection is gone: nothing is listened to or locked any more.
    /// Waiting `listen` calls return (registered; they take effect on reconnect).
    pub(crate) fn connection_lost(&mut self, reason: &Arc<str>) {
        self.dirty = true;
        for (name, ch) in &mut self.channels {
            ch.listening = false;
            ch.in_flight = false;
            ch.awaiting_ready = false;
            if ch.role == Role::Leader {
                ch.role = Role::Standby;
                self.events.push(ConnectionEvent::LockLost {
                    channel: name.clone(),
                    reason: reason.clone(),
                });
            }
            if ch.role == Role::Standby {
                ch.try_due = true;
            }
            for w in ch.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
        self.leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.channels.retain(|_, ch| ch.wanted());
    }

    /// Plain channels to listen to on a new connection; marks them listening.
    /// (Elected channels go through a lock attempt first.)
    pub(crate) fn relisten_all(&mut self) -> Vec<ChannelName> {
        self.channels.retain(|_, ch| ch.wanted());
        self.channels
            .iter_mut()
            .filter(|(_, ch)| ch.role == Role::Plain)
            .map(|(name, ch)| {
                ch.listening = true;
                name.clone()
            })
            .collect()
    }

    /// This session's own `ready:<channel>` arrived: deliver from here on.
    /// (Call after flushing what came before it.)
    pub(crate) fn own_ready(&mut self, channel: &str) {
        if let Some(ch) = self.channels.get_mut(channel) {
            ch.awaiting_ready = false;
        }
    }

    /// Channels this instance leads.
    pub(crate) fn leaders(&self) -> Vec<ChannelName> {
        self.channels
            .iter()
            .filter(|(_, ch)| ch.role == Role::Leader)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Sends a gap marker to every subscriber.
    pub(crate) fn gap(&self, gap: &Gap) {
        for s in self.channels.values().flat_map(|ch| &ch.subs) {
            s.queue.push_gap(gap.clone());
        }
    }

    /// Ends one channel's subscriptions (after a hand-over).
    pub(crate) fn end_channel(&mut self, channel: &str) {
        if let Some(mut ch) = self.channels.remove(channel) {
            for s in ch.subs.drain(..) {
                s.queue.close();
            }
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
        self.leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Queues a received notification; [`flush`](Self::flush) delivers it.
    pub(crate) fn stage(&mut self, note: Notification) {
        self.staged.push(note);
    }

    /// Fans staged notifications out to subscriber queues: one lookup per
    /// run of one channel and one lock per subscriber per run, rather than
    /// per message. Wakers of consumers to wake are collected in `wake`.
    pub(crate) fn flush(&mut self, wake: &mut Vec<Waker>) {
        let mut staged = std::mem::take(&mut self.staged);
        let mut run = std::mem::take(&mut self.run);
        let mut notes = staged.drain(..).peekable();
        while let Some(first) = notes.next() {
            // Only a leader handles an elected channel's messages, from its
            // own `ready:` on.
            let target = self
                .channels
                .get_key_value(first.channel())
                .filter(|(_, ch)| {
                    !ch.subs.is_empty() && ch.role != Role::Standby && !ch.awaiting_ready
                });
            // Not delivered: looked up again for the next message, which is
            // rare (a channel being unlistened, or not yet led).
            let Some((channel, ch)) = target else {
                continue;
            };
            let shared = ch.subs.len() > 1;
            let filter = self.filter_origin;
            let mut keep = |note: Notification| {
                let received = Received::new(note, shared);
                if filter.is_none() || received.origin() != filter {
                    run.push(received);
                }
            };
            keep(first);
            while let Some(note) = notes.next_if(|n| n.channel() == channel.as_str()) {
                keep(note);
            }
            if run.is_empty() {
                continue;
            }
            let mut slow = false;
            match ch.subs.as_slice() {
                // The only subscriber takes the notifications themselves.
                [only] => slow = only.queue.push_all(run.drain(..), wake),
                subs => {
                    for s in subs {
                        slow |= s.queue.push_all(run.iter().cloned(), wake);
                    }
                    run.clear();
                }
            }
            if slow {
                let channel = channel.clone();
                tracing::warn!(%channel, "pg-pubsub subscriber too slow; dropping its messages");
                self.events.push(ConnectionEvent::SlowConsumer { channel });
            }
        }
        drop(notes);
        self.staged = staged;
        self.run = run;
    }
}
