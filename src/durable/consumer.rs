//! Consuming a durable channel as a group: [`ConsumerBuilder`],
//! [`DurableSubscription`] and the task that reads for it.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;

use super::message::{Acks, DurableDelivery, DurableMessage};
use super::position::{Position, Snapshot, Xid8};
use super::Durable;
use crate::channel::ChannelName;
use crate::driver::LeadWatch;
use crate::error::{Error, ErrorKind, Origin, Result, Stage};
use crate::event::DurableEvent;
use crate::schema::election_channel;
use crate::ListenOptions;

/// The longest group name accepted, in bytes.
const MAX_GROUP_BYTES: usize = 200;

/// Turns a payload into a `T`; on failure gives the text back with the error.
type Decode<T> = fn(String) -> Result<T, (String, serde_json::Error)>;

/// Where a new group starts. An existing group always continues from its
/// cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Start {
    /// The oldest retained message (the default).
    Earliest,
    /// After everything already committed.
    Latest,
    /// After this position.
    After(Position),
    /// With the first batch ticked at or after this time (messages
    /// published shortly before it may be included).
    Time(SystemTime),
}

/// Options for a consumer, from [`Durable::consumer`].
#[must_use = "a builder does nothing until .subscribe() is awaited"]
pub struct ConsumerBuilder<T> {
    durable: Durable,
    channel: String,
    group: String,
    start: Start,
    poll_interval: Duration,
    max_poll_interval: Option<Duration>,
    batch_size: usize,
    ack_interval: Duration,
    retain_every: Option<Duration>,
    max_age: Option<Duration>,
    decode: Decode<T>,
}

/// An idle consumer's poll interval grows up to this many times the
/// configured one (see [`ConsumerBuilder::max_poll_interval`]).
const IDLE_BACKOFF: u32 = 8;

/// Pages a consumer reads with one statement while draining a batch.
const STREAM_PAGES: usize = 8;

/// How often an active consumer runs retention by default.
const RETAIN_EVERY: Duration = Duration::from_secs(30);

// Takes the text by value: a raw payload (up to 1 GB) is never copied.
fn decode_text(raw: String) -> Result<String, (String, serde_json::Error)> {
    Ok(raw)
}

fn decode_json<T: DeserializeOwned>(raw: String) -> Result<T, (String, serde_json::Error)> {
    serde_json::from_str(&raw).map_err(|e| (raw, e))
}

impl Durable {
    /// A consumer of `channel` in `group`, delivering payloads as text
    /// until [`json`](ConsumerBuilder::json) is called.
    pub fn consumer(&self, channel: &str, group: &str) -> ConsumerBuilder<String> {
        ConsumerBuilder {
            durable: self.clone(),
            channel: channel.to_owned(),
            group: group.to_owned(),
            start: Start::Earliest,
            poll_interval: Duration::from_secs(1),
            max_poll_interval: None,
            batch_size: 1000,
            ack_interval: Duration::from_millis(100),
            retain_every: Some(RETAIN_EVERY),
            max_age: None,
            decode: decode_text,
        }
    }

    /// Joins `group` on `channel`, decoding payloads as JSON into `T`,
    /// with the default options (a new group starts at the earliest message).
    pub async fn subscribe<T>(&self, channel: &str, group: &str) -> Result<DurableSubscription<T>>
    where
        T: DeserializeOwned + Send + 'static,
    {
        self.consumer(channel, group).json::<T>().subscribe().await
    }

    /// Joins `group` on `channel` with text payloads.
    pub async fn subscribe_raw(
        &self,
        channel: &str,
        group: &str,
    ) -> Result<DurableSubscription<String>> {
        self.consumer(channel, group).subscribe().await
    }
}

