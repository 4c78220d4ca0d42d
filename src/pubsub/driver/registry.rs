//! Which channels have subscribers, what the server is listening to, which
//! elected channels this instance leads, and fan-out of received
//! notifications to subscriber queues.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use bytes::BytesMut;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::election::{Answer, CONTROL_CHANNEL};
use super::role::{Election, Heard, Plain, Step};
use crate::channel::ChannelName;
use crate::error::{Error, Origin, Result};
use crate::event::ConnectionEvent;
use crate::frame::{self, Frame};
use crate::inbox::Queue;
use crate::message::{compact, Gap, GapCause, Note, Received, Run};
use crate::wire;

pub(crate) type SubId = u64;

/// A run's buffer holds at most this much (or one frame): a message the
/// application keeps keeps its run's buffer, so that stays small, while
/// one allocation still serves about fifty notifications.
const RUN_BYTES: usize = 4096;
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
    /// This instance's origin as in a header: filtered subscribers skip
    /// messages tagged with it.
    origin_hex: [u8; 32],
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
    /// Received, not yet delivered (see `flush`): whole frames, and each
    /// one's length and channel name length.
    staged: BytesMut,
    index: Vec<(u32, u8)>,
    /// Scratch space for `flush`, kept to reuse its allocation.
    run: Vec<Note>,
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
            origin_hex: wire::hex(shared.origin),
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

    /// Queues a received notification (a frame [`frame::parse`] accepted);
    /// [`flush`](Self::flush) delivers it.
    pub(crate) fn stage(&mut self, note: &Frame<'_>) {
        self.staged.extend_from_slice(note.bytes);
        // A channel name is below 64 bytes, a frame below 8 kB.
        self.index
            .push((note.bytes.len() as u32, note.channel.len() as u8));
    }

    /// Fans staged notifications out to subscriber queues: one lookup, one
    /// allocation (the run's frames, copied) and one lock per subscriber
    /// per run of one channel, rather than per message. Wakers of consumers
    /// to wake are collected in `wake`.
    pub(crate) fn flush(&mut self, wake: &mut Vec<Waker>) {
        let staged = std::mem::take(&mut self.staged);
        let index = std::mem::take(&mut self.index);
        let mut run = std::mem::take(&mut self.run);
        let (mut at, mut i) = (0, 0);
        while i < index.len() {
            // The run: this frame and the following ones of its channel.
            let (len, channel_len) = index[i];
            let channel = frame::channel_bytes(&staged[at..], channel_len.into());
            let (start, mut end, first) = (at, at + len as usize, i);
            i += 1;
            while let Some(&(len, cl)) = index.get(i) {
                if cl != channel_len
                    || end - start + len as usize > RUN_BYTES
                    || frame::channel_bytes(&staged[end..], cl.into()) != channel
                {
                    break;
                }
                end += len as usize;
                i += 1;
            }
            at = end;
            // Only a plain channel or a leader (from its own `ready:` on) delivers.
            let target = std::str::from_utf8(channel)
                .ok()
                .and_then(|name| self.channels.get_key_value(name))
                .filter(|(_, ch)| ch.wanted() && ch.state.delivers());
            let Some((channel, ch)) = target else {
                continue;
            };
            let frames = frame::copy_run(&staged[start..end]);
            let mut off = 0;
            for &(len, cl) in &index[first..i] {
                run.push(Note::new(frames.slice(off..off + len as usize), cl));
                off += len as usize;
            }
            // Once per run; every subscriber of a channel shares its counters.
            if let Some(s) = ch.subs.first() {
                s.queue.counters().metrics.received(run.len());
            }
            let origin = &self.origin_hex;
            let mut slow = false;
            match ch.subs.as_slice() {
                // The only subscriber takes the notifications themselves.
                [only] if only.filtered => {
                    let mut mine: Vec<Received> = run.drain(..).map(Received::Own).collect();
                    let before = mine.len();
                    mine.retain(|r| !r.is_from(origin));
                    compact(&mut mine, before);
                    if !mine.is_empty() {
                        slow = only.queue.push_all(mine.into_iter(), wake);
                    }
                }
                [only] => slow = only.queue.push_all(run.drain(..).map(Received::Own), wake),
                // Several share the run: one entry each.
                subs => {
                    let shared = Arc::new(Run::new(std::mem::take(&mut run)));
                    // Built once per run, only when a subscriber filters.
                    let mut others: Option<Vec<Received>> = None;
                    for s in subs {
                        if !s.filtered {
                            slow |= s.queue.push_run(&shared, wake);
                            continue;
                        }
                        let batch = others.get_or_insert_with(|| {
                            let mut kept: Vec<Received> = (0..shared.len())
                                .filter(|&i| !shared.is_from(i, origin))
                                .map(|i| Received::InRun(shared.clone(), i))
                                .collect();
                            compact(&mut kept, shared.len() as usize);
                            kept
                        });
                        if !batch.is_empty() {
                            slow |= s.queue.push_all(batch.iter().cloned(), wake);
                        }
                    }
                }
            }
            if slow {
                let channel = channel.clone();
                tracing::warn!(%channel, "pg-pubsub subscriber too slow; dropping its messages");
                self.events.push(ConnectionEvent::SlowConsumer { channel });
            }
        }
        let (mut staged, mut index) = (staged, index);
        staged.clear();
        index.clear();
        self.staged = staged;
        self.index = index;
        self.run = run;
    }
}

