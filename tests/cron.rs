//! Periodic jobs against a real server: once per slot across a fleet of
//! `pg-pubsub queue work` processes (one SIGKILLed and restarted over and
//! over), catch-up policies after an outage, pause/resume/remove at run
//! time, and the `pg-pubsub cron` commands. Each test has its own schema:
//! a scheduler serves every schedule of its schema.

mod common;

use std::time::{Duration, SystemTime};

use common::fleet::Fleet;
use common::*;
use pg_pubsub::cron::{CatchUp, Rule, ScheduleBuilder, Schedules, Target};
use pg_pubsub::queue::Queue;
use pg_pubsub::{PgPubSub, Text};

/// Bound for waits that span many one-second slots.
const LONG: Duration = Duration::from_secs(90);
const SECOND: i64 = 1_000_000;

async fn setup(schema: &str) -> (PgPubSub, Queue, tokio_postgres::Client) {
    let ps = pubsub().await;
    let q = ps.queue().with_schema(schema).expect("schema");
    q.install().await.expect("install");
    (ps, q, raw_client().await)
}

/// Schedules `skip`, `once` and `all`, each with that catch-up policy and
/// firing every `every` into the queue of its name; `payload` sets the rest.
async fn schedule_each_policy(
    s: &Schedules,
    every: Duration,
    payload: impl Fn(ScheduleBuilder, &str) -> ScheduleBuilder,
) {
    for (name, policy) in [
        ("skip", CatchUp::Skip),
        ("once", CatchUp::Once),
        ("all", CatchUp::All),
    ] {
        let b = s.schedule(name).every(every).catch_up(policy).queue(name);
        payload(b, name).upsert().await.expect("upsert");
    }
}

/// Whether upserting `schedule` (to queue `q`) fails.
async fn rejected(schedule: ScheduleBuilder) -> bool {
    schedule
        .queue("q")
        .payload(Text(""))
        .upsert()
        .await
        .is_err()
}

