//! [`Exec`]: how every pooled statement of the crate runs.
//!
//! One path for every capability (notify, wake-ups, durable channels, the
//! queue, change feeds, WAL slot statements), so that all of them get the
//! same guarantees:
//!
//! - the whole call (waiting for a connection and the statements) is
//!   bounded by the notify timeout;
//! - while no connection can be had it retries with the handle's backoff;
//!   the statements themselves are never retried (they may have committed);
//! - a call that times out, or is dropped, while its statements run has
//!   them **cancelled on the server** and its connection **detached from the
//!   pool**, so the next call never queues behind a statement that may still
//!   run; the error says whether it [may have
//!   committed](crate::Error::may_have_committed).
//!
//! Statements go through [`Conn`]'s `query_p` family (and [`Tx`]'s, in a
//! transaction), with typed parameters: prepared once per connection, or,
//! behind a pooler in transaction mode, unnamed.
//!
//! Capabilities and the wake-up task hold an `Exec`, not the whole handle:
//! it is the narrow dependency they share.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::CancelToken;

use crate::config::Backoff;
use crate::error::{Error, ErrorKind, Origin, Result};
use crate::tls::Connector;

/// Runs statements on the pool. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Exec {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    timeout: Duration,
    backoff: Backoff,
    /// For cancel requests: the connector the pool's connections use.
    tls: Connector,
    /// Set when the handle starts shutting down.
    shut_down: AtomicBool,
    /// Send statements unnamed, with their parameter types (one round
    /// trip, nothing left on the session): behind a transaction-pooling
    /// PgBouncer a named statement prepared in one transaction is not on
    /// the server connection the next one gets.
    unnamed: AtomicBool,
}

