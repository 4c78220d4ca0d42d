//! The listener task: owns the dedicated connection, serves commands from
//! handles, fans notifications out, and reconnects.
//!
//! Everything here runs in one task, so the registry needs no locks; the task
//! never waits on a consumer (queues are bounded and drop when full).

mod election;
mod leading;
mod live;
mod registry;
mod role;
mod tap;

use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::channel::ChannelName;
use crate::config::Options;
use crate::error::{describe_pg_error, Error, Origin, Result};
use crate::event::ConnectionEvent;
use crate::frame::{self, Frame};
use crate::inbox::Queue;
use crate::message::{Gap, GapCause};
use crate::stats::Board;

use election::Control;
pub(crate) use election::CONTROL_CHANNEL;
pub(crate) use leading::{LeadWatch, Leading};
pub(crate) use live::Endpoint;
use live::{drive, is_fatal, Live, OpError, Planned};
use registry::Registry;
pub(crate) use registry::{ChannelSet, Mode, Shared, SubId};
use role::{Heard, Step};
pub(crate) use tap::MakeHandshake;

/// Notifications handled per wake-up before yielding to other tasks, when
/// tokio-postgres reads them (the tap has its own budget).
const BATCH: usize = 4096;
/// A failed lock attempt right after a release retries this soon (the old
/// leader unlocks just after its announcement commits).
const HURRY: Duration = Duration::from_millis(20);

/// Whether a step touches the election (its failure may leave a lock held).
fn elects((channel, step): &(ChannelName, Step)) -> bool {
    channel.as_str() == CONTROL_CHANNEL || !matches!(step, Step::Listen | Step::Unlisten)
}

/// Elected channels being handed over at shutdown.
struct Cut {
    channels: Vec<ChannelName>,
    /// Notifications (frames) read while a statement ran, to handle first.
    held: BytesMut,
    /// We announced `stopped:` and deliver up to it.
    stopping: bool,
}

impl Cut {
    fn new(channels: Vec<ChannelName>, held: BytesMut) -> Self {
        Cut {
            channels,
            held,
            stopping: false,
        }
    }
}

/// Requests from handles to the listener task.
///
/// The channel carrying these is unbounded on purpose: every `Listen` and
/// `Shutdown` has a caller awaiting its reply, and every `Unsubscribe` comes
/// from a dropped subscription, so its length is bounded by live handles.
pub(crate) enum Command {
    Listen {
        channel: ChannelName,
        id: SubId,
        queue: Arc<Queue>,
        mode: Mode,
        reply: oneshot::Sender<Result<()>>,
    },
    Unsubscribe {
        channel: ChannelName,
        id: SubId,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Connection state visible to handles.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Status {
    /// Backend PID of the listener session while connected.
    pub process_id: Option<i32>,
}

/// A connection being re-established after a loss.
struct Reconnect {
    /// When the lost connection was last known to work.
    down_at: Instant,
    reason: Arc<str>,
    attempts: u32,
}

enum Stop {
    Shutdown(oneshot::Sender<()>),
    /// Every handle and subscription is gone.
    Orphaned,
    Lost(String),
}

pub(crate) struct Driver {
    server: Endpoint,
    opts: Options,
    cmds: mpsc::UnboundedReceiver<Command>,
    events: broadcast::Sender<ConnectionEvent>,
    status: watch::Sender<Status>,
    registry: Registry,
    wake: Vec<Waker>,
    /// Notifications read and not yet dispatched (frames), kept to reuse
    /// the allocation.
    notes: BytesMut,
    /// Backend PID of the current listener session.
    process_id: Option<i32>,
    /// When the next lock attempt may carry the collision probe.
    next_probe: Instant,
    board: Arc<Board>,
    /// This driver counts in the `listener_connected` gauge.
    up: bool,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A task aborted with its runtime never reaches `finish`.
        self.set_up(false);
    }
}

impl Driver {
    // Each argument is a distinct piece of state shared with the handle.
    pub(crate) fn new(
        server: Endpoint,
        opts: Options,
        cmds: mpsc::UnboundedReceiver<Command>,
        events: broadcast::Sender<ConnectionEvent>,
        status: watch::Sender<Status>,
        shared: Shared,
    ) -> Self {
        let board = shared.board.clone();
        let registry = Registry::new(shared);
        Driver {
            server,
            opts,
            cmds,
            events,
            status,
            registry,
            wake: Vec::new(),
            notes: BytesMut::new(),
            process_id: None,
            next_probe: Instant::now(),
            board,
            up: false,
        }
    }

