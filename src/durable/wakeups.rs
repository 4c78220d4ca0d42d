//! Wake-ups of a schema's durable consumers, dispatched per channel.
//!
//! Every publish of a schema notifies one server channel, `<schema>_wake`,
//! with the durable channel's name as payload. A handle listens to it once
//! per schema ([`Dispatchers`]); a task hands each wake-up to the readers
//! of that durable channel only ([`Waiters`]), so a publish costs one
//! map lookup in each consuming process, not a wake-up of every reader.
//! A gap or a lag on the shared subscription (a reconnect; the task fell
//! behind) may have lost wake-ups: it wakes every reader.
//!
//! The subscription lives as long as some reader of the schema holds a
//! [`Waiter`]: the last one dropped ends the task, which drops the
//! subscription (`UNLISTEN`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures::StreamExt;
use tokio::sync::{watch, Notify, OnceCell};

use crate::client::PgPubSub;
use crate::error::Result;
use crate::schema::SchemaName;
use crate::{Delivery, Text};

/// The readers waiting on each durable channel of one schema.
#[derive(Default)]
struct Waiters {
    next: u64,
    by_channel: HashMap<String, HashMap<u64, Arc<Notify>>>,
    /// Set when the shared subscription ended (the handle shut down).
    closed: bool,
}

impl Waiters {
    fn add(&mut self, channel: &str) -> (u64, Arc<Notify>) {
        let id = self.next;
        self.next += 1;
        let notify = Arc::new(Notify::new());
        if self.closed {
            // Nothing will ever wake it: let it see `closed` at once.
            notify.notify_one();
        }
        self.by_channel
            .entry(channel.to_owned())
            .or_default()
            .insert(id, notify.clone());
        (id, notify)
    }

    fn remove(&mut self, channel: &str, id: u64) {
        if let Some(waiters) = self.by_channel.get_mut(channel) {
            waiters.remove(&id);
            if waiters.is_empty() {
                self.by_channel.remove(channel);
            }
        }
    }

    /// Wakes the readers of `channel`; how many.
    fn wake(&self, channel: &str) -> usize {
        self.by_channel.get(channel).map_or(0, |waiters| {
            // A permit is kept if the reader is busy: it looks again after.
            waiters.values().for_each(|n| n.notify_one());
            waiters.len()
        })
    }

    /// Wakes every reader (a wake-up may have been lost).
    fn wake_all(&self) -> usize {
        self.by_channel
            .values()
            .flat_map(|w| w.values())
            .map(|n| n.notify_one())
            .count()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_channel.values().map(HashMap::len).sum()
    }
}

/// One schema's waiters and its listening task, shared by its [`Waiter`]s.
struct Schema {
    waiters: Mutex<Waiters>,
    /// Set once the task listens; retried by the next reader if it failed.
    listening: OnceCell<()>,
    /// Dropped with the last waiter: ends the task.
    _alive: watch::Sender<()>,
    alive: watch::Receiver<()>,
}

impl Schema {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The handle's wake-up dispatchers, one per schema with readers.
#[derive(Default)]
pub(crate) struct Dispatchers {
    schemas: Mutex<HashMap<SchemaName, Weak<Schema>>>,
}

/// A reader's registration for the wake-ups of one durable channel;
/// dropping it unregisters.
pub(crate) struct Waiter {
    schema: Arc<Schema>,
    channel: String,
    id: u64,
    notify: Arc<Notify>,
}

impl Waiter {
    /// Waits for a wake-up of this channel (or of every channel); false
    /// once the handle shut down.
    pub(crate) async fn woken(&self) -> bool {
        self.notify.notified().await;
        !self.schema.lock().closed
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.schema.lock().remove(&self.channel, self.id);
    }
}

impl Dispatchers {
    /// Registers a reader of `channel` in `schema`; returns once the
    /// schema's wake-up channel is listened to.
    pub(crate) async fn register(
        &self,
        pubsub: &PgPubSub,
        schema: &SchemaName,
        channel: &str,
    ) -> Result<Waiter> {
        let shared = {
            let mut schemas = self.schemas.lock().unwrap_or_else(|e| e.into_inner());
            match schemas.get(schema).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    schemas.retain(|_, s| s.strong_count() > 0);
                    let (tx, rx) = watch::channel(());
                    let s = Arc::new(Schema {
                        waiters: Mutex::default(),
                        listening: OnceCell::new(),
                        _alive: tx,
                        alive: rx,
                    });
                    schemas.insert(schema.clone(), Arc::downgrade(&s));
                    s
                }
            }
        };
        // Registered before listening: no wake-up after LISTEN is missed.
        let (id, notify) = shared.lock().add(channel);
        let waiter = Waiter {
            schema: shared.clone(),
            channel: channel.to_owned(),
            id,
            notify,
        };
        shared
            .listening
            .get_or_try_init(|| listen(pubsub, schema, &shared))
            .await?;
        Ok(waiter)
    }

    /// How many readers are registered for `schema`.
    #[cfg(test)]
    fn readers(&self, schema: &SchemaName) -> usize {
        let schemas = self.schemas.lock().unwrap_or_else(|e| e.into_inner());
        schemas
            .get(schema)
            .and_then(Weak::upgrade)
            .map_or(0, |s| s.lock().len())
    }
}

