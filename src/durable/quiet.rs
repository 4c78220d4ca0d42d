//! What this process remembers of each channel's quiet flag, so that a
//! publish need not look it up: the lookup cost about a tenth of a
//! one-message publish.
//!
//! A flag is trusted for [`FRESH`]; after that the next publish on the
//! channel runs the statement that reads it again. A flag changed by
//! another process is thus seen within a second (a wake-up too many, or a
//! poll interval of delay, never a lost message); one changed through the
//! same [`Durable`](super::Durable) at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a flag read from the database is trusted.
pub(crate) const FRESH: Duration = Duration::from_secs(1);
/// Channels remembered before the memory is cleared (a bound for
/// processes that publish on ever new channel names).
const MAX_CHANNELS: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct QuietFlags {
    flags: Mutex<HashMap<String, (bool, Instant)>>,
}

impl QuietFlags {
    /// The flag of `channel` if it was read less than [`FRESH`] ago.
    pub(crate) fn get(&self, channel: &str, now: Instant) -> Option<bool> {
        let flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        flags
            .get(channel)
            .filter(|(_, at)| now.saturating_duration_since(*at) < FRESH)
            .map(|(quiet, _)| *quiet)
    }

    /// Remembers that `channel` was `quiet` at `now`.
    pub(crate) fn set(&self, channel: &str, quiet: bool, now: Instant) {
        let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        if flags.len() >= MAX_CHANNELS && !flags.contains_key(channel) {
            flags.clear();
        }
        match flags.get_mut(channel) {
            Some(entry) => *entry = (quiet, now),
            None => {
                flags.insert(channel.to_owned(), (quiet, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_set() {
        let flags = QuietFlags::default();
        let now = Instant::now();
        assert_eq!(flags.get("a", now), None);
        flags.set("a", true, now);
        assert_eq!(flags.get("a", now), Some(true));
        assert_eq!(flags.get("b", now), None);
    }

    #[test]
    fn stale_after_fresh_period() {
        let flags = QuietFlags::default();
        let then = Instant::now();
        flags.set("a", false, then);
        assert_eq!(flags.get("a", then + FRESH / 2), Some(false));
        assert_eq!(flags.get("a", then + FRESH), None);
        flags.set("a", true, then + FRESH);
        assert_eq!(flags.get("a", then + FRESH), Some(true));
    }

    #[test]
    fn bounded() {
        let flags = QuietFlags::default();
        let now = Instant::now();
        for i in 0..MAX_CHANNELS {
            flags.set(&format!("c{i}"), false, now);
        }
        flags.set("c0", true, now);
        assert_eq!(
            flags.get("c1", now),
            Some(false),
            "updating a known channel keeps the rest"
        );
        flags.set("new", true, now);
        assert_eq!(flags.get("c1", now), None, "full: cleared");
        assert_eq!(flags.get("new", now), Some(true));
    }
}