impl<T: Send + 'static> ConsumerBuilder<T> {
    /// Decode payloads as JSON into `U`.
    pub fn json<U: DeserializeOwned + Send + 'static>(self) -> ConsumerBuilder<U> {
        ConsumerBuilder {
            durable: self.durable,
            channel: self.channel,
            group: self.group,
            start: self.start,
            poll_interval: self.poll_interval,
            max_poll_interval: self.max_poll_interval,
            batch_size: self.batch_size,
            ack_interval: self.ack_interval,
            retain_every: self.retain_every,
            max_age: self.max_age,
            decode: decode_json::<U>,
        }
    }

    /// Where the group starts if it does not exist yet. Default: [`Start::Earliest`].
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// How often to look for new messages without a wake-up. Default: 1 s.
    /// An idle consumer backs off up to
    /// [`max_poll_interval`](Self::max_poll_interval).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The longest an idle consumer waits between looks without a
    /// wake-up: each look that found nothing after a wait without one
    /// doubles the wait, from [`poll_interval`](Self::poll_interval) up
    /// to this; a wake-up, a reconnect, a change of role or a message
    /// found sets it back. It bounds the latency of a
    /// [quiet](Durable::set_quiet) channel (published without wake-ups)
    /// after an idle period, and of a message whose wake-up was lost.
    /// `Some(poll_interval)` turns the backoff off. Default: `None`, 8
    /// times the poll interval (8 s by default).
    pub fn max_poll_interval(mut self, interval: Option<Duration>) -> Self {
        self.max_poll_interval = interval;
        self
    }

    /// Messages per page handed to the stream. Reading a backlog, a query
    /// reads up to eight pages and up to ten may be buffered ahead of the
    /// consumer: lower it for very large payloads. Default: 1000.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size;
        self
    }

    /// How long acks are gathered before the cursor is written. Default: 100 ms.
    pub fn ack_interval(mut self, interval: Duration) -> Self {
        self.ack_interval = interval;
        self
    }

    /// How often this consumer, while it is its group's active one, runs
    /// [`Durable::retain`] on the channel with [`max_age`](Self::max_age):
    /// messages every group acked are removed without anyone scheduling
    /// it. Several active consumers of the channel (one per group) doing it
    /// is harmless: one that finds a retention running skips its round
    /// rather than wait, so reads never queue behind retention.
    /// `None`: never (run `retain` yourself). Default: every 30 s.
    pub fn retain_every(mut self, interval: Option<Duration>) -> Self {
        self.retain_every = interval;
        self
    }

    /// With [`retain_every`](Self::retain_every), also remove messages
    /// published longer ago than this, read or not; groups that had not
    /// read them get [`DurableDelivery::Truncated`]. Default: `None` (keep
    /// everything some group still needs). The max age is the channel's,
    /// for every group: [`subscribe`](Self::subscribe) records it when the
    /// channel has none and fails with [`ErrorKind::Config`] when it has
    /// another one ([`Durable::set_max_age`] changes it).
    pub fn max_age(mut self, age: Option<Duration>) -> Self {
        self.max_age = age;
        self
    }

    /// Creates the group if needed and starts consuming. Returns at once:
    /// the stream yields messages while this instance is the group's
    /// active consumer ([`DurableSubscription::is_active`]).
    pub async fn subscribe(self) -> Result<DurableSubscription<T>> {
        let channel = ChannelName::new(&self.channel)?;
        if self.group.is_empty() || self.group.contains('\0') || self.group.len() > MAX_GROUP_BYTES
        {
            return Err(Error::new(
                Origin::InvalidName,
                format!("group name must be 1 to {MAX_GROUP_BYTES} bytes, without NUL"),
            ));
        }
        if self.batch_size == 0 || self.batch_size > i32::MAX as usize {
            return Err(Error::new(Origin::Config, "batch_size must be at least 1"));
        }
        if self.poll_interval.is_zero()
            || self.ack_interval.is_zero()
            || self.retain_every.is_some_and(|d| d.is_zero())
        {
            return Err(Error::new(
                Origin::Config,
                "poll_interval, ack_interval and retain_every must be above zero",
            ));
        }
        let durable = self.durable;
        durable.install().await?;
        if let Some(age) = self.max_age {
            durable.claim_max_age(channel.as_str(), age).await?;
        }
        let start = durable.start_position(&channel, self.start).await?;
        durable.create_group(&channel, &self.group, start).await?;

        let pubsub = durable.pubsub.clone();
        let election = election_channel(&durable.schema, channel.as_str(), &self.group);
        // Leadership is read from the handle's shared state (not the lossy
        // public events): watched first, so no change can be missed.
        let lead = pubsub.inner.leading.watch(&election);
        let wake = pubsub
            .inner
            .durable_wakeups
            .register(&pubsub, &durable.schema, channel.as_str())
            .await?;
        let elected = pubsub
            .listen_raw_with(
                &election,
                ListenOptions::new().single_listener(true).filtered(false),
            )
            .await?;
        let group: Arc<str> = Arc::from(self.group.as_str());
        let acks = Arc::new(Acks::new(&durable.schema, channel.clone(), group.clone()));
        let counts = Arc::new(Counts::default());
        // Pages, not messages: one channel operation per page read. Two pages
        // buffered: the next one is read while the consumer works.
        let (out, rx) = mpsc::channel(2);
        let stop_tx = Arc::new(watch::Sender::new(false));
        let stop = stop_tx.subscribe();
        let reader = Reader {
            durable: durable.clone(),
            channel: channel.clone(),
            group: group.clone(),
            election: election.clone(),
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            max_poll_interval: self
                .max_poll_interval
                .unwrap_or(self.poll_interval.saturating_mul(IDLE_BACKOFF))
                .max(self.poll_interval),
            decode: self.decode,
            acks: acks.clone(),
            counts: counts.clone(),
            out,
            stop: stop.clone(),
            range: None,
            finished_tick: None,
            retain_every: self.retain_every,
            max_age: self.max_age,
            active: None,
            term: None,
        };
        // Both tasks are stopped by the handle's shutdown too, which waits
        // for the flusher to write the last acks.
        let stopper = |stop: &Arc<watch::Sender<bool>>| {
            let stop = stop.clone();
            move |_| {
                stop.send_replace(true);
            }
        };
        let services = &pubsub.inner.services;
        let reading = services.register("durable consumer", stopper(&stop_tx))?;
        let flushing = services.register("durable ack flusher", stopper(&stop_tx))?;
        let mut stopped = stop.clone();
        let task = tokio::spawn(async move {
            // A reader blocked handing over a page nobody reads stops too.
            tokio::select! {
                () = reader.run(wake, elected, lead) => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            drop(reading);
        });
        let flush = flush_loop(durable.clone(), acks.clone(), self.ack_interval, stop);
        let flusher = tokio::spawn(async move {
            flush.await;
            drop(flushing);
        });
        Ok(DurableSubscription {
            durable,
            channel,
            group,
            election,
            acks,
            counts,
            rx,
            page: std::collections::VecDeque::new(),
            stop: stop_tx,
            task: Some(task),
            flusher: Some(flusher),
        })
    }
}

