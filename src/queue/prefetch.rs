//! How many claimed jobs a worker keeps waiting for a free handler.
//!
//! A claim is a round trip. Handlers that finish faster than that would
//! sit idle until it returns, unless enough jobs wait in the worker to
//! cover it: with 8 no-op handlers, 8 waiting jobs gave 22k jobs/s and 256
//! gave 83k (BENCHMARKS.md). Slow handlers need none of that, and jobs held
//! by one worker are jobs another worker of the fleet cannot take. So by
//! default the buffer adapts, as a congestion window does: it doubles when
//! handlers ran out of work while a claim that came back full was on the
//! wire, and shrinks by an eighth after each claim that did not starve
//! them, between the concurrency and [`MAX`].
//!
//! Under limits the buffer adapts too (waiting jobs count as running for
//! them): claims come back short when a limit binds, and short claims
//! never grow it. With a per-key limit of 1 over 256 keys, 8 no-op
//! handlers ran 20-24k jobs/s with the adaptive buffer, 7-8k with the
//! concurrency alone.

/// The adaptive buffer's ceiling.
pub(super) const MAX: usize = 256;

/// The number of jobs a worker may hold beyond its running handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Prefetch {
    /// Set by the user (`WorkerBuilder::prefetch`): never adapted.
    fixed: Option<usize>,
    /// The smallest adaptive buffer (the concurrency).
    min: usize,
    /// The adaptive buffer now.
    window: usize,
    /// Handlers ran out of work during the claim under way.
    starved: bool,
}

impl Prefetch {
    /// `fixed` if the user chose one; else adaptive from `concurrency`.
    pub(super) fn new(fixed: Option<usize>, concurrency: usize) -> Self {
        Prefetch {
            fixed,
            min: concurrency,
            window: concurrency,
            starved: false,
        }
    }

    /// The buffer to keep now.
    pub(super) fn get(&self) -> usize {
        self.fixed.unwrap_or(self.window)
    }

    /// A claim is under way, a handler is free and no job waits.
    pub(super) fn starving(&mut self) {
        self.starved = true;
    }

    /// The claim under way asked for `asked` jobs and got `got`.
    pub(super) fn claimed(&mut self, asked: usize, got: usize) {
        if std::mem::take(&mut self.starved) && got == asked {
            // More work is due than the buffer covers.
            self.window = (self.window * 2).clamp(self.min, MAX.max(self.min));
        } else {
            self.window = (self.window - self.window / 8).max(self.min);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chosen_prefetch_never_moves() {
        let mut p = Prefetch::new(Some(3), 8);
        p.starving();
        p.claimed(11, 11);
        assert_eq!(p.get(), 3);
    }

    #[test]
    fn doubles_while_handlers_starve_on_full_claims_up_to_the_ceiling() {
        let mut p = Prefetch::new(None, 8);
        assert_eq!(p.get(), 8);
        let mut seen = vec![];
        for _ in 0..8 {
            p.starving();
            p.claimed(10, 10);
            seen.push(p.get());
        }
        assert_eq!(seen, [16, 32, 64, 128, 256, 256, 256, 256]);
    }

    #[test]
    fn a_short_claim_is_no_reason_to_grow() {
        // The queue ran dry: a bigger buffer would not have helped.
        let mut p = Prefetch::new(None, 8);
        p.starving();
        p.claimed(10, 4);
        assert_eq!(p.get(), 8);
    }

    #[test]
    fn shrinks_to_the_concurrency_once_handlers_keep_up() {
        let mut p = Prefetch::new(None, 8);
        for _ in 0..5 {
            p.starving();
            p.claimed(1, 1);
        }
        assert_eq!(p.get(), 256);
        p.claimed(1, 1);
        assert_eq!(p.get(), 224);
        for _ in 0..100 {
            p.claimed(1, 1);
        }
        assert_eq!(p.get(), 8);
    }

    #[test]
    fn starvation_counts_for_one_claim_only() {
        let mut p = Prefetch::new(None, 8);
        p.starving();
        p.claimed(5, 5);
        p.claimed(5, 5);
        assert_eq!(p.get(), 16 - 2);
    }

    #[test]
    fn a_large_concurrency_is_its_own_floor() {
        let mut big = Prefetch::new(None, 500);
        big.starving();
        big.claimed(1, 1);
        assert_eq!(big.get(), 500);
    }
}
