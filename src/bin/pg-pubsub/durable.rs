//! `pg-pubsub durable …`: durable channels from the shell, and the
//! consumer-group printer `changes tail` shares.

use clap::{Args, Subcommand};
use futures::StreamExt;
use pg_pubsub::durable::{
    Durable, DurableDelivery, DurableMessage, DurableSubscription, Position, Start,
};
use pg_pubsub::schema::SchemaName;
use pg_pubsub::Text;
use pg_pubsub::{ConnectionEvent, PgPubSub};

use crate::common::{
    check_channel, connect, note, print_json_lines, report_event, send_stdin_lines,
    write_json_line, ConnOpts, Failure, Result, Stop, Tuning,
};

#[derive(Args)]
pub(crate) struct DurableArgs {
    /// Schema holding the durable tables.
    #[arg(long, default_value = pg_pubsub::schema::DEFAULT_SCHEMA, global = true)]
    schema: String,
    #[command(subcommand)]
    command: DurableCommand,
}

#[derive(Subcommand)]
enum DurableCommand {
    /// Store a message on a durable channel, or one per line of stdin.
    Publish(PublishArgs),
    /// Print a durable channel's messages as a consumer group, one JSON
    /// object per line; each is acked once its line is written.
    Tail(TailArgs),
    /// The consumer groups of a channel with their position and lag, one
    /// JSON object per line (counting the lag reads every unacked message).
    Groups(GroupsArgs),
}

#[derive(Args)]
struct GroupsArgs {
    /// Durable channel.
    channel: String,
}

#[derive(Args)]
struct PublishArgs {
    /// Durable channel.
    channel: String,
    /// Payload text (any size).
    #[arg(required_unless_present = "stdin", conflicts_with = "stdin")]
    payload: Option<String>,
    /// Publish one message per line of standard input.
    #[arg(long)]
    stdin: bool,
}

#[derive(Args)]
struct TailArgs {
    /// Durable channel.
    channel: String,
    /// Consumer group: one process of the group prints at a time, and a
    /// restarted one continues after the last line it printed.
    #[arg(long)]
    group: String,
    /// Where a new group starts: earliest, latest, or a position (tick/xid/seq).
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    from: Start,
}

pub(crate) fn parse_start(s: &str) -> Result<Start, String> {
    match s {
        "earliest" => Ok(Start::Earliest),
        "latest" => Ok(Start::Latest),
        p => p
            .parse::<Position>()
            .map(Start::After)
            .map_err(|e| format!("expected earliest, latest or a position: {e}")),
    }
}

pub(crate) async fn run(conn: &ConnOpts, args: DurableArgs) -> Result<()> {
    // Checked before connecting so bad input is reported as such.
    SchemaName::new(&args.schema)?;
    match args.command {
        DurableCommand::Publish(p) => {
            check_channel(&p.channel)?;
            let ps = connect(conn, Tuning::default()).await?;
            let result = publish(&ps, &args.schema, p).await;
            ps.shutdown().await;
            result
        }
        DurableCommand::Groups(g) => {
            check_channel(&g.channel)?;
            let ps = connect(conn, Tuning::default()).await?;
            let result = groups(&ps, &args.schema, &g.channel).await;
            ps.shutdown().await;
            result
        }
        DurableCommand::Tail(t) => {
            check_channel(&t.channel)?;
            tail(conn, &args.schema, t).await
        }
    }
}

async fn groups(ps: &PgPubSub, schema: &str, channel: &str) -> Result<()> {
    let groups = ps.admin().with_schema(schema)?.groups(channel).await?;
    let lines: Vec<serde_json::Value> = groups
        .iter()
        .map(|g| {
            let mut v = serde_json::to_value(g).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.insert("channel".into(), channel.into());
            }
            v
        })
        .collect();
    print_json_lines(&lines).await
}

async fn publish(ps: &PgPubSub, schema: &str, args: PublishArgs) -> Result<()> {
    let durable = ps.durable().with_schema(schema)?;
    if let Some(payload) = args.payload {
        return Ok(durable.publish(&args.channel, Text(&payload)).await?);
    }
    let durable = &durable;
    let channel = args.channel.as_str();
    let sent = send_stdin_lines("messages", |chunk| async move {
        durable.publish_batch(channel, chunk.iter().map(Text)).await
    })
    .await?;
    note(&format!("published {sent} messages"));
    Ok(())
}

#[derive(serde::Serialize)]
struct Line<'a> {
    channel: &'a str,
    group: &'a str,
    payload: &'a str,
    position: String,
    published_at: String,
}

async fn tail(conn: &ConnOpts, schema: &str, args: TailArgs) -> Result<()> {
    tail_group(
        conn,
        |ps| async move { subscribe(&ps, schema, &args).await },
        "message",
        |m| {
            serde_json::to_value(Line {
                channel: m.channel().as_str(),
                group: m.group(),
                payload: m.payload(),
                position: m.position().to_string(),
                published_at: epoch_seconds(m.published_at()),
            })
        },
    )
    .await
}

