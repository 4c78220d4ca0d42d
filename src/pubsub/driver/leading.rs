//! [`Leading`]: the channels this instance leads, shared with the handles.
//!
//! Parts of the crate that act on leadership (the durable reader) read it
//! here rather than from the public event stream: that stream is lossy, and
//! a burst of other events could push a `LockLost` out of its buffer. This
//! is state, not a queue of events, so nothing can be missed: a reader
//! wakes on its channel's `watch` and looks at the current term. Watches
//! are per channel so that winning one election (thousands at start-up
//! with many durable consumers) wakes only the readers of that one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::channel::ChannelName;

/// Led channels and their terms. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Leading {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Last term handed out.
    terms: u64,
    /// Led channels, each with the term it was won in.
    led: HashMap<ChannelName, u64>,
    /// Signalled after every change of the channel's leadership.
    watched: HashMap<String, watch::Sender<()>>,
}

impl State {
    fn changed(&self, channel: &str) {
        if let Some(tx) = self.watched.get(channel) {
            tx.send_replace(());
        }
    }
}

/// Wakes when one channel's leadership changes; see [`Leading::watch`].
pub(crate) struct LeadWatch {
    leading: Leading,
    channel: String,
    rx: watch::Receiver<()>,
}

impl LeadWatch {
    /// Forgets the changes seen so far.
    pub(crate) fn mark_unchanged(&mut self) {
        self.rx.mark_unchanged();
    }

    /// Waits for the next change (a change since the last
    /// [`mark_unchanged`](Self::mark_unchanged) returns at once).
    pub(crate) async fn changed(&mut self) {
        // The sender lives in the shared state as long as this does.
        let _ = self.rx.changed().await;
    }

    #[cfg(test)]
    fn has_changed(&self) -> bool {
        self.rx.has_changed().unwrap_or(false)
    }
}

impl Drop for LeadWatch {
    fn drop(&mut self) {
        let mut state = self.leading.lock();
        // Ours is still counted: the last watch of the channel removes it.
        if state
            .watched
            .get(&self.channel)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            state.watched.remove(&self.channel);
        }
    }
}

impl Default for Leading {
    fn default() -> Self {
        Leading {
            inner: Arc::new(Inner {
                state: Mutex::default(),
            }),
        }
    }
}

impl Leading {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whether this instance leads `channel`; winning it again
    /// after losing it starts a new term.
    pub(crate) fn set(&self, channel: &ChannelName, leads: bool) {
        let mut state = self.lock();
        let changed = match (leads, state.led.contains_key(channel.as_str())) {
            (true, false) => {
                state.terms += 1;
                let term = state.terms;
                state.led.insert(channel.clone(), term);
                true
            }
            (false, true) => state.led.remove(channel.as_str()).is_some(),
            _ => false,
        };
        if changed {
            state.changed(channel.as_str());
        }
    }

    pub(crate) fn remove(&self, channel: &str) {
        let mut state = self.lock();
        if state.led.remove(channel).is_some() {
            state.changed(channel);
        }
    }

    pub(crate) fn clear(&self) {
        let mut state = self.lock();
        for (channel, _) in std::mem::take(&mut state.led) {
            state.changed(channel.as_str());
        }
    }

    pub(crate) fn contains(&self, channel: &str) -> bool {
        self.lock().led.contains_key(channel)
    }

    /// The term in which this instance won `channel`, if it leads it.
    pub(crate) fn term(&self, channel: &str) -> Option<u64> {
        self.lock().led.get(channel).copied()
    }

    pub(crate) fn channels(&self) -> Vec<ChannelName> {
        self.lock().led.keys().cloned().collect()
    }

    /// Wakes on every change of `channel`'s leadership.
    pub(crate) fn watch(&self, channel: &str) -> LeadWatch {
        let mut state = self.lock();
        let rx = match state.watched.get(channel) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(());
                state.watched.insert(channel.to_owned(), tx);
                rx
            }
        };
        LeadWatch {
            leading: self.clone(),
            channel: channel.to_owned(),
            rx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winning_again_is_a_new_term() {
        let leading = Leading::default();
        let mut rx = leading.watch("c");
        let ch = ChannelName::new("c").expect("valid");
        leading.set(&ch, true);
        let first = leading.term("c").expect("leads");
        assert!(rx.has_changed());
        rx.mark_unchanged();
        leading.set(&ch, true);
        assert!(!rx.has_changed(), "no change, no wake-up");
        leading.set(&ch, false);
        assert_eq!(leading.term("c"), None);
        leading.set(&ch, true);
        assert_ne!(leading.term("c"), Some(first));
        rx.mark_unchanged();
        leading.clear();
        assert!(!leading.contains("c"));
        assert!(rx.has_changed(), "clear wakes the watchers of led channels");
    }

    #[test]
    fn a_change_wakes_only_that_channels_watchers() {
        let leading = Leading::default();
        let (a, b) = (leading.watch("a"), leading.watch("b"));
        let a2 = leading.watch("a");
        leading.set(&ChannelName::new("a").expect("valid"), true);
        assert!(a.has_changed() && a2.has_changed());
        assert!(!b.has_changed(), "b's leadership did not change");
        drop(a);
        assert_eq!(leading.lock().watched.len(), 2, "a2 still watches a");
        drop((a2, b));
        assert!(leading.lock().watched.is_empty());
    }
}
