//! [`Stats`]: a snapshot of counters for metrics, from
//! [`PgPubSub::stats`](crate::PgPubSub::stats).
//!
//! Counters are relaxed atomics added to once per batch by the listener
//! task (not per message), and read without stopping it: a snapshot is
//! consistent per counter, not across counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::channel::ChannelName;

/// Counters of one instance, from [`PgPubSub::stats`](crate::PgPubSub::stats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Channels with at least one live subscription, sorted by name.
    pub channels: Vec<ChannelStats>,
    /// Times the listener connection was re-established after a loss.
    pub reconnects: u64,
    /// Elected channels this instance leads now (with
    /// [`Builder::single_listener`](crate::Builder::single_listener)), sorted.
    pub leading: Vec<ChannelName>,
    /// Backend PID of the listener session; `None` while reconnecting.
    pub listener_pid: Option<i32>,
}

impl Stats {
    /// The counters of `channel`, if it has subscriptions.
    pub fn channel(&self, channel: &str) -> Option<&ChannelStats> {
        self.channels.iter().find(|c| c.channel.as_str() == channel)
    }

    /// Whether the listener connection is up.
    pub fn connected(&self) -> bool {
        self.listener_pid.is_some()
    }
}

/// Counters of one channel, summed over its subscriptions.
///
/// They count from the channel's first subscription on; when its last
/// subscription is dropped the channel leaves [`Stats::channels`], and a
/// later subscription starts again from zero.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelStats {
    /// The channel.
    pub channel: ChannelName,
    /// Messages queued to subscriptions (one notification queued to three
    /// subscriptions counts three).
    pub delivered: u64,
    /// Messages dropped because a subscription's queue was full (reported to
    /// it as [`Delivery::Lagged`](crate::Delivery::Lagged)).
    pub lagged: u64,
    /// [`Delivery::Gap`](crate::Delivery::Gap) markers queued to
    /// subscriptions (gaps that arrive before the consumer read the previous
    /// one merge into it and count once).
    pub gaps: u64,
    /// Live subscriptions.
    pub subscribers: usize,
}

/// One channel's counters, shared by its subscriptions' queues.
pub(crate) struct ChannelCounters {
    pub delivered: AtomicU64,
    pub lagged: AtomicU64,
    pub gaps: AtomicU64,
    /// The channel's metric handles (nothing without the `metrics` feature).
    pub metrics: crate::record::ChannelMetrics,
}

impl ChannelCounters {
    pub(crate) fn new(channel: &ChannelName) -> Self {
        ChannelCounters {
            delivered: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            metrics: crate::record::ChannelMetrics::new(channel.as_str()),
        }
    }
}

struct Tracked {
    counters: Arc<ChannelCounters>,
    subscribers: usize,
}

/// Where the counters live, shared by the handles and the listener task.
#[derive(Default)]
pub(crate) struct Board {
    channels: Mutex<HashMap<ChannelName, Tracked>>,
    /// Counted by the listener task on every reconnect.
    pub reconnects: AtomicU64,
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, HashMap<ChannelName, Tracked>> {
        // Every update leaves the map consistent, even one that panicked.
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new subscription to `channel`: the counters its queue adds to.
    pub(crate) fn join(&self, channel: &ChannelName) -> Arc<ChannelCounters> {
        let mut channels = self.lock();
        let tracked = channels.entry(channel.clone()).or_insert_with(|| Tracked {
            counters: Arc::new(ChannelCounters::new(channel)),
            subscribers: 0,
        });
        tracked.subscribers += 1;
        tracked.counters.clone()
    }

    /// A subscription to `channel` was dropped.
    pub(crate) fn leave(&self, channel: &ChannelName) {
        let mut channels = self.lock();
        if let Some(tracked) = channels.get_mut(channel) {
            tracked.subscribers -= 1;
            if tracked.subscribers == 0 {
                channels.remove(channel);
            }
        }
    }

    /// The counters now, with the instance-wide parts given by the caller.
    pub(crate) fn snapshot(
        &self,
        mut leading: Vec<ChannelName>,
        listener_pid: Option<i32>,
    ) -> Stats {
        let mut channels: Vec<ChannelStats> = self
            .lock()
            .iter()
            .map(|(name, t)| ChannelStats {
                channel: name.clone(),
                delivered: t.counters.delivered.load(Relaxed),
                lagged: t.counters.lagged.load(Relaxed),
                gaps: t.counters.gaps.load(Relaxed),
                subscribers: t.subscribers,
            })
            .collect();
        channels.sort_unstable_by(|a, b| a.channel.cmp(&b.channel));
        leading.sort_unstable();
        Stats {
            channels,
            reconnects: self.reconnects.load(Relaxed),
            leading,
            listener_pid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_leave_with_their_last_subscription() {
        let board = Board::default();
        let ch = ChannelName::new("a").unwrap();
        let first = board.join(&ch);
        let second = board.join(&ch);
        assert!(Arc::ptr_eq(&first, &second));
        first.delivered.fetch_add(3, Relaxed);
        board.leave(&ch);
        let stats = board.snapshot(Vec::new(), None);
        let a = stats.channel("a").unwrap();
        assert_eq!((a.delivered, a.subscribers), (3, 1));
        board.leave(&ch);
        assert!(board.snapshot(Vec::new(), None).channels.is_empty());
        // A new subscription starts from zero.
        board.join(&ch);
        assert_eq!(board.snapshot(Vec::new(), None).channels[0].delivered, 0);
    }
}
