//! Periodic jobs: schedules kept in the database that enqueue a job or
//! publish a durable-channel message at each slot of a cron expression or
//! a fixed interval, in a time zone, once per slot across the fleet.
//!
//! ```no_run
//! # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
//! use pg_pubsub::cron::CatchUp;
//! let schedules = pubsub.queue().schedules();
//! schedules
//!     .schedule("nightly-report")
//!     .cron("30 2 * * *")
//!     .time_zone("Europe/Berlin")
//!     .catch_up(CatchUp::Once)
//!     .queue("reports")
//!     .payload(&serde_json::json!({"kind": "nightly"}))
//!     .upsert()
//!     .await?;
//! schedules.pause("nightly-report").await?;
//! schedules.resume("nightly-report").await?;
//! for s in schedules.list().await? {
//!     println!("{} next at {:?}", s.name, s.next_at);
//! }
//! schedules.remove("nightly-report").await?;
//! # Ok(()) }
//! ```
//!
//! ## Who fires
//!
//! Every [`Worker`](crate::queue::Worker) runs a scheduler unless told not
//! to ([`WorkerBuilder::schedules`](crate::queue::WorkerBuilder::schedules)),
//! one per handle and schema however many workers it has, so a fleet of
//! workers alone keeps schedules firing;
//! [`Schedules::run_scheduler`] runs one without a worker. A scheduler
//! sleeps until the earliest due slot (at most a second), then, in one
//! transaction: takes a transaction advisory lock (schedulers take turns;
//! one that finds it taken waits for the next round), locks the due rows
//! (`FOR UPDATE SKIP LOCKED`), enqueues or publishes, and moves each row's
//! `next_at` past now. The enqueue and the row update commit together, so
//! a slot fires exactly once however many schedulers run, crash or restart
//! mid-transaction; a slot that falls due while none runs fires late.
//! Times are the server's (`now()`), not the processes' clocks.
//!
//! ## Slots
//!
//! Cron expressions have 5 fields (or 6, seconds first), read by `croner`
//! in the schedule's time zone (IANA names from a tz database bundled in
//! the binary; default `UTC`). Across DST changes: a fixed time in the
//! spring-forward gap (02:30 in Berlin) fires once, at the first valid
//! time after the gap (03:00); a fixed time in the fall-back overlap fires
//! once, at its first occurrence; wildcard fields fire for each real time
//! that matches. Intervals ([`ScheduleBuilder::every`]) count from the Unix
//! epoch (`every(1 h)` fires on the hour, UTC), so all processes agree.
//!
//! A queued job's `run_at` is its slot. Jobs carry no unique key: the row
//! update is what makes firing once-only.
//!
//! ## Catch-up
//!
//! A slot is *missed* when the next slot also fell due before a scheduler
//! ran (no scheduler was alive for longer than a period). [`CatchUp`]
//! says what to fire then: nothing ([`CatchUp::Skip`], the default), one
//! job for the latest missed slot ([`CatchUp::Once`]) or one per slot, at
//! most 1,000 ([`CatchUp::All`]). A single late slot fires under every
//! policy. Slots that fell while a schedule was paused never fire.
//!
//! ## The table
//!
//! `schedules(name, kind, expr, every_us, time_zone, catch_up,
//! target_kind, target, payload, paused, next_at, last_slot,
//! last_fired_at, fired, last_error, created_at, updated_at)` in the
//! crate's schema. A row this build cannot read (say, a time zone it does
//! not know) gets `next_at = NULL` and a `last_error` until upserted again.

mod scheduler;
mod slot;
mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;

pub(crate) use scheduler::shared as shared_scheduler;
pub use scheduler::Scheduler;

use crate::error::{Error, Origin, Result};
use crate::queue::Queue;
use crate::Encode;
use slot::{Policy, Spec};
use store::Sql;

/// The longest schedule name accepted, in bytes.
const MAX_NAME_BYTES: usize = 200;

/// What a scheduler fires for slots missed while no scheduler ran.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Nothing: the schedule goes on with its next slot. The default.
    #[default]
    Skip,
    /// One job (or message) for the latest missed slot.
    Once,
    /// One per missed slot, the latest 1,000 at most.
    All,
}

