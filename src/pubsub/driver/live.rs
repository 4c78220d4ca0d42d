//! One open listener connection: opening it, running statements on it while
//! it is driven by `poll_message`, and the statement in flight.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::time::{Instant, Sleep};
use tokio_postgres::{AsyncMessage, Client, Config, SimpleQueryMessage, Socket};

use crate::error::{describe_pg_error, Error, Origin};
use crate::frame;
use crate::tls::{Connector, DynStream};

use super::role::Step;
use super::tap::{self, Notes, TapConnection};
use crate::channel::ChannelName;

/// The listener connection: on the tap (plain connections) or opened by
/// tokio-postgres (TLS).
pub(crate) enum PgConnection {
    Pg(tokio_postgres::Connection<Socket, DynStream>),
    Tapped(TapConnection, Notes),
}

/// The connection is gone.
pub(crate) enum Lost {
    Error(tokio_postgres::Error),
    Closed,
}

impl Lost {
    pub(crate) fn describe(&self) -> String {
        match self {
            Lost::Error(e) => describe_pg_error(e),
            Lost::Closed => "server closed the connection".to_owned(),
        }
    }

    pub(crate) fn into_error(self) -> Error {
        match self {
            Lost::Error(e) => Error::pg(Origin::Listen, "listener connection", e),
            Lost::Closed => Error::closed(Origin::Listen, "listener connection"),
        }
    }
}

impl PgConnection {
    /// Drives the connection (statements, their answers) and appends the
    /// notifications received to `notes` as frames: on the tap, what its
    /// reads took out (it yields after a budget); otherwise up to `budget`
    /// notifications from tokio-postgres.
    pub(crate) fn poll_notes(
        &mut self,
        cx: &mut Context<'_>,
        notes: &mut BytesMut,
        mut budget: usize,
    ) -> Result<(), Lost> {
        let res = loop {
            let polled = match self {
                PgConnection::Pg(conn) => conn.poll_message(cx),
                PgConnection::Tapped(conn, _) => conn.poll_message(cx),
            };
            match polled {
                Poll::Ready(Some(Ok(AsyncMessage::Notification(note)))) => {
                    // On the tap only for a frame it passed on (see tap.rs):
                    // what it took before comes first.
                    self.take_tapped(notes);
                    frame::push(notes, &note);
                    budget -= 1;
                    if budget == 0 {
                        cx.waker().wake_by_ref();
                        break Ok(());
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
                Poll::Ready(Some(Err(e))) => break Err(Lost::Error(e)),
                Poll::Ready(None) => break Err(Lost::Closed),
                Poll::Pending => break Ok(()),
            }
        };
        // Also when lost: what arrived before the loss is delivered.
        self.take_tapped(notes);
        res
    }

    /// Appends what the tap took off the socket to `notes`.
    fn take_tapped(&self, notes: &mut BytesMut) {
        let PgConnection::Tapped(_, taken) = self else {
            return;
        };
        let mut taken = taken.lock().unwrap_or_else(|e| e.into_inner());
        if notes.is_empty() {
            std::mem::swap(notes, &mut *taken);
        } else {
            notes.extend_from_slice(&taken);
            taken.clear();
        }
    }
}

impl Future for PgConnection {
    type Output = Result<(), tokio_postgres::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            PgConnection::Pg(conn) => conn.poll_unpin(cx),
            PgConnection::Tapped(conn, _) => conn.poll_unpin(cx),
        }
    }
}

/// A statement sent on the listener connection and not yet answered.
pub(crate) struct InFlight {
    pub fut: BoxFuture<'static, Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>>,
    pub steps: Planned,
    pub deadline: Pin<Box<Sleep>>,
}

/// What a statement on the listener session carries out.
#[derive(Default)]
pub(crate) struct Planned {
    pub steps: Vec<(ChannelName, Step)>,
    /// It includes the election collision probe.
    pub probe: bool,
}

pub(crate) struct Live {
    pub client: Arc<Client>,
    pub conn: PgConnection,
    pub process_id: i32,
    pub op: Option<InFlight>,
    pub health: Pin<Box<Sleep>>,
    /// When standbys next try for their locks.
    pub retry: Pin<Box<Sleep>>,
    /// The last moment the connection was known to work: a message
    /// arrived or a statement was answered.
    pub last_good: Instant,
}

