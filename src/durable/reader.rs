//! The task that reads for a subscription while it is the active consumer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::{ToSql, Type};

use super::message::{Acks, DurableDelivery, DurableMessage};
use super::plan::{ReadPlan, Step};
use super::position::{Position, Xid8};
use super::role::Role;
use super::store::Range;
use super::Durable;
use crate::channel::ChannelName;
use crate::error::{Error, ErrorKind, Result};
use crate::event::DurableEvent;

/// Turns a payload into a `T`; on failure gives the text back with the error.
pub(super) type Decode<T> = fn(String) -> Result<T, (String, serde_json::Error)>;

/// The task that reads for one subscription while it is the active consumer.
pub(super) struct Reader<T> {
    pub(super) durable: Durable,
    pub(super) channel: ChannelName,
    pub(super) group: Arc<str>,
    /// Where to read next and how long to wait (the decisions, no I/O).
    pub(super) plan: ReadPlan<Range>,
    pub(super) decode: Decode<T>,
    pub(super) acks: Arc<Acks>,
    pub(super) counts: Arc<Counts>,
    /// `durable_delivered_total{channel,group}`.
    pub(super) delivered: crate::record::Count,
    pub(super) out: mpsc::Sender<Vec<DurableDelivery<T>>>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) retain_every: Option<Duration>,
    pub(super) max_age: Option<Duration>,
    /// Whether this is the active consumer, as last reported in events.
    pub(super) active: Option<bool>,
}

/// What a round does after its tick, if any.
enum Then {
    /// The rows the tick's pipelined read returned.
    Rows(Vec<super::store::Row>),
    /// Read a page from here.
    Read(Position),
    /// Stream the rest of the batch after this position.
    Stream(Range, Position),
}

/// Why the reader should look again now.
enum Wake {
    /// Something happened (a wake-up, a gap, a change of role).
    Now,
    /// The poll interval passed without anything happening.
    Timer,
    Stop,
}

