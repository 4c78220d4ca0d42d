//! What every subcommand shares: the connection options and [`connect`],
//! stderr notes, JSON lines on stdout, stdin batches, connection events,
//! signals and the error type.

use std::fmt;
use std::io::Write as _;
use std::num::NonZeroUsize;
use std::time::Duration;

use clap::Args;
use pg_pubsub::{ChannelName, ConnectionEvent, ErrorKind, PgPubSub};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_postgres::error::SqlState;

/// Fail fast on a dead address instead of hanging a script; used only when
/// the connection string sets no `connect_timeout` of its own.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines sent per batch with `--stdin` (one statement, one transaction):
/// with notification lines of at most 7999 bytes, at most about 8 MB is held.
pub(crate) const STDIN_CHUNK: usize = 1000;

/// Options every subcommand shares.
#[derive(Args)]
pub(crate) struct ConnOpts {
    /// PostgreSQL connection URL or key=value string.
    // Hidden env value: the URL usually holds a password.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    url: Option<String>,
}

/// How to build the [`PgPubSub`]; applied in [`connect`].
#[derive(Default)]
pub(crate) struct Tuning {
    pub(crate) queue_capacity: Option<NonZeroUsize>,
    pub(crate) single_listener: bool,
    pub(crate) filtered: bool,
    /// Reconnect (and slot standby) backoff instead of the library's.
    pub(crate) backoff: Option<pg_pubsub::Backoff>,
}

/// A message for the user; printed as `pg-pubsub: error: <message>`.
pub(crate) struct Failure(pub(crate) String);

impl From<pg_pubsub::Error> for Failure {
    fn from(e: pg_pubsub::Error) -> Self {
        // 42602: e.g. `--table 'Order Items'`, which the server reads as SQL.
        if e.code() == Some(&SqlState::INVALID_NAME) {
            return Failure(format!(
                "{e} (names are read as SQL: double-quote one with capitals, spaces or \
                 other special characters, e.g. --table '\"Order Items\"' or \
                 --table 'shop.\"Order Items\"')"
            ));
        }
        Failure(e.to_string())
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(s)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) type Result<T, E = Failure> = std::result::Result<T, E>;

/// Writes one `pg-pubsub:` line to stderr. Never panics (unlike `eprintln!`
/// on a closed stderr) and keeps multi-line server texts on one line.
pub(crate) fn note(msg: &str) {
    let line = msg.replace(['\r', '\n'], " ");
    let _ = writeln!(std::io::stderr().lock(), "pg-pubsub: {line}");
}

/// The one place a [`PgPubSub`] is built from the command line.
pub(crate) async fn connect(conn: &ConnOpts, tuning: Tuning) -> Result<PgPubSub> {
    let url = conn
        .url
        .as_deref()
        .ok_or_else(|| Failure("no server given: pass --url or set DATABASE_URL".to_owned()))?;
    let mut builder = PgPubSub::builder(url)?;
    if builder.config().get_connect_timeout().is_none() {
        builder = builder.connect_timeout(CONNECT_TIMEOUT);
    }
    let server = server_name(builder.config());
    if let Some(n) = tuning.queue_capacity {
        builder = builder.queue_capacity(n.get());
    }
    builder = builder
        .single_listener(tuning.single_listener)
        .filtered(tuning.filtered);
    if let Some(backoff) = tuning.backoff {
        builder = builder.backoff(backoff);
    }
    builder
        .connect()
        .await
        .map_err(|e| connect_failure(&server, e))
}

/// `cannot connect to HOST:PORT: why`. The first connection the library
/// opens is its listener's, which a one-shot command does not care about.
fn connect_failure(server: &str, e: pg_pubsub::Error) -> Failure {
    let first_connection = matches!(
        e.kind(),
        ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Authentication | ErrorKind::Tls
    );
    if !first_connection {
        return e.into();
    }
    let text = e.to_string();
    let why = text
        .strip_prefix("connecting the listener: ")
        .unwrap_or(&text);
    Failure(format!("cannot connect to {server}: {why}"))
}

/// The servers a config names: `db:5432`, `[::1]:5432`, or a socket path.
fn server_name(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let mut names: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) if name.contains(':') => format!("[{name}]:{}", port(i)),
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            #[cfg(unix)]
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port(i)),
        })
        .collect();
    if names.is_empty() {
        names = config
            .get_hostaddrs()
            .iter()
            .enumerate()
            .map(|(i, addr)| std::net::SocketAddr::new(*addr, port(i)).to_string())
            .collect();
    }
    match names.len() {
        0 => "the server".to_owned(),
        _ => names.join(", "),
    }
}

