//! `pg-pubsub relay …`: a durable channel or a WAL feed relayed to a
//! broker (`nats://`, `redis://`, `amqp://`) until SIGINT/SIGTERM.

use std::time::Duration;

use clap::{Args, Subcommand};
use pg_pubsub::relay::{connect_sink, Relay, RelayBuilder, Sink, Source};
use pg_pubsub::PgPubSub;

use crate::common::{check_channel, connect, note, ConnOpts, Failure, Result, Stop, Tuning};

#[derive(Args)]
pub(crate) struct RelayArgs {
    #[command(subcommand)]
    command: RelayCommand,
}

#[derive(Subcommand)]
enum RelayCommand {
    /// Relay a durable channel as a consumer group: one process of the
    /// group relays at a time, a restarted one continues after the last
    /// message the broker confirmed.
    Durable(DurableArgs),
    /// Relay table changes and logical messages from a replication slot:
    /// one process streams the slot at a time, the others stand by.
    Wal(WalArgs),
}

#[derive(Args)]
struct Target {
    /// The broker: nats://HOST:PORT (JetStream: a stream must take the
    /// subjects), redis://HOST:PORT/DB (Redis Streams), amqp://USER:PASS@HOST:PORT/VHOST.
    #[arg(long)]
    to: String,
    /// Subject (NATS), stream key (Redis) or routing key (AMQP) template:
    /// {channel}, {schema}, {table}, {op}, {prefix}, {key}. Default
    /// {channel} (durable) or {schema}.{table}.{op} (WAL).
    #[arg(long)]
    subject: Option<String>,
    /// Template for the logical messages of a WAL source: {prefix}, {key}.
    /// Default {prefix}.
    #[arg(long)]
    message_subject: Option<String>,
    /// The payload field {key} stands for (dotted for nested objects).
    #[arg(long)]
    key_field: Option<String>,
    /// Durable channel poison messages go to.
    #[arg(long, default_value = pg_pubsub::relay::DEFAULT_DEAD_LETTER)]
    dead_letter: String,
    /// AMQP exchange to publish on (default: the default exchange, where
    /// the routing key is a queue's name).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Messages published (awaiting their confirm) at once.
    #[arg(long, default_value_t = 512)]
    batch_size: usize,
}

