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

use super::election::{Answer, CONTROL_CHANNEL};
use super::role::{Election, Heard, Plain, Step};
use crate::channel::ChannelName;
use crate::error::{Error, Origin, Result};
use crate::event::ConnectionEvent;
use crate::inbox::Queue;
use crate::message::{Gap, GapCause, Received};

pub(crate) type SubId = u64;
pub(crate) type Reply = oneshot::Sender<Result<()>>;
/// A set of channels shared with the handles (which this instance leads;
/// on which it filters its own messages).
pub(crate) type ChannelSet = Arc<Mutex<HashSet<ChannelName>>>;

/// What the registry shares with the handles.
#[derive(Clone)]
pub(crate) struct Shared {
    /// This instance's origin: filtered subscribers skip messages tagged with it.
    pub origin: Uuid,
    /// Channels this instance leads.
    pub leading: super::Leading,
    /// Channels with a filtered subscription.
    pub filtering: ChannelSet,
    /// Counters for `stats()`.
    pub board: Arc<crate::stats::Board>,
}

/// How one subscription wants its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mode {
    pub elected: bool,
    pub filtered: bool,
}

struct Subscriber {
    id: SubId,
    queue: Arc<Queue>,
    filtered: bool,
}

enum State {
    Plain(Plain),
    Elected(Election),
}

impl State {
    fn new(elected: bool) -> Self {
        if elected {
            State::Elected(Election::new())
        } else {
            State::Plain(Plain::Idle)
        }
    }

    fn is_elected(&self) -> bool {
        matches!(self, State::Elected(_))
    }

    /// Neither listened to nor locked, nor about to be.
    fn idle(&self) -> bool {
        match self {
            State::Plain(p) => *p == Plain::Idle,
            State::Elected(e) => matches!(e, Election::Standby { .. }),
        }
    }

    fn in_flight(&self) -> bool {
        match self {
            State::Plain(p) => matches!(p, Plain::Listening | Plain::Unlistening),
            State::Elected(e) => e.in_flight(),
        }
    }

    fn settled(&self) -> bool {
        match self {
            State::Plain(p) => *p == Plain::Listened,
            State::Elected(e) => e.settled(),
        }
    }

    /// Whether received messages go to the subscribers. A plain channel
    /// delivers even before its `LISTEN` is confirmed: the server only sends
    /// what was committed after it took effect.
    fn delivers(&self) -> bool {
        match self {
            State::Plain(_) => true,
            State::Elected(e) => e.delivers(),
        }
    }

    fn leads(&self) -> bool {
        matches!(self, State::Elected(e) if e.leads())
    }
}

struct Channel {
    subs: Vec<Subscriber>,
    /// `listen` calls waiting for the channel to settle.
    waiters: Vec<Reply>,
    state: State,
}

