//! The crate's error type: an opaque [`Error`] with a kind ([`ErrorKind`]:
//! what), a [`Stage`] (where) and predicates (retry? may it have committed?).

use std::fmt;
use std::sync::Arc;

use tokio_postgres::error::{DbError, SqlState};

/// A specialised `Result` for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong. Where it went wrong is a separate axis,
/// [`Error::stage`]; whether the server was lost (so a retry may succeed)
/// another, [`Error::is_connection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A name was refused before anything was sent: a channel (empty, a
    /// NUL byte, 64 bytes or longer), a consumer group, a queue, a schema.
    /// The message names which and why.
    InvalidName,
    /// A documented limit: a payload of 8000 bytes or more for `NOTIFY`, a
    /// NUL byte PostgreSQL text cannot hold, an argument out of range.
    Limit,
    /// The value could not be serialized to JSON.
    Serialize,
    /// The options are inconsistent (a zero capacity, an `sslmode` that
    /// needs the `tls` feature without it, two max ages for one channel).
    Config,
    /// Opening a connection failed: unreachable or refusing server, a
    /// database that does not exist, too many connections, ...
    Connect,
    /// The server rejected the credentials (SQLSTATE class 28, e.g.
    /// `28P01` wrong password, `28000` no `pg_hba.conf` entry).
    Authentication,
    /// TLS could not be set up: the server's certificate did not verify
    /// (unknown CA, wrong host name), or the server does not offer TLS.
    Tls,
    /// An established connection was lost while a statement or stream ran
    /// (server restart, terminated backend, network).
    Connection,
    /// The server refused or failed a statement: [`Error::code`] has the
    /// SQLSTATE. Also an answer this crate could not read.
    Server,
    /// The operation no longer applies: a job's claim was lost (its lease
    /// expired), a consumer group or a replication slot was removed.
    Conflict,
    /// The operation did not finish within its configured timeout.
    Timeout,
    /// The [`PgPubSub`](crate::PgPubSub) has been shut down.
    ShutDown,
    /// The schema could not be installed or used: a newer, edited or
    /// unknown migration, or migrations pending with automatic migration off.
    Schema,
    /// A WAL feed's replication slot is gone or unusable although the feed
    /// created it: missing on this server (a failover to a server without
    /// it) or invalidated (`wal_status = 'lost'`, e.g. by
    /// `max_slot_wal_keep_size`). Changes since the last ack cannot be
    /// replayed; the feed does not start over from "now" unless told to
    /// (`WalFeedBuilder::recreate_lost_slot`).
    SlotLost,
    /// The operation needs a server session of its own (`LISTEN`, session
    /// advisory locks, named prepared statements), but the connection goes
    /// through a pooler in transaction mode (PgBouncer's
    /// `pool_mode = transaction`), which hands each transaction to any
    /// server connection. Connect the listener directly or through session
    /// pooling; publishing, enqueueing, workers and durable consumers
    /// (polling) work through it.
    Pooler,
    /// A message broker (NATS, Redis, RabbitMQ: see [`relay`](crate::relay))
    /// could not be reached or refused what it was sent.
    Broker,
}

/// Where an error happened: which part of the crate was at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// Opening a connection (listener, pool, replication).
    Connect,
    /// The listener connection: `LISTEN`/`UNLISTEN`, the single-listener lock.
    Listen,
    /// Publishing with `notify`.
    Notify,
    /// A durable-channel statement (publish, tick, read, ack, retention).
    Durable,
    /// A work-queue statement (enqueue, claim, complete, fail, rescue).
    Queue,
    /// A trigger change-feed statement (install, remove, look up).
    Changes,
    /// The WAL change feed: slot, publication, replication stream.
    Wal,
    /// Installing or checking the schema.
    Schema,
    /// A relay to a broker: its source, its sink, its dead letters.
    Relay,
}

