//! Batched completions: a worker's finished jobs are deleted (and kept in
//! `finished_jobs`) many per statement, on a connection of their own,
//! while the worker claims more.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio_postgres::types::Type;

use super::context::Ctx;
use crate::event::QueueEvent;

/// A claim `(id, attempt)` to complete, and its output.
pub(super) type Done = (i64, i32, Option<String>);

/// Claims completed per statement at most.
const MAX_BATCH: usize = 1000;

/// Wait before retrying a batch that failed (the pool is out of
/// connections, the server restarts).
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Deletes the completed claims sent on `rx`: whatever arrived while the
/// previous statement ran goes in the next one, so batches grow with the
/// load and an idle worker completes a job at once. Ends when every sender
/// is gone and what they sent is written (or, once they are gone, a write
/// failed: those jobs run again after their lease). How many jobs each
/// statement deleted goes to `finished` (the vacuum task), if any.
pub(super) async fn run(
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<Done>,
    finished: Option<mpsc::UnboundedSender<u64>>,
) {
    let mut batch: Vec<Done> = Vec::new();
    let mut open = true;
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(claim) => batch.push(claim),
                None => return,
            }
        }
        while open && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(claim) => batch.push(claim),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        match complete(&ctx, &batch).await {
            Ok((n, cancelled)) => {
                ctx.completed.notify_one();
                for job_id in cancelled {
                    let attempt = batch.iter().find(|d| d.0 == job_id).map_or(0, |d| d.1);
                    tracing::info!(queue = %ctx.name, job_id, attempt, "pg-pubsub: job cancelled");
                    ctx.events.emit(QueueEvent::JobCancelled {
                        queue: ctx.name.clone(),
                        job_id,
                        attempt,
                    });
                }
                if let Some(finished) = &finished {
                    // Closed only if the vacuum task gave up: nothing to tell.
                    let _ = finished.send(n);
                }
                ctx.completing(|set| {
                    for (id, attempt, _) in &batch {
                        set.remove(&(*id, *attempt));
                    }
                });
                if n < batch.len() as u64 {
                    // Their lease expired meanwhile: they run (or ran) again.
                    tracing::debug!(queue = %ctx.name, lost = batch.len() as u64 - n, "pg-pubsub: completed jobs whose claim was lost");
                }
                batch.clear();
            }
            Err(e) if open => {
                tracing::warn!(queue = %ctx.name, %e, "pg-pubsub: completing jobs failed; retrying");
                tokio::time::sleep(RETRY_AFTER).await;
            }
            Err(e) => {
                tracing::warn!(queue = %ctx.name, %e, jobs = batch.len(), "pg-pubsub: completing jobs failed at shutdown; they run again after their lease");
                return;
            }
        }
    }
}

/// One statement for the whole batch; returns how many claims were
/// current, and the ids of the jobs that ended cancelled.
async fn complete(ctx: &Ctx, batch: &[Done]) -> crate::error::Result<(u64, Vec<i64>)> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut attempts = Vec::with_capacity(batch.len());
    let mut outputs = Vec::with_capacity(batch.len());
    for (id, attempt, output) in batch {
        ids.push(*id);
        attempts.push(*attempt);
        outputs.push(output.as_deref());
    }
    let (sql, keep) = (&ctx.sql.complete, !ctx.history.is_zero());
    ctx.with_client("completing jobs", |client| async move {
        let rows = client
            .query_p(
                sql,
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&attempts, Type::INT4_ARRAY),
                    (&outputs, Type::TEXT_ARRAY),
                    (&keep, Type::BOOL),
                ],
            )
            .await?;
        // One row (an aggregate), as `query_one` would insist.
        let row = rows.first();
        Ok((
            row.map_or(0, |row| row.get::<_, i64>(0).max(0) as u64),
            row.map(|row| row.get(1)).unwrap_or_default(),
        ))
    })
    .await
}
