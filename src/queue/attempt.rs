//! One attempt at a job, in a task of its own: run the handler, then hand
//! the completion to the completer, or record the failure (retry or dead).

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_postgres::types::Type;

use super::completer::Done;
use super::context::Ctx;
use super::job::Job;
use super::outcome::{IntoOutcome, Outcome};
use crate::event::QueueEvent;

/// Longest error text kept for a failed attempt, in bytes.
const MAX_ERROR_BYTES: usize = 8 * 1024;

/// Runs `handler` on `job`. `Ok` sends the claim (and the output) to the
/// completer (unless [`Job::complete_tx`] completed it already), or snoozes
/// the job; `Err` or a panic fails the attempt in its own statement. A job
/// cancelled before or while it runs goes to the completer whatever the
/// handler returns: the statement ends it as cancelled.
pub(super) async fn run<F, Fut, O, E>(
    ctx: Arc<Ctx>,
    handler: Arc<F>,
    job: Job,
    done: mpsc::UnboundedSender<Done>,
) where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<O, E>> + Send + 'static,
    O: IntoOutcome,
    E: fmt::Display + Send + 'static,
{
    let (id, attempt, max_attempts) = (job.id, job.attempt, job.max_attempts);
    let completed = job.completed.clone();
    let cancel = job.cancel.clone();
    let complete = |output: Option<String>| {
        if !completed.load(Ordering::Acquire) {
            ctx.completing(|set| set.insert((id, attempt)));
            // Closed only once every attempt task has ended.
            let _ = done.send((id, attempt, output));
        }
    };
    if *cancel.borrow() {
        // Cancelled while it waited in this worker: it never starts.
        complete(None);
        return;
    }
    let started = crate::record::Timer::start();
    // The handler is called inside the guarded future: a panic while
    // building its future fails the attempt too.
    let outcome = AssertUnwindSafe(async move { handler(job).await })
        .catch_unwind()
        .await;
    ctx.metrics.finished(started, matches!(outcome, Ok(Ok(_))));
    if *cancel.borrow() {
        complete(None);
        return;
    }
    let error = match outcome {
        Ok(Ok(o)) => match o.into_outcome() {
            Outcome::Snooze(delay) => {
                if !snooze(&ctx, id, attempt, delay).await {
                    // Cancelled meanwhile (or the claim was lost: then
                    // the completion finds nothing).
                    complete(None);
                }
                return;
            }
            Outcome::Output(out) => {
                complete(Some(out.into_string()));
                return;
            }
            _ => {
                complete(None);
                return;
            }
        },
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic_text(panic),
    };
    drop(done);
    fail(&ctx, id, attempt, max_attempts, error).await;
}

/// Makes the job ready again after `delay`, its attempt not spent; `false`
/// when it was not snoozed (cancelled, claim lost, or the statement failed:
/// then it runs again after its lease).
async fn snooze(ctx: &Ctx, id: i64, attempt: i32, delay: Duration) -> bool {
    let (sql, secs) = (&ctx.sql.snooze, delay.as_secs_f64());
    let res = ctx
        .with_client("snoozing a job", |client| async move {
            client
                .execute_p(
                    sql,
                    &[
                        (&id, Type::INT8),
                        (&attempt, Type::INT4),
                        (&secs, Type::FLOAT8),
                    ],
                )
                .await
        })
        .await;
    match res {
        Ok(n) => {
            tracing::debug!(queue = %ctx.name, id, attempt, ?delay, snoozed = n == 1, "pg-pubsub: job snoozed");
            n == 1
        }
        Err(e) => {
            tracing::warn!(queue = %ctx.name, id, %e, "pg-pubsub: snoozing a job failed; it runs again after its lease");
            true
        }
    }
}

/// Records a failed attempt: ready again after the backoff, or dead.
async fn fail(ctx: &Ctx, id: i64, attempt: i32, max_attempts: i32, text: String) {
    let mut error: String = text.replace('\0', "\u{FFFD}");
    if error.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
    }
    let delay = retry_delay(ctx.retry_base, ctx.retry_max, attempt);
    let (sql, secs, err) = (&ctx.sql.fail, delay.as_secs_f64(), &error);
    let res = ctx
        .with_client("failing a job", |client| async move {
            let rows = client
                .query_p(
                    sql,
                    &[
                        (&id, Type::INT8),
                        (&attempt, Type::INT4),
                        (err, Type::TEXT),
                        (&secs, Type::FLOAT8),
                    ],
                )
                .await?;
            Ok(rows.first().and_then(|row| row.get::<_, Option<String>>(0)))
        })
        .await;
    let event = match res.as_ref().map(Option::as_deref) {
        Ok(Some("retry")) => QueueEvent::JobRetried {
            queue: ctx.name.clone(),
            job_id: id,
            attempt,
            error: Arc::from(error.as_str()),
            retry_in: delay,
        },
        Ok(Some("cancelled")) => QueueEvent::JobCancelled {
            queue: ctx.name.clone(),
            job_id: id,
            attempt,
        },
        Ok(Some("dead")) => QueueEvent::JobDead {
            queue: ctx.name.clone(),
            job_id: id,
            attempts: attempt,
            error: Arc::from(error.as_str()),
        },
        Ok(_) => {
            tracing::debug!(queue = %ctx.name, id, attempt, "pg-pubsub: failed job's claim was lost");
            return;
        }
        Err(e) => {
            // The job runs again once its lease expires.
            tracing::warn!(queue = %ctx.name, id, %e, "pg-pubsub: recording a failed job failed");
            return;
        }
    };
    tracing::info!(queue = %ctx.name, id, attempt, max = max_attempts, %error, "pg-pubsub: job failed");
    ctx.events.emit(event);
}

/// The delay before retrying after failed attempt `attempt` (from 1).
pub(crate) fn retry_delay(base: Duration, max: Duration, attempt: i32) -> Duration {
    let exp = attempt.saturating_sub(1).clamp(0, 62) as u32;
    let full = base
        .checked_mul(1u32.checked_shl(exp.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    // Jitter in [0.5, 1]: failing jobs of one batch spread out.
    full.mul_f64(0.5 + fastrand::f64() / 2.0)
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned());
    format!("the handler panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(60));
        for (attempt, full) in [(1, 1), (2, 2), (3, 4), (7, 60), (1000, 60)] {
            let d = retry_delay(b, m, attempt);
            let full = Duration::from_secs(full);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }
}
