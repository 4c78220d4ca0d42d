//! The task that owns the replication connection: decodes, hands items to
//! the feed, passes acks on, and reconnects forever from the last ack.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_postgres::config::Host;

use super::decode::{Decoded, Decoder};
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
/// settings (host, port, user, password, database).
pub(crate) fn replication_config(
    pubsub: &PgPubSub,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig> {
    let pg = pubsub.config();
    if matches!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
        return Err(Error::new(
            Origin::Config,
            "the WAL feed connects without TLS (see pg_pubsub::changes::wal): use sslmode=prefer \
             or disable for it, or a local connection",
        ));
    }
    // Each connect replaces host and port by those of the current primary.
    let host = pg
        .get_hosts()
        .first()
        .map_or_else(|| "localhost".to_owned(), host_text);
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_owned();
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication)
            .with_port(port)
            .with_application_name("pg-pubsub-wal"),
    )
}

/// A host as pgwire-replication takes it: a name, or a socket folder.
fn host_text(host: &Host) -> String {
    match host {
        Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        Host::Unix(dir) => dir.to_string_lossy().into_owned(),
    }
}

/// 2000-01-01, PostgreSQL's epoch, as seconds after the Unix epoch.
const PG_EPOCH: u64 = 946_684_800;

fn pg_time(micros: i64) -> SystemTime {
    let base = UNIX_EPOCH + Duration::from_secs(PG_EPOCH);
    if micros >= 0 {
        base + Duration::from_micros(micros as u64)
    } else {
        base - Duration::from_micros(micros.unsigned_abs())
    }
}

pub(crate) struct StreamTask {
    pub(crate) exec: Exec,
    pub(crate) events: Bus<WalEvent>,
    pub(crate) slot: Arc<str>,
    pub(crate) cfg: ReplicationConfig,
    pub(crate) messages: Option<String>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) out: mpsc::Sender<RawItem>,
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

