//! The relay task: read a batch, publish it, settle it (dead letters,
//! source ack), retry the rest with backoff; until stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::plan::RetryPlan;
use super::sink::{Confirm, Outgoing, Sink, SinkError};
use super::source::{Acker, Item, Read, Reader, Render};
use crate::config::Backoff;
use crate::durable::Durable;
use crate::Text;

/// What a relay counts, shared with its handle.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) relayed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) active: AtomicBool,
    pub(crate) last: Mutex<Option<Last>>,
    pub(crate) last_error: Mutex<Option<String>>,
}

/// The newest settled message.
#[derive(Clone)]
pub(crate) struct Last {
    pub(crate) position: String,
    pub(crate) published_at: SystemTime,
    pub(crate) settled_at: SystemTime,
}

pub(crate) struct Runner {
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) origin: Arc<str>,
    pub(crate) dead_letter: Durable,
    pub(crate) dead_channel: String,
    pub(crate) plan: RetryPlan,
    pub(crate) backoff: Backoff,
    pub(crate) batch_size: usize,
    pub(crate) counters: Arc<Counters>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) metrics: crate::record::RelayMetrics,
}

/// The relay was asked to stop while it waited.
struct Stopped;

impl Runner {
    /// Relays until stopped. Each batch is published while the next one
    /// is read, so the source's round trips overlap the broker's; batches
    /// still settle (and ack the source) in order.
    pub(crate) async fn run(mut self, mut reader: Reader, render: Render) -> crate::Result<()> {
        let mut stop = self.stop.clone();
        let batch_size = self.batch_size;
        let acker = reader.acker();
        // A WAL source streams (is active) once started; a durable one's
        // role is read from its election by the handle.
        self.counters.active.store(true, Ordering::Relaxed);
        // The batch read while the previous one was relayed.
        let mut ahead: Option<Read> = None;
        // The previous batch's acks, written while this one is published.
        let mut flush_due = false;
        loop {
            let read = match ahead.take() {
                Some(read) => read,
                None => tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    read = reader.next_batch(batch_size, &render) => read,
                },
            };
            if read.lost > 0 {
                tracing::warn!(target: "pg_pubsub", lost = read.lost,
                    "relay: retention removed messages before the relay read them");
                self.counters.lost.fetch_add(read.lost, Ordering::Relaxed);
            }
            // Everything read before this batch is settled by now.
            if let Some(token) = &read.ack_first {
                acker.ack(token);
            }
            if read.ended {
                break;
            }
            if read.items.is_empty() {
                continue;
            }
            let reading = async {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => None,
                    read = reader.next_batch(batch_size, &render) => Some(read),
                }
            };
            let flushing = async {
                if std::mem::take(&mut flush_due) {
                    acker.flush().await;
                }
            };
            let (relayed, next, ()) =
                tokio::join!(self.relay(&acker, read.items), reading, flushing);
            match (relayed, next) {
                (Ok(due), Some(next)) => {
                    flush_due = due;
                    ahead = Some(next);
                }
                _ => break,
            }
        }
        self.counters.active.store(false, Ordering::Relaxed);
        reader.close().await
    }

    /// Publishes `items` until every one is settled, acking the source
    /// as they are. True if the acks should be written now rather than at
    /// the source's ack interval: catching up (full batches), a relay that
    /// dies then replays two batches (this one and the next, published
    /// while they are written), not an interval's worth of them.
    async fn relay(&mut self, acker: &Acker, mut items: Vec<Item>) -> Result<bool, Stopped> {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        let mut flush = false;
        while !items.is_empty() {
            let answers = self.publish(&items).await;
            let step = self.plan.decide(&answers, items.len());
            if !step.dead.is_empty() {
                self.write_dead_letters(&items, &step.dead).await?;
            }
            let settled: Vec<Item> = items.drain(..step.settled).collect();
            if let Some(token) = settled.iter().rev().find_map(|i| i.ack.as_ref()) {
                acker.ack(token);
                flush |= settled.len() >= self.batch_size.div_ceil(2).max(2);
            }
            if let Some(last) = settled.last() {
                let now = SystemTime::now();
                let sent = (settled.len() - step.dead.len()) as u64;
                let c = &self.counters;
                c.relayed.fetch_add(sent, Ordering::Relaxed);
                c.duplicates
                    .fetch_add(step.duplicates as u64, Ordering::Relaxed);
                c.dead_lettered
                    .fetch_add(step.dead.len() as u64, Ordering::Relaxed);
                let latency = now.duration_since(last.published_at).unwrap_or_default();
                self.metrics.settled(sent, step.dead.len() as u64, latency);
                *c.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Last {
                    position: last.position.clone(),
                    published_at: last.published_at,
                    settled_at: now,
                });
            }
            if let Some((delay, why)) = step.retry {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                self.metrics.retry();
                tracing::warn!(target: "pg_pubsub", sink = %self.sink.describe(),
                    "relay: the broker did not confirm, retrying in {delay:?}: {why}");
                *self
                    .counters
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(why);
                self.sleep(delay).await?;
            }
        }
        Ok(flush)
    }

    /// The broker's answer for each item (items that render no subject are
    /// refused for good without being sent).
    async fn publish(&self, items: &[Item]) -> Vec<Result<Confirm, SinkError>> {
        let outgoing: Vec<Outgoing> = items
            .iter()
            .filter_map(|i| {
                let subject = i.subject.as_ref().ok()?;
                Some(Outgoing {
                    id: i.id.clone(),
                    subject: subject.clone(),
                    payload: i.payload.clone(),
                    position: i.position.clone(),
                    published_at: i.published_at,
                    origin: self.origin.clone(),
                })
            })
            .collect();
        let mut sent = if outgoing.is_empty() {
            Vec::new()
        } else {
            self.sink.publish(&outgoing).await
        }
        .into_iter();
        items
            .iter()
            .map(|i| match &i.subject {
                Ok(_) => sent.next().unwrap_or_else(|| {
                    Err(SinkError::retryable(
                        "the sink gave no answer for this message",
                    ))
                }),
                Err(why) => Err(SinkError::permanent(why.clone())),
            })
            .collect()
    }

    /// Publishes the dead letters on the dead-letter channel, retrying
    /// (PostgreSQL may be down) until it worked or the relay stops: the
    /// source is not acked past them before.
    async fn write_dead_letters(
        &self,
        items: &[Item],
        dead: &[(usize, String)],
    ) -> Result<(), Stopped> {
        let letters: Vec<String> = dead
            .iter()
            .filter_map(|(i, why)| items.get(*i).map(|item| self.letter(item, why)))
            .collect();
        for (i, why) in dead {
            if let Some(item) = items.get(*i) {
                tracing::warn!(target: "pg_pubsub", id = %item.id, channel = %self.dead_channel,
                    "relay: dead-lettering a message the broker refused: {why}");
            }
        }
        let mut attempt = 1;
        loop {
            match self
                .dead_letter
                .publish_batch(&self.dead_channel, letters.iter().map(Text))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    let delay = self.backoff.delay(attempt);
                    tracing::warn!(target: "pg_pubsub",
                        "relay: writing dead letters to {} failed, retrying in {delay:?}: {e}",
                        self.dead_channel);
                    self.sleep(delay).await?;
                }
            }
        }
    }

    /// The dead letter of `item`: what it was, where it should have gone,
    /// and why it did not.
    fn letter(&self, item: &Item, why: &str) -> String {
        let mut letter = serde_json::json!({
            "id": item.id,
            "position": item.position,
            "published_at": humantime::format_rfc3339_micros(item.published_at).to_string(),
            "origin": &*self.origin,
            "subject": item.subject.as_ref().ok(),
            "sink": self.sink.describe(),
            "error": why,
        });
        match std::str::from_utf8(&item.payload) {
            Ok(text) => letter["payload"] = text.into(),
            Err(_) => {
                let hex: String = item.payload.iter().map(|b| format!("{b:02x}")).collect();
                letter["payload_hex"] = hex.into();
            }
        }
        letter.to_string()
    }

    async fn sleep(&self, delay: Duration) -> Result<(), Stopped> {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => Err(Stopped),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }
}
