//! The background services a handle started (workers, durable consumers,
//! WAL feeds), so that [`PgPubSub::shutdown`](crate::PgPubSub::shutdown)
//! can stop them before the pool closes and the listener stops.
//!
//! After River's `startstop.Service`: a task registers when it starts (with
//! how to ask it to stop) and holds the returned [`Registration`] until it
//! has finished its own shutdown (given jobs back, written acks, confirmed
//! the WAL); dropping the registration deregisters it. `stop_all` asks
//! every service at once and waits until all registrations are gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Asks a service to stop; the argument is when its shutdown must be done.
type Stopper = Box<dyn Fn(Instant) + Send + Sync>;

/// A handle's running services.
pub(crate) struct Services {
    state: Mutex<State>,
    /// How many are registered.
    live: watch::Sender<usize>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Set by `stop_all`: later registrations are refused.
    closed: bool,
    running: HashMap<u64, (&'static str, Stopper)>,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            state: Mutex::default(),
            live: watch::Sender::new(0),
        }
    }
}

impl Services {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a service named `what`; `stop` asks it to stop by the
    /// given time. Fails with [`ErrorKind::ShutDown`](crate::ErrorKind::ShutDown)
    /// once the handle is shutting down.
    pub(crate) fn register(
        self: &Arc<Self>,
        what: &'static str,
        stop: impl Fn(Instant) + Send + Sync + 'static,
    ) -> Result<Registration> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::shut_down().context(format!("starting a {what}")));
        }
        let id = state.next;
        state.next += 1;
        state.running.insert(id, (what, Box::new(stop)));
        self.live.send_replace(state.running.len());
        Ok(Registration {
            services: Arc::downgrade(self),
            id,
        })
    }

    /// Asks every service to stop by `by` and waits until all have ended
    /// or `by` has passed; false if some were still running then.
    pub(crate) async fn stop_all(&self, by: Instant) -> bool {
        {
            let mut state = self.lock();
            state.closed = true;
            for (what, stop) in state.running.values() {
                tracing::debug!(service = what, "pg-pubsub: stopping");
                stop(by);
            }
        }
        let mut live = self.live.subscribe();
        let ended = tokio::time::timeout_at(by, live.wait_for(|n| *n == 0))
            .await
            .is_ok();
        ended
    }
}

/// Held by a running service; dropping it (when the service has ended)
/// deregisters the service.
pub(crate) struct Registration {
    services: Weak<Services>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(services) = self.services.upgrade() {
            let mut state = services.lock();
            state.running.remove(&self.id);
            services.live.send_replace(state.running.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn stop_all_waits_for_every_registration() {
        let services = Arc::new(Services::default());
        let (tx, mut rx) = watch::channel(false);
        let tx = Arc::new(tx);
        let stop = tx.clone();
        let reg = services
            .register("test", move |_| {
                stop.send_replace(true);
            })
            .expect("open");
        let task = tokio::spawn(async move {
            let _reg = reg;
            let _ = rx.wait_for(|s| *s).await;
        });
        let by = Instant::now() + Duration::from_secs(20);
        assert!(services.stop_all(by).await);
        assert!(task.is_finished() || task.await.is_ok());
        assert!(services.register("late", |_| {}).is_err());
    }

    #[tokio::test]
    async fn stop_all_gives_up_at_the_deadline() {
        let services = Arc::new(Services::default());
        let reg = services.register("stuck", |_| {}).expect("open");
        assert!(!services.stop_all(Instant::now()).await);
        drop(reg);
        assert_eq!(*services.live.borrow(), 0);
    }
}