async fn subscribe(
    ps: &PgPubSub,
    schema: &str,
    args: &TailArgs,
) -> Result<DurableSubscription<Text>> {
    let durable: Durable = ps.durable().with_schema(schema)?;
    let sub = durable
        .subscribe::<Text>(&args.channel, &args.group)
        .start(args.from)
        .await?;
    note(&format!(
        "tailing {} as group {} ({})",
        args.channel,
        args.group,
        if sub.is_active() {
            "active"
        } else {
            "standing by: another process of the group is active"
        }
    ));
    Ok(sub)
}

/// Connects, subscribes with `subscribe` and prints the group's messages
/// with [`print_group`] until SIGINT/SIGTERM, then shuts down.
pub(crate) async fn tail_group<T, S, Fut, F>(
    conn: &ConnOpts,
    subscribe: S,
    noun: &str,
    line: F,
) -> Result<()>
where
    T: pg_pubsub::Decode + std::fmt::Debug,
    S: FnOnce(PgPubSub) -> Fut,
    Fut: std::future::Future<Output = Result<DurableSubscription<T>>>,
    F: Fn(&DurableMessage<T>) -> serde_json::Result<serde_json::Value>,
{
    let mut stop = Stop::new()?;
    let ps = match stop.or(connect(conn, Tuning::default())).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    let mut events = ps.events();
    let result = match stop.or(subscribe(ps.clone())).await {
        Some(Ok(sub)) => print_group(&ps, sub, &mut stop, &mut events, noun, line).await,
        Some(Err(e)) => Err(e),
        None => Ok(()),
    };
    ps.shutdown().await;
    result
}

/// Prints each message of a group's subscription as the JSON `line` makes
/// of it, acking it once written; election and connection events go to
/// stderr. Ends on SIGINT/SIGTERM or when stdout closes, after the acks of
/// what was printed are written. `noun` names the items in notes.
async fn print_group<T, F>(
    ps: &PgPubSub,
    mut sub: DurableSubscription<T>,
    stop: &mut Stop,
    events: &mut pg_pubsub::EventStream,
    noun: &str,
    line: F,
) -> Result<()>
where
    T: pg_pubsub::Decode + std::fmt::Debug,
    F: Fn(&DurableMessage<T>) -> serde_json::Result<serde_json::Value>,
{
    let mut out = tokio::io::stdout();
    let election = sub.election_channel().to_owned();
    let result = loop {
        tokio::select! {
            biased;
            _ = stop.recv() => break Ok(()),
            Some(event) = events.next() => match &event {
                ConnectionEvent::LockAcquired { channel } if channel.as_str() == election => {
                    note("this process is now the group's active consumer");
                }
                ConnectionEvent::LockLost { channel, reason } if channel.as_str() == election => {
                    note(&format!("no longer the group's active consumer: {reason}"));
                }
                ConnectionEvent::Standby { channel } if channel.as_str() == election => {
                    note("standing by: another process of the group is active");
                }
                // The group's election is reported above, in its own words.
                ConnectionEvent::LockAcquired { .. }
                | ConnectionEvent::Standby { .. }
                | ConnectionEvent::LockLost { .. }
                | ConnectionEvent::LockReleased { .. } => {}
                other => report_event(other),
            },
            item = sub.next() => match item {
                Some(DurableDelivery::Message(m)) => {
                    let value = line(&m).map_err(|e| Failure(format!("printing {noun} {}: {e}", m.position())))?;
                    if !write_json_line(&mut out, &value).await? {
                        break Ok(());
                    }
                    m.ack();
                }
                Some(DurableDelivery::Undecodable { message, error }) => {
                    // Something else was published on the channel: said on
                    // stderr, and passed.
                    note(&format!("not a {noun} at {}: {error}", message.position()));
                    message.ack();
                }
                Some(DurableDelivery::Truncated { lost }) => {
                    note(&format!("{lost} {noun}(s) expired before this group read them"));
                }
                Some(other) => note(&format!("{other:?}")),
                None if ps.is_shut_down() => break Ok(()),
                None => break Err(Failure("the consumer stopped unexpectedly".to_owned())),
            },
        }
    };
    // Acks of what was printed are written before exiting.
    sub.close().await?;
    result
}

/// Seconds since the Unix epoch with microseconds, e.g. `1700000000.123456`
/// (no date crate needed; `jq` turns it into a date with `todate`).
fn epoch_seconds(t: std::time::SystemTime) -> String {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => format!("{}.{:06}", d.as_secs(), d.subsec_micros()),
        Err(_) => "0".to_owned(),
    }
}