impl Exec {
    pub(crate) fn new(pool: Pool, timeout: Duration, backoff: Backoff, tls: Connector) -> Exec {
        Exec {
            inner: Arc::new(Inner {
                pool,
                timeout,
                backoff,
                tls,
                shut_down: AtomicBool::new(false),
                unnamed: AtomicBool::new(false),
            }),
        }
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The TLS connector the pool's connections use.
    pub(crate) fn tls(&self) -> &Connector {
        &self.inner.tls
    }

    pub(crate) fn backoff(&self) -> Backoff {
        self.inner.backoff
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.inner.shut_down.load(Ordering::Acquire)
    }

    /// Whether statements go unnamed (see [`Inner::unnamed`]).
    pub(crate) fn unnamed(&self) -> bool {
        self.inner.unnamed.load(Ordering::Acquire)
    }

    pub(crate) fn set_unnamed(&self, unnamed: bool) {
        self.inner.unnamed.store(unnamed, Ordering::Release);
    }

    pub(crate) fn set_shut_down(&self) {
        self.inner.shut_down.store(true, Ordering::Release);
    }

    /// Runs `f` on a pooled connection within the timeout, its server
    /// errors reported as `kind` at `stage`.
    pub(crate) async fn run<R, F, Fut>(&self, kind: Origin, stage: &'static str, f: F) -> Result<R>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<R, tokio_postgres::Error>>,
    {
        self.run_with(stage, |client| async move {
            f(client).await.map_err(|e| Error::pg(kind, stage, e))
        })
        .await
    }

    /// [`run`](Self::run) for bodies that map their own errors.
    pub(crate) async fn run_with<R, F, Fut>(&self, stage: &'static str, f: F) -> Result<R>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<R>>,
    {
        let timeout = self.inner.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        let client = match tokio::time::timeout_at(deadline, self.get(stage, &mut last)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::timeout(stage, timeout, last)),
        };
        let shared = Arc::new(Mutex::new(Lent {
            obj: None,
            abandoned: false,
        }));
        let mut lease = Lease {
            shared: shared.clone(),
            cancel: Some((client.cancel_token(), self.inner.tls.clone())),
            stage,
            discard: false,
        };
        let conn = Conn {
            obj: Some(client),
            shared,
            unnamed: self.unnamed(),
        };
        let res = match tokio::time::timeout_at(deadline, f(conn)).await {
            Ok(res) => {
                lease.cancel = None;
                // A lost connection may have lost the answer to a COMMIT. A
                // connection that is still open but refuses writes (its
                // server was demoted or fenced) must not go back to the
                // pool: the next call then connects anew and finds the primary.
                res.map_err(|e| {
                    if e.is_connection() {
                        lease.discard = true;
                        e.sent()
                    } else {
                        e
                    }
                })
            }
            Err(_) => Err(Error::timeout(stage, timeout, None).sent()),
        };
        drop(lease);
        res
    }

    /// A pooled connection; while none can be opened, retries with backoff
    /// (the caller bounds the wait). `last` is the last failure.
    async fn get(&self, stage: &'static str, last: &mut Option<Error>) -> Result<Object> {
        let mut attempt = 1;
        loop {
            match self.inner.pool.get().await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    let err = pool_error(stage, e);
                    if !err.is_connection() || err.kind() == ErrorKind::Timeout {
                        return Err(err);
                    }
                    attempt += 1;
                    let delay = self.inner.backoff.delay(attempt);
                    tracing::debug!(%err, ?delay, "pg-pubsub: no pooled connection; retrying");
                    *last = Some(err);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// The pooled connection lent to a statement body. Derefs to
/// [`deadpool_postgres::Client`].
pub(crate) struct Conn {
    obj: Option<Object>,
    shared: Arc<Mutex<Lent>>,
    /// Send statements unnamed ([`Exec::unnamed`]).
    unnamed: bool,
}

/// Runs a `crate::tx` statement function on a connection (or transaction)
/// as the mode says: unnamed through tokio-postgres' own type, or prepared
/// once per connection through deadpool's statement cache.
macro_rules! dispatch {
    ($unnamed:expr, $plain:ty, $cached:ty, $target:expr, $f:ident($($arg:expr),*)) => {
        if $unnamed {
            let target: &$plain = $target;
            crate::tx::$f(target, $($arg),*).await
        } else {
            let target: &$cached = $target;
            crate::tx::$f(target, $($arg),*).await
        }
    };
}

/// Statements with typed parameters, sent as the handle's mode says:
/// prepared once per connection, or, behind a transaction pooler, unnamed
/// (one round trip, nothing left on whichever server connection ran it).
/// Every statement of the crate goes through these (see [`Exec::unnamed`]).
macro_rules! typed_statements {
    ($plain:ty, $cached:ty) => {
        /// Runs `sql`; returns its rows.
        pub(crate) async fn query_p(
            &self,
            sql: &str,
            params: &crate::tx::Params<'_>,
        ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
            dispatch!(self.unnamed, $plain, $cached, self, query(sql, params))
        }

        /// Runs `sql`; returns its only row (an error unless exactly one).
        pub(crate) async fn query_one_p(
            &self,
            sql: &str,
            params: &crate::tx::Params<'_>,
        ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
            dispatch!(self.unnamed, $plain, $cached, self, query_one(sql, params))
        }

        /// Runs `sql`; returns its row, if any.
        pub(crate) async fn query_opt_p(
            &self,
            sql: &str,
            params: &crate::tx::Params<'_>,
        ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
            dispatch!(self.unnamed, $plain, $cached, self, query_opt(sql, params))
        }

        /// Runs `sql`; returns its rows as they arrive.
        #[allow(dead_code)] // not every target needs every form
        pub(crate) async fn query_raw_p(
            &self,
            sql: &str,
            params: &crate::tx::Params<'_>,
        ) -> Result<tokio_postgres::RowStream, tokio_postgres::Error> {
            dispatch!(self.unnamed, $plain, $cached, self, query_raw(sql, params))
        }

        /// Runs `sql`; returns the number of rows it affected.
        pub(crate) async fn execute_p(
            &self,
            sql: &str,
            params: &crate::tx::Params<'_>,
        ) -> Result<u64, tokio_postgres::Error> {
            dispatch!(self.unnamed, $plain, $cached, self, execute(sql, params))
        }

        /// Whether statements go unnamed (behind a transaction pooler).
        #[allow(dead_code)] // not every target needs every form
        pub(crate) fn unnamed(&self) -> bool {
            self.unnamed
        }
    };
}

impl Conn {
    typed_statements!(tokio_postgres::Client, deadpool_postgres::ClientWrapper);

    /// Starts a transaction whose statements go as this connection's do.
    pub(crate) async fn transaction_p(&mut self) -> Result<Tx<'_>, tokio_postgres::Error> {
        let unnamed = self.unnamed;
        let client: &mut deadpool_postgres::Client = self;
        Ok(Tx {
            tx: client.transaction().await?,
            unnamed,
        })
    }
}

/// A transaction on a lent connection ([`Conn::transaction_p`]). Rolled
/// back when dropped uncommitted.
pub(crate) struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    unnamed: bool,
}

impl<'a> Tx<'a> {
    typed_statements!(
        tokio_postgres::Transaction<'a>,
        deadpool_postgres::Transaction<'a>
    );

    /// Commits it.
    pub(crate) async fn commit(self) -> Result<(), tokio_postgres::Error> {
        self.tx.commit().await
    }
}

// How the statement macros reach the transaction.
impl<'a> Deref for Tx<'a> {
    type Target = deadpool_postgres::Transaction<'a>;

    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

/// What the body's [`Conn`] and the executor's [`Lease`] share; whichever
/// is dropped last decides the connection's fate (the drop order of an
/// abandoned call is not ours to choose).
struct Lent {
    /// The connection, once the body dropped its `Conn` first.
    obj: Option<Object>,
    /// The call ended (timeout, or dropped) while the body still ran.
    abandoned: bool,
}

fn lock(m: &Mutex<Lent>) -> std::sync::MutexGuard<'_, Lent> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes a connection whose statement may still run out of the pool; it
/// closes when dropped and the pool opens a new one when needed.
fn detach(obj: Object) {
    drop(Object::take(obj));
}

impl Deref for Conn {
    type Target = deadpool_postgres::Client;

    fn deref(&self) -> &Self::Target {
        // Only `Drop` takes it out.
        self.obj.as_ref().expect("connection present until drop")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.obj.as_mut().expect("connection present until drop")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(obj) = self.obj.take() else { return };
        let mut lent = lock(&self.shared);
        if lent.abandoned {
            detach(obj);
        } else {
            lent.obj = Some(obj);
        }
    }
}

/// The executor's side of a lent connection. Dropped with `cancel` still
/// set (the body timed out or the caller dropped the call), the body's
/// statement may still run: it is cancelled on the server and the
/// connection is detached from the pool instead of being reused.
struct Lease {
    shared: Arc<Mutex<Lent>>,
    cancel: Option<(CancelToken, Connector)>,
    stage: &'static str,
    /// The body finished with a connection error: close the connection
    /// instead of returning it to the pool.
    discard: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut lent = lock(&self.shared);
        let obj = lent.obj.take();
        let Some((token, tls)) = self.cancel.take() else {
            // Finished: `obj` (if the body let it go) returns to the pool,
            // unless it failed as a connection.
            if self.discard {
                lent.abandoned = true;
                drop(lent);
                if let Some(obj) = obj {
                    detach(obj);
                }
            }
            return;
        };
        lent.abandoned = true;
        drop(lent);
        if let Some(obj) = obj {
            detach(obj);
        }
        let stage = self.stage;
        tracing::debug!(
            stage,
            "pg-pubsub: statement abandoned; cancelling it on the server"
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = token.cancel_query(tls).await {
                    tracing::warn!(stage, %e, "pg-pubsub: cancelling an abandoned statement failed");
                }
            });
        }
    }
}

/// Maps the pool's error, keeping the server's error as the source.
fn pool_error(stage: &str, err: deadpool_postgres::PoolError) -> Error {
    use deadpool_postgres::PoolError;
    match err {
        // The pool opens connections on demand: this is a failed connect.
        PoolError::Backend(e) => Error::pg(Origin::Connect, &format!("{stage}: connecting"), e),
        PoolError::Timeout(_) => Error::new(
            Origin::Timeout,
            format!("{stage}: no pooled connection: {err}"),
        )
        .with_source(err)
        .connection(),
        PoolError::Closed => Error::shut_down().context(format!("{stage}: the pool is closed")),
        other => Error::new(
            Origin::Connect,
            format!("{stage}: no pooled connection: {other}"),
        )
        .with_source(other),
    }
}