impl CatchUp {
    /// `skip`, `once` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Skip => "skip",
            CatchUp::Once => "once",
            CatchUp::All => "all",
        }
    }

    fn policy(self) -> Policy {
        match self {
            CatchUp::Skip => Policy::Skip,
            CatchUp::Once => Policy::Once,
            CatchUp::All => Policy::All,
        }
    }
}

impl std::str::FromStr for CatchUp {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(CatchUp::Skip),
            "once" => Ok(CatchUp::Once),
            "all" => Ok(CatchUp::All),
            _ => Err(Error::new(
                Origin::Config,
                format!("catch-up must be skip, once or all, not {s:?}"),
            )),
        }
    }
}

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// A cron expression (5 fields, or 6 with seconds first).
    Cron(String),
    /// A fixed interval, counted from the Unix epoch (whole microseconds).
    Every(Duration),
}

/// What a schedule sends at each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A job on this queue (its `run_at` is the slot).
    Queue(String),
    /// A message on this durable channel.
    Channel(String),
}

/// A schedule as stored, from [`Schedules::list`], [`Schedules::get`] or
/// [`ScheduleBuilder::upsert`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ScheduleInfo {
    /// Its name.
    pub name: String,
    /// When it fires.
    pub rule: Rule,
    /// The IANA time zone the rule is read in.
    pub time_zone: String,
    /// What to fire for missed slots.
    pub catch_up: CatchUp,
    /// Where it sends.
    pub target: Target,
    /// The payload text sent at each slot.
    pub payload: String,
    /// Paused: fires nothing until resumed.
    pub paused: bool,
    /// The earliest slot not fired yet (None: never again, or unreadable
    /// by the scheduler: see `last_error`).
    pub next_at: Option<SystemTime>,
    /// The last slot fired.
    pub last_slot: Option<SystemTime>,
    /// When a slot last fired (the server's time).
    pub last_fired_at: Option<SystemTime>,
    /// Slots fired in all.
    pub fired: i64,
    /// Why a scheduler could not compute its slots, if it could not.
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it was last upserted, paused or resumed.
    pub updated_at: SystemTime,
}

/// The schedules of one schema, from [`Queue::schedules`]. Cheap to clone.
#[derive(Clone)]
pub struct Schedules {
    queue: Queue,
    sql: Arc<Sql>,
}

impl std::fmt::Debug for Schedules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedules")
            .field("schema", self.queue.schema())
            .finish()
    }
}

impl Queue {
    /// The periodic jobs (schedules) of this schema.
    pub fn schedules(&self) -> Schedules {
        Schedules {
            queue: self.clone(),
            sql: Arc::new(Sql::new(self.schema().as_str())),
        }
    }

    /// A schedule to create or change: `queue.schedules().schedule(name)`.
    pub fn schedule(&self, name: &str) -> ScheduleBuilder {
        self.schedules().schedule(name)
    }
}

/// A schedule to create or change, from [`Schedules::schedule`]: set a
/// rule ([`cron`](Self::cron) or [`every`](Self::every)), a target
/// ([`queue`](Self::queue) or [`channel`](Self::channel)) and a
/// [`payload`](Self::payload), then [`upsert`](Self::upsert).
#[must_use = "a schedule builder does nothing until .upsert() is awaited"]
#[derive(Debug, Clone)]
pub struct ScheduleBuilder {
    schedules: Schedules,
    name: String,
    rule: Option<Rule>,
    time_zone: String,
    catch_up: CatchUp,
    target: Option<Target>,
    payload: Option<std::result::Result<String, Error>>,
}

impl ScheduleBuilder {
    /// Fires at each match of a cron expression (5 fields, or 6 with
    /// seconds first), read in the [`time_zone`](Self::time_zone).
    pub fn cron(mut self, expr: &str) -> Self {
        self.rule = Some(Rule::Cron(expr.to_owned()));
        self
    }

    /// Fires every `interval` (whole microseconds, at least one), at the
    /// multiples of it since the Unix epoch.
    pub fn every(mut self, interval: Duration) -> Self {
        self.rule = Some(Rule::Every(interval));
        self
    }

    /// The IANA time zone the cron expression is read in (default `UTC`).
    pub fn time_zone(mut self, zone: &str) -> Self {
        zone.clone_into(&mut self.time_zone);
        self
    }

    /// What to fire for slots missed while no scheduler ran (default
    /// [`CatchUp::Skip`]).
    pub fn catch_up(mut self, policy: CatchUp) -> Self {
        self.catch_up = policy;
        self
    }

