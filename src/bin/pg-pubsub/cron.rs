//! `pg-pubsub cron …`: periodic jobs (add, list, remove, pause, resume, and
//! a scheduler without a worker).

use std::time::SystemTime;

use clap::{Args, Subcommand};
use pg_pubsub::cron::{CatchUp, Rule, ScheduleInfo, Schedules, Target};
use pg_pubsub::Text;

use crate::common::{connect, note, print_json_lines, ConnOpts, Failure, Result, Stop, Tuning};

#[derive(Args)]
pub(crate) struct CronArgs {
    /// Schema holding the schedules table.
    #[arg(long, default_value = pg_pubsub::schema::DEFAULT_SCHEMA, global = true)]
    schema: String,
    #[command(subcommand)]
    command: CronCommand,
}

#[derive(Subcommand)]
enum CronCommand {
    /// Create or change a schedule (its pending slot is kept when the
    /// rule and zone are unchanged).
    Add(AddArgs),
    /// Every schedule, one JSON object per line.
    List,
    /// Remove a schedule.
    Remove(NameArg),
    /// Pause a schedule: it fires nothing until resumed.
    Pause(NameArg),
    /// Resume a schedule from its next slot.
    Resume(NameArg),
    /// Run a scheduler only (workers run one already) until SIGTERM/SIGINT.
    Run,
}

#[derive(Args)]
struct NameArg {
    /// Schedule name.
    name: String,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("rule").required(true).args(["cron", "every"])))]
#[command(group(clap::ArgGroup::new("target").required(true).args(["queue", "channel"])))]
struct AddArgs {
    /// Schedule name.
    name: String,
    /// Cron expression (5 fields, or 6 with seconds first), e.g. "30 2 * * *".
    #[arg(long)]
    cron: Option<String>,
    /// Fixed interval, e.g. 1s, 5m, 1h 30m (counted from the Unix epoch).
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Option<std::time::Duration>,
    /// IANA time zone of the cron expression.
    #[arg(long, default_value = "UTC")]
    tz: String,
    /// Slots missed while no scheduler ran: skip, once or all.
    #[arg(long, default_value = "skip", value_parser = parse_catch_up)]
    catch_up: CatchUp,
    /// Enqueue a job on this queue at each slot.
    #[arg(long)]
    queue: Option<String>,
    /// Publish on this durable channel at each slot.
    #[arg(long)]
    channel: Option<String>,
    /// The payload, sent as is.
    payload: String,
}

fn parse_catch_up(s: &str) -> Result<CatchUp, String> {
    s.parse().map_err(|e: pg_pubsub::Error| e.to_string())
}

pub(crate) async fn run(conn: &ConnOpts, args: CronArgs) -> Result<()> {
    pg_pubsub::schema::SchemaName::new(&args.schema)?;
    let ps = connect(conn, Tuning::default()).await?;
    let schedules = ps.queue().with_schema(&args.schema)?.schedules();
    let result = command(&schedules, args.command).await;
    ps.shutdown().await;
    result
}

async fn command(schedules: &Schedules, command: CronCommand) -> Result<()> {
    match command {
        CronCommand::Add(a) => {
            let mut b = schedules
                .schedule(&a.name)
                .time_zone(&a.tz)
                .catch_up(a.catch_up)
                .payload(Text(a.payload.as_str()));
            b = match (a.cron, a.every) {
                (Some(expr), _) => b.cron(&expr),
                (None, Some(d)) => b.every(d),
                (None, None) => return Err(Failure("--cron or --every".into())),
            };
            b = match (a.queue, a.channel) {
                (Some(q), _) => b.queue(&q),
                (None, Some(c)) => b.channel(&c),
                (None, None) => return Err(Failure("--queue or --channel".into())),
            };
            let info = b.upsert().await?;
            print_json_lines(&[json(&info)]).await
        }
        CronCommand::List => {
            let all: Vec<_> = schedules.list().await?.iter().map(json).collect();
            print_json_lines(&all).await
        }
        CronCommand::Remove(n) => found(schedules.remove(&n.name).await?, &n.name, "removed"),
        CronCommand::Pause(n) => found(schedules.pause(&n.name).await?, &n.name, "paused"),
        CronCommand::Resume(n) => found(schedules.resume(&n.name).await?, &n.name, "resumed"),
        CronCommand::Run => {
            let mut stop = Stop::new()?;
            let scheduler = schedules.run_scheduler().await?;
            note("scheduling");
            stop.recv().await;
            note("stopping");
            Ok(scheduler.shutdown().await?)
        }
    }
}

fn found(ok: bool, name: &str, what: &str) -> Result<()> {
    if ok {
        note(&format!("schedule {name} {what}"));
        Ok(())
    } else {
        Err(Failure(format!("no schedule named {name}")))
    }
}

fn time(t: Option<SystemTime>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| {
        humantime::format_rfc3339_micros(t).to_string().into()
    })
}

fn json(s: &ScheduleInfo) -> serde_json::Value {
    let (cron, every) = match &s.rule {
        Rule::Cron(e) => (Some(e.clone()), None),
        Rule::Every(d) => (None, Some(d.as_secs_f64())),
    };
    let (queue, channel) = match &s.target {
        Target::Queue(q) => (Some(q.clone()), None),
        Target::Channel(c) => (None, Some(c.clone())),
    };
    serde_json::json!({
        "name": s.name,
        "cron": cron,
        "every_seconds": every,
        "time_zone": s.time_zone,
        "catch_up": s.catch_up.as_str(),
        "queue": queue,
        "channel": channel,
        "payload": s.payload,
        "paused": s.paused,
        "next_at": time(s.next_at),
        "last_slot": time(s.last_slot),
        "last_fired_at": time(s.last_fired_at),
        "fired": s.fired,
        "last_error": s.last_error,
        "created_at": time(Some(s.created_at)),
        "updated_at": time(Some(s.updated_at)),
    })
}