impl Durable {
    async fn start_position(&self, channel: &ChannelName, start: Start) -> Result<Position> {
        Ok(match start {
            Start::Earliest => Position::EARLIEST,
            Start::After(p) => p,
            Start::Latest => match self.tick(channel.as_str()).await? {
                0 => Position::EARLIEST,
                t => Position::end_of_tick(t),
            },
            Start::Time(at) => {
                let sql = format!(
                    "SELECT coalesce(max(tick_id), 0) FROM {}.ticks WHERE channel = $1 AND created_at < $2",
                    self.schema.as_str()
                );
                let ch = channel.as_str();
                let t: i64 = self
                    .with_client("durable start time", |c| async move {
                        Ok(c.query_one(&sql, &[&ch, &at]).await?.get(0))
                    })
                    .await?;
                Position::end_of_tick(t)
            }
        })
    }

    async fn create_group(&self, channel: &ChannelName, group: &str, p: Position) -> Result<()> {
        let sql = format!(
            "INSERT INTO {}.groups (channel, group_name, tick_id, xid, seq) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            self.schema.as_str()
        );
        let (ch, xid) = (channel.as_str(), p.xid8());
        self.with_client("creating the durable group", |c| async move {
            c.execute(&sql, &[&ch, &group, &p.tick, &xid, &p.seq])
                .await?;
            Ok(())
        })
        .await
    }

    /// The group's cursor and its count of messages lost to max-age
    /// retention (reset to zero: the caller reports them).
    async fn load_cursor(&self, channel: &ChannelName, group: &str) -> Result<(Position, i64)> {
        let s = self.schema.as_str();
        let sql = format!(
            "WITH old AS (SELECT tick_id, xid, seq, lost FROM {s}.groups \
                          WHERE channel = $1 AND group_name = $2 FOR UPDATE) \
             UPDATE {s}.groups g SET lost = 0 FROM old \
             WHERE g.channel = $1 AND g.group_name = $2 \
             RETURNING old.tick_id, old.xid, old.seq, old.lost"
        );
        let ch = channel.as_str();
        let row = self
            .with_client("loading the durable cursor", |c| async move {
                c.query_opt(&sql, &[&ch, &group]).await
            })
            .await?
            .ok_or_else(|| {
                Error::new(
                    Origin::Conflict,
                    format!("durable group {group:?} of {ch:?} does not exist (was it removed?)"),
                )
                .at(Stage::Durable)
            })?;
        Ok((position_of(&row, 0)?, row.get(3)))
    }

