//! [`Leading`]: the channels this instance leads, shared with the handles.
//!
//! Parts of the crate that act on leadership (the durable reader) read it
//! here rather than from the public event stream: that stream is lossy, and
//! a burst of other events could push a `LockLost` out of its buffer. This
//! is state, not a queue of events, so nothing can be missed: a reader
//! wakes on `watch` and looks at the current term.

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
    /// Signalled after every change.
    changed: watch::Sender<()>,
}

#[derive(Default)]
struct State {
    /// Last term handed out.
    terms: u64,
    /// Led channels, each with the term it was won in.
    led: HashMap<ChannelName, u64>,
}

impl Default for Leading {
    fn default() -> Self {
        Leading {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                changed: watch::Sender::new(()),
            }),
        }
    }
}

impl Leading {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.inner.changed.send_replace(());
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
        drop(state);
        if changed {
            self.changed();
        }
    }

    pub(crate) fn remove(&self, channel: &str) {
        let removed = self.lock().led.remove(channel).is_some();
        if removed {
            self.changed();
        }
    }

    pub(crate) fn clear(&self) {
        let mut state = self.lock();
        let had = !state.led.is_empty();
        state.led.clear();
        drop(state);
        if had {
            self.changed();
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

    /// Wakes on every change.
    pub(crate) fn watch(&self) -> watch::Receiver<()> {
        self.inner.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winning_again_is_a_new_term() {
        let leading = Leading::default();
        let mut rx = leading.watch();
        let ch = ChannelName::new("c").expect("valid");
        leading.set(&ch, true);
        let first = leading.term("c").expect("leads");
        assert!(rx.has_changed().unwrap_or(false));
        rx.mark_unchanged();
        leading.set(&ch, true);
        assert!(!rx.has_changed().unwrap_or(true), "no change, no wake-up");
        leading.set(&ch, false);
        assert_eq!(leading.term("c"), None);
        leading.set(&ch, true);
        assert_ne!(leading.term("c"), Some(first));
        leading.clear();
        assert!(!leading.contains("c"));
    }
}