    /// Opens the first connection; on success the task runs until shutdown.
    pub(crate) async fn start(mut self) -> Result<impl Future<Output = ()>> {
        let (client, conn) = self.server.open(self.opts.connect_timeout).await?;
        let live = self.establish(client, conn, None).await?;
        self.emit(ConnectionEvent::Connected {
            process_id: live.process_id,
        });
        Ok(self.run(live))
    }

    /// Moves the `listener_connected` gauge on a change of state only, so
    /// it stays a count of connected listeners across handles.
    fn set_up(&mut self, up: bool) {
        if self.up != up {
            self.up = up;
            crate::record::listener_connected(up);
        }
    }

    fn emit(&self, event: ConnectionEvent) {
        tracing::debug!(?event, "pg-pubsub event");
        let _ = self.events.send(event);
    }

    /// Publishes the events the registry produced.
    fn emit_registry_events(&mut self) {
        for event in std::mem::take(&mut self.registry.events) {
            self.emit(event);
        }
    }

    async fn run(mut self, mut live: Live) {
        loop {
            match poll_fn(|cx| self.poll_serve(cx, &mut live)).await {
                Stop::Shutdown(reply) => return self.finish(Some(live), Some(reply)).await,
                Stop::Orphaned => return self.finish(Some(live), None).await,
                Stop::Lost(reason) => {
                    let last_good = live.last_good;
                    drop(live);
                    live = match self.reconnect(reason, last_good).await {
                        Ok(live) => live,
                        Err(Stop::Shutdown(reply)) => return self.finish(None, Some(reply)).await,
                        Err(_) => return self.finish(None, None).await,
                    };
                }
            }
        }
    }

    /// Listens to every registered channel on a fresh connection. On a
    /// reconnect, every subscriber gets a gap before any new notification.
    async fn establish(
        &mut self,
        client: tokio_postgres::Client,
        conn: live::PgConnection,
        reconnect: Option<Reconnect>,
    ) -> Result<Live, Error> {
        let (mut channels, elected) = self.registry.relisten_all();
        let control = elected
            .then(|| ChannelName::new(CONTROL_CHANNEL))
            .transpose()?;
        let sql = election::listen_sql(channels.iter().chain(&control));
        let mut held = BytesMut::new();
        let live = Live::establish(
            client,
            conn,
            sql,
            self.opts.health_check_timeout,
            self.opts.health_check_interval,
            self.opts.lock_retry_interval,
            &mut held,
        )
        .await?;
        self.process_id = Some(live.process_id);
        self.status.send_replace(Status {
            process_id: Some(live.process_id),
        });
        self.set_up(true);
        if let Some(Reconnect {
            down_at,
            reason,
            attempts,
        }) = reconnect
        {
            self.board
                .reconnects
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::record::listener_reconnected();
            let downtime = down_at.elapsed();
            tracing::info!(attempts, ?downtime, "pg-pubsub listener reconnected");
            // The event goes first, so a reader of both sees it before the gaps.
            self.emit(ConnectionEvent::Reconnected {
                process_id: live.process_id,
                attempts,
                downtime,
            });
            self.registry
                .gap(&Gap::new(GapCause::Reconnect { downtime }, reason));
        }
        for channel in channels.drain(..) {
            self.emit(ConnectionEvent::Listening { channel });
        }
        let dispatched = self.dispatch_all(&held);
        self.wake_consumers();
        dispatched.map_err(|reason| Error::new(Origin::Listen, reason).connection())?;
        Ok(live)
    }

