//! The task that owns the replication connection: decodes, hands items to
//! the feed, passes acks on, and reconnects forever from the last ack.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_postgres::config::Host;

use super::decode::{Decoded, Decoder};
use super::slot::{advance_slot, emit_heartbeat, slot_position, stream_hint, HEARTBEAT_PREFIX};
use super::{RawItem, Shared, WalItem, WalMessage};
use crate::changes::Lsn;

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
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(dir)) => dir.to_string_lossy().into_owned(),
        None => "localhost".to_owned(),
    };
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
        let cfg = self
            .cfg
            .clone()
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

    /// Reports the loss and waits out the backoff; `false` when stopped.
    async fn lost(&mut self, err: Error, attempt: &mut u32, backoff: &crate::Backoff) -> bool {
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
        let mut decoder = Decoder::default();
        let mut xid = 0u32;
        let mut commit_time = None;
        let mut pending_begin: Option<RawItem> = None;
        // The highest ack-able position handed to the consumer.
        let mut delivered = self.shared.acked.load(Ordering::Acquire);
        // Between a Begin and its Commit (a keepalive there is mid-transaction).
        let mut in_txn = false;
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
            let mut items: Vec<RawItem> = match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid: x,
                    commit_time_micros,
                } => {
                    xid = x;
                    in_txn = true;
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
                    in_txn = false;
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
                    if prefix == HEARTBEAT_PREFIX {
                        // Caught up: confirm past WAL this feed does not need.
                        let acked = self.shared.acked.load(Ordering::Acquire);
                        if !transactional && acked >= delivered && lsn.0 > acked {
                            self.shared.acked.fetch_max(lsn.0, Ordering::AcqRel);
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
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    // Everything the server sent before `wal_end` was handed
                    // over: when the consumer has acked all of it and no
                    // transaction is open, confirm up to there, as the
                    // heartbeat does. A fast shutdown waits for this: its
                    // walsenders exit once the shutdown checkpoint is
                    // confirmed (else only at wal_sender_timeout).
                    let acked = self.shared.acked.load(Ordering::Acquire);
                    if !in_txn && acked >= delivered && wal_end.0 > acked {
                        self.shared.acked.fetch_max(wal_end.0, Ordering::AcqRel);
                        delivered = delivered.max(wal_end.0);
                        client.update_applied_lsn(pgwire_replication::Lsn(wal_end.0));
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
        }
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