pub(crate) fn check_channel(name: &str) -> Result<ChannelName> {
    Ok(ChannelName::new(name)?)
}

/// Sends standard input line by line, `STDIN_CHUNK` lines per `send` call
/// (each call one batch, all or nothing); returns how many were sent. An
/// error says how many `what` (e.g. "messages") went out before it. Lines
/// are read whole: durable messages and jobs have no size limit.
pub(crate) async fn send_stdin_lines<F, Fut>(what: &str, mut send: F) -> Result<usize>
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = pg_pubsub::Result<usize>>,
{
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut chunk = Vec::with_capacity(STDIN_CHUNK);
    let mut sent = 0usize;
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| Failure(format!("reading stdin after {sent} {what}: {e}")))?;
        let done = line.is_none();
        chunk.extend(line);
        if chunk.len() == STDIN_CHUNK || (done && !chunk.is_empty()) {
            let batch = std::mem::replace(&mut chunk, Vec::with_capacity(STDIN_CHUNK));
            sent += send(batch)
                .await
                .map_err(|e| Failure(format!("{e} ({sent} {what} were sent before)")))?;
        }
        if done {
            return Ok(sent);
        }
    }
}

/// Writes `line` as one JSON line, flushed so a reader sees it at once;
/// `false` when stdout is closed (e.g. `| head`).
pub(crate) async fn write_json_line<T: serde::Serialize>(
    out: &mut tokio::io::Stdout,
    line: &T,
) -> Result<bool> {
    let mut json = serde_json::to_vec(line).map_err(|e| format!("encoding JSON: {e}"))?;
    json.push(b'\n');
    let written = async {
        out.write_all(&json).await?;
        out.flush().await
    };
    match written.await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Failure(format!("writing to stdout: {e}"))),
    }
}

/// Prints a connection event of the listener as a `pg-pubsub:` line.
pub(crate) fn report_event(event: &ConnectionEvent) {
    match event {
        ConnectionEvent::Disconnected { reason } => {
            note(&format!("disconnected: {reason}; reconnecting"));
        }
        ConnectionEvent::ReconnectFailed {
            attempt,
            error,
            retry_in,
        } => note(&format!(
            "reconnect attempt {attempt} failed: {error}; retrying in {}",
            human(*retry_in)
        )),
        ConnectionEvent::Reconnected {
            attempts, downtime, ..
        } => note(&format!(
            "reconnected after {attempts} attempt(s), downtime {}",
            human(*downtime)
        )),
        ConnectionEvent::SlowConsumer { channel } => {
            note(&format!("output too slow on {channel}: dropping messages"));
        }
        ConnectionEvent::LockAcquired { channel } => {
            note(&format!("leading {channel}: this process now receives it"));
        }
        ConnectionEvent::Standby { channel } => {
            note(&format!(
                "standing by on {channel}: another process leads it"
            ));
        }
        ConnectionEvent::LockLost { channel, reason } => {
            note(&format!("lost the lead on {channel}: {reason}"));
        }
        ConnectionEvent::LockReleased { channel } => {
            note(&format!("released {channel} to the standbys"));
        }
        ConnectionEvent::ElectionBlocked {
            channel,
            holder_pid,
        } => note(&format!(
            "error: cannot lead {channel}: its election lock is held by backend {holder_pid}, \
             which does not lead it (key collision or a foreign advisory lock)"
        )),
        ConnectionEvent::EventsLagged { missed } => {
            note(&format!("{missed} connection event(s) not shown"));
        }
        // The listening line is printed once all channels are listened to;
        // re-listens after a reconnect are covered by the reconnect and gap lines.
        _ => {}
    }
}

/// `12ms`, `3.4s`: short enough for a log line.
pub(crate) fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// SIGINT or SIGTERM: the request to shut down cleanly.
pub(crate) struct Stop {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Stop {
    #[cfg(unix)]
    pub(crate) fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| signal(kind).map_err(|e| format!("installing signal handlers: {e}"));
        Ok(Stop {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
        })
    }

    #[cfg(not(unix))]
    pub(crate) fn new() -> Result<Self> {
        Ok(Stop {})
    }

    #[cfg(unix)]
    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    #[cfg(not(unix))]
    pub(crate) async fn recv(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Runs `fut` unless a signal comes first (then `None`).
    pub(crate) async fn or<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.recv() => None,
            out = fut => Some(out),
        }
    }
}

/// Prints `items` as JSON lines (stops quietly when stdout closes).
pub(crate) async fn print_json_lines<T: serde::Serialize>(items: &[T]) -> Result<()> {
    let mut out = tokio::io::stdout();
    for item in items {
        if !write_json_line(&mut out, item).await? {
            break;
        }
    }
    Ok(())
}