impl Channel {
    fn wanted(&self) -> bool {
        !self.subs.is_empty()
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    channels: HashMap<ChannelName, Channel>,
    /// Something changed since the last `plan`.
    dirty: bool,
    /// This instance's origin: filtered subscribers skip messages tagged with it.
    origin: Option<Uuid>,
    leading: super::Leading,
    filtering: ChannelSet,
    /// The session listens to the election's control channel.
    control: bool,
    /// A failed lock attempt followed a release: retry soon.
    pub hurry: bool,
    /// Standby channels whose lock a non-leader held at the last probe.
    suspects: HashMap<String, i32>,
    /// Suspects already reported.
    reported: HashSet<String>,
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

fn lock(set: &ChannelSet) -> std::sync::MutexGuard<'_, HashSet<ChannelName>> {
    set.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub(crate) fn new(shared: Shared) -> Self {
        Registry {
            origin: Some(shared.origin),
            leading: shared.leading,
            filtering: shared.filtering,
            ..Registry::default()
        }
    }

    /// Adds a subscriber; `reply` is answered once the channel settles
    /// (at once when it already has, or when offline). A channel is either
    /// elected or not: a subscription asking for the other mode fails.
    pub(crate) fn subscribe(
        &mut self,
        channel: ChannelName,
        id: SubId,
        queue: Arc<Queue>,
        mode: Mode,
        reply: Reply,
        connected: bool,
    ) {
        let ch = self
            .channels
            .entry(channel.clone())
            .or_insert_with(|| Channel {
                subs: Vec::new(),
                waiters: Vec::new(),
                state: State::new(mode.elected),
            });
        if ch.state.is_elected() != mode.elected {
            if ch.wanted() || !ch.state.idle() {
                let (has, wants) = if mode.elected {
                    ("plain", "single-listener")
                } else {
                    ("single-listener", "plain")
                };
                let why = if ch.wanted() {
                    "has subscriptions"
                } else {
                    "is still being released"
                };
                let _ = reply.send(Err(Error::new(
                    Origin::Config,
                    format!(
                        "channel {channel:?} {why} in {has} mode on this instance; \
                         a {wants} subscription cannot share it"
                    ),
                )));
                return;
            }
            ch.state = State::new(mode.elected);
        }
        self.dirty = true;
        ch.subs.push(Subscriber {
            id,
            queue,
            filtered: mode.filtered,
        });
        if mode.filtered {
            lock(&self.filtering).insert(channel);
        }
        if !connected || ch.state.settled() {
            // Offline: registered, takes effect (with a gap) on reconnect.
            let _ = reply.send(Ok(()));
        } else {
            ch.waiters.push(reply);
        }
    }

    pub(crate) fn unsubscribe(&mut self, channel: &str, id: SubId) {
        if let Some(ch) = self.channels.get_mut(channel) {
            ch.subs.retain(|s| s.id != id);
            if !ch.subs.iter().any(|s| s.filtered) {
                lock(&self.filtering).remove(channel);
            }
            self.dirty = true;
        }
    }

    /// Statements needed to make the server match the subscriptions; marks
    /// them in flight. Also answers waiters of settled channels and forgets
    /// unused ones.
    pub(crate) fn plan(&mut self) -> Vec<(ChannelName, Step)> {
        let mut steps = Vec::new();
        if !std::mem::take(&mut self.dirty) {
            return steps;
        }
        let mut elected = false;
        self.channels.retain(|name, ch| {
            elected |= ch.state.is_elected() && ch.wanted();
            if ch.state.in_flight() {
                return true;
            }
            let wanted = ch.wanted();
            let step = match &mut ch.state {
                State::Plain(p) => p.plan(wanted),
                State::Elected(e) => e.plan(wanted),
            };
            match step {
                Some(step) => steps.push((name.clone(), step)),
                None if ch.state.settled() => {
                    for w in ch.waiters.drain(..) {
                        let _ = w.send(Ok(()));
                    }
                }
                None => {}
            }
            wanted || !ch.state.idle()
        });
        if elected && !self.control && !steps.is_empty() {
            // Heard before the first lock attempt's answer: control
            // messages decide whether a take-over needs a gap.
            if let Ok(control) = ChannelName::new(CONTROL_CHANNEL) {
                steps.insert(0, (control, Step::Listen));
            }
        }
        steps
    }

    /// The server carried out `steps`; `answer` holds the lock results.
    pub(crate) fn confirmed(&mut self, steps: Vec<(ChannelName, Step)>, answer: &Answer) {
        self.dirty = true;
        for (name, step) in steps {
            if name.as_str() == CONTROL_CHANNEL {
                self.control = true;
                continue;
            }
            let Some(ch) = self.channels.get_mut(name.as_str()) else {
                continue;
            };
            let event = match &mut ch.state {
                State::Plain(p) => {
                    p.confirmed();
                    Some(if *p == Plain::Listened {
                        ConnectionEvent::Listening {
                            channel: name.clone(),
                        }
                    } else {
                        ConnectionEvent::Unlistened {
                            channel: name.clone(),
                        }
                    })
                }
                State::Elected(e) => match step {
                    Step::TryLock => {
                        let first = !matches!(e, Election::Acquiring { tried: true, .. });
                        let granted = answer.granted.iter().any(|c| c == name.as_str());
                        self.hurry |= e.lock_answer(granted);
                        if granted {
                            self.reported.remove(name.as_str());
                            None
                        } else {
                            first.then(|| ConnectionEvent::Standby {
                                channel: name.clone(),
                            })
                        }
                    }
                    // Announced: the lock is ours and we listen.
                    Step::Announce => {
                        e.announced();
                        Some(ConnectionEvent::LockAcquired {
                            channel: name.clone(),
                        })
                    }
                    Step::Release => {
                        e.released();
                        Some(ConnectionEvent::LockReleased {
                            channel: name.clone(),
                        })
                    }
                    Step::Listen | Step::Unlisten => None,
                },
            };
            let leads = ch.state.leads();
            self.set_leading(&name, leads);
            self.events.extend(event);
        }
    }

    /// Reports standbys blocked by a lock that no leader of their channel
    /// holds, when a probe saw the same holder twice in a row.
    pub(crate) fn probed(&mut self, answer: &Answer) {
        let now: HashMap<String, i32> = answer.suspects.iter().cloned().collect();
        for (channel, pid) in &now {
            if self.suspects.get(channel) != Some(pid) || self.reported.contains(channel) {
                continue;
            }
            let Some((name, _)) = self.channels.get_key_value(channel.as_str()) else {
                continue;
            };
            tracing::error!(
                %channel, holder = pid,
                "pg-pubsub: election lock held by a session that does not lead this channel"
            );
            self.events.push(ConnectionEvent::ElectionBlocked {
                channel: name.clone(),
                holder_pid: *pid,
            });
            self.reported.insert(channel.clone());
        }
        self.suspects = now;
    }

    fn set_leading(&self, channel: &ChannelName, leads: bool) {
        self.leading.set(channel, leads);
    }

    /// The server refused plain `steps` (the session is still up): their
    /// `listen` calls fail and their subscriptions end.
    pub(crate) fn refused(&mut self, steps: &[(ChannelName, Step)], err: &Error) {
        self.dirty = true;
        for (name, step) in steps {
            let Some(ch) = self.channels.get_mut(name.as_str()) else {
                continue;
            };
            if let State::Plain(p) = &mut ch.state {
                *p = Plain::Idle;
            }
            if *step == Step::Listen {
                for w in ch.waiters.drain(..) {
                    let _ = w.send(Err(err.clone()));
                }
                for s in ch.subs.drain(..) {
                    s.queue.close();
                }
            }
        }
    }

    /// Standbys try for the lock again (retry timer).
    pub(crate) fn retry_locks(&mut self) {
        for ch in self.channels.values_mut() {
            if let State::Elected(e) = &mut ch.state {
                e.retry();
                self.dirty = true;
            }
        }
    }

    /// A control message from another session.
    pub(crate) fn heard(&mut self, channel: &str, what: Heard) {
        if let Some(ch) = self.channels.get_mut(channel) {
            if let State::Elected(e) = &mut ch.state {
                e.heard(what);
                self.dirty = true;
            }
        }
    }

    /// This session's own `ready:<channel>` arrived: deliver from here on,
    /// after a take-over gap when the previous leader did not hand over.
    /// (Call after flushing what came before it.)
    pub(crate) fn own_ready(&mut self, channel: &str) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let State::Elected(e) = &mut ch.state else {
            return;
        };
        if e.own_ready() {
            let gap = Gap::new(
                GapCause::TakeOver,
                format!(
                    "took over {channel:?} without a hand-over from a previous leader; \
                     messages sent before this may not have been delivered"
                ),
            );
            for s in &ch.subs {
                s.queue.push_gap(gap.clone());
            }
        }
    }

