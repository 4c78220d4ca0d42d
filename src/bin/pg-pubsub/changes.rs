//! `pg-pubsub changes …`: trigger change feeds from the shell.

use clap::{Args, Subcommand};
use pg_pubsub::changes::{ChangeEvent, Changes, FeedOptions, Op, TriggerLevel};
use pg_pubsub::durable::{DurableSubscription, Start};
use pg_pubsub::PgPubSub;

use crate::common::{connect, note, print_json_lines, ConnOpts, Result, Tuning};
use crate::durable::{parse_start, tail_group};

#[derive(Args)]
pub(crate) struct ChangesArgs {
    /// Schema holding the change-feed functions and durable tables.
    #[arg(long, default_value = pg_pubsub::schema::DEFAULT_SCHEMA, global = true)]
    schema: String,
    #[command(subcommand)]
    command: ChangesCommand,
}

#[derive(Subcommand)]
enum ChangesCommand {
    /// Install (or re-install with new options) the trigger feed of a table.
    Install(InstallArgs),
    /// Remove the trigger feed of a table (its durable channel stays).
    Uninstall(UninstallArgs),
    /// Print a table's changes as a consumer group, one JSON object per
    /// line (op, schema, table, old, new, xid, changed_at, position); each
    /// is acked once its line is written.
    Tail(TailArgs),
    /// Drop a replication slot left by `tail --wal` (it holds WAL on the
    /// server until dropped). Fails while a feed streams from it. The
    /// publication named like it stays (it holds no WAL).
    DropSlot(DropSlotArgs),
    /// The cluster's replication slots (name, plugin, active, WAL held in
    /// bytes), one JSON object per line.
    Slots,
    /// The trigger feeds installed in the schema, one JSON object per line.
    Feeds,
    /// Request a backfill of a table (or of its rows matching `--where`)
    /// into the WAL feed of a slot: the feed, here or in another process,
    /// reads the rows and delivers them as `op: read` lines merged with
    /// its changes. Prints the request's id.
    Backfill(BackfillArgs),
}

#[derive(Args)]
struct BackfillArgs {
    /// The table.
    #[arg(long)]
    table: String,
    /// The WAL feed's replication slot.
    #[arg(long)]
    slot: String,
    /// Only the rows matching this SQL condition (run as written).
    #[arg(long = "where")]
    filter: Option<String>,
}

#[derive(Args)]
struct DropSlotArgs {
    /// The replication slot.
    slot: String,
}

#[derive(Args)]
struct InstallArgs {
    /// The table: `orders`, `shop.orders`, `'"Weird Schema"."Order Items"'`.
    #[arg(long)]
    table: String,
    /// Send events over plain NOTIFY (ephemeral) instead of a durable channel.
    #[arg(long)]
    notify: bool,
    /// Channel name instead of `changes.<schema>.<table>`.
    #[arg(long)]
    channel: Option<String>,
    /// Only these columns (comma-separated).
    #[arg(long, value_delimiter = ',')]
    columns: Option<Vec<String>>,
    /// Leave these columns out (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude: Option<Vec<String>>,
    /// Only these operations (comma-separated: insert,update,delete,truncate).
    #[arg(long, value_delimiter = ',', value_parser = parse_op)]
    ops: Option<Vec<Op>>,
    /// Trigger level: statement (transition tables) or row.
    #[arg(long, default_value = "statement", value_parser = parse_level)]
    level: TriggerLevel,
    /// Print the SQL instead of running it.
    #[arg(long)]
    print: bool,
}

#[derive(Args)]
struct UninstallArgs {
    /// The table.
    #[arg(long)]
    table: String,
    /// Print the SQL instead of running it.
    #[arg(long)]
    print: bool,
}

/// `changes tail`'s arguments; `--wal --slot S` is served by the WAL feed.
#[derive(Args)]
pub(crate) struct TailArgs {
    /// The table whose changes to print.
    #[arg(long)]
    pub(crate) table: String,
    /// Read the trigger feed's durable channel as this consumer group.
    #[arg(long, required_unless_present = "wal", conflicts_with = "wal")]
    pub(crate) durable: Option<String>,
    /// Read the WAL through a logical replication slot (feature `wal`).
    #[arg(long, requires = "slot")]
    pub(crate) wal: bool,
    /// The replication slot for `--wal`. It is kept on exit (so a later run
    /// continues where this one stopped) and holds WAL until dropped.
    #[arg(long, requires = "wal")]
    pub(crate) slot: Option<String>,
    /// With `--wal`: drop the slot on a clean exit (SIGINT/SIGTERM, stdout
    /// closed), so it holds no WAL; a later run starts from its own start.
    #[arg(long, requires = "wal")]
    pub(crate) drop_slot_on_exit: bool,
    /// With `--wal`: start with every existing row of the table (`op:
    /// read` lines, merged with the changes), once per slot; a run killed
    /// during it resumes it.
    #[arg(long, requires = "wal")]
    pub(crate) snapshot: bool,
    /// Rows per chunk of a snapshot or backfill.
    #[arg(long, requires = "wal", default_value_t = 4096)]
    pub(crate) chunk_rows: usize,
    /// Where a new group starts: earliest, latest, or a position (tick/xid/seq).
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    pub(crate) from: Start,
}

fn parse_op(s: &str) -> Result<Op, String> {
    s.parse().map_err(|e: pg_pubsub::Error| e.to_string())
}

fn parse_level(s: &str) -> Result<TriggerLevel, String> {
    s.parse().map_err(|e: pg_pubsub::Error| e.to_string())
}