/// The slots (`run_at`, microseconds) of the jobs of `queue`, in order.
async fn slots(db: &tokio_postgres::Client, schema: &str, queue: &str) -> Vec<i64> {
    db.query(
        &format!(
            "SELECT (extract(epoch FROM run_at) * 1000000)::int8 FROM {schema}.jobs \
             WHERE queue = $1 ORDER BY run_at"
        ),
        &[&queue],
    )
    .await
    .expect("jobs")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The server's clock, in microseconds.
async fn db_now(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT (extract(epoch FROM now()) * 1000000)::int8", &[])
        .await
        .expect("now")
        .get(0)
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as i64
}

/// How many slots `name` has fired.
async fn fired(s: &Schedules, name: &str) -> i64 {
    s.get(name).await.expect("get").expect("exists").fired
}

/// Polls until `name` has fired at least `n` slots in all.
async fn wait_fired(s: &Schedules, name: &str, n: i64) {
    tokio::time::timeout(LONG, async {
        while fired(s, name).await < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} did not fire {n} slots"));
}

/// No slot twice, none left out: consecutive one-second slots.
fn assert_contiguous(slots: &[i64]) {
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], SECOND, "slots {slots:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_fires_each_slot_once_while_workers_are_killed_and_restarted() {
    let schema = "cron_fleet";
    let (ps, q, db) = setup(schema).await;
    let s = q.schedules();
    let work = ["--schema", schema, "idle", "--", "true"];
    let mut fleet = Fleet::new();
    for _ in 0..3 {
        fleet.spawn_worker(&work).await;
    }
    // Added through the CLI, while the fleet runs.
    let mut add = fleet_cli(&[
        "cron",
        "add",
        "tick",
        "--schema",
        schema,
        "--every",
        "1s",
        "--catch-up",
        "all",
        "--queue",
        "ticks",
        "slot",
    ]);
    assert!(add.status().await.expect("cron add").success());
    wait_fired(&s, "tick", 2).await;
    // About 20 s: every ~3 slots one process is SIGKILLed (maybe inside
    // a round's transaction) and a new one started.
    let mut target = 2;
    for _ in 0..6 {
        target += 3;
        wait_fired(&s, "tick", target).await;
        let victim = fleet
            .procs
            .iter()
            .position(Option::is_some)
            .expect("one runs");
        assert!(!fleet.signal(victim, "-KILL").await.success());
        fleet.spawn_worker(&work).await;
    }
    wait_fired(&s, "tick", target + 3).await;
    assert!(s.pause("tick").await.expect("pause"));
    let info = s.get("tick").await.expect("get").expect("exists");
    let got = slots(&db, schema, "ticks").await;
    assert_eq!(got.len() as i64, info.fired, "one job per fired slot");
    assert!(got.len() >= 20, "{} slots", got.len());
    assert_contiguous(&got);
    assert_eq!(info.last_slot.map(micros), got.last().copied());
    for i in 0..fleet.procs.len() {
        if fleet.procs[i].is_some() {
            assert!(fleet.signal(i, "-TERM").await.success());
        }
    }
    ps.shutdown().await;
}

/// `pg-pubsub ARGS` against the test server.
fn fleet_cli(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pg-pubsub"));
    cmd.args(args)
        .env("DATABASE_URL", server().url())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    cmd
}

#[tokio::test]
async fn catch_up_policies_after_a_ten_second_outage() {
    let schema = "cron_catch_up";
    let (ps, q, db) = setup(schema).await;
    let s = q.schedules();
    schedule_each_policy(&s, Duration::from_secs(1), |b, name| b.payload(Text(name))).await;
    let scheduler = s.run_scheduler().await.expect("scheduler");
    for name in ["skip", "once", "all"] {
        wait_fired(&s, name, 2).await;
    }
    scheduler.shutdown().await.expect("shutdown");
    let mut before = Vec::new();
    for name in ["skip", "once", "all"] {
        let info = s.get(name).await.expect("get").expect("exists");
        before.push(info.last_slot.map(micros).expect("fired"));
    }
    // The outage: no scheduler alive for ten seconds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let restart = db_now(&db).await;
    let scheduler = s.run_scheduler().await.expect("scheduler");
    for name in ["skip", "once", "all"] {
        let n = fired(&s, name).await;
        wait_fired(&s, name, n + 3).await;
    }
    scheduler.shutdown().await.expect("shutdown");
    // Before the outage: every slot. After: by policy.
    let skip = slots(&db, schema, "skip").await;
    let (old, new): (Vec<i64>, Vec<i64>) = skip.iter().partition(|t| **t <= before[0]);
    assert_contiguous(&old);
    assert_contiguous(&new);
    assert!(new[0] > restart, "skip fired a missed slot: {new:?}");
    let once = slots(&db, schema, "once").await;
    let (old, new): (Vec<i64>, Vec<i64>) = once.iter().partition(|t| **t <= before[1]);
    assert_contiguous(&old);
    assert_contiguous(&new);
    // One job for the slots missed: the latest due when the scheduler
    // came back (at or a moment after `restart`), then each slot.
    assert!(
        new[0] >= restart - SECOND,
        "once fired an older slot: {new:?}"
    );
    assert!(
        new[0] - before[1] >= 9 * SECOND,
        "outage too short: {new:?}"
    );
    let all = slots(&db, schema, "all").await;
    assert_contiguous(&all);
    let missed = all
        .iter()
        .filter(|t| **t > before[2] && **t <= restart)
        .count();
    assert!(
        missed >= 9,
        "all: {missed} missed slots fired, expected each"
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn once_fires_the_latest_of_many_missed_slots_and_all_fires_each() {
    // An outage of ten hourly slots, made by moving the pending slot back.
    let schema = "cron_catch_up_hours";
    let (ps, q, db) = setup(schema).await;
    let s = q.schedules();
    schedule_each_policy(&s, Duration::from_secs(3600), |b, name| {
        b.payload(&serde_json::json!({ "policy": name }))
    })
    .await;
    db.execute(
        &format!("UPDATE {schema}.schedules SET next_at = next_at - interval '10 hours'"),
        &[],
    )
    .await
    .expect("back-date");
    let first_missed = micros(
        s.get("all")
            .await
            .expect("get")
            .expect("exists")
            .next_at
            .expect("next"),
    );
    let scheduler = s.run_scheduler().await.expect("scheduler");
    tokio::time::timeout(LONG, async {
        loop {
            let all = s.list().await.expect("list");
            if all
                .iter()
                .all(|i| i.next_at.is_some_and(|t| t > SystemTime::now()))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("caught up");
    scheduler.shutdown().await.expect("shutdown");
    let hour = 3600 * SECOND;
    assert!(slots(&db, schema, "skip").await.is_empty());
    let now = db_now(&db).await;
    let latest = now - now.rem_euclid(hour);
    assert_eq!(slots(&db, schema, "once").await, vec![latest]);
    let all = slots(&db, schema, "all").await;
    assert_eq!(
        all,
        (0..)
            .map(|k| first_missed + k * hour)
            .take(all.len())
            .collect::<Vec<_>>()
    );
    assert_eq!(all.last(), Some(&latest));
    assert!(all.len() >= 10, "{all:?}");
    ps.shutdown().await;
}

#[tokio::test]
async fn pause_resume_and_remove_take_effect_at_run_time() {
    let schema = "cron_control";
    let (ps, q, db) = setup(schema).await;
    let s = q.schedules();
    // `clock` always runs: "nothing happened meanwhile" means nothing in
    // three of its slots. It publishes on a durable channel.
    let clock = s
        .schedule("clock")
        .every(Duration::from_secs(1))
        .channel("clock")
        .payload(Text("tick"))
        .upsert()
        .await
        .expect("clock");
    assert_eq!(clock.target, Target::Channel("clock".into()));
    let info = s
        .schedule("job")
        .cron("* * * * * *")
        .time_zone("America/New_York")
        .queue("job")
        .payload(&serde_json::json!({"n": 1}))
        .upsert()
        .await
        .expect("job");
    assert_eq!(info.rule, Rule::Cron("* * * * * *".into()));
    assert_eq!(
        (info.catch_up, info.paused, info.fired),
        (CatchUp::Skip, false, 0)
    );
    // A worker schedules (by default).
    let worker = q
        .worker("unrelated")
        .run(|_job| async { Ok::<_, pg_pubsub::Error>(()) })
        .await
        .expect("worker");
    wait_fired(&s, "job", 2).await;
    let clock_ticks = |n: i64| {
        let s = s.clone();
        async move {
            let c = fired(&s, "clock").await;
            wait_fired(&s, "clock", c + n).await;
        }
    };
    assert!(s.pause("job").await.expect("pause"));
    let paused_at = slots(&db, schema, "job").await.len();
    clock_ticks(3).await;
    assert_eq!(
        slots(&db, schema, "job").await.len(),
        paused_at,
        "fired while paused"
    );
    assert!(s.get("job").await.expect("get").expect("exists").paused);
    assert!(s.resume("job").await.expect("resume"));
    let n = fired(&s, "job").await;
    wait_fired(&s, "job", n + 2).await;
    let resumed = slots(&db, schema, "job").await;
    // Slots that fell while paused were not caught up.
    assert!(
        resumed[paused_at] - resumed[paused_at - 1] >= 3 * SECOND,
        "{resumed:?}"
    );
    // Changing the payload keeps the pending slot; the new payload is used.
    s.schedule("job")
        .cron("* * * * * *")
        .time_zone("America/New_York")
        .queue("job")
        .payload(&serde_json::json!({"n": 2}))
        .upsert()
        .await
        .expect("change");
    let n = fired(&s, "job").await;
    wait_fired(&s, "job", n + 1).await;
    let payloads: Vec<String> = db
        .query(
            &format!("SELECT payload FROM {schema}.jobs WHERE queue = 'job' ORDER BY run_at DESC LIMIT 1"),
            &[],
        )
        .await
        .expect("payload")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(payloads, vec![r#"{"n":2}"#.to_owned()]);
    assert!(s.remove("job").await.expect("remove"));
    assert!(!s.remove("job").await.expect("remove again"));
    let removed_at = slots(&db, schema, "job").await.len();
    clock_ticks(3).await;
    assert_eq!(
        slots(&db, schema, "job").await.len(),
        removed_at,
        "fired after removal"
    );
    assert!(!s.pause("job").await.expect("pause"));
    assert!(!s.resume("job").await.expect("resume"));
    // The clock's messages are on its durable channel, one per slot.
    let clock = s.get("clock").await.expect("get").expect("exists");
    let messages: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM {schema}.messages WHERE channel = 'clock'"),
            &[],
        )
        .await
        .expect("messages")
        .get(0);
    assert_eq!(messages, clock.fired);
    worker.shutdown().await.expect("worker shutdown");
    assert!(rejected(s.schedule("x").every(Duration::ZERO)).await);
    assert!(rejected(s.schedule("x").cron("bad")).await);
    assert!(rejected(s.schedule("x").cron("* * * * *").time_zone("Nowhere/Else")).await);
    ps.shutdown().await;
}

#[tokio::test]
async fn the_cron_commands() {
    let schema = "cron_cli";
    let (ps, q, _db) = setup(schema).await;
    let run = |args: Vec<&str>| {
        let mut all = vec!["cron", "--schema", schema];
        all.extend(args);
        let mut cmd = fleet_cli(&all);
        async move { cmd.output().await.expect("run pg-pubsub") }
    };
    let out = run(vec![
        "add",
        "nightly",
        "--cron",
        "30 2 * * *",
        "--tz",
        "Europe/Berlin",
        "--catch-up",
        "once",
        "--queue",
        "reports",
        r#"{"kind":"nightly"}"#,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(vec![
        "add",
        "beat",
        "--every",
        "5m",
        "--channel",
        "beats",
        "hi",
    ])
    .await;
    assert!(out.status.success());
    let out = run(vec!["pause", "beat"]).await;
    assert!(out.status.success());
    let out = run(vec!["list"]).await;
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["name"], "beat");
    assert_eq!(lines[0]["every_seconds"], 300.0);
    assert_eq!(lines[0]["paused"], true);
    assert_eq!(lines[0]["channel"], "beats");
    assert_eq!(lines[1]["cron"], "30 2 * * *");
    assert_eq!(lines[1]["time_zone"], "Europe/Berlin");
    assert_eq!(lines[1]["catch_up"], "once");
    assert_eq!(lines[1]["queue"], "reports");
    assert_eq!(lines[1]["payload"], r#"{"kind":"nightly"}"#);
    // 02:30 in Berlin is 00:30 or 01:30 UTC.
    let next = lines[1]["next_at"].as_str().expect("next_at");
    assert!(
        next.contains("T00:30:00") || next.contains("T01:30:00"),
        "{next}"
    );
    assert!(run(vec!["resume", "beat"]).await.status.success());
    assert!(run(vec!["remove", "beat"]).await.status.success());
    assert!(!run(vec!["remove", "beat"]).await.status.success());
    let bad = run(vec!["add", "x", "--cron", "* * *", "--queue", "q", "p"]).await;
    assert!(!bad.status.success());
    let both = run(vec![
        "add",
        "x",
        "--cron",
        "* * * * *",
        "--every",
        "1s",
        "--queue",
        "q",
        "p",
    ])
    .await;
    assert!(!both.status.success());
    let names: Vec<String> = q
        .schedules()
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["nightly".to_owned()]);
    ps.shutdown().await;
}
