//! `pg-pubsub`: listen to and publish on PostgreSQL channels from the shell.
//!
//! `listen` prints one JSON object per notification on stdout, so the output
//! can be piped into `jq` or a script; everything else (gaps, reconnects,
//! errors) goes to stderr as single lines starting with `pg-pubsub:`.
//!
//! This file only parses the command line and dispatches; `common.rs` holds
//! what every subcommand shares, and each subcommand has its own file.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod changes;
mod common;
mod cron;
mod dev;
mod durable;
mod listen;
mod migrate;
mod notify;
mod queue;
mod relay;
mod serve;
mod wal;

use common::{note, ConnOpts};

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

#[derive(Subcommand)]
enum Command {
    /// Print every notification on the channels as one JSON object per line.
    Listen(listen::ListenArgs),
    /// Send a notification, or one per line of stdin.
    Notify(notify::NotifyArgs),
    /// Durable channels: stored messages, consumer groups.
    Durable(durable::DurableArgs),
    /// Start a throwaway PostgreSQL and print its URL (until Ctrl-C).
    Dev(dev::DevArgs),
    /// The schema's migrations: status, apply pending ones, print the script.
    Migrate(migrate::MigrateArgs),
    /// Work queue: enqueue jobs, run a worker command, stats, dead jobs.
    Queue(queue::QueueArgs),
    /// Change feeds: install triggers on a table, print its changes.
    Changes(changes::ChangesArgs),
    /// Periodic jobs: schedules that enqueue a job or publish a message.
    Cron(cron::CronArgs),
    /// Serve the dashboard and admin API over HTTP (localhost by default;
    /// read-only unless given an admin token).
    Serve(serve::ServeArgs),
    /// Relay a durable channel or a WAL feed to NATS JetStream, Redis
    /// Streams or RabbitMQ, acking the source once the broker confirmed.
    Relay(relay::RelayArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit here with clap's own message and code 2.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Listen(args) => listen::run(&cli.conn, args).await,
        Command::Notify(args) => notify::run(&cli.conn, args).await,
        Command::Durable(args) => durable::run(&cli.conn, args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Migrate(args) => migrate::run(&cli.conn, args).await,
        Command::Queue(args) => queue::run(&cli.conn, args).await,
        Command::Changes(args) => changes::run(&cli.conn, args).await,
        Command::Cron(args) => cron::run(&cli.conn, args).await,
        Command::Serve(args) => serve::run(&cli.conn, args).await,
        Command::Relay(args) => relay::run(&cli.conn, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}