/// Whether an error means the session is gone (as opposed to a refused statement).
pub(crate) fn is_fatal(err: &tokio_postgres::Error) -> bool {
    err.is_closed()
        || err
            .as_db_error()
            .is_none_or(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// Where and how the listener connects.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub config: Config,
    pub tls: Connector,
}

impl Endpoint {
    /// Opens a connection within `timeout`.
    pub(crate) async fn open(&self, timeout: Duration) -> Result<(Client, PgConnection), Error> {
        const WHAT: &str = "connecting the listener";
        if let Some(tls) = self
            .tls
            .tap
            .as_deref()
            .filter(|_| tap::usable(&self.config))
        {
            return match tokio::time::timeout(timeout, tap::connect(&self.config, tls)).await {
                Ok(res) => res,
                Err(_) => Err(Error::timeout(WHAT, timeout, None)),
            };
        }
        match tokio::time::timeout(timeout, self.config.connect(self.tls.clone())).await {
            Ok(Ok((client, conn))) => Ok((client, PgConnection::Pg(conn))),
            Ok(Err(e)) => Err(Error::pg(Origin::Connect, WHAT, e)),
            Err(_) => Err(Error::timeout(WHAT, timeout, None)),
        }
    }
}

/// Runs `fut` (a statement on this connection) while driving the connection,
/// keeping the notifications that arrive meanwhile in `held` (as frames).
pub(crate) async fn drive<F>(
    conn: &mut PgConnection,
    fut: F,
    held: &mut BytesMut,
) -> Result<F::Output, Error>
where
    F: Future,
{
    let mut fut = std::pin::pin!(fut);
    poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if let Err(lost) = conn.poll_notes(cx, held, usize::MAX) {
            return Poll::Ready(Err(lost.into_error()));
        }
        // The connection may have delivered the statement's answer.
        fut.as_mut().poll(cx).map(Ok)
    })
    .await
}

impl Live {
    /// Listens to `channels` in one round trip and learns the backend PID.
    /// Notifications that arrive meanwhile are kept in `held`.
    pub(crate) async fn establish(
        client: Client,
        mut conn: PgConnection,
        listen_sql: String,
        timeout: Duration,
        health_interval: Duration,
        retry_interval: Duration,
        held: &mut BytesMut,
    ) -> Result<Live, Error> {
        const WHAT: &str = "LISTEN on the new listener connection";
        let sql = format!("{listen_sql}SELECT pg_backend_pid()");
        let run = drive(&mut conn, client.simple_query(&sql), held);
        let rows = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(Ok(rows))) => rows,
            Ok(Ok(Err(e))) => return Err(Error::pg(Origin::Listen, WHAT, e)),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::timeout(WHAT, timeout, None)),
        };
        let process_id = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .ok_or_else(|| {
                Error::new(
                    Origin::Listen,
                    "starting the listener: server did not report its backend PID",
                )
            })?;
        Ok(Live {
            client: Arc::new(client),
            conn,
            process_id,
            op: None,
            health: Box::pin(tokio::time::sleep(health_interval)),
            retry: Box::pin(tokio::time::sleep(retry_interval)),
            last_good: Instant::now(),
        })
    }

    /// Sends `sql` (the `steps`, or a health check when empty).
    pub(crate) fn start(&mut self, sql: String, steps: Planned, timeout: Duration) {
        let client = self.client.clone();
        self.op = Some(InFlight {
            fut: async move { client.simple_query(&sql).await }.boxed(),
            steps,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        });
    }

    /// Polls the statement in flight: `Ready(Some(..))` when it finished.
    pub(crate) fn poll_op(&mut self, cx: &mut Context<'_>) -> Poll<Option<Finished>> {
        let Some(op) = &mut self.op else {
            return Poll::Ready(None);
        };
        let res = match op.fut.poll_unpin(cx) {
            Poll::Ready(res) => res.map_err(OpError::Pg),
            Poll::Pending => match op.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Err(OpError::TimedOut),
                Poll::Pending => return Poll::Pending,
            },
        };
        if res.is_ok() {
            self.last_good = Instant::now();
        }
        let steps = self.op.take().map(|op| op.steps).unwrap_or_default();
        Poll::Ready(Some((steps, res)))
    }

    pub(crate) fn reset_health(&mut self, interval: Duration) {
        self.health.as_mut().reset(Instant::now() + interval);
    }

    /// Moves the standbys' next retry to `in_`, if that is sooner.
    pub(crate) fn retry_soon(&mut self, in_: Duration) {
        let at = Instant::now() + in_;
        if self.retry.deadline() > at {
            self.retry.as_mut().reset(at);
        }
    }

    /// Whether the standbys' retry is due; re-arms it.
    pub(crate) fn poll_retry(&mut self, cx: &mut Context<'_>, interval: Duration) -> bool {
        if self.retry.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.retry.as_mut().reset(Instant::now() + interval);
        true
    }

    /// Closes the session politely (Terminate), by `deadline`.
    pub(crate) async fn close(self, deadline: Instant) {
        let Live {
            client, conn, op, ..
        } = self;
        drop(op);
        drop(client);
        let _ = tokio::time::timeout_at(deadline, conn).await;
    }
}

/// A finished statement: what it carried out and the server's answer.
pub(crate) type Finished = (Planned, Result<Vec<SimpleQueryMessage>, OpError>);

pub(crate) enum OpError {
    Pg(tokio_postgres::Error),
    TimedOut,
}
