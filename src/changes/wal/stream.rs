//! The task that owns the replication connection: decodes, hands items to
//! the feed in batches, reports acks, and reconnects forever from the last ack.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::conn::{Conn, Frame, Settings};
use super::decode::{Decoded, Decoder, TypeRow, TYPES_SQL};
use super::slot::{
    advance_slot, emit_heartbeat, slot_position, slot_state, stream_hint, HEARTBEAT_PREFIX,
};
use super::snapshot::{Link, Mark, SNAPSHOT_PREFIX};
use super::{RawItem, Shared, WalItem, WalMessage};
use crate::changes::{ChangeEvent, Lsn, Op};

/// A stream that ran this long was healthy: the next loss backs off from
/// the start again.
const STEADY: Duration = Duration::from_secs(10);
use crate::error::{Error, Origin, Result};
use crate::event::{Bus, WalEvent};
use crate::exec::Exec;
use crate::PgPubSub;

/// The replication connection's settings, from the handle's connection
/// settings (user, password, database, `sslmode` and its rustls set-up).
/// Host and port are those of the current primary, found at each connect.
pub(crate) fn replication_settings(
    pubsub: &PgPubSub,
    slot: &str,
    publication: &str,
) -> Result<Settings> {
    let pg = pubsub.config();
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let settings = Settings {
        database: pg.get_dbname().unwrap_or(&user).to_owned(),
        user,
        password: pg.get_password().map(<[u8]>::to_vec),
        slot: slot.to_owned(),
        publication: publication.to_owned(),
        ssl_mode: pg.get_ssl_mode(),
        #[cfg(feature = "tls")]
        rustls: pubsub.exec().tls().rustls.clone(),
        connect_timeout: pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(pubsub.inner.opts.connect_timeout),
    };
    settings.check()?;
    Ok(settings)
}

pub(crate) struct StreamTask {
    pub(crate) exec: Exec,
    pub(crate) events: Bus<WalEvent>,
    pub(crate) slot: Arc<str>,
    pub(crate) settings: Settings,
    pub(crate) messages: Option<String>,
    pub(crate) shared: Arc<Shared>,
    /// Items go to the feed in batches of at most `batch` (one channel
    /// operation, one wake-up, for many items).
    pub(crate) out: mpsc::Sender<Vec<RawItem>>,
    pub(crate) batch: usize,
    /// How often the acked position is reported to the server.
    pub(crate) status_interval: Duration,
    pub(crate) stop: watch::Receiver<bool>,
    /// `wal_changes_total{slot}`.
    pub(crate) changes: crate::record::Count,
    /// The handle's connection settings: each (re)connect streams from the
    /// first of its hosts that is a primary now.
    pub(crate) pg: tokio_postgres::Config,
    /// Where the feed's slot is recorded (see [`SlotState`]).
    pub(crate) schema: crate::schema::SchemaName,
    pub(crate) connect_timeout: Duration,
    /// Shared with the snapshot driver: tracked tables, chunks in flight.
    pub(crate) link: Arc<Link>,
}

/// Why the stream loop returned.
enum End {
    Stopped,
    Lost(Error),
}