    /// The connection is gone: nothing is listened to or locked any more.
    /// Waiting `listen` calls return (registered; they take effect on reconnect).
    pub(crate) fn connection_lost(&mut self, reason: &Arc<str>) {
        self.dirty = true;
        self.control = false;
        self.hurry = false;
        for (name, ch) in &mut self.channels {
            match &mut ch.state {
                State::Plain(p) => *p = Plain::Idle,
                State::Elected(e) => {
                    if e.connection_lost() {
                        self.events.push(ConnectionEvent::LockLost {
                            channel: name.clone(),
                            reason: reason.clone(),
                        });
                    }
                }
            }
            for w in ch.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
        self.leading.clear();
        self.channels.retain(|_, ch| ch.wanted());
    }

    /// Channels to listen to on a new connection, marked listened (elected
    /// channels go through a lock attempt first), and whether the control
    /// channel is among them.
    pub(crate) fn relisten_all(&mut self) -> (Vec<ChannelName>, bool) {
        self.channels.retain(|_, ch| ch.wanted());
        let mut channels = Vec::new();
        let mut elected = false;
        for (name, ch) in &mut self.channels {
            match &mut ch.state {
                State::Plain(p) => {
                    *p = Plain::Listened;
                    channels.push(name.clone());
                }
                State::Elected(_) => elected = true,
            }
        }
        self.control = elected;
        (channels, elected)
    }

    /// Channels whose lock this session holds and announced.
    pub(crate) fn leaders(&self) -> Vec<ChannelName> {
        self.channels
            .iter()
            .filter(|(_, ch)| ch.state.leads())
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
        self.leading.remove(channel);
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
        self.leading.clear();
        lock(&self.filtering).clear();
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
            // Only a plain channel or a leader (from its own `ready:` on) delivers.
            let target = self
                .channels
                .get_key_value(first.channel())
                .filter(|(_, ch)| ch.wanted() && ch.state.delivers());
            // Not delivered: looked up again for the next message, which is
            // rare (a channel being unlistened, or not led here).
            let Some((channel, ch)) = target else {
                continue;
            };
            let shared = ch.subs.len() > 1;
            run.push(Received::new(first, shared));
            while let Some(note) = notes.next_if(|n| n.channel() == channel.as_str()) {
                run.push(Received::new(note, shared));
            }
            // Once per run; every subscriber of a channel shares its counters.
            if let Some(s) = ch.subs.first() {
                s.queue.counters().metrics.received(run.len());
            }
            let origin = self.origin;
            let mut slow = false;
            match ch.subs.as_slice() {
                // The only subscriber takes the notifications themselves.
                [only] => {
                    if only.filtered {
                        run.retain(|r| r.origin() != origin);
                    }
                    if !run.is_empty() {
                        slow = only.queue.push_all(run.drain(..), wake);
                    }
                }
                subs => {
                    // Built once per run, only when a subscriber filters.
                    let mut others: Option<Vec<Received>> = None;
                    for s in subs {
                        let batch = if s.filtered {
                            others.get_or_insert_with(|| {
                                run.iter()
                                    .filter(|r| r.origin() != origin)
                                    .cloned()
                                    .collect()
                            })
                        } else {
                            &run
                        };
                        if !batch.is_empty() {
                            slow |= s.queue.push_all(batch.iter().cloned(), wake);
                        }
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