    async fn reconnect(&mut self, reason: String, down_at: Instant) -> Result<Live, Stop> {
        tracing::warn!(%reason, "pg-pubsub listener connection lost; reconnecting");
        self.status.send_replace(Status::default());
        self.set_up(false);
        let reason: Arc<str> = reason.into();
        self.emit(ConnectionEvent::Disconnected {
            reason: reason.clone(),
        });
        self.registry.connection_lost(&reason);
        self.emit_registry_events();
        let mut attempt = 0;
        let mut delay = Duration::ZERO;
        loop {
            attempt += 1;
            if !delay.is_zero() {
                self.offline(tokio::time::sleep(delay)).await?;
            }
            let server = self.server.clone();
            let timeout = self.opts.connect_timeout;
            let error = match self
                .offline(async move { server.open(timeout).await })
                .await?
            {
                Ok((client, conn)) => {
                    let reconnect = Reconnect {
                        down_at,
                        reason: reason.clone(),
                        attempts: attempt,
                    };
                    match self.establish(client, conn, Some(reconnect)).await {
                        Ok(live) => return Ok(live),
                        Err(e) => {
                            self.registry.connection_lost(&reason);
                            e
                        }
                    }
                }
                Err(e) => e,
            };
            delay = self.opts.backoff.delay(attempt + 1);
            tracing::debug!(attempt, %error, ?delay, "pg-pubsub reconnect failed");
            self.emit(ConnectionEvent::ReconnectFailed {
                attempt,
                error: error.to_string().into(),
                retry_in: delay,
            });
        }
    }

