//! Opt-in: shut down cleanly on SIGINT/SIGTERM (feature `signal`).

use tokio::task::JoinHandle;

use crate::client::PgPubSub;

impl PgPubSub {
    /// Spawns a task that calls [`shutdown`](PgPubSub::shutdown) on the first
    /// SIGINT or SIGTERM (Ctrl-C on other platforms): the handle's workers,
    /// durable consumers and WAL feeds stop first (jobs finished or given
    /// back, acks written), then subscriptions end
    /// after what they received, so a consumer loop `while let Some(d) =
    /// sub.next().await` finishes by itself; with single listener, the
    /// standbys take over first. The handle completes after the shutdown.
    ///
    /// The task does not keep the instance alive: it also ends, without
    /// waiting for a signal, once the listener stops, whether by
    /// [`shutdown`](PgPubSub::shutdown) or because every handle and
    /// subscription was dropped. While subscriptions outlive every handle,
    /// a signal still shuts their listener down.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
    /// use futures::StreamExt;
    /// let mut jobs = pubsub.listen::<pg_pubsub::Text>("jobs").await?;
    /// pubsub.shutdown_on_signal();
    /// while let Some(delivery) = jobs.next().await {
    ///     println!("{delivery:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn shutdown_on_signal(&self) -> JoinHandle<()> {
        let pubsub = self.downgrade();
        let ended = pubsub.listener_ended();
        tokio::spawn(async move {
            tokio::select! {
                signalled = wait_for_signal() => if signalled {
                    tracing::info!("pg-pubsub: signal received, shutting down");
                    pubsub.shutdown().await;
                },
                () = ended => {}
            }
        })
    }
}

/// False when no handler could be installed (then it never fires).
#[cfg(unix)]
async fn wait_for_signal() -> bool {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("pg-pubsub: could not install signal handlers");
        return false;
    };
    tokio::select! {
        _ = int.recv() => true,
        _ = term.recv() => true,
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> bool {
    tokio::signal::ctrl_c().await.is_ok()
}
