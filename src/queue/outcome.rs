//! What a handler returns: done, done with an output, or snoozed.

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Origin, Result};

/// The largest job output kept, in bytes of JSON text (64 KiB).
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// How a handler's attempt ended well, from its `Ok` value. Handlers that
/// return `Ok(())` complete the job (as [`Outcome::Done`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// The job is done.
    Done,
    /// The job is done, with a result kept in `finished_jobs` with it
    /// (when the worker keeps history, see [`WorkerBuilder::history`](super::WorkerBuilder::history)).
    Output(JobOutput),
    /// Run the job again after this delay, without spending an attempt
    /// (its next run has the same [`Job::attempt`](super::Job::attempt)).
    /// The delay is measured on the server's clock; the job is picked up
    /// by a poll, so up to one poll interval later. A job cancelled
    /// meanwhile ends cancelled instead.
    Snooze(Duration),
}

impl Outcome {
    /// Done, with `value` (serialized to JSON) as the job's output; an
    /// [`ErrorKind::Limit`](crate::ErrorKind::Limit) error when the JSON
    /// text is above [`MAX_OUTPUT_BYTES`] (nothing is cut: return a
    /// smaller value, or `Outcome::Done`).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Outcome> {
        JobOutput::json(value).map(Outcome::Output)
    }
}

/// A job's output: JSON text of at most [`MAX_OUTPUT_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutput(String);

impl JobOutput {
    /// `value` as JSON; [`ErrorKind::Limit`](crate::ErrorKind::Limit) when
    /// above [`MAX_OUTPUT_BYTES`], [`ErrorKind::Serialize`](crate::ErrorKind::Serialize)
    /// when it cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<JobOutput> {
        let text = serde_json::to_string(value).map_err(|e| {
            Error::new(
                Origin::Serialize,
                format!("job output is not serializable: {e}"),
            )
            .with_source(e)
        })?;
        if text.len() > MAX_OUTPUT_BYTES {
            return Err(Error::new(
                Origin::Limit,
                format!(
                    "job output is {} bytes of JSON, above the {MAX_OUTPUT_BYTES} allowed",
                    text.len()
                ),
            ));
        }
        Ok(JobOutput(text))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(super) fn into_string(self) -> String {
        self.0
    }
}

/// What a handler's `Ok` value may be: `()` (done) or an [`Outcome`].
pub trait IntoOutcome: Send + 'static {
    /// The outcome.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Done
    }
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_bounded() {
        assert!(Outcome::json(&serde_json::json!({"ok": true})).is_ok());
        let big = "x".repeat(MAX_OUTPUT_BYTES);
        let e = Outcome::json(&big).expect_err("quotes make it too long");
        assert_eq!(e.kind(), crate::ErrorKind::Limit);
        let fits = "x".repeat(MAX_OUTPUT_BYTES - 2);
        assert_eq!(
            JobOutput::json(&fits).map(|o| o.as_str().len()).ok(),
            Some(MAX_OUTPUT_BYTES)
        );
    }
}
