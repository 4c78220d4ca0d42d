//! The background writer of a subscription's acks.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::message::Acks;
use super::Durable;

/// Writes acks every `interval` while there are any, and once more on stop.
pub(super) async fn flush_loop(
    durable: Durable,
    acks: Arc<Acks>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stopping = tokio::select! {
            _ = acks.notify.notified() => false,
            _ = stop.changed() => true,
        };
        if !stopping {
            // Gather the acks that follow into one write.
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
        }
        if let Some(p) = acks.take() {
            if let Err(e) = durable.write_ack(&acks, p).await {
                acks.restore(p);
                tracing::warn!(channel = %acks.channel, group = %acks.group, "durable acks not written: {e}");
                if stopping || *stop.borrow() {
                    return;
                }
                tokio::time::sleep(interval).await;
                acks.notify.notify_one();
            }
        }
        if stopping || *stop.borrow() {
            return;
        }
    }
}
