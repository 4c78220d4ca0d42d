//! `pg-pubsub`: listen to and publish on PostgreSQL channels from the shell.
//!
//! `listen` prints one JSON object per notification on stdout, so the output
//! can be piped into `jq` or a script; everything else (gaps, reconnects,
//! errors) goes to stderr as single lines starting with `pg-pubsub:`.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io::Write as _;
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures::stream::{self, Fuse, StreamExt};
use futures::FutureExt;
use pg_pubsub::wire::{self, MAX_PAYLOAD_BYTES};
use pg_pubsub::{
    ChannelName, ConnectionEvent, Delivery, EventStream, GapCause, ListenOptions, PgPubSub,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};

#[path = "pg-pubsub/changes_cmd.rs"]
mod changes_cmd;
#[path = "pg-pubsub/durable_cmd.rs"]
mod durable_cmd;
#[path = "pg-pubsub/migrate_cmd.rs"]
mod migrate_cmd;
#[path = "pg-pubsub/queue_cmd.rs"]
mod queue_cmd;
#[path = "pg-pubsub/wal_cmd.rs"]
mod wal_cmd;

/// Fail fast on a dead address instead of hanging a script.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines sent per `notify_batch` call with `--stdin` (one statement, one
/// transaction): with lines of at most 7999 bytes, at most about 8 MB is held.
const STDIN_CHUNK: usize = 1000;