pub(crate) async fn run(conn: &ConnOpts, args: ChangesArgs) -> Result<()> {
    pg_pubsub::schema::SchemaName::new(&args.schema)?;
    match args.command {
        ChangesCommand::Install(a) => {
            let ps = connect(conn, Tuning::default()).await?;
            let result = install(&ps.changes().with_schema(&args.schema)?, a).await;
            ps.shutdown().await;
            result
        }
        ChangesCommand::Uninstall(a) => {
            let ps = connect(conn, Tuning::default()).await?;
            let result = uninstall(&ps.changes().with_schema(&args.schema)?, a).await;
            ps.shutdown().await;
            result
        }
        ChangesCommand::Tail(t) if t.wal => wal_tail(conn, &args.schema, t).await,
        ChangesCommand::Tail(t) => tail(conn, &args.schema, t).await,
        ChangesCommand::Slots => {
            let ps = connect(conn, Tuning::default()).await?;
            let result = list(&ps, &args.schema, true).await;
            ps.shutdown().await;
            result
        }
        ChangesCommand::Feeds => {
            let ps = connect(conn, Tuning::default()).await?;
            let result = list(&ps, &args.schema, false).await;
            ps.shutdown().await;
            result
        }
        ChangesCommand::Backfill(a) => {
            let ps = connect(conn, Tuning::default()).await?;
            let result = backfill(&ps, &args.schema, a).await;
            ps.shutdown().await;
            result
        }
        ChangesCommand::DropSlot(a) => {
            let ps = connect(conn, Tuning::default()).await?;
            let result = crate::wal::drop_slot(&ps, &a.slot).await;
            ps.shutdown().await;
            result
        }
    }
}

/// `changes slots` (`slots`) or `changes feeds`.
async fn list(ps: &pg_pubsub::PgPubSub, schema: &str, slots: bool) -> Result<()> {
    let admin = ps.admin().with_schema(schema)?;
    if slots {
        print_json_lines(&admin.wal_slots().await?).await
    } else {
        print_json_lines(&admin.change_feeds().await?).await
    }
}

/// `changes tail --wal --slot S`: the WAL feed of the table.
async fn wal_tail(conn: &ConnOpts, _schema: &str, args: TailArgs) -> Result<()> {
    let slot = args.slot.unwrap_or_default(); // clap: --wal requires --slot
    let on_exit = match args.drop_slot_on_exit {
        true => crate::wal::OnExit::DropSlot,
        false => crate::wal::OnExit::KeepSlot,
    };
    let snapshot = crate::wal::Snapshot {
        initial: args.snapshot,
        chunk_rows: args.chunk_rows,
    };
    crate::wal::tail(conn, &[args.table], &slot, on_exit, snapshot).await
}

/// `changes backfill --table T --slot S [--where SQL]`.
async fn backfill(ps: &PgPubSub, schema: &str, a: BackfillArgs) -> Result<()> {
    let mut request = ps
        .wal_backfill(&a.slot, &a.table)
        .schema(pg_pubsub::schema::SchemaName::new(schema)?);
    if let Some(filter) = &a.filter {
        request = request.filter(filter);
    }
    let id = request.await?;
    println!("{id}");
    note(&format!(
        "backfill {id} of {} requested for the WAL feed of slot {}",
        a.table, a.slot
    ));
    Ok(())
}

async fn install(changes: &Changes, a: InstallArgs) -> Result<()> {
    let mut options = FeedOptions::new().notify(a.notify).level(a.level);
    if let Some(channel) = a.channel {
        options = options.channel(channel);
    }
    if let Some(columns) = a.columns {
        options = options.columns(columns);
    }
    if let Some(exclude) = a.exclude {
        options = options.exclude(exclude);
    }
    if let Some(ops) = a.ops {
        options = options.ops(ops);
    }
    if a.print {
        print!(
            "{}",
            changes.install_change_feed_sql(&a.table, &options).await?
        );
        return Ok(());
    }
    let feed = changes.install_change_feed(&a.table, &options).await?;
    note(&format!(
        "change feed on {} -> {} {} ({}-level triggers)",
        feed.table,
        if feed.notify {
            "NOTIFY"
        } else {
            "durable channel"
        },
        feed.channel,
        feed.level
    ));
    Ok(())
}

async fn uninstall(changes: &Changes, a: UninstallArgs) -> Result<()> {
    if a.print {
        print!("{}", changes.uninstall_change_feed_sql(&a.table).await?);
        return Ok(());
    }
    changes.uninstall_change_feed(&a.table).await?;
    note(&format!("removed the change feed on {}", a.table));
    Ok(())
}

type Sub = DurableSubscription<ChangeEvent<serde_json::Value>>;

async fn tail(conn: &ConnOpts, schema: &str, args: TailArgs) -> Result<()> {
    tail_group(
        conn,
        |ps| async move { subscribe(&ps, schema, &args).await },
        "change",
        |m| {
            serde_json::to_value(Line {
                change: m.payload(),
                position: m.position().to_string(),
            })
        },
    )
    .await
}

async fn subscribe(ps: &PgPubSub, schema: &str, args: &TailArgs) -> Result<Sub> {
    let group = args.durable.as_deref().unwrap_or_default();
    let sub = ps
        .changes()
        .with_schema(schema)?
        .subscribe_from(&args.table, group, args.from)
        .await?;
    note(&format!(
        "tailing changes of {} (channel {}) as group {group} ({})",
        args.table,
        sub.channel(),
        if sub.is_active() {
            "active"
        } else {
            "standing by: another process of the group is active"
        }
    ));
    Ok(sub)
}

#[derive(serde::Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    change: &'a ChangeEvent<serde_json::Value>,
    position: String,
}
