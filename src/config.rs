//! Options for [`PgPubSub`](crate::PgPubSub), set through [`Builder`](crate::Builder).

use std::time::Duration;

use crate::error::{Error, Origin, Result};

/// Reconnect delays: the first attempt is immediate, then `initial`, doubling
/// up to `max`, each shortened by up to `jitter` (a fraction, 0.0 to 1.0) at
/// random so that a fleet does not reconnect in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the second attempt.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Fraction of each delay that is randomised away.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: 0.3,
        }
    }
}

impl Backoff {
    /// Delay before attempt `attempt` (1-based) after a loss.
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let doublings = (attempt - 2).min(30);
        let base = self.initial.saturating_mul(1u32 << doublings).min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0) * fastrand::f64();
        base.mul_f64(1.0 - jitter)
    }
}

/// One subscription's own options, set on a [`Listen`](crate::Listen)
/// request; unset ones take the instance defaults.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ListenOptions {
    pub(crate) single_listener: Option<bool>,
    pub(crate) filtered: Option<bool>,
}

/// Everything tunable, with the defaults documented on each [`Builder`](crate::Builder) method.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub backoff: Backoff,
    pub health_check_interval: Duration,
    pub health_check_timeout: Duration,
    pub queue_capacity: usize,
    pub application_name: String,
    pub connect_timeout: Duration,
    pub notify_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub pool_size: usize,
    pub filtered: bool,
    pub single_listener: bool,
    pub lock_retry_interval: Duration,
    pub handover_timeout: Duration,
    pub event_capacity: usize,
    pub auto_migrate: bool,
    /// `Some`: declared by the user; `None`: probed at connect.
    pub transaction_pooling: Option<bool>,
    pub lease_duration: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backoff: Backoff::default(),
            health_check_interval: Duration::from_secs(10),
            health_check_timeout: Duration::from_secs(5),
            queue_capacity: 65_536,
            application_name: "pg-pubsub".to_owned(),
            connect_timeout: Duration::from_secs(10),
            notify_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            pool_size: 16,
            filtered: false,
            single_listener: false,
            lock_retry_interval: Duration::from_millis(500),
            handover_timeout: Duration::from_secs(1),
            event_capacity: 1024,
            auto_migrate: true,
            transaction_pooling: None,
            lease_duration: Duration::from_secs(10),
        }
    }
}

impl Options {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::new(Origin::Config, what.to_owned()));
        if self.queue_capacity == 0 {
            return bad("queue_capacity must be at least 1");
        }
        if self.pool_size == 0 {
            return bad("pool_size must be at least 1");
        }
        if self.event_capacity == 0 {
            return bad("event_capacity must be at least 1");
        }
        if self.health_check_interval.is_zero() || self.health_check_timeout.is_zero() {
            return bad("health check interval and timeout must be above zero");
        }
        if self.lock_retry_interval.is_zero() {
            return bad("lock_retry_interval must be above zero");
        }
        if self.lease_duration < Duration::from_millis(100) {
            return bad("lease_duration must be at least 100 ms");
        }
        if !(0.0..=1.0).contains(&self.backoff.jitter) {
            return bad("backoff jitter must be between 0.0 and 1.0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_capped() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(1), Duration::ZERO);
        assert_eq!(b.delay(2), Duration::from_millis(100));
        assert_eq!(b.delay(3), Duration::from_millis(200));
        assert_eq!(b.delay(100), Duration::from_secs(10));
        let j = Backoff::default();
        for _ in 0..100 {
            let d = j.delay(3);
            assert!(d <= Duration::from_millis(200) && d >= Duration::from_millis(140));
        }
    }
}
