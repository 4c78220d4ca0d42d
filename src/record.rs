//! What the crate's tasks record for [`metrics`](crate::metrics), where the
//! work happens: the listener driver, durable publish and readers, queue
//! attempts, the WAL stream.
//!
//! Without the `metrics` feature every type here is empty and every method
//! an inlined no-op, so the hot paths compile to what they were. With it,
//! handles (`metrics::Counter`, ...) are registered once per channel,
//! group, queue or slot and kept, so a message costs an atomic add, not a
//! label allocation and a registry lookup. Handles are registered with the
//! recorder installed at that moment: install it before the handles start
//! (see [`crate::metrics`]).

#[cfg(feature = "metrics")]
mod imp {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use ::metrics::{counter, gauge, histogram, Counter, Histogram};

    use crate::metrics::names;

    /// Per channel of the listener: received, dropped, gaps.
    pub(crate) struct ChannelMetrics {
        received: Counter,
        lagged: Counter,
        gaps: Counter,
    }

    impl ChannelMetrics {
        pub(crate) fn new(channel: &str) -> Self {
            ChannelMetrics {
                received: counter!(names::NOTIFICATIONS_RECEIVED, "channel" => channel.to_owned()),
                lagged: counter!(names::LAGGED, "channel" => channel.to_owned()),
                gaps: counter!(names::GAPS, "channel" => channel.to_owned()),
            }
        }

        #[inline]
        pub(crate) fn received(&self, n: usize) {
            self.received.increment(n as u64);
        }

        #[inline]
        pub(crate) fn lagged(&self, n: u64) {
            self.lagged.increment(n);
        }

        #[inline]
        pub(crate) fn gap(&self) {
            self.gaps.increment(1);
        }
    }

    /// The listener connection came up (`true`) or went down. The gauge
    /// is a sum over the process's handles: each adds its own 1 while up.
    pub(crate) fn listener_connected(up: bool) {
        let g = gauge!(names::LISTENER_CONNECTED);
        if up {
            g.increment(1.0);
        } else {
            g.decrement(1.0);
        }
    }

    pub(crate) fn listener_reconnected() {
        counter!(names::LISTENER_RECONNECTS).increment(1);
    }

    /// One counter handle with its labels, registered once.
    pub(crate) struct Count(Counter);

    impl Count {
        pub(crate) fn durable_delivered(channel: &str, group: &str) -> Self {
            Count(counter!(
                names::DURABLE_DELIVERED,
                "channel" => channel.to_owned(),
                "group" => group.to_owned()
            ))
        }

        #[cfg_attr(not(feature = "wal"), allow(dead_code))]
        pub(crate) fn wal_changes(slot: &str) -> Self {
            Count(counter!(names::WAL_CHANGES, "slot" => slot.to_owned()))
        }

        #[inline]
        pub(crate) fn add(&self, n: usize) {
            self.0.increment(n as u64);
        }
    }

    /// Durable publishes per channel: the handles of the channels this
    /// publisher has seen, so a publish costs a map lookup, not a
    /// registration. Bounded by the channels a process publishes to.
    #[derive(Default)]
    pub(crate) struct Published(Mutex<HashMap<Box<str>, Counter>>);

