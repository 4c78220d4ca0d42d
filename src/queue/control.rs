//! Queue control: cancelling a job, pausing and resuming a queue, and the
//! finished jobs kept for a while (completed with their output, cancelled).

use std::time::SystemTime;

use serde::Serialize;
use tokio_postgres::types::Type;

use super::{check_queue, Queue};
use crate::error::Result;

/// What [`Queue::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Cancelled {
    /// The job was waiting (ready or scheduled): it is now cancelled and
    /// never runs.
    Removed,
    /// The job is running (or held by a worker): its handler is told
    /// ([`Job::cancelled`](super::Job::cancelled)) and the job ends
    /// cancelled, never retried, whatever the handler returns.
    Signalled,
    /// The job already ended (completed or cancelled and still in the
    /// history, or dead): nothing changed.
    AlreadyFinished,
    /// There is no such job (never was, or it left the history).
    Unknown,
}

/// How a finished job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FinishedState {
    /// Its handler succeeded.
    Completed,
    /// It was cancelled ([`Queue::cancel`]).
    Cancelled,
}

/// A completed or cancelled job, kept for the worker's
/// [`history`](super::WorkerBuilder::history), from [`Queue::finished_jobs`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct FinishedJob {
    /// The job's id.
    pub id: i64,
    /// The queue.
    pub queue: String,
    /// How it ended.
    pub state: FinishedState,
    /// Its priority.
    pub priority: i16,
    /// Attempts made (0: cancelled before it ever ran).
    pub attempts: i32,
    /// The output its handler returned ([`Outcome::Output`](super::Outcome::Output)),
    /// JSON text of at most [`MAX_OUTPUT_BYTES`](super::MAX_OUTPUT_BYTES).
    pub output: Option<String>,
    /// The last error (of a failed earlier attempt, or of the handler
    /// that was cancelled).
    pub last_error: Option<String>,
    /// When it was enqueued.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    /// When it ended.
    #[serde(serialize_with = "rfc3339")]
    pub finished_at: SystemTime,
    /// The payload.
    pub payload: String,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

const FINISHED: &str = "id, queue, state, priority, attempt, output, last_error, created_at, \
     finished_at, payload";

fn finished(r: &tokio_postgres::Row) -> FinishedJob {
    FinishedJob {
        id: r.get(0),
        queue: r.get(1),
        state: match r.get::<_, &str>(2) {
            "cancelled" => FinishedState::Cancelled,
            _ => FinishedState::Completed,
        },
        priority: r.get(3),
        attempts: r.get(4),
        output: r.get(5),
        last_error: r.get(6),
        created_at: r.get(7),
        finished_at: r.get(8),
        payload: r.get(9),
    }
}

impl Queue {
    /// Cancels job `id`, from any process. A waiting job never runs; a
    /// running one's handler is told at once (the worker running it hears
    /// a notification on `<schema>_queue_ctl`, or finds out at its next
    /// lease extension) and the job ends cancelled, not retried. Cancelled
    /// jobs are kept in [`finished_jobs`](Self::finished_jobs).
    pub async fn cancel(&self, id: i64) -> Result<Cancelled> {
        let sql = format!("SELECT {}($1)", self.obj("cancel"));
        self.with_client("cancelling a job", |client| async move {
            let row = client.query_one_p(&sql, &[(&id, Type::INT8)]).await?;
            Ok(match row.get::<_, Option<&str>>(0) {
                Some("removed") => Cancelled::Removed,
                Some("signalled") => Cancelled::Signalled,
                Some("finished") => Cancelled::AlreadyFinished,
                _ => Cancelled::Unknown,
            })
        })
        .await
    }

    /// Pauses `queue` for every worker: they claim nothing from it (within
    /// a second: by notification, or at their next poll) and finish what
    /// they hold. Stored in the database (`paused_queues`): it lasts across
    /// restarts and deploys until [`resume`](Self::resume). Enqueueing
    /// goes on. `false` if it was paused already.
    pub async fn pause(&self, queue: &str) -> Result<bool> {
        check_queue(queue)?;
        let sql = format!(
            "WITH p AS (INSERT INTO {} (queue) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1) \
             SELECT count(*) > 0, pg_notify($2, 'pause ' || $1) FROM p",
            self.obj("paused_queues")
        );
        let channel = self.schema.queue_control_channel();
        self.with_client("pausing a queue", |client| async move {
            Ok(client
                .query_one_p(&sql, &[(&queue, Type::TEXT), (&channel, Type::TEXT)])
                .await?
                .get(0))
        })
        .await
    }

    /// Resumes a paused `queue`: its workers claim again at once. `false`
    /// if it was not paused.
    pub async fn resume(&self, queue: &str) -> Result<bool> {
        check_queue(queue)?;
        let sql = format!(
            "WITH p AS (DELETE FROM {} WHERE queue = $1 RETURNING 1) \
             SELECT count(*) > 0, pg_notify($2, 'resume ' || $1) FROM p",
            self.obj("paused_queues")
        );
        let channel = self.schema.queue_control_channel();
        self.with_client("resuming a queue", |client| async move {
            Ok(client
                .query_one_p(&sql, &[(&queue, Type::TEXT), (&channel, Type::TEXT)])
                .await?
                .get(0))
        })
        .await
    }

    /// Whether `queue` is paused.
    pub async fn is_paused(&self, queue: &str) -> Result<bool> {
        check_queue(queue)?;
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE queue = $1)",
            self.obj("paused_queues")
        );
        self.with_client("checking for a pause", |client| async move {
            Ok(client
                .query_one_p(&sql, &[(&queue, Type::TEXT)])
                .await?
                .get(0))
        })
        .await
    }

    /// Finished jobs (completed or cancelled, still in the history) of one
    /// queue or all (`None`), most recent first, at most `limit`.
    pub async fn finished_jobs(&self, queue: Option<&str>, limit: i64) -> Result<Vec<FinishedJob>> {
        if let Some(q) = queue {
            check_queue(q)?;
        }
        let sql = format!(
            "SELECT {FINISHED} FROM {} WHERE $1::text IS NULL OR queue = $1 \
             ORDER BY finished_at DESC, id DESC LIMIT $2",
            self.obj("finished_jobs")
        );
        self.with_client("listing finished jobs", |client| async move {
            Ok(client
                .query_p(&sql, &[(&queue, Type::TEXT), (&limit, Type::INT8)])
                .await?
                .iter()
                .map(finished)
                .collect())
        })
        .await
    }

    /// Finished job `id`, if it is still in the history.
    pub async fn finished_job(&self, id: i64) -> Result<Option<FinishedJob>> {
        let sql = format!(
            "SELECT {FINISHED} FROM {} WHERE id = $1",
            self.obj("finished_jobs")
        );
        self.with_client("looking a finished job up", |client| async move {
            Ok(client
                .query_opt_p(&sql, &[(&id, Type::INT8)])
                .await?
                .as_ref()
                .map(finished))
        })
        .await
    }
}