    /// Enqueue a job on `queue` at each slot.
    pub fn queue(mut self, queue: &str) -> Self {
        self.target = Some(Target::Queue(queue.to_owned()));
        self
    }

    /// Publish on the durable channel `channel` at each slot.
    pub fn channel(mut self, channel: &str) -> Self {
        self.target = Some(Target::Channel(channel.to_owned()));
        self
    }

    /// The payload sent at each slot: `&value` (JSON) or [`Text`](crate::Text).
    pub fn payload<P: Encode>(mut self, payload: P) -> Self {
        self.payload = Some(payload.encode().map(|p| p.into_owned()));
        self
    }

    /// Creates the schedule, or changes it (keeping its paused state, and
    /// its pending slot when the rule and time zone are unchanged).
    pub async fn upsert(self) -> Result<ScheduleInfo> {
        check_name(&self.name)?;
        let Some(rule) = self.rule else {
            return Err(config("a schedule needs .cron(expr) or .every(interval)"));
        };
        let Some(target) = self.target else {
            return Err(config("a schedule needs .queue(name) or .channel(name)"));
        };
        let Some(payload) = self.payload else {
            return Err(config("a schedule needs a .payload(..)"));
        };
        let payload = payload?;
        let (kind, expr, every_us, spec) = match &rule {
            Rule::Cron(e) => (
                "cron",
                Some(e.as_str()),
                None,
                Spec::cron(e, &self.time_zone)?,
            ),
            Rule::Every(d) => {
                let us = slot::every_micros(*d)?;
                ("every", None, Some(us), Spec::every(us, &self.time_zone)?)
            }
        };
        let (target_kind, target) = match &target {
            Target::Queue(q) => {
                crate::queue::check_queue(q)?;
                ("queue", q.as_str())
            }
            Target::Channel(c) => {
                crate::ChannelName::new(c)?;
                ("channel", c.as_str())
            }
        };
        let sql = self.schedules.sql.clone();
        let (name, tz, catch_up) = (&self.name, &self.time_zone, self.catch_up.as_str());
        let row = self
            .schedules
            .queue
            .with_client("schedule upsert", |client| async move {
                let now: SystemTime = client.query_one_p(&sql.now, &[]).await?.get(0);
                let next = next_after(&spec, now);
                client
                    .query_one_p(
                        &sql.upsert,
                        &[
                            (name, Type::TEXT),
                            (&kind, Type::TEXT),
                            (&expr, Type::TEXT),
                            (&every_us, Type::INT8),
                            (tz, Type::TEXT),
                            (&catch_up, Type::TEXT),
                            (&target_kind, Type::TEXT),
                            (&target, Type::TEXT),
                            (&payload, Type::TEXT),
                            (&next, Type::TIMESTAMPTZ),
                        ],
                    )
                    .await
            })
            .await?;
        from_row(&row)
    }
}

impl Schedules {
    /// A schedule to create or change (see [`ScheduleBuilder`]).
    pub fn schedule(&self, name: &str) -> ScheduleBuilder {
        ScheduleBuilder {
            schedules: self.clone(),
            name: name.to_owned(),
            rule: None,
            time_zone: "UTC".to_owned(),
            catch_up: CatchUp::Skip,
            target: None,
            payload: None,
        }
    }

    /// Every schedule, by name.
    pub async fn list(&self) -> Result<Vec<ScheduleInfo>> {
        let sql = self.sql.clone();
        let rows = self
            .queue
            .with_client("schedule list", |client| async move {
                client.query_p(&sql.list, &[]).await
            })
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// One schedule, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<ScheduleInfo>> {
        let sql = self.sql.clone();
        let row = self
            .queue
            .with_client("schedule get", |client| async move {
                client.query_opt_p(&sql.get, &[(&name, Type::TEXT)]).await
            })
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Removes a schedule; false if there was none. A slot being fired
    /// right now still fires (the removal waits for it).
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let sql = self.sql.clone();
        let n = self
            .queue
            .with_client("schedule remove", |client| async move {
                client.execute_p(&sql.remove, &[(&name, Type::TEXT)]).await
            })
            .await?;
        Ok(n > 0)
    }

