//! A subscriber's bounded queue, filled by the listener task and drained by
//! the subscription.
//!
//! Why not `tokio::sync::mpsc`: a full queue must drop the message and report
//! how many were dropped *in order*, gaps must never be dropped, and the
//! consumer takes everything queued with one lock (batch hand-over) while the
//! listener wakes it once per batch rather than once per message.

use std::collections::VecDeque;
use std::mem;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::message::{Gap, Received};

pub(crate) enum Entry {
    Message(Received),
    Lagged(u64),
    Gap(Gap),
}

pub(crate) struct Queue {
    capacity: usize,
    inner: Mutex<Inner>,
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
    pub(crate) fn new(capacity: usize) -> Self {
        Queue {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues clones of `messages`, dropping what does not fit. The
    /// consumer's waker, if it waits, is moved to `wake` so the caller can
    /// wake once per batch. Returns true when this starts a run of drops.
    pub(crate) fn push_all(&self, messages: &[Received], wake: &mut Vec<Waker>) -> bool {
        let mut inner = self.lock();
        let was_dropping = inner.dropped > 0;
        let room = self.capacity.saturating_sub(inner.messages);
        let (fits, rest) = messages.split_at(room.min(messages.len()));
        if !fits.is_empty() {
            if inner.dropped > 0 {
                let dropped = mem::take(&mut inner.dropped);
                inner.entries.push_back(Entry::Lagged(dropped));
            }
            inner
                .entries
                .extend(fits.iter().cloned().map(Entry::Message));
            inner.messages += fits.len();
            if let Some(w) = inner.waker.take() {
                wake.push(w);
            }
        }
        inner.dropped += rest.len() as u64;
        !was_dropping && !rest.is_empty()
    }

    /// Queues a gap marker; never dropped, consecutive gaps of one cause merge.
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
        }
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
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
