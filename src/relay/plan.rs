//! The relay loop's decisions, without I/O: given what the broker answered
//! for a batch, how far the source may be acked, what goes to the
//! dead-letter channel, and whether (and when) to publish the rest again.

use std::time::Duration;

use super::sink::{Confirm, SinkError};
use crate::config::Backoff;

/// What to do after one publish of a batch.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Step {
    /// How many messages at the front of the batch are settled (confirmed
    /// or dead-lettered): the source is acked up to there, once the dead
    /// letters among them are written.
    pub(crate) settled: usize,
    /// Settled messages that go to the dead-letter channel, with why.
    pub(crate) dead: Vec<(usize, String)>,
    /// Settled messages the broker said it already had.
    pub(crate) duplicates: usize,
    /// Publish `batch[settled..]` again after this delay, because of this
    /// error; `None`: the batch is done.
    pub(crate) retry: Option<(Duration, String)>,
}

/// The retry state carried from one publish to the next.
#[derive(Debug, Clone)]
pub(crate) struct RetryPlan {
    backoff: Backoff,
    /// A message refused this many times while the broker confirmed
    /// others is dead-lettered (it is the message, not the broker).
    max_refusals: u32,
    /// Publishes in a row that settled nothing.
    failures: u32,
    /// Times the batch's first unsettled message was refused (retryably)
    /// while the broker confirmed messages after it.
    refusals: u32,
}

impl RetryPlan {
    pub(crate) fn new(backoff: Backoff, max_refusals: u32) -> Self {
        RetryPlan {
            backoff,
            max_refusals: max_refusals.max(1),
            failures: 0,
            refusals: 0,
        }
    }

    /// Publishes in a row that settled nothing (0 after any progress).
    #[cfg(test)]
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Decides on the broker's `answers` for the unsettled part of a batch
    /// (one per message, in order; missing answers count as retryable
    /// failures).
    pub(crate) fn decide(&mut self, answers: &[Result<Confirm, SinkError>], len: usize) -> Step {
        let mut step = Step::default();
        let mut i = 0;
        while i < len {
            match answers.get(i) {
                Some(Ok(Confirm::Stored)) => {}
                Some(Ok(Confirm::Duplicate)) => step.duplicates += 1,
                Some(Err(e)) if !e.is_retryable() => step.dead.push((i, e.to_string())),
                other => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "the sink gave no answer for this message".to_owned(),
                    };
                    // Messages settled before it: it is a new head.
                    if i > 0 {
                        self.refusals = 0;
                    }
                    let broker_up = answers.iter().skip(i + 1).any(Result::is_ok);
                    if broker_up {
                        self.refusals += 1;
                        if self.refusals >= self.max_refusals {
                            step.dead.push((
                                i,
                                format!(
                                    "refused {} times while the broker confirmed the messages \
                                     after it: {why}",
                                    self.refusals
                                ),
                            ));
                            self.refusals = 0;
                            i += 1;
                            continue;
                        }
                    }
                    let progress = i > 0;
                    self.failures = if progress { 1 } else { self.failures + 1 };
                    step.settled = i;
                    // Backoff::delay(1) is zero: the first retry waits `initial`.
                    step.retry = Some((self.backoff.delay(self.failures + 1), why));
                    return step;
                }
            }
            i += 1;
        }
        self.failures = 0;
        self.refusals = 0;
        step.settled = len;
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RetryPlan {
        RetryPlan::new(
            Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
                jitter: 0.0,
            },
            3,
        )
    }

    fn ok() -> Result<Confirm, SinkError> {
        Ok(Confirm::Stored)
    }
    fn down() -> Result<Confirm, SinkError> {
        Err(SinkError::retryable("broker down"))
    }
    fn refused() -> Result<Confirm, SinkError> {
        Err(SinkError::permanent("too large"))
    }

    #[test]
    fn all_confirmed_settles_the_batch() {
        let mut p = plan();
        let step = p.decide(&[ok(), Ok(Confirm::Duplicate), ok()], 3);
        assert_eq!(step.settled, 3);
        assert_eq!(step.duplicates, 1);
        assert!(step.retry.is_none() && step.dead.is_empty());
    }

    #[test]
    fn a_permanent_refusal_is_dead_lettered_and_the_batch_goes_on() {
        let mut p = plan();
        let step = p.decide(&[ok(), refused(), ok()], 3);
        assert_eq!(step.settled, 3);
        assert_eq!(step.dead.len(), 1);
        assert_eq!(step.dead[0].0, 1);
    }

    #[test]
    fn a_down_broker_keeps_the_position_and_backs_off() {
        let mut p = plan();
        let step = p.decide(&[ok(), down(), down()], 3);
        assert_eq!(step.settled, 1, "acked up to the first failure only");
        let (first, _) = step.retry.expect("retry");
        assert_eq!(first, Duration::from_millis(100));
        // Nothing settles: the delay doubles up to the maximum, forever.
        let mut last = first;
        for _ in 0..10 {
            let step = p.decide(&[down(), down()], 2);
            assert_eq!(step.settled, 0);
            assert!(step.dead.is_empty(), "a down broker never dead-letters");
            let (d, _) = step.retry.expect("retry");
            assert!(d >= last);
            last = d;
        }
        assert_eq!(last, Duration::from_secs(1));
        // Back up: settled, and the next failure starts from the beginning.
        assert!(p.decide(&[ok(), ok()], 2).retry.is_none());
        assert_eq!(p.failures(), 0);
        let (d, _) = p.decide(&[down()], 1).retry.expect("retry");
        assert_eq!(d, Duration::from_millis(100));
    }

    #[test]
    fn a_message_refused_while_others_pass_is_dead_lettered_after_max_refusals() {
        let mut p = plan();
        for _ in 0..2 {
            let step = p.decide(&[down(), ok()], 2);
            assert_eq!(step.settled, 0);
            assert!(step.retry.is_some());
        }
        let step = p.decide(&[down(), ok()], 2);
        assert_eq!(step.settled, 2);
        assert_eq!(step.dead.len(), 1);
        assert!(step.retry.is_none());
    }

    #[test]
    fn missing_answers_are_retried() {
        let mut p = plan();
        let step = p.decide(&[ok()], 3);
        assert_eq!(step.settled, 1);
        assert!(step.retry.is_some());
    }

    #[test]
    fn progress_resets_the_refusals_of_the_previous_head() {
        let mut p = plan();
        p.decide(&[down(), ok()], 2);
        p.decide(&[down(), ok()], 2);
        // The head passes; the next one fails twice: not dead yet.
        let step = p.decide(&[ok(), down(), ok()], 3);
        assert_eq!(step.settled, 1);
        let step = p.decide(&[down(), ok()], 2);
        assert_eq!(step.settled, 0, "second refusal of the new head");
    }
}