#[cfg(test)]
mod tests {
    //! Fan-out without a server: subscriptions registered as the listener
    //! task registers them, notifications staged and flushed as it does.

    use std::collections::VecDeque;
    use std::sync::atomic::Ordering::Relaxed;
    use std::task::{Context, Poll};

    use super::*;
    use crate::inbox::Entry;
    use crate::message::Message;
    use crate::stats::ChannelCounters;
    use crate::wire;

    /// Notification frames, as the tap takes them off the socket.
    fn notifications(notes: &[(&str, &str)]) -> BytesMut {
        let mut frames = BytesMut::new();
        for (channel, payload) in notes {
            frame::push_parts(&mut frames, 4242, channel, payload);
        }
        frames
    }

    fn registry(origin: Uuid) -> Registry {
        Registry::new(Shared {
            origin,
            leading: super::super::Leading::default(),
            filtering: ChannelSet::default(),
            board: Arc::default(),
        })
    }

    fn name(channel: &str) -> ChannelName {
        ChannelName::new(channel).expect("a valid channel name")
    }

    /// A plain subscription, registered offline (answered at once), with
    /// a queue of `capacity` and its own counters.
    fn subscribe(
        registry: &mut Registry,
        channel: &str,
        id: SubId,
        capacity: usize,
        filtered: bool,
    ) -> (Arc<Queue>, Arc<ChannelCounters>) {
        let counters = Arc::new(ChannelCounters::new(&name(channel)));
        let queue = Arc::new(Queue::new(capacity, counters.clone()));
        let (reply, mut answer) = oneshot::channel();
        let mode = Mode {
            elected: false,
            filtered,
        };
        registry.subscribe(name(channel), id, queue.clone(), mode, reply, false);
        assert!(matches!(answer.try_recv(), Ok(Ok(()))));
        (queue, counters)
    }

    fn deliver(registry: &mut Registry, notes: &[(&str, &str)]) {
        let frames = notifications(notes);
        for note in frame::frames(&frames) {
            registry.stage(&note.expect("a well-formed frame"));
        }
        registry.flush(&mut Vec::new());
    }