/// What a crate-internal constructor is told: a kind, or the stage at
/// which a statement failed (the kind then comes from the cause).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    InvalidName,
    Limit,
    Serialize,
    Config,
    Connect,
    Authentication,
    /// TLS could not be set up (the WAL feed's own handshake).
    #[cfg_attr(not(feature = "wal"), allow(dead_code))]
    Tls,
    Timeout,
    ShutDown,
    Schema,
    Conflict,
    SlotLost,
    Pooler,
    Listen,
    Notify,
    Durable,
    Queue,
    Changes,
    Wal,
    Relay,
    #[cfg_attr(
        not(any(
            feature = "relay-nats",
            feature = "relay-redis",
            feature = "relay-amqp"
        )),
        allow(dead_code)
    )]
    Broker,
}

impl Origin {
    /// The kind and the stage an error of this origin has when its cause
    /// says nothing more specific (`connection`: the server was lost).
    fn split(self, connection: bool) -> (ErrorKind, Option<Stage>) {
        let at = |stage| {
            let kind = if connection {
                ErrorKind::Connection
            } else {
                ErrorKind::Server
            };
            (kind, Some(stage))
        };
        match self {
            Origin::InvalidName => (ErrorKind::InvalidName, None),
            Origin::Limit => (ErrorKind::Limit, None),
            Origin::Serialize => (ErrorKind::Serialize, None),
            Origin::Config => (ErrorKind::Config, None),
            Origin::Connect => (ErrorKind::Connect, Some(Stage::Connect)),
            Origin::Authentication => (ErrorKind::Authentication, Some(Stage::Connect)),
            Origin::Tls => (ErrorKind::Tls, Some(Stage::Connect)),
            Origin::Timeout => (ErrorKind::Timeout, None),
            Origin::ShutDown => (ErrorKind::ShutDown, None),
            Origin::Schema => (ErrorKind::Schema, Some(Stage::Schema)),
            Origin::Conflict => (ErrorKind::Conflict, None),
            Origin::SlotLost => (ErrorKind::SlotLost, Some(Stage::Wal)),
            Origin::Pooler => (ErrorKind::Pooler, Some(Stage::Listen)),
            Origin::Listen => at(Stage::Listen),
            Origin::Notify => at(Stage::Notify),
            Origin::Durable => at(Stage::Durable),
            Origin::Queue => at(Stage::Queue),
            Origin::Changes => at(Stage::Changes),
            Origin::Wal => at(Stage::Wal),
            Origin::Relay => at(Stage::Relay),
            Origin::Broker => (ErrorKind::Broker, Some(Stage::Relay)),
        }
    }
}