    fn tick_sql(&self) -> String {
        let s = self.schema.as_str();
        format!(
            "WITH old AS (SELECT lost FROM {s}.groups \
                          WHERE channel = $1 AND group_name = $2 AND lost > 0 FOR UPDATE), \
             upd AS (UPDATE {s}.groups g SET lost = 0 FROM old \
                     WHERE g.channel = $1 AND g.group_name = $2 RETURNING old.lost) \
             SELECT {s}.tick($1), coalesce((SELECT lost FROM upd), 0)"
        )
    }

    fn read_sql(&self) -> String {
        format!(
            "SELECT tick_id, xid, seq, published_at, payload \
             FROM {}.read($1, $2, $3, $4, $5)",
            self.schema.as_str()
        )
    }

    /// Ticks the channel and, in the same round trip, reports (and
    /// clears) the group's messages lost to max-age retention.
    async fn tick_and_take_lost(&self, channel: &ChannelName, group: &str) -> Result<i64> {
        let sql = self.tick_sql();
        let ch = channel.as_str();
        let row = self
            .with_client("ticking the durable channel", |c| async move {
                let stmt = c.prepare_cached(&sql).await?;
                c.query_one(&stmt, &[&ch, &group]).await
            })
            .await?;
        Ok(row.get(1))
    }

    /// [`tick_and_take_lost`](Self::tick_and_take_lost) then
    /// [`read`](Self::read), pipelined: both statements leave in one write
    /// and the server runs them in order (each in its own transaction, so
    /// the read sees the new tick), one round trip instead of two between
    /// a wake-up and its messages.
    async fn tick_and_read(
        &self,
        channel: &ChannelName,
        group: &str,
        after: Position,
        limit: usize,
    ) -> Result<(i64, Vec<Row>)> {
        let (tick_sql, read_sql) = (self.tick_sql(), self.read_sql());
        let (ch, xid) = (channel.as_str(), after.xid8());
        // Bounded by the caller's batch_size, which fits an i32.
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let (tick, rows) = self
            .with_client("ticking and reading the durable channel", |c| async move {
                let (ts, rs) =
                    futures::try_join!(c.prepare_cached(&tick_sql), c.prepare_cached(&read_sql))?;
                let tick_params: [&(dyn ToSql + Sync); 2] = [&ch, &group];
                let read_params: [&(dyn ToSql + Sync); 5] =
                    [&ch, &after.tick, &xid, &after.seq, &limit];
                futures::try_join!(c.query_one(&ts, &tick_params), c.query(&rs, &read_params))
            })
            .await?;
        Ok((tick.get(1), rows_of(&rows)?))
    }

    async fn read(&self, channel: &ChannelName, after: Position, limit: usize) -> Result<Vec<Row>> {
        let sql = self.read_sql();
        let (ch, xid) = (channel.as_str(), after.xid8());
        // Bounded by the caller's batch_size, which fits an i32.
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows = self
            .with_client("reading the durable channel", |c| async move {
                let stmt = c.prepare_cached(&sql).await?;
                c.query(&stmt, &[&ch, &after.tick, &xid, &after.seq, &limit])
                    .await
            })
            .await?;
        rows_of(&rows)
    }

    /// The bounds of batch `after.tick` when the rest of it after `after`
    /// is one plain range scan (see `range_of` in the schema script).
    async fn range_of(&self, channel: &ChannelName, after: Position) -> Result<Option<Range>> {
        let sql = format!(
            "SELECT lo, snap FROM {}.range_of($1, $2, $3, $4)",
            self.schema.as_str()
        );
        let (ch, xid) = (channel.as_str(), after.xid8());
        let row = self
            .with_client("reading the durable batch bounds", |c| async move {
                let stmt = c.prepare_cached(&sql).await?;
                c.query_opt(&stmt, &[&ch, &after.tick, &xid, &after.seq])
                    .await
            })
            .await?;
        row.map(|r| {
            Ok(Range {
                tick: after.tick,
                lo: r.try_get(0).map_err(|e| {
                    Error::new(Origin::Durable, "the server sent an unreadable xid").with_source(e)
                })?,
                snap: r.try_get(1).map_err(|e| {
                    Error::new(Origin::Durable, "the server sent an unreadable snapshot")
                        .with_source(e)
                })?,
            })
        })
        .transpose()
    }