impl<T: Send + 'static> Reader<T> {
    pub(super) async fn run(mut self, wake: Option<super::wakeups::Waiter>, mut role: Role) {
        let mut next_retain = self.retain_every.map(|d| tokio::time::Instant::now() + d);
        loop {
            role.mark_unchanged();
            // `listen` of the election returned: not leading is standing by.
            if self.plan.lead(role.term()) {
                self.set_active(true);
                if let (Some(at), Some(every)) = (next_retain, self.retain_every) {
                    if tokio::time::Instant::now() >= at {
                        let expired = self.retain().await;
                        self.plan.retained(expired);
                        next_retain = Some(tokio::time::Instant::now() + every);
                    }
                }
                self.counts.reads.fetch_add(1, Ordering::Relaxed);
                match self.round().await {
                    Ok((got, more)) => {
                        if self.plan.round_done(got, more) {
                            continue;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::ShutDown => return,
                    Err(e) => {
                        self.plan.round_failed();
                        if self.out.is_closed() {
                            return;
                        }
                        tracing::warn!(channel = %self.channel, group = %self.group, "durable consumer: {e}; retrying");
                    }
                }
            } else {
                self.set_active(false);
            }
            // Only this channel's wake-ups and leadership changes reach
            // here (see `wakeups`): each is worth a look.
            let mut deadline = tokio::time::Instant::now() + self.plan.idle();
            if self.active == Some(true) {
                deadline = next_retain.map_or(deadline, |at| at.min(deadline));
            }
            let wait = tokio::select! {
                _ = self.stop.changed() => Wake::Stop,
                open = woken(wake.as_ref()) => if open { Wake::Now } else { Wake::Stop },
                open = role.changed() => if open { Wake::Now } else { Wake::Stop },
                _ = tokio::time::sleep_until(deadline) => Wake::Timer,
            };
            match wait {
                Wake::Stop => return,
                _ if self.out.is_closed() => return,
                Wake::Now => {
                    self.counts.wakeups.fetch_add(1, Ordering::Relaxed);
                    self.plan.woken();
                }
                Wake::Timer => self.plan.timed_out(),
            }
        }
    }

    /// Reports a change of role in the instance's events.
    fn set_active(&mut self, active: bool) {
        if self.active == Some(active) {
            return;
        }
        self.active = Some(active);
        let (channel, group) = (self.channel.clone(), self.group.clone());
        self.durable.pubsub.inner.buses.durable.emit(if active {
            DurableEvent::Active { channel, group }
        } else {
            DurableEvent::Standby { channel, group }
        });
    }

    /// Runs retention on the channel; true when it expired messages (some
    /// group, maybe this one, lost some). Failures are logged: the next
    /// interval tries again.
    async fn retain(&self) -> bool {
        match self
            .durable
            .retain_with(self.channel.as_str(), self.max_age, false)
            .await
        {
            Ok(r) => {
                if r.acked > 0 || r.expired > 0 || r.truncated > 0 {
                    self.durable
                        .pubsub
                        .inner
                        .buses
                        .durable
                        .emit(DurableEvent::Retained {
                            channel: self.channel.clone(),
                            acked: r.acked,
                            expired: r.expired,
                            truncated: r.truncated,
                            carried: r.carried,
                        });
                }
                r.expired > 0
            }
            Err(e) => {
                tracing::warn!(channel = %self.channel, group = %self.group, "durable retention: {e}");
                false
            }
        }
    }

    /// Reads one page where the plan says (ticking first unless it is
    /// draining); whether it delivered rows, and whether to read again at
    /// once.
    async fn round(&mut self) -> Result<(bool, bool)> {
        let durable = &self.durable;
        let mut lost = 0;
        let at = match self.plan.cursor() {
            Some(p) => p,
            None => {
                // Our own pending acks first, so a reload does not go back.
                if let Some(p) = self.acks.take() {
                    if let Err(e) = durable.write_ack(&self.acks, p).await {
                        self.acks.restore(p);
                        return Err(e);
                    }
                }
                let (p, l) = durable.load_cursor(&self.channel, &self.group).await?;
                lost = l;
                self.plan.loaded(p);
                p
            }
        };
        let batch_size = self.plan.batch_size();
        let then = match self.plan.step(at) {
            Step::Read { tick: true, from } => {
                let (latest, l, rows) = durable
                    .tick_and_read(&self.channel, &self.group, from, batch_size)
                    .await?;
                self.plan.ticked(latest);
                lost += l;
                Then::Rows(rows)
            }
            Step::Read { tick: false, from } => Then::Read(from),
            Step::Stream { tick, range, at } => {
                if tick {
                    let (latest, l) = durable
                        .tick_and_take_lost(&self.channel, &self.group)
                        .await?;
                    self.plan.ticked(latest);
                    lost += l;
                }
                Then::Stream(range, at)
            }
        };
        let mut page = Vec::new();
        if lost > 0 {
            let lost = u64::try_from(lost).unwrap_or(0);
            self.durable
                .pubsub
                .inner
                .buses
                .durable
                .emit(DurableEvent::Truncated {
                    channel: self.channel.clone(),
                    group: self.group.clone(),
                    lost,
                });
            page.push(DurableDelivery::Truncated { lost });
        }
        // A backlog is read a page at a time; `read` (a function) costs a
        // copy of each page on the server, so the rest of a batch whose
        // first page was full takes the plain statement when it can,
        // streamed several pages per statement.
        let rows = match then {
            Then::Rows(rows) => rows,
            Then::Read(from) => durable.read(&self.channel, from, batch_size).await?,
            Then::Stream(range, at) => return self.stream_range(range, at, page).await,
        };
        let got = !rows.is_empty();
        let end = self
            .plan
            .page_read(rows.len(), rows.last().map(|r| r.position));
        if let Some(last) = end.find_range {
            let range = durable.range_of(&self.channel, last).await?;
            self.plan.set_range(range);
        }
        page.reserve(rows.len());
        self.delivered.add(rows.len());
        for row in rows {
            page.push(deliver(
                self.decode,
                &self.acks,
                row.position,
                row.published_at,
                row.payload,
            ));
        }
        if !page.is_empty() && self.out.send(page).await.is_err() {
            return Err(Error::shut_down());
        }
        Ok((got, end.more))
    }

    /// Reads up to `STREAM_PAGES` pages of batch `range.tick` after `at`
    /// with one statement, handing each page to the stream as soon as its
    /// rows arrived: the server produces the next rows while these are
    /// decoded and consumed, and a backlog costs one round trip per
    /// `STREAM_PAGES` pages. `page` holds what goes first (a truncation
    /// notice). Whether it read rows, and whether it read the most it
    /// could (more may follow).
    async fn stream_range(
        &mut self,
        range: Range,
        at: Position,
        page: Vec<DurableDelivery<T>>,
    ) -> Result<(bool, bool)> {
        let (size, limit) = (self.plan.batch_size(), self.plan.stream_limit());
        let sql = format!(
            "SELECT xid, seq, published_at, payload FROM {}.messages \
             WHERE channel = $1 AND xid >= $2 AND xid < pg_snapshot_xmax($3) \
               AND (xid, seq) > ($4, $5) AND pg_visible_in_snapshot(xid, $3) \
             ORDER BY xid, seq LIMIT $6",
            self.durable.schema.as_str()
        );
        let (decode, acks, out) = (self.decode, self.acks.clone(), self.out.clone());
        let (ch, xid) = (self.channel.as_str(), at.xid8());
        let (tick, lo, snap) = (range.tick, &range.lo, &range.snap);
        let limit_param = i64::try_from(limit).unwrap_or(i64::MAX);
        let (read, last, held, closed) = self
            .durable
            .with_client("reading the durable channel", |c| async move {
                let params: [(&(dyn ToSql + Sync), Type); 6] = [
                    (&ch, Type::TEXT),
                    (lo, Type::XID8),
                    (snap, Type::PG_SNAPSHOT),
                    (&xid, Type::XID8),
                    (&at.seq, Type::INT8),
                    (&limit_param, Type::INT8),
                ];
                let rows = c.query_raw_p(&sql, &params).await?;
                futures::pin_mut!(rows);
                let (mut page, mut held, mut read, mut last) = (page, Vec::new(), 0, None);
                let mut closed = false;
                while let Some(row) = rows.next().await {
                    let row = row?;
                    let xid: Xid8 = row.try_get(0)?;
                    let position = Position {
                        tick,
                        xid: xid.0,
                        seq: row.try_get(1)?,
                    };
                    page.push(deliver(
                        decode,
                        &acks,
                        position,
                        row.try_get(2)?,
                        row.try_get(3)?,
                    ));
                    read += 1;
                    last = Some(position);
                    if page.len() >= size {
                        let full = std::mem::replace(&mut page, Vec::with_capacity(size));
                        // Never wait for the consumer here (the statement
                        // runs under the pool's timeout): hold pages back.
                        if !held.is_empty() {
                            held.push(full);
                        } else if let Err(e) = out.try_send(full) {
                            match e {
                                mpsc::error::TrySendError::Full(full) => held.push(full),
                                mpsc::error::TrySendError::Closed(_) => {
                                    closed = true;
                                    break;
                                }
                            }
                        }
                    }
                }
                if !page.is_empty() {
                    held.push(page);
                }
                Ok((read, last, held, closed))
            })
            .await?;
        if closed {
            return Err(Error::shut_down());
        }
        for page in held {
            if self.out.send(page).await.is_err() {
                return Err(Error::shut_down());
            }
        }
        self.delivered.add(read);
        Ok((read > 0, self.plan.streamed(range, read, last)))
    }
}

/// A wake-up of the channel; never without wake-ups (poll-only, behind a
/// pooler in transaction mode). False once the handle shut down.
async fn woken(wake: Option<&super::wakeups::Waiter>) -> bool {
    match wake {
        Some(w) => w.woken().await,
        None => std::future::pending().await,
    }
}

/// A consumer's counters, shared by its reader and its subscription.
#[derive(Default)]
pub(super) struct Counts {
    pub(super) reads: AtomicU64,
    pub(super) wakeups: AtomicU64,
}

/// What a consumer did so far, from [`DurableSubscription::stats`](super::DurableSubscription::stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Times the consumer looked for messages while active (each a round
    /// trip or two: a tick and a read, or the next page of a batch).
    pub reads: u64,
    /// Times it was woken to look: a wake-up of its channel, a reconnect,
    /// or a change of role (timer-driven polls are not counted).
    pub wakeups: u64,
}

/// A row as the stream's item: decoded, or handed over as text with the error.
fn deliver<T>(
    decode: Decode<T>,
    acks: &Arc<Acks>,
    position: Position,
    published_at: SystemTime,
    payload: String,
) -> DurableDelivery<T> {
    let message = DurableMessage {
        payload: (),
        position,
        published_at,
        acks: acks.clone(),
    };
    match decode(payload) {
        Ok(payload) => DurableDelivery::Message(message.map(|()| payload)),
        Err((raw, error)) => DurableDelivery::Undecodable {
            message: message.map(|()| raw),
            error: Arc::new(error),
        },
    }
}