/// Where a stream stands between frames.
struct Progress {
    decoder: Decoder,
    xid: u32,
    commit_time: Option<std::time::SystemTime>,
    /// A Begin held back until its transaction has something for this feed.
    pending_begin: Option<RawItem>,
    /// The highest ack-able position handed to the consumer.
    delivered: u64,
    /// Between a Begin and its Commit: a keepalive's position may then be
    /// past the commit record of the transaction being sent.
    in_tx: bool,
    batch: Vec<RawItem>,
    last_status: Instant,
    /// Fires when the next status update is due: one timer, reset at each
    /// update (not one per wake-up).
    status_due: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl StreamTask {
    /// Opens the stream from the last ack (or the slot's confirmed position).
    pub(crate) async fn connect(&self, first: bool) -> Result<Conn> {
        let from = Lsn(self.shared.acked.load(Ordering::Acquire));
        let (host, port) =
            crate::connect::find_primary(&self.pg, self.exec.tls(), self.connect_timeout)
                .await
                .map_err(|e| e.at(crate::error::Stage::Wal))?;
        let conn = Conn::open(&self.settings, &host, port, from)
            .await
            .map_err(|e| slot_error(&self.slot, e))?;
        tracing::debug!(slot = %self.slot, %from, first, "pg-pubsub: WAL feed streaming");
        self.events.emit(WalEvent::Streaming {
            slot: self.slot.clone(),
            from,
        });
        Ok(conn)
    }

    /// The first connect: errors are returned, except (with `standby`)
    /// "slot is active for PID" (55006), which is waited out.
    pub(crate) async fn connect_first(&self, standby: bool) -> Result<Conn> {
        let backoff = self.exec.backoff();
        let mut attempt = 1;
        loop {
            match self.connect(true).await {
                Err(e) if standby && e.to_string().contains("55006") => {
                    attempt += 1;
                    tracing::debug!(slot = %self.slot, "pg-pubsub: WAL slot in use; standing by");
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.delay(attempt)) => {}
                        _ = stop.wait_for(|s| *s) => return Err(Error::shut_down()),
                    }
                }
                res => return res,
            }
        }
    }

    /// Streams until stopped (or the feed is dropped), then moves the slot
    /// to the last ack: what the stream had not reported yet counts too.
    pub(crate) async fn run(mut self, first: Conn) -> Result<()> {
        self.stream_loop(first).await;
        self.confirm().await
    }

    async fn confirm(&self) -> Result<()> {
        let acked = Lsn(self.shared.acked.load(Ordering::Acquire));
        if acked.0 == 0 {
            return Ok(());
        }
        // The walsender may take a moment to release the slot after the
        // stream ended: "slot is active" (55006) until then.
        let backoff = crate::Backoff::default();
        let mut attempt = 1;
        loop {
            match advance_slot(&self.exec, &self.slot, acked).await {
                Err(e)
                    if attempt < 25
                        && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
                {
                    attempt += 1;
                    tokio::time::sleep(backoff.delay(attempt).min(Duration::from_millis(200)))
                        .await;
                }
                res => return res,
            }
        }
    }

    async fn stream_loop(&mut self, first: Conn) {
        let mut conn = Some(first);
        let mut attempt = 0u32;
        let backoff = self.exec.backoff();
        loop {
            if let Some(mut c) = conn.take() {
                // Backoff starts over only after a stream that lasted: one
                // that fails at once (a dropped publication) keeps backing off.
                let started = Instant::now();
                let end = self.stream(&mut c).await;
                if started.elapsed() >= STEADY {
                    attempt = 0;
                }
                match end {
                    End::Stopped => {
                        c.close(self.shared.acked.load(Ordering::Acquire)).await;
                        return;
                    }
                    End::Lost(err) => {
                        drop(c);
                        if !self.lost(err, &mut attempt, &backoff).await {
                            return;
                        }
                    }
                }
            }
            match self.connect(false).await {
                Ok(c) => conn = Some(c),
                Err(err) => {
                    if !self.lost(err, &mut attempt, &backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Reports the loss and waits out the backoff; `false` when stopped,
    /// or when the slot itself is lost (missing after a failover, or
    /// invalidated): that ends the feed with an
    /// [`ErrorKind::SlotLost`](crate::ErrorKind::SlotLost) item, as
    /// reconnecting can never resume it.
    async fn lost(&mut self, err: Error, attempt: &mut u32, backoff: &crate::Backoff) -> bool {
        // A server that refused the stream (no such slot, an invalidated
        // one) is asked why; one that cannot be reached is not (the check
        // would wait for the pool as long as the outage lasts).
        let state = if err.is_connection() {
            None
        } else {
            slot_state(&self.exec, &self.schema, &self.slot).await.ok()
        };
        if let Some(state) = state {
            if let Some(gone) = state.lost_error(&self.slot, &self.schema) {
                let gone = gone.context(format!("the stream ended with: {err}"));
                tracing::error!(slot = %self.slot, %gone, "pg-pubsub: WAL feed slot lost");
                tokio::select! {
                    _ = self.out.send(vec![WalItem::Error(gone)]) => {}
                    _ = self.stop.wait_for(|s| *s) => {}
                }
                return false;
            }
        }
        *attempt += 1;
        // The first attempt after a good stream is immediate; later ones back off.
        let retry_in = backoff.delay(*attempt + 1);
        tracing::warn!(slot = %self.slot, %err, ?retry_in, "pg-pubsub: WAL feed lost its stream");
        self.events.emit(WalEvent::Disconnected {
            slot: self.slot.clone(),
            reason: Arc::from(err.to_string()),
            attempt: *attempt,
            retry_in,
        });
        if *attempt == 1 {
            let sent = tokio::select! {
                sent = self.out.send(vec![WalItem::Error(err)]) => sent.is_ok(),
                _ = self.stop.wait_for(|s| *s) => false,
            };
            if !sent {
                return false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => true,
            _ = self.stop.wait_for(|s| *s) => false,
        }
    }

    fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Acquire)
    }

    async fn stream(&mut self, conn: &mut Conn) -> End {
        // What a snapshot tracked of the last stream is gone with it.
        self.link.restarted();
        let mut p = Progress {
            decoder: Decoder::default(),
            xid: 0,
            commit_time: None,
            pending_begin: None,
            delivered: self.acked(),
            in_tx: false,
            batch: Vec::with_capacity(self.batch),
            last_status: Instant::now(),
            status_due: Box::pin(tokio::time::sleep(self.status_interval)),
        };
        let mut stop = self.stop.clone();
        loop {
            // Everything already read, without I/O or select.
            loop {
                let frame = match conn.frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return End::Lost(slot_error(&self.slot, e)),
                };
                if let Err(end) = self.frame(conn, &mut p, frame).await {
                    return end;
                }
                if p.batch.len() >= self.batch {
                    if let Err(end) = self.flush(conn, &mut p).await {
                        return end;
                    }
                }
            }
            if let Err(end) = self.flush(conn, &mut p).await {
                return end;
            }
            if p.last_status.elapsed() >= self.status_interval {
                if let Err(end) = self.status(conn, &mut p, false).await {
                    return end;
                }
            }
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return End::Stopped,
                _ = &mut p.status_due => {
                    if let Err(end) = self.status(conn, &mut p, false).await {
                        return end;
                    }
                }
                read = conn.read_more() => {
                    if let Err(e) = read {
                        return End::Lost(e.prefix(format!("WAL feed on slot {:?}", self.slot)));
                    }
                }
            }
        }
    }

    /// Reports the acked position to the server.
    async fn status(&self, conn: &mut Conn, p: &mut Progress, reply: bool) -> Result<(), End> {
        p.last_status = Instant::now();
        p.status_due
            .as_mut()
            .reset(p.last_status + self.status_interval);
        conn.send_status(self.acked(), reply)
            .await
            .map_err(|e| End::Lost(e.prefix(format!("WAL feed on slot {:?}", self.slot))))
    }

    /// Hands the batch to the feed, reporting acks while it is full.
    async fn flush(&self, conn: &mut Conn, p: &mut Progress) -> Result<(), End> {
        if p.batch.is_empty() {
            return Ok(());
        }
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return Err(End::Stopped),
                permit = self.out.reserve() => match permit {
                    Ok(permit) => {
                        let next = Vec::with_capacity(self.batch);
                        permit.send(std::mem::replace(&mut p.batch, next));
                        return Ok(());
                    }
                    Err(_) => return Err(End::Stopped),
                },
                // The consumer is slow: the server still hears from us.
                _ = &mut p.status_due => self.status(conn, p, false).await?,
            }
        }
    }

    /// Adds a transaction's item to the batch, its Begin first if held back.
    fn push(p: &mut Progress, item: RawItem) {
        if let Some(begin) = p.pending_begin.take() {
            p.batch.push(begin);
        }
        p.batch.push(item);
    }

    async fn frame(&self, conn: &mut Conn, p: &mut Progress, frame: Frame) -> Result<(), End> {
        let (lsn, data) = match frame {
            Frame::End => {
                return Err(End::Lost(
                    Error::new(Origin::Wal, "the replication stream ended").connection(),
                ))
            }
            Frame::KeepAlive { wal_end, reply } => {
                // Idle, and the consumer acked all it was given: confirm
                // the server's position. Every transaction committed
                // before it was sent already (none was for this feed, or
                // it was delivered and acked), so nothing is skipped; and
                // the slot then holds no WAL, and a clean shutdown of
                // the server (a switchover), which waits until the
                // client confirmed all that was sent, is not held up.
                let acked = self.acked();
                if !p.in_tx && acked >= p.delivered && wal_end.0 > acked {
                    p.delivered = wal_end.0;
                    self.shared.advance(wal_end.0);
                }
                if reply {
                    self.status(conn, p, false).await?;
                }
                return Ok(());
            }
            Frame::XLogData { wal_start, data } => (wal_start, data),
        };
        let decoded = match p.decoder.decode(&data) {
            Ok(d) => d,
            Err(failure) => {
                Self::push(
                    p,
                    WalItem::Undecodable {
                        lsn,
                        error: Error::new(Origin::Wal, failure.0),
                        raw: None,
                    },
                );
                return Ok(());
            }
        };
        match decoded {
            Decoded::Begin {
                final_lsn,
                xid,
                commit_time,
            } => {
                p.in_tx = true;
                p.xid = xid;
                p.commit_time = Some(commit_time);
                // Held back until the transaction has something for this
                // feed: one with only other prefixes' messages is skipped.
                p.pending_begin = Some(WalItem::Begin {
                    xid,
                    final_lsn,
                    commit_time,
                });
            }
            Decoded::Commit {
                lsn,
                end_lsn,
                commit_time,
            } => {
                p.in_tx = false;
                if p.pending_begin.take().is_none() {
                    p.delivered = p.delivered.max(end_lsn.0);
                    p.batch.push(WalItem::Commit {
                        xid: p.xid,
                        lsn,
                        end_lsn,
                        commit_time,
                    });
                }
            }
            Decoded::Change(mut event) => {
                self.changes.add(1);
                self.link.observe(p.xid, std::slice::from_ref(&event));
                event.xid = Some(u64::from(p.xid));
                event.committed_at = p.commit_time;
                Self::push(p, WalItem::Change { lsn, event });
            }
            Decoded::Truncate(events) => {
                self.changes.add(events.len());
                self.link.observe(p.xid, &events);
                for mut event in events {
                    event.xid = Some(u64::from(p.xid));
                    event.committed_at = p.commit_time;
                    Self::push(p, WalItem::Change { lsn, event });
                }
            }
            Decoded::Relation(raw) => {
                // Rare (once per table and session): read its types now.
                let types = self
                    .types(raw.type_oids())
                    .await
                    .map_err(|e| End::Lost(e.connection()))?;
                p.decoder.add_relation(raw, &types);
            }
            Decoded::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix == SNAPSHOT_PREFIX {
                    match self.link.mark(&content) {
                        Mark::Request => self.link.wake.notify_one(),
                        Mark::Chunk(n) => self.chunk(p, n, lsn).await?,
                        Mark::Other => {}
                    }
                    return Ok(());
                }
                if prefix == HEARTBEAT_PREFIX {
                    // Caught up: confirm past WAL this feed does not need.
                    let acked = self.acked();
                    if !transactional && acked >= p.delivered && lsn.0 > acked {
                        self.shared.advance(lsn.0);
                        p.delivered = p.delivered.max(lsn.0);
                    }
                    return Ok(());
                }
                match &self.messages {
                    Some(wanted) if prefix.starts_with(wanted.as_str()) => {}
                    _ => return Ok(()),
                }
                let item = WalItem::Message(WalMessage {
                    prefix,
                    payload: content,
                    lsn,
                    transactional,
                });
                if transactional {
                    Self::push(p, item);
                } else {
                    p.delivered = p.delivered.max(lsn.0);
                    p.batch.push(item);
                }
            }
            Decoded::Nothing => {}
        }
        Ok(())
    }

    /// Snapshot chunk `n`, whose watermark is at `lsn`: its rows the stream
    /// did not carry, as `read` changes of a transaction of xid 0 committed
    /// at `lsn`; then tells the driver what the consumer must ack to have
    /// them all. Nothing for a chunk this stream does not wait for (an
    /// earlier stream's).
    async fn chunk(&self, p: &mut Progress, n: u64, lsn: Lsn) -> Result<(), End> {
        let Some(rx) = self.link.take(n) else {
            return Ok(());
        };
        // Sent once the chunk's transaction committed (it wrote the
        // watermark just before); dropped if it failed.
        let mut stop = self.stop.clone();
        let chunk = tokio::select! {
            chunk = rx => chunk.ok(),
            _ = stopped(&mut stop) => return Err(End::Stopped),
        };
        let Some(chunk) = chunk else {
            return Ok(());
        };
        let (schema, table) = chunk.table.clone();
        let rows = self.link.merge(chunk);
        if rows.is_empty() {
            // Nothing to ack: what was handed before is enough.
            self.link.handed(n, Lsn(p.delivered));
            return Ok(());
        }
        p.delivered = p.delivered.max(lsn.0);
        let now = std::time::SystemTime::now();
        p.batch.push(WalItem::Begin {
            xid: 0,
            final_lsn: lsn,
            commit_time: now,
        });
        for row in rows {
            let mut event = ChangeEvent::new(Op::Read, schema.as_str(), table.as_str());
            event.new = Some(row);
            p.batch.push(WalItem::Change { lsn, event });
        }
        p.batch.push(WalItem::Commit {
            xid: 0,
            lsn,
            end_lsn: lsn,
            commit_time: now,
        });
        // The consumer can ack it only once the batch went out.
        self.link.handed(n, lsn);
        Ok(())
    }

    /// The catalog's rows for `oids` and every type they refer to.
    async fn types(&self, oids: Vec<u32>) -> Result<HashMap<u32, TypeRow>> {
        const STAGE: &str = "WAL feed: read column types";
        let mut types = HashMap::new();
        let mut want = oids;
        want.sort_unstable();
        want.dedup();
        while !want.is_empty() {
            let rows = self
                .exec
                .run_with(STAGE, |client| {
                    let want = want.clone();
                    async move {
                        client
                            .query(TYPES_SQL, &[&want])
                            .await
                            .map_err(|e| Error::pg(Origin::Wal, STAGE, e))
                    }
                })
                .await?;
            let mut next = Vec::new();
            for row in &rows {
                let t = TypeRow::from_row(row);
                next.extend(t.refs());
                types.insert(t.oid, t);
            }
            // Types the catalog no longer has are not asked for again.
            for oid in want {
                types.entry(oid).or_insert_with(|| TypeRow::unknown(oid));
            }
            next.retain(|t| !types.contains_key(t));
            next.sort_unstable();
            next.dedup();
            want = next;
        }
        Ok(types)
    }
}

