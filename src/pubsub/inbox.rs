//! A subscriber's bounded queue (its inbox), filled by the listener task and
//! drained by the subscription.
//!
//! Why not `tokio::sync::mpsc`: a full queue must drop the message and report
//! how many were dropped *in order*, gaps must never be dropped, and the
//! consumer takes everything queued with one lock (batch hand-over) while the
//! listener wakes it once per batch rather than once per message.

use std::collections::VecDeque;
use std::mem;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::message::{Gap, Received, Run};
use crate::stats::ChannelCounters;

pub(crate) enum Entry {
    Message(Received),
    /// Notifications `start..end` of a run shared with other subscribers.
    Run(Arc<Run>, u32, u32),
    Lagged(u64),
    Gap(Gap),
}

pub(crate) struct Queue {
    capacity: usize,
    inner: Mutex<Inner>,
    /// The channel's counters for [`stats`](crate::PgPubSub::stats),
    /// added to once per batch.
    counters: Arc<ChannelCounters>,
}

#[derive(Default)]
struct Inner {
    entries: VecDeque<Entry>,
    /// Messages in `entries` (markers do not count against the capacity).
    messages: usize,
    /// Messages dropped since the last one queued.
    dropped: u64,
    closed: bool,
    waker: Option<Waker>,
}

impl Queue {
    pub(crate) fn new(capacity: usize, counters: Arc<ChannelCounters>) -> Self {
        Queue {
            capacity,
            inner: Mutex::new(Inner::default()),
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `messages` in order, dropping (and counting) what does not
    /// fit. The consumer's waker, if it waits, is moved to `wake` so the
    /// caller can wake once per batch. Returns true when this starts a run
    /// of drops.
    pub(crate) fn push_all<I>(&self, messages: I, wake: &mut Vec<Waker>) -> bool
    where
        I: ExactSizeIterator<Item = Received>,
    {
        let total = messages.len();
        self.admit(total, wake, |entries, fits| {
            if fits * 2 < total {
                // Most of the run is dropped: do not pin it for the rest.
                let mut kept: Vec<Received> = messages.take(fits).collect();
                crate::message::compact(&mut kept, total);
                entries.extend(kept.into_iter().map(Entry::Message));
            } else {
                entries.extend(messages.take(fits).map(Entry::Message));
            }
        })
    }

    /// Queues a shared run as one entry, dropping (and counting) what does
    /// not fit, as [`push_all`](Self::push_all) does.
    pub(crate) fn push_run(&self, run: &Arc<Run>, wake: &mut Vec<Waker>) -> bool {
        let total = run.len() as usize;
        self.admit(total, wake, |entries, fits| {
            if fits * 2 < total {
                // Most of the run is dropped: do not pin it for the rest.
                let mut kept: Vec<Received> = (0..fits as u32)
                    .map(|i| Received::InRun(run.clone(), i))
                    .collect();
                crate::message::compact(&mut kept, total);
                entries.extend(kept.into_iter().map(Entry::Message));
            } else {
                entries.push_back(Entry::Run(run.clone(), 0, fits as u32));
            }
        })
    }

    /// Admits as many of `total` messages as fit (`put` queues the first
    /// `fits` of them), counts the rest as dropped, and moves a waiting
    /// consumer's waker to `wake`. True when this starts a run of drops.
    fn admit(
        &self,
        total: usize,
        wake: &mut Vec<Waker>,
        put: impl FnOnce(&mut VecDeque<Entry>, usize),
    ) -> bool {
        let mut inner = self.lock();
        let was_dropping = inner.dropped > 0;
        let fits = self.capacity.saturating_sub(inner.messages).min(total);
        let dropped = total - fits;
        if fits > 0 {
            if inner.dropped > 0 {
                let dropped = mem::take(&mut inner.dropped);
                inner.entries.push_back(Entry::Lagged(dropped));
            }
            put(&mut inner.entries, fits);
            inner.messages += fits;
            if let Some(w) = inner.waker.take() {
                wake.push(w);
            }
        }
        inner.dropped += dropped as u64;
        drop(inner);
        self.counters.delivered.fetch_add(fits as u64, Relaxed);
        if dropped > 0 {
            self.counters.lagged.fetch_add(dropped as u64, Relaxed);
            self.counters.metrics.lagged(dropped as u64);
        }
        !was_dropping && dropped > 0
    }

    /// Queues a gap marker; never dropped, consecutive gaps of one cause
    /// merge (and count as one).
    pub(crate) fn push_gap(&self, gap: Gap) {
        let mut inner = self.lock();
        if inner.dropped > 0 {
            let dropped = mem::take(&mut inner.dropped);
            inner.entries.push_back(Entry::Lagged(dropped));
        }
        let absorbed = match inner.entries.back_mut() {
            Some(Entry::Gap(last)) => last.absorb(&gap),
            _ => false,
        };
        if !absorbed {
            inner.entries.push_back(Entry::Gap(gap));
            self.counters.gaps.fetch_add(1, Relaxed);
            self.counters.metrics.gap();
        }
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }

    /// The channel's counters.
    pub(crate) fn counters(&self) -> &ChannelCounters {
        &self.counters
    }

    /// Ends the stream once the queued entries are consumed.
    pub(crate) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }

    /// Moves everything queued into `into` (which must be empty).
    /// `Ready(false)` means closed and drained.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>, into: &mut VecDeque<Entry>) -> Poll<bool> {
        let mut inner = self.lock();
        if !inner.entries.is_empty() {
            mem::swap(&mut inner.entries, into);
            inner.messages = 0;
            return Poll::Ready(true);
        }
        if inner.dropped > 0 {
            into.push_back(Entry::Lagged(mem::take(&mut inner.dropped)));
            return Poll::Ready(true);
        }
        if inner.closed {
            return Poll::Ready(false);
        }
        match &mut inner.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