    /// Pauses a schedule: it fires nothing until resumed. False if there
    /// is no such schedule.
    pub async fn pause(&self, name: &str) -> Result<bool> {
        let sql = self.sql.clone();
        let n = self
            .queue
            .with_client("schedule pause", |client| async move {
                client.execute_p(&sql.pause, &[(&name, Type::TEXT)]).await
            })
            .await?;
        Ok(n > 0)
    }

    /// Resumes a schedule from its next slot after now (slots that fell
    /// while it was paused do not fire). False if there is no such schedule.
    pub async fn resume(&self, name: &str) -> Result<bool> {
        let sql = self.sql.clone();
        let found = self
            .queue
            .with_client("schedule resume", |mut client| async move {
                let tx = client.transaction_p().await?;
                let Some(row) = tx
                    .query_opt_p(&sql.lock_one, &[(&name, Type::TEXT)])
                    .await?
                else {
                    return Ok(None);
                };
                let now: SystemTime = tx.query_one_p(&sql.now, &[]).await?.get(0);
                let next = match spec_of(&row) {
                    Ok(spec) => next_after(&spec, now),
                    Err(e) => return Ok(Some(Err(e))),
                };
                tx.execute_p(
                    &sql.resume,
                    &[(&name, Type::TEXT), (&next, Type::TIMESTAMPTZ)],
                )
                .await?;
                tx.commit().await?;
                Ok(Some(Ok(())))
            })
            .await?;
        match found {
            None => Ok(false),
            Some(r) => r.map(|()| true),
        }
    }

    /// Runs a scheduler without a worker (workers run one by default),
    /// until [`Scheduler::shutdown`], its drop, or the handle's shutdown.
    pub async fn run_scheduler(&self) -> Result<Scheduler> {
        self.queue.install().await?;
        scheduler::start(self.queue.clone(), self.sql.clone())
    }
}

fn config(msg: &str) -> Error {
    Error::new(Origin::Config, msg)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('\0') || name.len() > MAX_NAME_BYTES {
        return Err(Error::new(
            Origin::InvalidName,
            format!("schedule name must be 1 to {MAX_NAME_BYTES} bytes, without NUL"),
        ));
    }
    Ok(())
}

fn to_ts(t: SystemTime) -> Option<jiff::Timestamp> {
    jiff::Timestamp::try_from(t).ok()
}

fn next_after(spec: &Spec, now: SystemTime) -> Option<SystemTime> {
    to_ts(now)
        .and_then(|t| spec.next_after(t))
        .map(SystemTime::from)
}

/// The rule of a row (see `store::COLUMNS`).
fn spec_of(row: &tokio_postgres::Row) -> Result<Spec> {
    let kind: &str = row.get(1);
    let tz: &str = row.get(4);
    match (
        kind,
        row.get::<_, Option<&str>>(2),
        row.get::<_, Option<i64>>(3),
    ) {
        ("cron", Some(expr), _) => Spec::cron(expr, tz),
        ("every", _, Some(us)) => Spec::every(us, tz),
        _ => Err(config(&format!("unknown schedule kind {kind:?}"))),
    }
}

fn from_row(row: &tokio_postgres::Row) -> Result<ScheduleInfo> {
    let kind: &str = row.get(1);
    let rule = match (
        kind,
        row.get::<_, Option<String>>(2),
        row.get::<_, Option<i64>>(3),
    ) {
        ("cron", Some(expr), _) => Rule::Cron(expr),
        ("every", _, Some(us)) => Rule::Every(Duration::from_micros(us.max(0).unsigned_abs())),
        _ => return Err(config(&format!("unknown schedule kind {kind:?}"))),
    };
    let target_kind: &str = row.get(6);
    let target: String = row.get(7);
    let target = match target_kind {
        "queue" => Target::Queue(target),
        "channel" => Target::Channel(target),
        other => return Err(config(&format!("unknown schedule target {other:?}"))),
    };
    Ok(ScheduleInfo {
        name: row.get(0),
        rule,
        time_zone: row.get(4),
        catch_up: row.get::<_, &str>(5).parse()?,
        target,
        payload: row.get(8),
        paused: row.get(9),
        next_at: row.get(10),
        last_slot: row.get(11),
        last_fired_at: row.get(12),
        fired: row.get(13),
        last_error: row.get(14),
        created_at: row.get(15),
        updated_at: row.get(16),
    })
}
