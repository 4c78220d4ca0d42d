//! Looking at queues: per-queue counts, and dead jobs (list, retry, delete).

use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;

use super::{check_queue, Queue};
use crate::error::Result;

/// Counts for one queue, from [`Queue::stats`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Jobs due now, waiting for a worker.
    pub ready: u64,
    /// Jobs waiting for a later time (scheduled, or retrying after a backoff).
    pub scheduled: u64,
    /// Jobs claimed by a worker.
    pub running: u64,
    /// Dead jobs kept in `dead_jobs`.
    pub dead: u64,
    /// Completed jobs kept in the history (`finished_jobs`).
    pub completed: u64,
    /// Cancelled jobs kept in the history (`finished_jobs`).
    pub cancelled: u64,
    /// Whether the queue is paused ([`Queue::pause`]).
    pub paused: bool,
    /// How long the oldest due job has been due; zero when none is.
    pub oldest_ready_age: Duration,
    /// The queue's limits ([`Queue::set_limits`]).
    pub limits: super::Limits,
}

/// A `count(*)` as the unsigned count every stats type uses.
fn count(n: i64) -> u64 {
    n.max(0) as u64
}

/// A job that failed its last attempt, from [`Queue::dead_jobs`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadJob {
    /// The job's id.
    pub id: i64,
    /// The queue.
    pub queue: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: SystemTime,
    /// When it died.
    pub died_at: SystemTime,
    /// The payload.
    pub payload: String,
}

impl Queue {
    /// Counts per queue (every queue with a live, dead or finished job,
    /// paused, or with limits), by name.
    pub async fn stats(&self) -> Result<Vec<QueueStats>> {
        let s = self.schema.as_str();
        let sql = format!(
            "SELECT q.queue, \
               count(*) FILTER (WHERE j.state = 'ready' AND j.run_at <= now()), \
               count(*) FILTER (WHERE j.state = 'ready' AND j.run_at > now()), \
               count(*) FILTER (WHERE j.state = 'running'), \
               (SELECT count(*) FROM {s}.dead_jobs d WHERE d.queue = q.queue), \
               coalesce(extract(epoch FROM now() - min(j.run_at) \
                        FILTER (WHERE j.state = 'ready' AND j.run_at <= now())), 0)::float8, \
               (SELECT count(*) FROM {s}.finished_jobs f \
                 WHERE f.queue = q.queue AND f.state = 'completed'), \
               (SELECT count(*) FROM {s}.finished_jobs f \
                 WHERE f.queue = q.queue AND f.state = 'cancelled'), \
               EXISTS (SELECT 1 FROM {s}.paused_queues p WHERE p.queue = q.queue), \
               l.concurrency, l.per_key, l.rate_count, \
               extract(epoch FROM l.rate_interval)::float8 \
             FROM (SELECT DISTINCT queue FROM {s}.jobs UNION SELECT DISTINCT queue FROM {s}.dead_jobs \
                   UNION SELECT DISTINCT queue FROM {s}.finished_jobs \
                   UNION SELECT queue FROM {s}.paused_queues \
                   UNION SELECT queue FROM {s}.queue_limits) q \
             LEFT JOIN {s}.jobs j ON j.queue = q.queue \
             LEFT JOIN {s}.queue_limits l ON l.queue = q.queue \
             GROUP BY q.queue, l.queue ORDER BY q.queue"
        );
        self.with_client("queue stats", |client| async move {
            let rows = client.query_p(&sql, &[]).await?;
            Ok(rows
                .iter()
                .map(|r| QueueStats {
                    queue: r.get(0),
                    ready: count(r.get(1)),
                    scheduled: count(r.get(2)),
                    running: count(r.get(3)),
                    dead: count(r.get(4)),
                    oldest_ready_age: Duration::from_secs_f64(r.get::<_, f64>(5).max(0.0)),
                    completed: count(r.get(6)),
                    cancelled: count(r.get(7)),
                    paused: r.get(8),
                    limits: super::limits::from_row(r, 9),
                })
                .collect())
        })
        .await
    }

    /// Dead jobs, of one queue or all (`None`), oldest first, at most `limit`.
    pub async fn dead_jobs(&self, queue: Option<&str>, limit: i64) -> Result<Vec<DeadJob>> {
        if let Some(q) = queue {
            check_queue(q)?;
        }
        let sql = format!(
            "SELECT id, queue, attempt, last_error, created_at, died_at, payload \
             FROM {} WHERE $1::text IS NULL OR queue = $1 ORDER BY id LIMIT $2",
            self.obj("dead_jobs")
        );
        self.with_client("listing dead jobs", |client| async move {
            let rows = client
                .query_p(&sql, &[(&queue, Type::TEXT), (&limit, Type::INT8)])
                .await?;
            Ok(rows
                .iter()
                .map(|r| DeadJob {
                    id: r.get(0),
                    queue: r.get(1),
                    attempts: r.get(2),
                    last_error: r.get(3),
                    created_at: r.get(4),
                    died_at: r.get(5),
                    payload: r.get(6),
                })
                .collect())
        })
        .await
    }

    /// Puts dead job `id` back in its queue, due now, with a fresh set of
    /// attempts. `false` if there is no such dead job; an error if its
    /// unique key is taken by another job meanwhile.
    pub async fn retry_dead(&self, id: i64) -> Result<bool> {
        let sql = format!("SELECT {}($1)", self.obj("retry_dead"));
        self.with_client("retrying a dead job", |client| async move {
            Ok(client.query_one_p(&sql, &[(&id, Type::INT8)]).await?.get(0))
        })
        .await
    }

    /// Deletes dead job `id`; `false` if there was none.
    pub async fn delete_dead(&self, id: i64) -> Result<bool> {
        let sql = format!("DELETE FROM {} WHERE id = $1", self.obj("dead_jobs"));
        self.with_client("deleting a dead job", |client| async move {
            Ok(client.execute_p(&sql, &[(&id, Type::INT8)]).await? == 1)
        })
        .await
    }
}