/// An error from this crate. Use [`Error::kind`] to branch on it,
/// [`Error::is_connection`] to decide whether to retry, and
/// [`Error::code`] / [`Error::as_db_error`] for the server's answer.
///
/// The underlying error (a [`tokio_postgres::Error`], an I/O error, ...) is
/// kept as [`source()`](std::error::Error::source). Cloning is cheap: the
/// source is shared, so one error can be handed to several waiters.
///
/// ```
/// use pg_pubsub::{ErrorKind, ChannelName};
/// let err = ChannelName::new("").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::InvalidName);
/// ```
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    stage: Option<Stage>,
    message: String,
    connection: bool,
    /// The statement had been sent when the call failed.
    sent: bool,
    /// Nothing took effect, whatever was sent.
    nothing_done: bool,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub(crate) fn new(origin: Origin, message: impl Into<String>) -> Self {
        let (kind, stage) = origin.split(false);
        Error {
            kind,
            stage,
            message: message.into(),
            connection: false,
            sent: false,
            nothing_done: false,
            source: None,
        }
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Marks the error as a lost or unreachable server.
    pub(crate) fn connection(mut self) -> Self {
        self.connection = true;
        if self.kind == ErrorKind::Server {
            self.kind = ErrorKind::Connection;
        }
        self
    }

    /// Says at which stage it happened.
    pub(crate) fn at(mut self, stage: Stage) -> Self {
        self.stage = Some(stage);
        self
    }

    /// Marks the error as one that hit after the statement was sent
    /// (unless it is known that nothing took effect).
    pub(crate) fn sent(mut self) -> Self {
        self.sent = !self.nothing_done;
        self
    }

    /// Marks the error as one after which nothing took effect, although a
    /// statement ran (a guarded statement that found a read-only server).
    pub(crate) fn nothing_done(mut self) -> Self {
        self.nothing_done = true;
        self.sent = false;
        self
    }

    /// Puts `what: ` before the message, keeping kind and source.
    #[cfg(feature = "wal")]
    pub(crate) fn prefix(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// Appends `(what)` to the message, keeping kind and source.
    pub(crate) fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{} ({what})", self.message);
        self
    }

    pub(crate) fn shut_down() -> Self {
        Error::new(Origin::ShutDown, "the PgPubSub has been shut down")
    }

    /// A statement or connection failed at `stage` (the kind used unless the
    /// error says authentication or TLS); `what` names the operation.
    pub(crate) fn pg(origin: Origin, what: &str, err: tokio_postgres::Error) -> Self {
        let (kind, stage, connection) = classify(origin, &err);
        let mut message = format!("{what}: {}", describe_pg_error(&err));
        // tokio-postgres' word for "every host is read-only" (pg-pubsub
        // connects with target_session_attrs=read-write).
        if message.contains("does not allow writes") {
            message.push_str(
                " (no host is a primary that takes writes: a standby or a read-only server; \
                 during a failover, until the new primary is promoted)",
            );
        }
        if kind == ErrorKind::Tls && mentions_certificate(&err) {
            message.push_str(
                " (the server's certificate could not be verified: check sslrootcert, \
                 the CA, and that the host name matches the certificate)",
            );
        }
        Error {
            kind,
            stage,
            message,
            connection,
            sent: false,
            nothing_done: false,
            source: Some(Arc::new(err)),
        }
    }

    /// The session ended without an error from the server or the socket.
    pub(crate) fn closed(stage: Origin, what: &str) -> Self {
        Error::new(stage, format!("{what}: server closed the connection")).connection()
    }

    /// `what` did not finish within `timeout`; `last` is what the last
    /// attempt ran into, if anything.
    pub(crate) fn timeout(what: &str, timeout: std::time::Duration, last: Option<Error>) -> Self {
        let mut err = Error::new(
            Origin::Timeout,
            format!("{what}: no answer within {timeout:?} (is the server reachable?)"),
        );
        if let Some(last) = last {
            err.message = format!("{}; last error: {last}", err.message);
            err.source = Some(Arc::new(last));
        }
        err.connection()
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Where it happened, when that is known (a refused name is refused
    /// before any stage).
    pub fn stage(&self) -> Option<Stage> {
        self.stage
    }

    /// The server's error, when the server answered with one (a refused
    /// statement, a failed login, an administrator's shutdown, ...).
    pub fn as_db_error(&self) -> Option<&DbError> {
        self.pg_error().and_then(tokio_postgres::Error::as_db_error)
    }

    /// The SQLSTATE of the server's error, if there was one
    /// (e.g. [`SqlState::INVALID_PASSWORD`] for a wrong password).
    pub fn code(&self) -> Option<&SqlState> {
        self.as_db_error().map(DbError::code)
    }

    /// The first [`tokio_postgres::Error`] in the source chain.
    fn pg_error(&self) -> Option<&tokio_postgres::Error> {
        let mut next = std::error::Error::source(self);
        while let Some(err) = next {
            if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
                return Some(pg);
            }
            next = err.source();
        }
        None
    }

    /// Whether the error was caused by a lost or unreachable server, so
    /// retrying later may succeed: refused or reset connections, a session
    /// ended by the server (`FATAL`, SQLSTATE classes 08 and 57, e.g. a
    /// restart), a server that refuses writes because it is read-only
    /// (SQLSTATE 25006: a standby, or a primary demoted by a failover; a
    /// new connection finds the new primary), and timeouts. False for
    /// refused statements, wrong credentials and certificate problems.
    pub fn is_connection(&self) -> bool {
        self.connection || self.kind == ErrorKind::Timeout
    }

    /// Whether the failed call may still have taken effect: it timed out
    /// or lost its connection after its statement was sent to the server
    /// (the statement was then cancelled, but it may have committed before
    /// the cancel arrived). False when nothing was sent (no connection
    /// could be had, a check failed) or the server refused the statement.
    /// Check before retrying something that must not happen twice.
    pub fn may_have_committed(&self) -> bool {
        self.sent
    }
}

/// The kind, the stage and whether the connection was lost, for an error
/// of `origin`.
fn classify(origin: Origin, err: &tokio_postgres::Error) -> (ErrorKind, Option<Stage>, bool) {
    let with = |connection: bool| {
        let (kind, stage) = origin.split(connection);
        (kind, stage, connection)
    };
    let stage = origin.split(false).1;
    if let Some(db) = err.as_db_error() {
        let class = &db.code().code()[..2];
        if class == "28" {
            return (ErrorKind::Authentication, stage, false);
        }
        // A database that does not exist will not appear by retrying.
        // A read-only server (a standby, or a primary demoted or fenced by
        // failover tooling) will not take writes again: the writes belong
        // on the new primary, which a new connection finds.
        let lost = (matches!(db.severity(), "FATAL" | "PANIC")
            && *db.code() != SqlState::INVALID_CATALOG_NAME)
            || class == "08"
            || (class == "57" && *db.code() != SqlState::QUERY_CANCELED)
            || is_read_only(db);
        return with(lost);
    }
    let text = err.to_string();
    // tokio-postgres' own client-side authentication failures (no password given, ...).
    if text.starts_with("authentication error") {
        return (ErrorKind::Authentication, stage, false);
    }
    if text.starts_with("timeout waiting for server") {
        return with(true);
    }
    if is_tls(err) {
        // A handshake cut short by the network is a connection problem; a
        // certificate or a server without TLS will not heal by retrying.
        return (
            ErrorKind::Tls,
            stage,
            has_io_loss(err) && !mentions_certificate(err),
        );
    }
    with(err.is_closed() || has_io_loss(err))
}

/// Whether the server refused a write because it is read-only: a hot
/// standby (`cannot execute LISTEN during recovery`), or a primary demoted
/// or fenced with `default_transaction_read_only` (SQLSTATE 25006).
pub(crate) fn is_read_only(db: &DbError) -> bool {
    *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION
}

/// tokio-postgres does not expose its error kinds; its TLS kind always
/// displays as this.
fn is_tls(err: &tokio_postgres::Error) -> bool {
    err.to_string()
        .starts_with("error performing TLS handshake")
}

fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

fn mentions_certificate(err: &tokio_postgres::Error) -> bool {
    chain_text(err).contains("certificate")
}

/// Whether an I/O error anywhere in the chain is a network failure.
fn has_io_loss(err: &tokio_postgres::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            // A TLS failure arrives as InvalidData; a certificate is no network loss.
            return !matches!(io.kind(), K::InvalidData | K::InvalidInput);
        }
        next = e.source();
    }
    false
}

/// Renders a tokio-postgres error with the server's text when there is one
/// (tokio-postgres' own `Display` says only "db error"), or with its whole
/// source chain (e.g. "error connecting to server: Connection refused").
pub(crate) fn describe_pg_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => chain_text(err),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("stage", &self.stage)
            .field("message", &self.message)
            .field("connection", &self.is_connection())
            .field("may_have_committed", &self.sent);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}
