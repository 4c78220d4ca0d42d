//! The crate's error type: an opaque [`Error`] with a [`ErrorKind`] and accessors.

use std::fmt;

/// A specialised `Result` for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, and at which stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The channel name is empty.
    EmptyChannel,
    /// The channel name contains a NUL byte.
    ChannelContainsNul,
    /// The channel name is 64 bytes or longer.
    ChannelTooLong,
    /// The payload (after serialization and framing) is 8000 bytes or longer.
    PayloadTooLarge,
    /// The value could not be serialized to JSON.
    Serialize,
    /// The options are inconsistent (for example a zero queue capacity).
    Config,
    /// Opening the listener connection failed.
    Connect,
    /// No pooled connection could be had for publishing.
    Pool,
    /// The server refused a statement.
    Db,
    /// The operation did not finish within its configured timeout.
    Timeout,
    /// The [`PgPubSub`](crate::PgPubSub) has been shut down.
    ShutDown,
    /// The payload contains a NUL byte, which PostgreSQL text cannot hold.
    PayloadContainsNul,
}

/// An error from this crate. Use [`Error::kind`] to branch on it.
///
/// ```
/// use pg_pubsub::{ErrorKind, ChannelName};
/// let err = ChannelName::new("").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::EmptyChannel);
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Appends `(what)` to the message, keeping kind and source.
    pub(crate) fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{} ({what})", self.message);
        self
    }

    pub(crate) fn shut_down() -> Self {
        Error::new(ErrorKind::ShutDown, "the PgPubSub has been shut down")
    }

    pub(crate) fn db(stage: &str, err: tokio_postgres::Error) -> Self {
        let kind = if err.is_closed() || err.as_db_error().is_none() {
            ErrorKind::Connect
        } else {
            ErrorKind::Db
        };
        Error::new(kind, format!("{stage}: {}", describe_pg_error(&err))).with_source(err)
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The server's error, when the server refused a statement.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        self.source
            .as_deref()
            .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
            .and_then(|e| e.as_db_error())
    }

    /// Whether the error was caused by a lost or unreachable server
    /// (so retrying later may succeed).
    pub fn is_connection(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect | ErrorKind::Pool | ErrorKind::Timeout
        )
    }
}

/// Renders a tokio-postgres error with the server's text when there is one
/// (tokio-postgres' own `Display` says only "db error").
pub(crate) fn describe_pg_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        },
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
        d.field("kind", &self.kind).field("message", &self.message);
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
