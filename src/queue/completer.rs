//! Batched completions: a worker's finished jobs are deleted many per
//! statement, on a connection of their own, while the worker claims more.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use super::context::Ctx;

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
    mut rx: mpsc::UnboundedReceiver<(i64, i32)>,
    finished: Option<mpsc::UnboundedSender<u64>>,
) {
    let mut batch: Vec<(i64, i32)> = Vec::new();
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
            Ok(n) => {
                ctx.completed.notify_one();
                if let Some(finished) = &finished {
                    // Closed only if the vacuum task gave up: nothing to tell.
                    let _ = finished.send(n);
                }
                ctx.completing(|set| {
                    for claim in &batch {
                        set.remove(claim);
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

/// One `DELETE` for the whole batch; returns how many claims were current.
async fn complete(ctx: &Ctx, batch: &[(i64, i32)]) -> crate::error::Result<u64> {
    let (ids, attempts): (Vec<i64>, Vec<i32>) = batch.iter().copied().unzip();
    let sql = &ctx.sql.complete;
    ctx.with_client("completing jobs", |client| async move {
        let stmt = client.prepare_cached(sql).await?;
        client.execute(&stmt, &[&ids, &attempts]).await
    })
    .await
}