#[derive(Parser)]
#[command(
    version,
    about = "Publish and subscribe on PostgreSQL LISTEN/NOTIFY channels"
)]
struct Cli {
    #[command(flatten)]
    conn: ConnOpts,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand shares.
#[derive(Args)]
struct ConnOpts {
    /// PostgreSQL connection URL or key=value string.
    // Hidden env value: the URL usually holds a password.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print every notification on the channels as one JSON object per line.
    Listen(ListenArgs),
    /// Send a notification, or one per line of stdin.
    Notify(NotifyArgs),
    /// Durable channels: stored messages, consumer groups.
    Durable(durable_cmd::DurableArgs),
    /// The schema's migrations: status, apply pending ones, print the script.
    Migrate(migrate_cmd::MigrateArgs),
    /// Work queue: enqueue jobs, run a worker command, stats, dead jobs.
    Queue(queue_cmd::QueueArgs),
    /// Change feeds: install triggers on a table, print its changes.
    Changes(changes_cmd::ChangesArgs),
}

#[derive(Args)]
struct ListenArgs {
    /// Channels to listen on.
    #[arg(required_unless_present = "elect", value_name = "CHANNEL")]
    channels: Vec<String>,
    /// Messages buffered per channel before they are dropped (and reported).
    #[arg(long, value_name = "N")]
    queue_capacity: Option<NonZeroUsize>,
    /// Only one process (of those electing the channel on the same
    /// database) receives each channel; the others stand by and take over.
    #[arg(long)]
    single_listener: bool,
    /// Elect only this channel (repeatable; it is listened to even if not
    /// given as CHANNEL); the other channels are received by every process.
    #[arg(long, value_name = "CHANNEL")]
    elect: Vec<String>,
    /// Do not print messages this process published itself.
    #[arg(long)]
    filtered: bool,
}

#[derive(Args)]
struct NotifyArgs {
    /// Channel to notify.
    channel: String,
    /// Payload text.
    #[arg(required_unless_present = "stdin", conflicts_with = "stdin")]
    payload: Option<String>,
    /// Send one notification per line of standard input.
    ///
    /// Lines are streamed: sent in batches of up to 1000 as they are read,
    /// each batch in one transaction once all its lines are checked (UTF-8,
    /// no NUL byte, at most 7999 bytes; a longer line is not read further).
    /// A bad line or a failed batch stops the run with an error that says
    /// which lines were sent ("lines 1 to 2000 were sent before"); no later
    /// line is read or sent.
    #[arg(long, verbatim_doc_comment)]
    stdin: bool,
}

/// How to build the [`PgPubSub`]; applied in [`connect`].
#[derive(Default)]
struct Tuning {
    queue_capacity: Option<NonZeroUsize>,
    single_listener: bool,
    filtered: bool,
}

/// A message for the user; printed as `pg-pubsub: error: <message>`.
struct Failure(String);

impl From<pg_pubsub::Error> for Failure {
    fn from(e: pg_pubsub::Error) -> Self {
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

type Result<T, E = Failure> = std::result::Result<T, E>;

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit here with clap's own message and code 2.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Listen(args) => listen(&cli.conn, args).await,
        Command::Notify(args) => notify(&cli.conn, args).await,
        Command::Durable(args) => durable_cmd::run(&cli.conn, args).await,
        Command::Migrate(args) => migrate_cmd::run(&cli.conn, args).await,
        Command::Queue(args) => queue_cmd::run(&cli.conn, args).await,
        Command::Changes(args) => changes_cmd::run(&cli.conn, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes one `pg-pubsub:` line to stderr. Never panics (unlike `eprintln!`
/// on a closed stderr) and keeps multi-line server texts on one line.
fn note(msg: &str) {
    let line = msg.replace(['\r', '\n'], " ");
    let _ = writeln!(std::io::stderr().lock(), "pg-pubsub: {line}");
}

/// The one place a [`PgPubSub`] is built from the command line.
async fn connect(conn: &ConnOpts, tuning: Tuning) -> Result<PgPubSub> {
    let url = conn
        .url
        .as_deref()
        .ok_or_else(|| Failure("no server given: pass --url or set DATABASE_URL".to_owned()))?;
    let mut builder = PgPubSub::builder(url)?.connect_timeout(CONNECT_TIMEOUT);
    if let Some(n) = tuning.queue_capacity {
        builder = builder.queue_capacity(n.get());
    }
    builder = builder
        .single_listener(tuning.single_listener)
        .filtered(tuning.filtered);
    Ok(builder.connect().await?)
}

fn check_channel(name: &str) -> Result<ChannelName> {
    Ok(ChannelName::new(name)?)
}

/// Checked before connecting so bad input is reported as such, even with no server.
fn check_payload(payload: &str) -> Result<(), String> {
    wire::check_payload(payload).map_err(|e| e.to_string())
}

async fn notify(conn: &ConnOpts, args: NotifyArgs) -> Result<()> {
    check_channel(&args.channel)?;
    let payload = match args.payload {
        Some(p) => {
            check_payload(&p)?;
            Some(p)
        }
        None => None,
    };
    let ps = connect(conn, Tuning::default()).await?;
    let result = match payload {
        Some(p) => ps
            .notify_raw(&args.channel, &p)
            .await
            .map_err(Failure::from),
        None => notify_stdin(&ps, &args.channel).await,
    };
    ps.shutdown().await;
    result
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

/// Streams stdin in batches of at most [`STDIN_CHUNK`] lines, each sent
/// with one `notify_batch` call that is one statement and one transaction
/// (a batch ends before a repeated line, which the server would merge), so
/// a batch goes out whole or not at all and errors can say which lines went.
async fn notify_stdin(ps: &PgPubSub, channel: &str) -> Result<()> {
    let mut input = BufReader::new(tokio::io::stdin());
    let mut bytes = Vec::new();
    let mut chunk: Vec<String> = Vec::with_capacity(STDIN_CHUNK);
    // Hashes of the chunk's lines: a collision only ends a batch early.
    let hasher = RandomState::new();
    let mut seen = HashSet::with_capacity(STDIN_CHUNK);
    let mut line_no = 0usize;
    // Lines 1 to `sent` have been sent.
    let mut sent = 0usize;
    let sent_so_far = |sent: usize| match sent {
        0 => "nothing was sent before".to_owned(),
        n => format!("lines 1 to {n} were sent before"),
    };
    loop {
        let read = read_line(&mut input, &mut bytes).await.map_err(|e| {
            let line = line_no + 1;
            format!("reading stdin line {line}: {e}; {}", sent_so_far(sent))
        })?;
        let line = match read {
            ReadLine::End => None,
            ReadLine::TooLong => Some(Err(format!(
                "payload is more than {MAX_PAYLOAD_BYTES} bytes; PostgreSQL accepts at most \
                 {MAX_PAYLOAD_BYTES}"
            ))),
            ReadLine::Line => Some(
                String::from_utf8(std::mem::take(&mut bytes))
                    .map_err(|_| "not valid UTF-8".to_owned())
                    .and_then(|line| check_payload(&line).map(|()| line)),
            ),
        };
        let line = match line {
            Some(line) => {
                line_no += 1;
                Some(line.map_err(|e| format!("line {line_no}: {e}; {}", sent_so_far(sent)))?)
            }
            None => None,
        };
        let repeat = line
            .as_ref()
            .is_some_and(|l| !seen.insert(hasher.hash_one(l)));
        let full = chunk.len() == STDIN_CHUNK || repeat || (line.is_none() && !chunk.is_empty());
        if full {
            let (first, last) = (sent + 1, sent + chunk.len());
            let n = ps.notify_batch(channel, &chunk).await.map_err(|e| {
                // A lost connection may have lost the commit's answer, not the commit.
                let fate = if e.is_connection() {
                    "may have been"
                } else {
                    "were not"
                };
                format!(
                    "sending lines {first} to {last}: {e}; they {fate} sent; {}",
                    sent_so_far(sent)
                )
            })?;
            sent += n;
            chunk.clear();
            seen.clear();
            if let Some(l) = &line {
                seen.insert(hasher.hash_one(l));
            }
        }
        match line {
            Some(line) => chunk.push(line),
            None => break,
        }
    }
    note(&format!("sent {sent} notifications"));
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum ReadLine {
    /// A line is in the buffer, without its `\n` or `\r\n`.
    Line,
    /// Longer than a payload may be; the rest of it was not read.
    TooLong,
    /// End of input.
    End,
}

/// Reads one line into `line` holding at most one payload's worth of it,
/// however long the line is (a plain `read_line` would hold all of it).
async fn read_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<ReadLine> {
    // One more than a payload: room for the `\r` of `\r\n`.
    const ROOM: usize = MAX_PAYLOAD_BYTES + 1;
    line.clear();
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            // A last line without `\n` counts, as with `BufRead::lines`.
            return Ok(match line.len() {
                0 => ReadLine::End,
                n if n > MAX_PAYLOAD_BYTES => ReadLine::TooLong,
                _ => ReadLine::Line,
            });
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(buf.len());
        if line.len() + take > ROOM {
            return Ok(ReadLine::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        input.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(if line.len() > MAX_PAYLOAD_BYTES {
                ReadLine::TooLong
            } else {
                ReadLine::Line
            });
        }
    }
}

async fn listen(conn: &ConnOpts, args: ListenArgs) -> Result<()> {
    // Duplicates would print every message twice.
    let mut channels: Vec<(ChannelName, ListenOptions)> = Vec::new();
    for name in &args.channels {
        let channel = check_channel(name)?;
        if !channels.iter().any(|(c, _)| *c == channel) {
            channels.push((channel, ListenOptions::new()));
        }
    }
    for name in &args.elect {
        let channel = check_channel(name)?;
        let elected = ListenOptions::new().single_listener(true);
        match channels.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, options)) => *options = elected,
            None => channels.push((channel, elected)),
        }
    }
    // Installed first so a signal during connecting still ends cleanly.
    let mut stop = Stop::new()?;
    let tuning = Tuning {
        queue_capacity: args.queue_capacity,
        single_listener: args.single_listener,
        filtered: args.filtered,
    };
    let ps = match stop.or(connect(conn, tuning)).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    // Subscribed before listening so no reconnect goes unreported.
    let mut events = ps.events().fuse();
    // A signal shuts down while `serve` goes on printing what the listener
    // still delivers (a leader hands over first); the streams then end.
    let on_signal = ps.shutdown_on_signal();
    drop(stop);
    let result = serve(&ps, &channels, &mut events).await;
    ps.shutdown().await;
    on_signal.abort();
    // What shutdown did (e.g. hand-overs) is already queued.
    while let Some(Some(event)) = events.next().now_or_never() {
        report_event(&event);
    }
    result
}

/// Subscribes, then prints until the listener stops or stdout is closed.
async fn serve(
    ps: &PgPubSub,
    channels: &[(ChannelName, ListenOptions)],
    events: &mut Fuse<EventStream>,
) -> Result<()> {
    let mut subs = Vec::with_capacity(channels.len());
    for (channel, options) in channels {
        let sub = ps.listen_raw_with(channel.as_str(), *options).await?;
        let channel = channel.clone();
        subs.push(sub.map(move |d| (channel.clone(), d)));
    }
    let names: Vec<&str> = channels.iter().map(|(c, _)| c.as_str()).collect();
    note(&format!("listening on {}", names.join(", ")));
    let mut deliveries = stream::select_all(subs);
    let mut out = tokio::io::stdout();
    loop {
        // Events first: a disconnect is reported before the gaps it causes.
        tokio::select! {
            biased;
            Some(event) = events.next() => report_event(&event),
            delivery = deliveries.next() => match delivery {
                Some((channel, delivery)) => {
                    if !print_delivery(&mut out, &channel, delivery).await? {
                        return Ok(());
                    }
                }
                None if ps.is_shut_down() => return Ok(()),
                None => return Err(Failure("the listener stopped unexpectedly".to_owned())),
            },
        }
    }
}

#[derive(serde::Serialize)]
struct Line<'a> {
    channel: &'a str,
    payload: &'a str,
    process_id: i32,
    origin: Option<String>,
}

/// Prints one delivery; `false` when stdout is closed (e.g. `| head`).
async fn print_delivery(
    out: &mut tokio::io::Stdout,
    channel: &ChannelName,
    delivery: Delivery<String>,
) -> Result<bool> {
    let line = match &delivery {
        Delivery::Message(m) => Line {
            channel: m.channel(),
            payload: m.raw(),
            process_id: m.process_id(),
            origin: m.origin().map(|o| o.to_string()),
        },
        // Raw subscriptions never fail to decode; kept as a message if one ever does.
        Delivery::Undecodable(e) => Line {
            channel: e.channel(),
            payload: e.raw(),
            process_id: e.process_id(),
            origin: None,
        },
        Delivery::Lagged(n) => {
            note(&format!(
                "lagged on {channel}: {n} message(s) dropped because output was too slow \
                 (see --queue-capacity)"
            ));
            return Ok(true);
        }
        Delivery::Gap(gap) => {
            match gap.cause() {
                GapCause::Reconnect { downtime } => note(&format!(
                    "gap on {channel}: listener reconnected after {} ({}); messages may have been missed",
                    human(downtime),
                    gap.reason()
                )),
                _ => note(&format!("gap on {channel}: {}", gap.reason())),
            }
            return Ok(true);
        }
        other => {
            note(&format!("on {channel}: {other:?}"));
            return Ok(true);
        }
    };
    write_json_line(out, &line).await
}

fn report_event(event: &ConnectionEvent) {
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
            "error: cannot lead {channel}: its election lock is held by backend {holder_pid},              which does not lead it (key collision or a foreign advisory lock)"
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
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// SIGINT or SIGTERM: the request to shut down cleanly.
struct Stop {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Stop {
    #[cfg(unix)]
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind| signal(kind).map_err(|e| format!("installing signal handlers: {e}"));
        Ok(Stop {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
        })
    }

    #[cfg(not(unix))]
    fn new() -> Result<Self> {
        Ok(Stop {})
    }

    #[cfg(unix)]
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Runs `fut` unless a signal comes first (then `None`).
    async fn or<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.recv() => None,
            out = fut => Some(out),
        }
    }
}