    /// Writes the group's cursor (never backwards).
    async fn write_ack(&self, acks: &Acks, p: Position) -> Result<()> {
        let params = acks.ack_params(p);
        let sql = &acks.ack_sql;
        self.with_client("writing acks", |c| async move {
            let stmt = c.prepare_cached(sql).await?;
            c.execute(&stmt, &params.as_params()).await?;
            Ok(())
        })
        .await
    }
}

/// Rows of `read()`: position, publish time, payload.
fn rows_of(rows: &[tokio_postgres::Row]) -> Result<Vec<Row>> {
    rows.iter()
        .map(|r| {
            Ok(Row {
                position: position_of(r, 0)?,
                published_at: r.get(3),
                payload: r.get(4),
            })
        })
        .collect()
}

/// Reads `(tick_id, xid, seq)` starting at column `at`.
pub(crate) fn position_of(row: &tokio_postgres::Row, at: usize) -> Result<Position> {
    let xid: Xid8 = row.try_get(at + 1).map_err(|e| {
        Error::new(Origin::Durable, "the server sent an unreadable xid").with_source(e)
    })?;
    Ok(Position {
        tick: row.get(at),
        xid: xid.0,
        seq: row.get(at + 2),
    })
}

/// A batch whose rest is one plain range scan: its tick, the previous
/// tick's xmax, and its own snapshot.
struct Range {
    tick: i64,
    lo: Xid8,
    snap: Snapshot,
}

struct Row {
    position: Position,
    published_at: SystemTime,
    payload: String,
}

