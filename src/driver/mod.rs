//! The listener task: owns the dedicated connection, serves commands from
//! handles, fans notifications out, and reconnects.
//!
//! Everything here runs in one task, so the registry needs no locks; the task
//! never waits on a consumer (queues are bounded and drop when full).

mod election;
mod live;
mod registry;

use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Config, Notification};

use crate::channel::ChannelName;
use crate::config::Options;
use crate::error::{describe_pg_error, Error, ErrorKind, Result};
use crate::event::ConnectionEvent;
use crate::message::Gap;
use crate::queue::Queue;
use crate::stats::Board;

use election::Control;
pub(crate) use election::CONTROL_CHANNEL;
use live::{drive, is_fatal, open, Live, OpError};
use registry::Registry;
pub(crate) use registry::{Leading, SubId};

/// Notifications handled per wake-up before yielding to other tasks.
const BATCH: usize = 4096;

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
    pg: Config,
    opts: Options,
    cmds: mpsc::UnboundedReceiver<Command>,
    events: broadcast::Sender<ConnectionEvent>,
    status: watch::Sender<Status>,
    registry: Registry,
    wake: Vec<Waker>,
    /// Backend PID of the current listener session.
    process_id: Option<i32>,
    board: Arc<Board>,
}

impl Driver {
    // Each argument is a distinct piece of state shared with the handle.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pg: Config,
        opts: Options,
        cmds: mpsc::UnboundedReceiver<Command>,
        events: broadcast::Sender<ConnectionEvent>,
        status: watch::Sender<Status>,
        filter_origin: Option<uuid::Uuid>,
        leading: Leading,
        board: Arc<Board>,
    ) -> Self {
        let registry = Registry::new(filter_origin, opts.single_listener, leading);
        Driver {
            pg,
            opts,
            cmds,
            events,
            status,
            registry,
            wake: Vec::new(),
            process_id: None,
            board,
        }
    }

    /// Opens the first connection; on success the task runs until shutdown.
    pub(crate) async fn start(mut self) -> Result<impl Future<Output = ()>> {
        let (client, conn) = open(&self.pg, self.opts.connect_timeout)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, format!("connecting the listener: {e}")))?;
        let live = self
            .establish(client, conn, None)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, format!("starting the listener: {e}")))?;
        self.emit(ConnectionEvent::Connected {
            process_id: live.process_id,
        });
        Ok(self.run(live))
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
                    drop(live);
                    live = match self.reconnect(reason).await {
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
    ) -> Result<Live, String> {
        let mut channels = self.registry.relisten_all();
        let control = self
            .opts
            .single_listener
            .then(|| ChannelName::new(CONTROL_CHANNEL))
            .transpose()
            .map_err(|e| e.to_string())?;
        let sql = election::listen_sql(channels.iter().chain(&control));
        let mut held = Vec::new();
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
        if let Some(Reconnect {
            down_at,
            reason,
            attempts,
        }) = reconnect
        {
            self.board
                .reconnects
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let downtime = down_at.elapsed();
            tracing::info!(attempts, ?downtime, "pg-pubsub listener reconnected");
            // The event goes first, so a reader of both sees it before the gaps.
            self.emit(ConnectionEvent::Reconnected {
                process_id: live.process_id,
                attempts,
                downtime,
            });
            self.registry.gap(&Gap { downtime, reason });
        }
        for channel in channels.drain(..) {
            self.emit(ConnectionEvent::Listening { channel });
        }
        for note in held {
            self.dispatch(note);
        }
        self.wake_consumers();
        Ok(live)
    }

    async fn reconnect(&mut self, reason: String) -> Result<Live, Stop> {
        let down_at = Instant::now();
        tracing::warn!(%reason, "pg-pubsub listener connection lost; reconnecting");
        self.status.send_replace(Status::default());
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
            let pg = self.pg.clone();
            let timeout = self.opts.connect_timeout;
            let error = match self
                .offline(async move { open(&pg, timeout).await })
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
                error: error.into(),
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
                reply,
            } => self
                .registry
                .subscribe(channel, id, queue, reply, connected),
            Command::Unsubscribe { channel, id } => self.registry.unsubscribe(channel.as_str(), id),
            Command::Shutdown { reply } => return Some(reply),
        }
        None
    }

    fn dispatch(&mut self, note: Notification) {
        if self.opts.single_listener && note.channel() == CONTROL_CHANNEL {
            match election::parse_control(note.payload()) {
                // A leader let go: try at once instead of at the next retry.
                Some(Control::Release(channel)) => self.registry.retry_locks(Some(channel)),
                // Our own announcement: what was queued before it is the old leader's.
                Some(Control::Ready(channel)) if Some(note.process_id()) == self.process_id => {
                    self.registry.flush(&mut self.wake);
                    self.registry.own_ready(channel);
                }
                _ => {}
            }
            return;
        }
        self.registry.stage(note);
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

        let mut budget = BATCH;
        let lost = loop {
            match live.conn.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notification(note)))) => {
                    self.dispatch(note);
                    budget -= 1;
                    if budget == 0 {
                        cx.waker().wake_by_ref();
                        break None;
                    }
                }
                Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                    tracing::info!(
                        severity = notice.severity(),
                        message = notice.message(),
                        "server notice"
                    );
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => break Some(describe_pg_error(&e)),
                Poll::Ready(None) => break Some("server closed the connection".to_owned()),
                Poll::Pending => break None,
            }
        };
        self.wake_consumers();
        if let Some(reason) = lost {
            return Poll::Ready(Stop::Lost(reason));
        }

        if let Poll::Ready(Some((changes, res))) = live.poll_op(cx) {
            match res {
                Ok(rows) => {
                    self.registry.confirmed(changes, &election::acquired(&rows));
                    self.emit_registry_events();
                    live.reset_health(self.opts.health_check_interval);
                }
                // Locks may have been granted before the error: only a new
                // session is sure to hold none.
                Err(OpError::Pg(e)) if is_fatal(&e) || self.opts.single_listener => {
                    return Poll::Ready(Stop::Lost(describe_pg_error(&e)))
                }
                Err(OpError::Pg(e)) => {
                    let err = Error::db("LISTEN", e);
                    tracing::error!(%err, "pg-pubsub: server refused LISTEN/UNLISTEN");
                    self.registry.refused(&changes, &err);
                }
                Err(OpError::TimedOut) => {
                    return Poll::Ready(Stop::Lost(format!(
                        "no answer from the server within {:?} (health check)",
                        self.opts.health_check_timeout
                    )))
                }
            }
        }

        if self.opts.single_listener && live.poll_retry(cx, self.opts.lock_retry_interval) {
            self.registry.retry_locks(None);
        }
        if live.op.is_none() {
            let changes = self.registry.plan();
            let health_due = live.health.as_mut().poll(cx).is_ready();
            if !changes.is_empty() || health_due {
                let sql = election::changes_sql(&changes);
                live.start(sql, changes, self.opts.health_check_timeout);
                // Poll again so the statement is sent.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    /// Hands elected channels over: unlock and wake the standbys, then keep
    /// delivering until a new leader announces it listens (its LISTEN and
    /// announcement commit together, so nothing is lost or seen twice), or
    /// until the hand-over timeout when nobody takes over.
    async fn hand_over(&mut self, live: &mut Live) {
        let mut pending: Vec<ChannelName> = self.registry.leaders();
        if pending.is_empty() {
            return;
        }
        let sql: String = pending.iter().map(election::release_sql).collect();
        let client = live.client.clone();
        let deadline = Instant::now() + self.opts.handover_timeout;
        let mut held = Vec::new();
        let sent = tokio::time::timeout_at(
            deadline,
            drive(&mut live.conn, client.simple_query(&sql), &mut held),
        )
        .await;
        for channel in &pending {
            self.emit(ConnectionEvent::LockReleased {
                channel: channel.clone(),
            });
        }
        if !matches!(sent, Ok(Ok(Ok(_)))) {
            return;
        }
        let mut held = held.into_iter();
        let conn = &mut live.conn;
        let waited = tokio::time::timeout_at(
            deadline,
            poll_fn(|cx| {
                loop {
                    let note = match held.next() {
                        Some(note) => note,
                        None => match conn.poll_message(cx) {
                            Poll::Ready(Some(Ok(AsyncMessage::Notification(note)))) => note,
                            Poll::Ready(Some(Ok(_))) => continue,
                            Poll::Ready(_) => return Poll::Ready(()),
                            Poll::Pending => break,
                        },
                    };
                    if note.channel() == CONTROL_CHANNEL {
                        if let Some(Control::Ready(ch)) = election::parse_control(note.payload()) {
                            if let Some(i) = pending.iter().position(|p| p.as_str() == ch) {
                                // Everything before this was ours to deliver; the rest is the new leader's.
                                self.registry.flush(&mut self.wake);
                                self.registry.end_channel(ch);
                                pending.swap_remove(i);
                            }
                        }
                    } else {
                        self.dispatch(note);
                    }
                }
                self.wake_consumers();
                if pending.is_empty() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }),
        )
        .await;
        self.wake_consumers();
        if waited.is_err() {
            tracing::info!(channels = ?pending, "pg-pubsub: no standby took over within the hand-over timeout");
        }
    }

    /// Ends every subscription, UNLISTENs, closes the session, and answers.
    async fn finish(mut self, mut live: Option<Live>, reply: Option<oneshot::Sender<()>>) {
        if let Some(live) = &mut live {
            self.hand_over(live).await;
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
            let timeout = self.opts.shutdown_timeout;
            let mut held = Vec::new();
            let client = live.client.clone();
            let unlisten = drive(
                &mut live.conn,
                client.batch_execute("UNLISTEN *"),
                &mut held,
            );
            if tokio::time::timeout(timeout, unlisten).await.is_err() {
                tracing::warn!("pg-pubsub: UNLISTEN * not answered within {timeout:?}");
            }
            drop(client);
            live.close(timeout).await;
        }
        self.status.send_replace(Status::default());
        self.emit(ConnectionEvent::ShutDown);
        tracing::info!("pg-pubsub listener shut down");
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
    }
}
