//! Wake-ups sent after commit, coalesced across publishers.
//!
//! `NOTIFY` makes every notifying commit in the cluster take one lock in
//! turn (see the durable and queue docs). When this crate commits a publish
//! or an enqueue itself (not in the caller's transaction), the row is
//! already visible when the statement returns, so the wake-up can follow in
//! a transaction of its own: one task sends, in one statement, every
//! distinct `(channel, payload)` asked for while its previous statement was
//! in flight. Concurrent publishers then share notifying commits instead of
//! taking one each. A wake-up that fails is only logged: consumers poll, so
//! a lost one delays and never loses.
//!
//! Under sustained contention the task sends at most one statement per
//! [`MIN_GAP`]: 100 notifying commits a second at most instead of one per
//! publish (a wake-up per publish cost a quarter of the throughput, one per
//! millisecond still a tenth). Consumers of a busy channel then hear of new
//! messages up to that much later, in bigger batches.
//!
//! Deferring costs a round trip of latency, so it is done only under
//! contention: a publish that starts while no other publish of the handle
//! is in flight notifies inside its own transaction, as the SQL functions
//! do.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::Origin;
use crate::exec::Exec;

/// The least time between the starts of two wake-up statements.
const MIN_GAP: Duration = Duration::from_millis(10);

/// The sending side, kept in the handle's shared state.
#[derive(Debug)]
pub(crate) struct Wakes {
    tx: mpsc::UnboundedSender<(String, String)>,
    /// Publishes (and enqueues) of the handle in flight.
    busy: Arc<AtomicUsize>,
}

/// One publish in flight; see [`Wakes::start_publish`].
pub(crate) struct Publishing {
    busy: Arc<AtomicUsize>,
    alone: bool,
}

impl Publishing {
    /// No other publish of the handle was in flight when this one started:
    /// notify inside the transaction rather than after it.
    pub(crate) fn alone(&self) -> bool {
        self.alone
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Wakes::new`] gives the task to start with [`spawn`].
pub(crate) struct WakeQueue(mpsc::UnboundedReceiver<(String, String)>);

impl Wakes {
    pub(crate) fn new() -> (Wakes, WakeQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let busy = Arc::new(AtomicUsize::new(0));
        (Wakes { tx, busy }, WakeQueue(rx))
    }
}

impl Wakes {
    /// Counts a publish in flight until the returned value is dropped.
    pub(crate) fn start_publish(&self) -> Publishing {
        let busy = Arc::clone(&self.busy);
        let alone = busy.fetch_add(1, Ordering::AcqRel) == 0;
        Publishing { busy, alone }
    }

    /// Sends `NOTIFY channel, payload` soon, in its own transaction, merged
    /// with identical ones asked for meanwhile. Call only after the data it
    /// announces has committed.
    pub(crate) fn wake_after_commit(&self, channel: String, payload: String) {
        // Fails only once the task is gone, i.e. the handle is shutting down.
        let _ = self.tx.send((channel, payload));
    }
}

/// Starts the sender task. It ends when the handle's shared state (and
/// with it the sending side) is dropped, or the handle shuts down.
pub(crate) fn spawn(queue: WakeQueue, exec: Exec) {
    tokio::spawn(run(queue.0, exec));
}

async fn run(mut rx: mpsc::UnboundedReceiver<(String, String)>, exec: Exec) {
    while let Some(first) = rx.recv().await {
        let mut batch = BTreeSet::from([first]);
        while let Ok(next) = rx.try_recv() {
            batch.insert(next);
        }
        if exec.is_shut_down() {
            return;
        }
        let started = tokio::time::Instant::now();
        let (channels, payloads): (Vec<String>, Vec<String>) = batch.into_iter().unzip();
        let sent = exec
            .run(Origin::Notify, "wake-up", |client| async move {
                use tokio_postgres::types::Type;
                client
                    .execute_p(
                        "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                        &[(&channels, Type::TEXT_ARRAY), (&payloads, Type::TEXT_ARRAY)],
                    )
                    .await
            })
            .await;
        if let Err(err) = sent {
            tracing::warn!(%err, "pg-pubsub: wake-up not sent; consumers will find the data by polling");
        }
        // What arrives meanwhile goes into the next statement.
        tokio::time::sleep_until(started + MIN_GAP).await;
    }
}