    /// Runs `fut` while serving commands without a connection.
    async fn offline<F: Future>(&mut self, fut: F) -> Result<F::Output, Stop> {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => match cmd {
                    None => return Err(Stop::Orphaned),
                    Some(cmd) => if let Some(reply) = self.command(cmd, false) {
                        return Err(Stop::Shutdown(reply));
                    },
                },
                out = &mut fut => return Ok(out),
            }
        }
    }

    /// Serves one command; a shutdown request is handed back to the caller.
    fn command(&mut self, cmd: Command, connected: bool) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Listen {
                channel,
                id,
                queue,
                mode,
                reply,
            } => self
                .registry
                .subscribe(channel, id, queue, mode, reply, connected),
            Command::Unsubscribe { channel, id } => self.registry.unsubscribe(channel.as_str(), id),
            Command::Shutdown { reply } => return Some(reply),
        }
        None
    }

    /// Dispatches every frame of `frames`; a malformed one ends the session.
    fn dispatch_all(&mut self, frames: &[u8]) -> std::result::Result<(), String> {
        for note in frame::frames(frames) {
            match note {
                Ok(note) => self.dispatch(&note),
                Err(frame::Malformed(what)) => return Err(format!("the server sent {what}")),
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, note: &Frame<'_>) {
        if note.channel != CONTROL_CHANNEL {
            return self.registry.stage(note);
        }
        let own = Some(note.process_id()) == self.process_id;
        match election::parse_control(note.payload()) {
            // Our own announcement: what was queued before it is the old leader's.
            Some(Control::Ready(channel)) if own => {
                self.registry.flush(&mut self.wake);
                self.registry.own_ready(channel);
            }
            _ if own => {}
            Some(Control::Ready(channel)) => self.registry.heard(channel, Heard::Ready),
            Some(Control::Release(channel)) => self.registry.heard(channel, Heard::Release),
            Some(Control::Stopped(channel)) => self.registry.heard(channel, Heard::Stopped),
            None => {}
        }
    }

    /// Delivers what was staged and wakes the consumers that got something.
    fn wake_consumers(&mut self) {
        self.registry.flush(&mut self.wake);
        for w in self.wake.drain(..) {
            w.wake();
        }
        self.emit_registry_events();
    }

    fn poll_serve(&mut self, cx: &mut Context<'_>, live: &mut Live) -> Poll<Stop> {
        loop {
            match self.cmds.poll_recv(cx) {
                Poll::Ready(None) => return Poll::Ready(Stop::Orphaned),
                Poll::Ready(Some(cmd)) => {
                    if let Some(reply) = self.command(cmd, true) {
                        return Poll::Ready(Stop::Shutdown(reply));
                    }
                }
                Poll::Pending => break,
            }
        }

        let mut notes = std::mem::take(&mut self.notes);
        let mut lost = live
            .conn
            .poll_notes(cx, &mut notes, BATCH)
            .err()
            .map(|l| l.describe());
        if !notes.is_empty() {
            // Once per batch: a clock read per message would cost more.
            live.last_good = Instant::now();
            if let Err(reason) = self.dispatch_all(&notes) {
                lost = lost.or(Some(reason));
            }
            notes.clear();
        }
        self.notes = notes;
        self.wake_consumers();
        if let Some(reason) = lost {
            return Poll::Ready(Stop::Lost(reason));
        }

        if let Poll::Ready(Some((planned, res))) = live.poll_op(cx) {
            let Planned { steps, probe } = planned;
            match res {
                Ok(rows) => {
                    let answer = election::parse_answer(&rows);
                    if answer.read_only {
                        return Poll::Ready(Stop::Lost(
                            "the server is in recovery or read-only (demoted or fenced by a \
                             failover): reconnecting to the primary"
                                .to_owned(),
                        ));
                    }
                    self.registry.confirmed(steps, &answer);
                    if probe {
                        self.registry.probed(&answer);
                    }
                    if std::mem::take(&mut self.registry.hurry) {
                        live.retry_soon(HURRY);
                    }
                    self.emit_registry_events();
                    live.reset_health(self.opts.health_check_interval);
                }
                // Locks may have been granted before the error: only a new
                // session is sure to hold none.
                Err(OpError::Pg(e)) if is_fatal(&e) || steps.iter().any(elects) => {
                    return Poll::Ready(Stop::Lost(describe_pg_error(&e)))
                }
                Err(OpError::Pg(e)) => {
                    let err = Error::pg(Origin::Listen, "LISTEN", e);
                    tracing::error!(%err, "pg-pubsub: server refused LISTEN/UNLISTEN");
                    self.registry.refused(&steps, &err);
                }
                Err(OpError::TimedOut) => {
                    return Poll::Ready(Stop::Lost(format!(
                        "no answer from the server within {:?} (health check)",
                        self.opts.health_check_timeout
                    )))
                }
            }
        }

        if live.poll_retry(cx, self.opts.lock_retry_interval) {
            self.registry.retry_locks();
        }
        if live.op.is_none() {
            let steps = self.registry.plan();
            let health_due = live.health.as_mut().poll(cx).is_ready();
            if !steps.is_empty() || health_due {
                let now = Instant::now();
                let probe =
                    now >= self.next_probe && steps.iter().any(|(_, s)| *s == Step::TryLock);
                if probe {
                    self.next_probe = now + self.opts.health_check_interval;
                }
                let mut sql = election::steps_sql(&steps, probe);
                if health_due {
                    sql.push_str(election::PRIMARY_CHECK);
                }
                live.start(
                    sql,
                    Planned { steps, probe },
                    self.opts.health_check_timeout,
                );
                // Poll again so the statement is sent.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    /// Hands elected channels over: announce the release and unlock, then
    /// keep delivering until a new leader announces that it listens (its
    /// `LISTEN` and announcement commit together, so nothing is lost or seen
    /// twice). A `ready:` counts only from a session that holds the
    /// channel's lock. When nobody takes over within the hand-over timeout,
    /// announce `stopped:` and deliver up to it, so standbys that win later
    /// know to report a gap.
    async fn hand_over(&mut self, live: &mut Live, deadline: Instant) {
        let pending: Vec<ChannelName> = self.registry.leaders();
        if pending.is_empty() {
            return;
        }
        let ready_by = deadline.min(Instant::now() + self.opts.handover_timeout);
        let mut held = BytesMut::new();
        let sql = election::release_sql(&pending);
        let sent = self.statement(live, &sql, &mut held, ready_by).await;
        for channel in &pending {
            self.emit(ConnectionEvent::LockReleased {
                channel: channel.clone(),
            });
        }
        if sent.is_none() {
            return;
        }
        let mut pending = Cut::new(pending, held);
        self.deliver_until(live, &mut pending, ready_by).await;
        if pending.channels.is_empty() {
            return;
        }
        tracing::info!(channels = ?pending.channels, "pg-pubsub: no standby took over within the hand-over timeout");
        let sql = election::stopped_sql(&pending.channels);
        let mut later = BytesMut::new();
        let sent = self.statement(live, &sql, &mut later, deadline).await;
        pending.held.extend_from_slice(&later);
        if sent.is_some() {
            pending.stopping = true;
            self.deliver_until(live, &mut pending, deadline).await;
        }
    }

    /// Runs `sql` on the listener session by `deadline`, keeping the
    /// notifications that arrive meanwhile in `held`.
    async fn statement(
        &self,
        live: &mut Live,
        sql: &str,
        held: &mut BytesMut,
        deadline: Instant,
    ) -> Option<Vec<tokio_postgres::SimpleQueryMessage>> {
        let client = live.client.clone();
        let run = drive(&mut live.conn, client.simple_query(sql), held);
        match tokio::time::timeout_at(deadline, run).await {
            Ok(Ok(Ok(rows))) => Some(rows),
            _ => None,
        }
    }

    /// Delivers the channels in `cut` until each reaches its cut (a verified
    /// successor's `ready:`, or our own `stopped:`), or until `deadline`.
    async fn deliver_until(&mut self, live: &mut Live, cut: &mut Cut, deadline: Instant) {
        let own = live.process_id;
        while !cut.channels.is_empty() {
            if cut.held.is_empty() {
                self.wake_consumers();
                let conn = &mut live.conn;
                let held = &mut cut.held;
                let next = poll_fn(|cx| match conn.poll_notes(cx, held, BATCH) {
                    Err(_) => Poll::Ready(false),
                    Ok(()) if held.is_empty() => Poll::Pending,
                    Ok(()) => Poll::Ready(true),
                });
                match tokio::time::timeout_at(deadline, next).await {
                    Ok(true) => {}
                    _ => break,
                }
            }
            let (note, len) = match frame::parse(&cut.held) {
                Ok(parsed) => parsed,
                Err(frame::Malformed(what)) => {
                    tracing::warn!("pg-pubsub: the server sent {what} during a hand-over");
                    break;
                }
            };
            if note.channel != CONTROL_CHANNEL {
                self.dispatch(&note);
                cut.held.advance(len);
                continue;
            }
            let from = note.process_id();
            let control = match election::parse_control(note.payload()) {
                Some(Control::Ready(ch)) if from != own => Some(ch.to_owned()),
                Some(Control::Stopped(ch)) if cut.stopping && from == own => Some(ch.to_owned()),
                _ => None,
            };
            cut.held.advance(len);
            let Some(channel) = control else {
                continue;
            };
            let channel = channel.as_str();
            let Some(i) = cut.channels.iter().position(|p| p.as_str() == channel) else {
                continue;
            };
            if from != own {
                // Later notifications wait in `held` while we ask.
                let sql = election::holder_sql(channel, from);
                let mut later = BytesMut::new();
                let rows = self.statement(live, &sql, &mut later, deadline).await;
                cut.held.extend_from_slice(&later);
                if !rows.is_some_and(|rows| election::is_true(&rows)) {
                    tracing::warn!(
                        channel,
                        pid = from,
                        "pg-pubsub: ignored a ready: from a session that does not hold the lock"
                    );
                    continue;
                }
            }
            // Everything before this was ours to deliver; the rest is not.
            self.registry.flush(&mut self.wake);
            self.registry.end_channel(channel);
            cut.channels.swap_remove(i);
        }
        self.wake_consumers();
    }

    /// Ends every subscription, UNLISTENs, closes the session, and answers,
    /// all within one shutdown timeout.
    async fn finish(mut self, mut live: Option<Live>, reply: Option<oneshot::Sender<()>>) {
        let deadline = Instant::now() + self.opts.shutdown_timeout;
        if let Some(live) = &mut live {
            self.hand_over(live, deadline).await;
        }
        self.registry.shut_down();
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Command::Listen { reply, .. } => {
                    let _ = reply.send(Err(Error::shut_down()));
                }
                Command::Shutdown { reply } => {
                    let _ = reply.send(());
                }
                Command::Unsubscribe { .. } => {}
            }
        }
        if let Some(mut live) = live {
            let mut held = BytesMut::new();
            if self
                .statement(&mut live, "UNLISTEN *", &mut held, deadline)
                .await
                .is_none()
            {
                tracing::warn!("pg-pubsub: UNLISTEN * not answered within the shutdown timeout");
            }
            live.close(deadline).await;
        }
        self.status.send_replace(Status::default());
        self.set_up(false);
        self.emit(ConnectionEvent::ShutDown);
        tracing::info!("pg-pubsub listener shut down");
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
    }
}