/// Listens to the schema's wake-up channel and starts the task that
/// dispatches it; the task holds the schema only weakly.
async fn listen(pubsub: &PgPubSub, schema: &SchemaName, shared: &Arc<Schema>) -> Result<()> {
    let mut sub = pubsub
        .listen::<Text>(&schema.wake_channel())
        .single_listener(false)
        .filtered(false)
        .await?;
    let weak = Arc::downgrade(shared);
    let mut alive = shared.alive.clone();
    tokio::spawn(async move {
        loop {
            let delivery = tokio::select! {
                d = sub.next() => d,
                // The last waiter is gone.
                _ = alive.changed() => return,
            };
            let Some(shared) = weak.upgrade() else { return };
            let waiters = shared.lock();
            match delivery {
                Some(Delivery::Message(m)) => {
                    waiters.wake(m.raw());
                }
                // A reconnect or a full queue: a wake-up may be lost.
                Some(_) => {
                    waiters.wake_all();
                }
                None => {
                    drop(waiters);
                    let mut waiters = shared.lock();
                    waiters.closed = true;
                    waiters.wake_all();
                    return;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(n: &Notify) -> bool {
        // A stored permit completes `notified` at once.
        futures::FutureExt::now_or_never(n.notified()).is_some()
    }

    #[test]
    fn a_wake_up_reaches_only_its_channels_readers() {
        let mut w = Waiters::default();
        let (_, a1) = w.add("a");
        let (_, a2) = w.add("a");
        let (_, b) = w.add("b");
        assert_eq!(w.wake("a"), 2);
        assert!(woken(&a1) && woken(&a2));
        assert!(!woken(&b), "b's reader stays asleep");
        assert_eq!(w.wake("nobody"), 0);
    }

    #[test]
    fn wake_ups_while_busy_coalesce_into_one() {
        let mut w = Waiters::default();
        let (_, a) = w.add("a");
        w.wake("a");
        w.wake("a");
        assert!(woken(&a));
        assert!(!woken(&a), "one permit, not one per wake-up");
    }

    #[test]
    fn a_gap_wakes_everyone() {
        let mut w = Waiters::default();
        let (_, a) = w.add("a");
        let (_, b) = w.add("b");
        assert_eq!(w.wake_all(), 2);
        assert!(woken(&a) && woken(&b));
    }

    #[test]
    fn removing_the_last_reader_forgets_the_channel() {
        let mut w = Waiters::default();
        let (x, _) = w.add("a");
        let (y, _) = w.add("a");
        w.remove("a", x);
        assert_eq!(w.len(), 1);
        w.remove("a", y);
        assert!(w.by_channel.is_empty());
        w.remove("a", y);
    }

    #[test]
    fn a_reader_added_after_close_wakes_at_once() {
        let mut w = Waiters {
            closed: true,
            ..Waiters::default()
        };
        let (_, a) = w.add("a");
        assert!(woken(&a));
    }

    #[test]
    fn dropping_a_waiter_unregisters_it() {
        let d = Dispatchers::default();
        let schema = SchemaName::default();
        let (tx, rx) = watch::channel(());
        let shared = Arc::new(Schema {
            waiters: Mutex::default(),
            listening: OnceCell::new(),
            _alive: tx,
            alive: rx,
        });
        d.schemas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(schema.clone(), Arc::downgrade(&shared));
        let (id, notify) = shared.lock().add("a");
        let waiter = Waiter {
            schema: shared.clone(),
            channel: "a".to_owned(),
            id,
            notify,
        };
        assert_eq!(d.readers(&schema), 1);
        drop(waiter);
        assert_eq!(d.readers(&schema), 0);
    }
}