    /// Everything queued now, as the subscription would take it.
    fn take(queue: &Queue) -> VecDeque<Entry> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut entries = VecDeque::new();
        match queue.poll_take(&mut cx, &mut entries) {
            Poll::Ready(true) | Poll::Pending => entries,
            Poll::Ready(false) => panic!("the queue was closed"),
        }
    }

    /// The bodies of the queued messages; `Err(n)` for a lag of `n`.
    fn bodies(entries: &VecDeque<Entry>) -> Vec<Result<String, u64>> {
        entries
            .iter()
            .flat_map(|e| match e {
                Entry::Message(r) => vec![Ok(r.body().to_owned())],
                Entry::Run(run, start, end) => (*start..*end)
                    .map(|i| Ok(Received::InRun(run.clone(), i).body().to_owned()))
                    .collect(),
                Entry::Lagged(n) => vec![Err(*n)],
                Entry::Gap(_) => panic!("no gap expected"),
            })
            .collect()
    }

    fn tagged(origin: Uuid, body: &str) -> String {
        wire::encode(Some(origin), body)
            .expect("a valid payload")
            .into_owned()
    }

    #[test]
    fn every_subscription_of_a_channel_gets_each_notification_in_order() {
        let mut registry = registry(Uuid::new_v4());
        let subs: Vec<_> = (1..=3)
            .map(|id| subscribe(&mut registry, "orders", id, 10, false).0)
            .collect();
        let (other, _) = subscribe(&mut registry, "other", 4, 10, false);
        deliver(
            &mut registry,
            &[
                ("orders", "a"),
                ("orders", "b"),
                ("other", "x"),
                ("orders", "c"),
            ],
        );
        for queue in &subs {
            assert_eq!(
                bodies(&take(queue)),
                [Ok("a".to_owned()), Ok("b".to_owned()), Ok("c".to_owned())]
            );
        }
        assert_eq!(bodies(&take(&other)), [Ok("x".to_owned())]);
        assert!(registry.events.is_empty());
    }

    #[test]
    fn subscriptions_of_one_channel_share_one_notification_and_one_decoded_value() {
        let mut registry = registry(Uuid::new_v4());
        let (a, _) = subscribe(&mut registry, "orders", 1, 10, false);
        let (b, _) = subscribe(&mut registry, "orders", 2, 10, false);
        let (only, _) = subscribe(&mut registry, "alone", 3, 10, false);
        deliver(&mut registry, &[("orders", "\"7\""), ("alone", "\"8\"")]);
        let (a, b) = (take(&a).pop_front(), take(&b).pop_front());
        let (Some(Entry::Run(ra, 0, 1)), Some(Entry::Run(rb, 0, 1))) = (a, b) else {
            panic!("one run of one message each");
        };
        assert!(
            Arc::ptr_eq(&ra, &rb),
            "a channel's subscribers share its notifications"
        );
        let (a, b) = (Received::InRun(ra, 0), Received::InRun(rb, 0));
        let decode: fn(&str) -> serde_json::Result<String> = |s| serde_json::from_str(s);
        // The first to decode keeps the value; the other reads it.
        assert!(matches!(a.decode(decode), Ok(None)));
        assert!(matches!(b.decode(decode), Ok(None)));
        assert_eq!(Message::<String>::new(b, None).payload(), "7");
        // The only subscriber of a channel owns its notification.
        let Some(Entry::Message(own)) = take(&only).pop_front() else {
            panic!("one message");
        };
        assert!(matches!(own, Received::Own(_)));
        assert!(matches!(own.decode(decode), Ok(Some(s)) if s == "8"));
    }

    #[test]
    fn a_filtered_subscription_skips_its_own_origin_and_an_unfiltered_one_gets_it() {
        let (me, them) = (Uuid::new_v4(), Uuid::new_v4());
        let mut registry = registry(me);
        let (filtered, _) = subscribe(&mut registry, "orders", 1, 10, true);
        let (unfiltered, _) = subscribe(&mut registry, "orders", 2, 10, false);
        let (alone, _) = subscribe(&mut registry, "audit", 3, 10, true);
        assert!(lock(&registry.filtering).contains("orders"));
        let (mine, theirs) = (tagged(me, "mine"), tagged(them, "theirs"));
        deliver(
            &mut registry,
            &[
                ("orders", &mine),
                ("orders", &theirs),
                ("orders", "untagged"),
                ("audit", &mine),
                ("audit", &theirs),
            ],
        );
        assert_eq!(
            bodies(&take(&filtered)),
            [Ok("theirs".to_owned()), Ok("untagged".to_owned())]
        );
        assert_eq!(
            bodies(&take(&unfiltered)),
            [
                Ok("mine".to_owned()),
                Ok("theirs".to_owned()),
                Ok("untagged".to_owned())
            ]
        );
        // A channel's only subscriber filters too.
        assert_eq!(bodies(&take(&alone)), [Ok("theirs".to_owned())]);
        // Nothing but its own: nothing queued, nobody woken.
        deliver(&mut registry, &[("audit", &mine)]);
        assert!(take(&alone).is_empty());
    }

    #[test]
    fn a_full_queue_counts_a_lag_without_holding_back_the_others() {
        let mut registry = registry(Uuid::new_v4());
        let (slow, slow_counts) = subscribe(&mut registry, "orders", 1, 2, false);
        let (fast, fast_counts) = subscribe(&mut registry, "orders", 2, 10, false);
        let notes = [
            ("orders", "1"),
            ("orders", "2"),
            ("orders", "3"),
            ("orders", "4"),
            ("orders", "5"),
        ];
        deliver(&mut registry, &notes);
        let slow_events = |registry: &Registry| {
            let slow = |e: &&ConnectionEvent| match e {
                ConnectionEvent::SlowConsumer { channel } => channel.as_str() == "orders",
                _ => false,
            };
            registry.events.iter().filter(slow).count()
        };
        assert_eq!(slow_events(&registry), 1);
        assert_eq!(
            bodies(&take(&fast)),
            [
                Ok("1".to_owned()),
                Ok("2".to_owned()),
                Ok("3".to_owned()),
                Ok("4".to_owned()),
                Ok("5".to_owned())
            ]
        );
        assert_eq!(
            bodies(&take(&slow)),
            [Ok("1".to_owned()), Ok("2".to_owned())]
        );
        assert_eq!(slow_counts.lagged.load(Relaxed), 3);
        assert_eq!(fast_counts.lagged.load(Relaxed), 0);
        // Room again: the lag comes first, in order, and the same run of
        // drops is reported once.
        deliver(&mut registry, &[("orders", "6")]);
        assert_eq!(bodies(&take(&slow)), [Err(3), Ok("6".to_owned())]);
        assert_eq!(bodies(&take(&fast)), [Ok("6".to_owned())]);
        assert_eq!(slow_events(&registry), 1);
        assert_eq!(slow_counts.delivered.load(Relaxed), 3);
        assert_eq!(fast_counts.delivered.load(Relaxed), 6);
    }

    #[test]
    fn a_shared_run_yields_each_notification_in_order_to_each_subscription() {
        use futures::StreamExt;
        let mut registry = registry(Uuid::new_v4());
        let (a, _) = subscribe(&mut registry, "orders", 1, 10, false);
        let (b, _) = subscribe(&mut registry, "orders", 2, 10, false);
        deliver(
            &mut registry,
            &[("orders", "1"), ("orders", "2"), ("orders", "x")],
        );
        let (cmds, _rx) = tokio::sync::mpsc::unbounded_channel();
        let decode: crate::subscription::Decoder<u32> = |s| serde_json::from_str(s);
        for (id, queue) in [(1, a), (2, b)] {
            let mut sub = crate::Subscription::new(
                name("orders"),
                id,
                queue.clone(),
                decode,
                cmds.clone(),
                Arc::default(),
            );
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut got = Vec::new();
            while let Poll::Ready(Some(d)) = sub.poll_next_unpin(&mut cx) {
                got.push(match d {
                    crate::Delivery::Message(m) => Ok(*m.payload()),
                    crate::Delivery::Undecodable(e) => Err(e.raw().to_owned()),
                    other => panic!("unexpected {other:?}"),
                });
            }
            assert_eq!(got, [Ok(1), Ok(2), Err("x".to_owned())]);
        }
    }

    #[test]
    fn a_dropped_subscription_is_removed() {
        let mut registry = registry(Uuid::new_v4());
        let (gone, _) = subscribe(&mut registry, "orders", 1, 10, true);
        let (kept, _) = subscribe(&mut registry, "orders", 2, 10, false);
        registry.unsubscribe("orders", 1);
        assert!(
            !lock(&registry.filtering).contains("orders"),
            "no filtered subscription left"
        );
        deliver(&mut registry, &[("orders", "a")]);
        assert!(take(&gone).is_empty());
        assert_eq!(bodies(&take(&kept)), [Ok("a".to_owned())]);
        // The last one: the channel is forgotten (it was never listened
        // to, being offline) and nothing is delivered any more.
        registry.unsubscribe("orders", 2);
        assert!(registry.plan().is_empty());
        assert!(registry.channels.is_empty());
        deliver(&mut registry, &[("orders", "b")]);
        assert!(take(&kept).is_empty());
    }
}