/// Resolves once the feed is told to stop (holds no guard across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A replication-connection error with the slot named, and the fix named
/// for the usual configuration problems.
fn slot_error(slot: &str, err: Error) -> Error {
    let mut e = err.prefix(format!("WAL feed on slot {slot:?}"));
    let text = e.to_string();
    if let Some(hint) = stream_hint(&text) {
        e = e.context(hint);
    }
    e
}

/// Emits a heartbeat and checks the slot's lag every `every` until stopped.
pub(crate) async fn heartbeat(
    exec: Exec,
    events: Bus<WalEvent>,
    slot: String,
    every: Duration,
    warn: Option<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let slot_name: Arc<str> = Arc::from(slot.as_str());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(err) = emit_heartbeat(&exec).await {
            tracing::debug!(%err, "pg-pubsub: WAL feed heartbeat failed");
        }
        let Some(warn_bytes) = warn else { continue };
        match slot_position(&exec, &slot).await {
            Ok(Some((_, lag_bytes))) if lag_bytes > warn_bytes => {
                tracing::warn!(
                    slot,
                    lag_bytes,
                    "pg-pubsub: WAL feed slot lag above warning level"
                );
                events.emit(WalEvent::Lag {
                    slot: slot_name.clone(),
                    lag_bytes,
                    warn_bytes,
                });
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(%err, "pg-pubsub: WAL feed lag check failed"),
        }
    }
}