/// The task that reads for one subscription while it is the active consumer.
struct Reader<T> {
    durable: Durable,
    channel: ChannelName,
    group: Arc<str>,
    election: String,
    batch_size: usize,
    poll_interval: Duration,
    max_poll_interval: Duration,
    decode: Decode<T>,
    acks: Arc<Acks>,
    counts: Arc<Counts>,
    out: mpsc::Sender<Vec<DurableDelivery<T>>>,
    stop: watch::Receiver<bool>,
    /// Set while draining a batch that plain range scans can read.
    range: Option<Range>,
    /// A tick whose batch was read to its end (a short page): the next
    /// read starts at the following tick instead of looking for more of it.
    finished_tick: Option<i64>,
    retain_every: Option<Duration>,
    max_age: Option<Duration>,
    /// Whether this is the active consumer, as last reported in events.
    active: Option<bool>,
    /// The leadership term this reader's cursor belongs to: a new term
    /// (the lock was lost and won back) reloads the group's cursor.
    term: Option<u64>,
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
    async fn run(
        mut self,
        wake: super::wakeups::Waiter,
        mut elected: crate::Subscription<String>,
        mut lead: LeadWatch,
    ) {
        let leading = self.durable.pubsub.inner.leading.clone();
        // Where the next read starts; None: reload the group's cursor.
        let mut cursor: Option<Position> = None;
        let mut draining = false;
        // The wait before the next look without a wake-up (backs off).
        let mut idle = self.poll_interval;
        let mut next_retain = self.retain_every.map(|d| tokio::time::Instant::now() + d);
        loop {
            lead.mark_unchanged();
            let term = leading.term(&self.election);
            if term.is_some() && term != self.term {
                // Another consumer may have moved the group meanwhile.
                cursor = None;
            }
            self.term = term;
            if term.is_some() {
                self.set_active(true);
                if let (Some(at), Some(every)) = (next_retain, self.retain_every) {
                    if tokio::time::Instant::now() >= at {
                        // Tick before the next read: it takes (and reports)
                        // what max-age removal cost this group.
                        draining &= !self.retain().await;
                        next_retain = Some(tokio::time::Instant::now() + every);
                    }
                }
                self.counts.reads.fetch_add(1, Ordering::Relaxed);
                let result = self.round(&mut cursor, draining).await;
                draining = matches!(result, Ok(true)) && cursor.is_some();
                match result {
                    Ok(true) => {
                        // Rows read: more may be waiting.
                        idle = self.poll_interval;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) if e.kind() == ErrorKind::ShutDown => return,
                    Err(e) => {
                        if self.out.is_closed() {
                            return;
                        }
                        tracing::warn!(channel = %self.channel, group = %self.group, "durable consumer: {e}; retrying");
                        cursor = None;
                    }
                }
            } else {
                // `listen` of the election returned: not leading is standing by.
                cursor = None;
                self.set_active(false);
            }
            // Only this channel's wake-ups and leadership changes reach
            // here (see `wakeups`): each is worth a look.
            let mut deadline = tokio::time::Instant::now() + idle;
            if self.active == Some(true) {
                deadline = next_retain.map_or(deadline, |at| at.min(deadline));
            }
            let wait = tokio::select! {
                _ = self.stop.changed() => Wake::Stop,
                open = wake.woken() => if open { Wake::Now } else { Wake::Stop },
                d = elected.next() => match d {
                    Some(_) => Wake::Now,
                    None => Wake::Stop,
                },
                () = lead.changed() => Wake::Now,
                _ = tokio::time::sleep_until(deadline) => Wake::Timer,
            };
            match wait {
                Wake::Stop => return,
                _ if self.out.is_closed() => return,
                Wake::Now => {
                    self.counts.wakeups.fetch_add(1, Ordering::Relaxed);
                    idle = self.poll_interval;
                }
                Wake::Timer => idle = idle.saturating_mul(2).min(self.max_poll_interval),
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

    /// Ticks (unless `draining`: the last page had rows, so the known
    /// ticks may not be exhausted yet) and reads one page; true when it
    /// had rows.
    async fn round(&mut self, cursor: &mut Option<Position>, draining: bool) -> Result<bool> {
        let durable = &self.durable;
        let mut lost = 0;
        let at = match *cursor {
            Some(p) => p,
            None => {
                self.range = None;
                self.finished_tick = None;
                // Our own pending acks first, so a reload does not go back.
                if let Some(p) = self.acks.take() {
                    if let Err(e) = durable.write_ack(&self.acks, p).await {
                        self.acks.restore(p);
                        return Err(e);
                    }
                }
                let (p, l) = durable.load_cursor(&self.channel, &self.group).await?;
                lost = l;
                *cursor = Some(p);
                p
            }
        };
        let mut page = Vec::new();
        let ranged = self.range.as_ref().is_some_and(|r| r.tick == at.tick);
        // Batches never change once ticked: after the end of one, read the
        // next (ticks of a channel are numbered without holes) rather than
        // have `read` look for more of it first, which halves its work.
        let from = match self.finished_tick {
            Some(t) if t == at.tick => Position::start_of_tick(t + 1),
            _ => at,
        };
        let mut rows = None;
        if !draining && ranged {
            lost += durable
                .tick_and_take_lost(&self.channel, &self.group)
                .await?;
        } else if !draining {
            let (l, r) = durable
                .tick_and_read(&self.channel, &self.group, from, self.batch_size)
                .await?;
            lost += l;
            rows = Some(r);
        }
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
        let rows = match rows {
            Some(rows) => rows,
            None => match self.range.take().filter(|r| r.tick == at.tick) {
                Some(range) => return self.stream_range(range, at, cursor, page).await,
                None => durable.read(&self.channel, from, self.batch_size).await?,
            },
        };
        let full = rows.len() == self.batch_size;
        let got_rows = !rows.is_empty();
        if let Some(last) = rows.last() {
            self.finished_tick = (!full).then_some(last.position.tick);
        }
        self.range = match rows.last() {
            Some(last) if full => durable.range_of(&self.channel, last.position).await?,
            _ => None,
        };
        page.reserve(rows.len());
        for row in rows {
            *cursor = Some(row.position);
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
        // `read` returns one batch (tick) at most: a short page may be
        // followed by more ticked batches (a group catching up on many
        // small transactions), so read on until a read finds nothing
        // instead of waiting a poll interval per batch.
        Ok(full || got_rows)
    }

    /// Reads up to [`STREAM_PAGES`] pages of batch `range.tick` after `at`
    /// with one statement, handing each page to the stream as soon as its
    /// rows arrived: the server produces the next rows while these are
    /// decoded and consumed, and a backlog costs one round trip per
    /// [`STREAM_PAGES`] pages. `page` holds what goes first (a truncation
    /// notice). True when it read the most it could (more may follow).
    async fn stream_range(
        &mut self,
        range: Range,
        at: Position,
        cursor: &mut Option<Position>,
        page: Vec<DurableDelivery<T>>,
    ) -> Result<bool> {
        let size = self.batch_size;
        let limit = size.saturating_mul(STREAM_PAGES);
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
                let stmt = c.prepare_cached(&sql).await?;
                let params: [&(dyn ToSql + Sync); 6] = [&ch, lo, snap, &xid, &at.seq, &limit_param];
                let rows = c.query_raw(&stmt, params).await?;
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
        if let Some(last) = last {
            *cursor = Some(last);
        }
        let full = read == limit;
        if full {
            self.range = Some(range);
        }
        Ok(full)
    }
}

/// A consumer's counters, shared by its reader and its subscription.
#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    wakeups: AtomicU64,
}

/// What a consumer did so far, from [`DurableSubscription::stats`].
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

/// Writes acks every `interval` while there are any, and once more on stop.
async fn flush_loop(
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

/// A consumer group member: a [`Stream`] of [`DurableDelivery`] items.
///
/// Messages arrive only while this is the group's active consumer. Acks
/// are cumulative and written in the background; call
/// [`close`](Self::close) to stop and write the last ones (dropping also
/// stops, and writes them if the pool is still open). The stream ends when
/// the [`PgPubSub`](crate::PgPubSub) shuts down.
pub struct DurableSubscription<T> {
    durable: Durable,
    channel: ChannelName,
    group: Arc<str>,
    election: String,
    acks: Arc<Acks>,
    counts: Arc<Counts>,
    rx: mpsc::Receiver<Vec<DurableDelivery<T>>>,
    /// The rest of the page being handed out.
    page: std::collections::VecDeque<DurableDelivery<T>>,
    stop: Arc<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
    flusher: Option<JoinHandle<()>>,
}

impl<T> DurableSubscription<T> {
    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The elected channel that decides the group's active consumer (see
    /// [`election_channel`](super::election_channel)).
    pub fn election_channel(&self) -> &str {
        &self.election
    }

    /// Whether this instance is the group's active consumer now.
    pub fn is_active(&self) -> bool {
        self.durable.pubsub.is_leader(&self.election)
    }

    /// Events of the durable consumers of this subscription's
    /// [`PgPubSub`](crate::PgPubSub) (see [`Durable::events`]).
    pub fn events(&self) -> crate::event::Events<DurableEvent> {
        self.durable.events()
    }

    /// What this consumer did so far: how often it looked for messages,
    /// and how often it was woken to.
    pub fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            reads: self.counts.reads.load(Ordering::Relaxed),
            wakeups: self.counts.wakeups.load(Ordering::Relaxed),
        }
    }

    /// Writes the acks given so far to the group's cursor now.
    pub async fn flush(&self) -> Result<()> {
        match self.acks.take() {
            Some(p) => self
                .durable
                .write_ack(&self.acks, p)
                .await
                .inspect_err(|_| {
                    self.acks.restore(p);
                }),
            None => Ok(()),
        }
    }

    /// Stops consuming (handing the group to a standby) after writing the
    /// acks given so far.
    pub async fn close(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            // It may wait to hand us a message nobody will read.
            task.abort();
            let _ = task.await;
        }
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.await;
        }
        // The flusher tried once; a failure is reported here.
        self.flush().await
    }

    /// The next item; `None` once the stream ended.
    pub async fn recv(&mut self) -> Option<DurableDelivery<T>> {
        futures::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<DurableDelivery<T>>> {
        loop {
            if let Some(item) = self.page.pop_front() {
                return Poll::Ready(Some(item));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(page)) => self.page = page.into(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

// Nothing in it is pinned: the page buffer and channel move freely.
impl<T> Unpin for DurableSubscription<T> {}

impl<T> Stream for DurableSubscription<T> {
    type Item = DurableDelivery<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_item(cx)
    }
}

impl<T> Drop for DurableSubscription<T> {
    fn drop(&mut self) {
        // The reader drops its subscriptions (releasing the election) and
        // the flusher writes the last acks.
        let _ = self.stop.send(true);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl<T> fmt::Debug for DurableSubscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableSubscription")
            .field("channel", &self.channel)
            .field("group", &self.group)
            .field("election", &self.election)
            .finish()
    }
}