impl StreamTask {
    /// Opens the stream from the last ack (or the slot's confirmed position).
    pub(crate) async fn connect(&self, first: bool) -> Result<ReplicationClient> {
        let from = self.shared.acked.load(Ordering::Acquire);
        let (host, port) =
            crate::connect::find_primary(&self.pg, self.exec.tls(), self.connect_timeout)
                .await
                .map_err(|e| e.at(crate::error::Stage::Wal))?;
        let mut cfg = self.cfg.clone();
        cfg.host = host_text(&host);
        cfg.port = port;
        let cfg = cfg
            .with_start_lsn(pgwire_replication::Lsn(from))
            .with_ack_lsn(pgwire_replication::Lsn(from));
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| stream_error(&self.slot, e))?;
        // `connect` returns before authentication and START_REPLICATION;
        // their errors (no REPLICATION, slot in use) must surface here.
        client
            .wait_started()
            .await
            .map_err(|e| stream_error(&self.slot, e))?;
        tracing::debug!(slot = %self.slot, from = %Lsn(from), first, "pg-pubsub: WAL feed streaming");
        self.events.emit(WalEvent::Streaming {
            slot: self.slot.clone(),
            from: Lsn(from),
        });
        Ok(client)
    }

    /// The first connect: errors are returned, except (with `standby`)
    /// "slot is active for PID" (55006), which is waited out.
    pub(crate) async fn connect_first(&self, standby: bool) -> Result<ReplicationClient> {
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
    pub(crate) async fn run(mut self, first: ReplicationClient) -> Result<()> {
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

    async fn stream_loop(&mut self, first: ReplicationClient) {
        let mut client = Some(first);
        let mut attempt = 0u32;
        let backoff = self.exec.backoff();
        loop {
            if let Some(mut c) = client.take() {
                // Backoff starts over only after a stream that lasted: one
                // that fails at once (a dropped publication) keeps backing off.
                let started = tokio::time::Instant::now();
                let end = self.stream(&mut c).await;
                if started.elapsed() >= STEADY {
                    attempt = 0;
                }
                match end {
                    End::Stopped => {
                        let _ = c.shutdown().await;
                        return;
                    }
                    End::Lost(err) => {
                        c.abort();
                        if !self.lost(err, &mut attempt, &backoff).await {
                            return;
                        }
                    }
                }
            }
            match self.connect(false).await {
                Ok(c) => client = Some(c),
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
                    _ = self.out.send(WalItem::Error(gone)) => {}
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
                sent = self.out.send(WalItem::Error(err)) => sent.is_ok(),
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

    async fn stream(&mut self, client: &mut ReplicationClient) -> End {
        // What a snapshot tracked of the last stream is gone with it.
        self.link.restarted();
        let mut decoder = Decoder::default();
        let mut xid = 0u32;
        let mut commit_time = None;
        let mut pending_begin: Option<RawItem> = None;
        // The highest ack-able position handed to the consumer.
        let mut delivered = self.shared.acked.load(Ordering::Acquire);
        // Between a Begin and its Commit: a keepalive's position may then be
        // past the commit record of the transaction being sent.
        let mut in_tx = false;
        loop {
            let event = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => return End::Stopped,
                _ = self.shared.ack_wake.notified() => {
                    client.update_applied_lsn(pgwire_replication::Lsn(self.shared.acked.load(Ordering::Acquire)));
                    continue;
                }
                ev = client.recv() => ev,
            };
            let event = match event {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return End::Lost(
                        Error::new(Origin::Wal, "the replication stream ended").connection(),
                    )
                }
                Err(e) => return End::Lost(stream_error(&self.slot, e)),
            };
            // A snapshot chunk handed over by this event: its number and
            // what the consumer must ack to have it all.
            let mut handed = None;
            let mut items: Vec<RawItem> = match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid: x,
                    commit_time_micros,
                } => {
                    in_tx = true;
                    xid = x;
                    let t = pg_time(commit_time_micros);
                    commit_time = Some(t);
                    // Held back until the transaction has something for this
                    // feed: one with only other prefixes' messages is skipped.
                    pending_begin = Some(WalItem::Begin {
                        xid: x,
                        final_lsn: Lsn(final_lsn.0),
                        commit_time: t,
                    });
                    continue;
                }
                ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                } => {
                    in_tx = false;
                    if pending_begin.take().is_some() {
                        continue; // nothing of it was delivered
                    }
                    delivered = delivered.max(end_lsn.0);
                    vec![WalItem::Commit {
                        xid,
                        lsn: Lsn(lsn.0),
                        end_lsn: Lsn(end_lsn.0),
                        commit_time: pg_time(commit_time_micros),
                    }]
                }
                ReplicationEvent::XLogData {
                    wal_start, data, ..
                } => {
                    let lsn = Lsn(wal_start.0);
                    match decoder.decode(&data) {
                        Ok(Decoded::Nothing) => continue,
                        Ok(Decoded::Changes(events)) => {
                            self.changes.add(events.len());
                            self.link.observe(xid, &events);
                            events
                                .into_iter()
                                .map(|mut event| {
                                    event.xid = Some(u64::from(xid));
                                    event.committed_at = commit_time;
                                    WalItem::Change { lsn, event }
                                })
                                .collect()
                        }
                        Err(failure) => vec![WalItem::Undecodable {
                            lsn,
                            error: Error::new(Origin::Wal, failure.0),
                            raw: None,
                        }],
                    }
                }
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => {
                    if prefix == SNAPSHOT_PREFIX {
                        let mut reads = Vec::new();
                        match self.link.mark(&content) {
                            Mark::Request => self.link.wake.notify_one(),
                            Mark::Chunk(n) => {
                                match self.chunk(n, Lsn(lsn.0), &mut delivered).await {
                                    Ok(Some((items, ack))) => {
                                        reads = items;
                                        handed = Some((n, ack));
                                    }
                                    Ok(None) => {}
                                    Err(end) => return end,
                                }
                            }
                            Mark::Other => {}
                        }
                        if handed.is_none() {
                            continue;
                        }
                        reads
                    } else {
                        if prefix == HEARTBEAT_PREFIX {
                            // Caught up: confirm past WAL this feed does not need.
                            let acked = self.shared.acked.load(Ordering::Acquire);
                            if !transactional && acked >= delivered && lsn.0 > acked {
                                self.shared.advance(lsn.0);
                                delivered = delivered.max(lsn.0);
                                client.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
                            }
                            continue;
                        }
                        match &self.messages {
                            Some(p) if prefix.starts_with(p.as_str()) => {}
                            _ => continue,
                        }
                        if !transactional {
                            delivered = delivered.max(lsn.0);
                        }
                        vec![WalItem::Message(WalMessage {
                            prefix,
                            payload: content,
                            lsn: Lsn(lsn.0),
                            transactional,
                        })]
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    // Idle, and the consumer acked all it was given: confirm
                    // the server's position. Every transaction committed
                    // before it was sent already (none was for this feed, or
                    // it was delivered and acked), so nothing is skipped; and
                    // the slot then holds no WAL, and a clean shutdown of
                    // the server (a switchover), which waits until the
                    // client confirmed all that was sent, is not held up.
                    let acked = self.shared.acked.load(Ordering::Acquire);
                    if !in_tx && acked >= delivered && wal_end.0 > acked {
                        delivered = wal_end.0;
                        self.shared.advance(wal_end.0);
                        client.update_applied_lsn(wal_end);
                    }
                    continue;
                }
                ReplicationEvent::StoppedAt { .. } => return End::Stopped,
            };
            if let Some(begin) = pending_begin.take() {
                items.insert(0, begin);
            }
            for item in items {
                // Pass acks on while the consumer is slow to take items.
                loop {
                    tokio::select! {
                        permit = self.out.reserve() => match permit {
                            Ok(permit) => { permit.send(item); break; }
                            Err(_) => return End::Stopped,
                        },
                        _ = self.shared.ack_wake.notified() => {
                            client.update_applied_lsn(pgwire_replication::Lsn(self.shared.acked.load(Ordering::Acquire)));
                        }
                        _ = self.stop.wait_for(|s| *s) => return End::Stopped,
                    }
                }
            }
            if let Some((n, ack)) = handed {
                self.link.handed(n, ack);
            }
        }
    }

    /// The items of snapshot chunk `n` whose watermark is at `lsn`: its
    /// rows the stream did not carry, as `read` changes of a transaction
    /// of xid 0 committed at `lsn`, and the position that acks them all.
    /// `None`: not a chunk this stream waits for (an earlier stream's).
    async fn chunk(
        &mut self,
        n: u64,
        lsn: Lsn,
        delivered: &mut u64,
    ) -> Result<Option<(Vec<RawItem>, Lsn)>, End> {
        let Some(rx) = self.link.take(n) else {
            return Ok(None);
        };
        // Sent once the chunk's transaction committed (it wrote the
        // watermark just before); dropped if it failed.
        let chunk = tokio::select! {
            chunk = rx => chunk.ok(),
            _ = self.stop.wait_for(|s| *s) => return Err(End::Stopped),
        };
        let Some(chunk) = chunk else {
            return Ok(None);
        };
        let (schema, table) = chunk.table.clone();
        let rows = self.link.merge(chunk);
        if rows.is_empty() {
            // Nothing to ack: what was handed before is enough.
            return Ok(Some((Vec::new(), Lsn(*delivered))));
        }
        *delivered = (*delivered).max(lsn.0);
        let now = SystemTime::now();
        let mut items = Vec::with_capacity(rows.len() + 2);
        items.push(WalItem::Begin {
            xid: 0,
            final_lsn: lsn,
            commit_time: now,
        });
        items.extend(rows.into_iter().map(|row| {
            let mut event = ChangeEvent::new(Op::Read, schema.as_str(), table.as_str());
            event.new = Some(row);
            WalItem::Change { lsn, event }
        }));
        items.push(WalItem::Commit {
            xid: 0,
            lsn,
            end_lsn: lsn,
            commit_time: now,
        });
        Ok(Some((items, lsn)))
    }
}

/// A replication-connection error as this crate's error, with the fix
/// named for the usual configuration problems.
fn stream_error(slot: &str, err: pgwire_replication::PgWireError) -> Error {
    let text = err.to_string();
    let connection = err.is_transient() || err.is_io();
    let kind = if err.is_auth() {
        Origin::Authentication
    } else {
        Origin::Wal
    };
    let mut e = Error::new(kind, format!("WAL feed on slot {slot:?}: {text}")).with_source(err);
    if let Some(hint) = stream_hint(&text) {
        e = e.context(hint);
    }
    if connection {
        e = e.connection();
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