#[derive(Args)]
struct DurableArgs {
    /// Durable channel.
    channel: String,
    /// Consumer group holding the relay's position.
    #[arg(long)]
    group: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct WalArgs {
    /// Logical replication slot (created if missing).
    #[arg(long)]
    slot: String,
    /// Publication (created if missing). Default: the slot's name.
    #[arg(long)]
    publication: Option<String>,
    /// Table of a new publication (repeatable). None: all tables, or only
    /// messages when --messages is given.
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Relay logical messages whose prefix starts with this.
    #[arg(long)]
    messages: Option<String>,
    #[command(flatten)]
    target: Target,
}

pub(crate) async fn run(conn: &ConnOpts, args: RelayArgs) -> Result<()> {
    // The library's warnings (a lost stream, a retried publish) on stderr.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let mut stop = Stop::new()?;
    let (target, what) = match &args.command {
        RelayCommand::Durable(d) => {
            check_channel(&d.channel)?;
            (
                &d.target,
                format!("durable channel {} as group {}", d.channel, d.group),
            )
        }
        RelayCommand::Wal(w) => (&w.target, format!("slot {}", w.slot)),
    };
    check_channel(&target.dead_letter)?;
    // A WAL relay standing by tries the slot at this backoff's pace: a
    // take-over within 2 s of the active relay's death.
    let tuning = Tuning {
        backoff: Some(pg_pubsub::Backoff {
            max: Duration::from_secs(2),
            ..pg_pubsub::Backoff::default()
        }),
        ..Tuning::default()
    };
    let ps = match stop.or(connect(conn, tuning)).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    let result = relay(&ps, &args.command, target, &what, &mut stop).await;
    ps.shutdown().await;
    result
}

async fn relay(
    ps: &PgPubSub,
    command: &RelayCommand,
    target: &Target,
    what: &str,
    stop: &mut Stop,
) -> Result<()> {
    let sink = match stop.or(sink(target)).await {
        Some(sink) => sink?,
        None => return Ok(()),
    };
    let describe = sink.describe();
    let source = match command {
        RelayCommand::Durable(d) => Source::durable(&d.channel, &d.group),
        RelayCommand::Wal(w) => {
            let mut feed = ps.wal_feed(&w.slot);
            if let Some(p) = &w.publication {
                feed = feed.publication(p);
            }
            let tables: Vec<&str> = w.tables.iter().map(String::as_str).collect();
            if !tables.is_empty() || w.messages.is_some() {
                feed = feed.tables(&tables);
            }
            if let Some(prefix) = &w.messages {
                feed = feed.messages(prefix);
            }
            note(&format!(
                "waiting for slot {} (another relay may stream it)",
                w.slot
            ));
            Source::wal(feed)
        }
    };
    let builder = options(ps.relay(source, sink), target);
    let relay = match stop.or(std::future::IntoFuture::into_future(builder)).await {
        Some(relay) => relay?,
        None => return Ok(()),
    };
    let stats = relay.stats();
    note(&format!(
        "relaying {what} to {describe} ({})",
        if stats.active {
            "active"
        } else {
            "standing by: another relay is active"
        }
    ));
    let result = watch(&relay, stop, stats.active).await;
    let stats = relay.stats();
    let closed = relay.close().await.map_err(Failure::from);
    note(&format!(
        "stopped: relayed {} message(s) ({} the broker already had), dead-lettered {}, \
         retried {} publish(es)",
        stats.relayed, stats.duplicates, stats.dead_lettered, stats.retries
    ));
    result.and(closed)
}

async fn sink(target: &Target) -> Result<Box<dyn Sink>> {
    #[cfg(feature = "relay-amqp")]
    if target.to.starts_with("amqp") {
        let sink = pg_pubsub::relay::AmqpSink::connect(&target.to, &target.exchange).await?;
        return Ok(Box::new(sink));
    }
    Ok(connect_sink(&target.to).await?)
}

fn options(mut builder: RelayBuilder, target: &Target) -> RelayBuilder {
    if let Some(t) = &target.subject {
        builder = builder.subject(t);
    }
    if let Some(t) = &target.message_subject {
        builder = builder.message_subject(t);
    }
    if let Some(f) = &target.key_field {
        builder = builder.key_field(f);
    }
    builder
        .dead_letter(&target.dead_letter)
        .batch_size(target.batch_size)
}

/// Reports changes of role (from `active`, the role last reported) and of
/// the broker's health on stderr until a signal, or the relay ends.
async fn watch(relay: &Relay, stop: &mut Stop, mut active: bool) -> Result<()> {
    let mut error: Option<String> = None;
    let mut dead = 0;
    loop {
        if stop
            .or(tokio::time::sleep(Duration::from_millis(100)))
            .await
            .is_none()
        {
            return Ok(());
        }
        if relay.is_finished() {
            return Err(Failure("the relay stopped unexpectedly".to_owned()));
        }
        let stats = relay.stats();
        if stats.active != active {
            active = stats.active;
            note(if active {
                "this relay is now active"
            } else {
                "standing by: another relay is active"
            });
        }
        if stats.last_error != error {
            if let Some(e) = &stats.last_error {
                note(&format!("the broker did not confirm, retrying: {e}"));
            }
            error = stats.last_error.clone();
        }
        if stats.dead_lettered != dead {
            note(&format!(
                "{} message(s) moved to the dead-letter channel",
                stats.dead_lettered - dead
            ));
            dead = stats.dead_lettered;
        }
    }
}