    impl std::fmt::Debug for Published {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Published")
        }
    }

    impl Published {
        pub(crate) fn add(&self, channel: &str, n: usize) {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get(channel) {
                return c.increment(n as u64);
            }
            let c = counter!(names::DURABLE_PUBLISHED, "channel" => channel.to_owned());
            c.increment(n as u64);
            map.insert(channel.into(), c);
        }
    }

    /// Per queue of a worker: outcomes and handler durations.
    pub(crate) struct QueueMetrics {
        completed: Counter,
        failed: Counter,
        duration: Histogram,
    }

    /// When a handler started.
    #[derive(Clone, Copy)]
    pub(crate) struct Timer(std::time::Instant);

    impl Timer {
        #[inline]
        pub(crate) fn start() -> Self {
            Timer(std::time::Instant::now())
        }
    }

    impl QueueMetrics {
        pub(crate) fn new(queue: &str) -> Self {
            QueueMetrics {
                completed: counter!(names::QUEUE_JOBS_COMPLETED, "queue" => queue.to_owned()),
                failed: counter!(names::QUEUE_JOBS_FAILED, "queue" => queue.to_owned()),
                duration: histogram!(names::QUEUE_JOB_DURATION, "queue" => queue.to_owned()),
            }
        }

        #[inline]
        pub(crate) fn finished(&self, started: Timer, ok: bool) {
            self.duration.record(started.0.elapsed().as_secs_f64());
            if ok {
                self.completed.increment(1);
            } else {
                self.failed.increment(1);
            }
        }
    }

    /// Per relay: settled and dead-lettered messages, retries, lag.
    pub(crate) struct RelayMetrics {
        messages: Counter,
        dead: Counter,
        retries: Counter,
        lag: ::metrics::Gauge,
    }

    impl RelayMetrics {
        pub(crate) fn new(relay: &str) -> Self {
            RelayMetrics {
                messages: counter!(names::RELAY_MESSAGES, "relay" => relay.to_owned()),
                dead: counter!(names::RELAY_DEAD_LETTERED, "relay" => relay.to_owned()),
                retries: counter!(names::RELAY_RETRIES, "relay" => relay.to_owned()),
                lag: gauge!(names::RELAY_LAG_SECONDS, "relay" => relay.to_owned()),
            }
        }

        #[inline]
        pub(crate) fn settled(&self, sent: u64, dead: u64, lag: std::time::Duration) {
            self.messages.increment(sent);
            self.dead.increment(dead);
            self.lag.set(lag.as_secs_f64());
        }

        #[inline]
        pub(crate) fn retry(&self) {
            self.retries.increment(1);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    //! The feature is off: nothing to record, nothing to keep.

    pub(crate) struct ChannelMetrics;

    impl ChannelMetrics {
        #[inline(always)]
        pub(crate) fn new(_: &str) -> Self {
            ChannelMetrics
        }
        #[inline(always)]
        pub(crate) fn received(&self, _: usize) {}
        #[inline(always)]
        pub(crate) fn lagged(&self, _: u64) {}
        #[inline(always)]
        pub(crate) fn gap(&self) {}
    }

    #[inline(always)]
    pub(crate) fn listener_connected(_: bool) {}

    #[inline(always)]
    pub(crate) fn listener_reconnected() {}

    pub(crate) struct Count;

    impl Count {
        #[inline(always)]
        pub(crate) fn durable_delivered(_: &str, _: &str) -> Self {
            Count
        }
        #[cfg_attr(not(feature = "wal"), allow(dead_code))]
        #[inline(always)]
        pub(crate) fn wal_changes(_: &str) -> Self {
            Count
        }
        #[inline(always)]
        pub(crate) fn add(&self, _: usize) {}
    }

    #[derive(Debug, Default)]
    pub(crate) struct Published;

    impl Published {
        #[inline(always)]
        pub(crate) fn add(&self, _: &str, _: usize) {}
    }

    pub(crate) struct QueueMetrics;

    pub(crate) struct RelayMetrics;

    impl RelayMetrics {
        pub(crate) fn new(_: &str) -> Self {
            RelayMetrics
        }

        #[inline]
        pub(crate) fn settled(&self, _: u64, _: u64, _: std::time::Duration) {}

        #[inline]
        pub(crate) fn retry(&self) {}
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Timer;

    impl Timer {
        #[inline(always)]
        pub(crate) fn start() -> Self {
            Timer
        }
    }

    impl QueueMetrics {
        #[inline(always)]
        pub(crate) fn new(_: &str) -> Self {
            QueueMetrics
        }
        #[inline(always)]
        pub(crate) fn finished(&self, _: Timer, _: bool) {}
    }
}

pub(crate) use imp::*;
