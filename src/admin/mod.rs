//! The operator's view of a schema: queues and their jobs, dead jobs (retry,
//! delete), durable channels and their groups, change feeds, replication
//! slots and elected channels.
//!
//! Every answer is a plain [`serde::Serialize`] struct, so the same calls
//! serve the dashboard's JSON API (feature `ui`), the CLI's inspect
//! commands and a program's own checks. Listing calls read the tables
//! directly: meant for people and dashboards, not hot loops.
//!
//! ```no_run
//! # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
//! use pg_pubsub::admin::{JobState, Page};
//! let admin = pubsub.admin();
//! for q in admin.queues().await? {
//!     println!("{}: {} ready, {} dead", q.queue, q.ready, q.dead);
//! }
//! let dead = admin.jobs("emails", JobState::Dead, Page::first(50)).await?;
//! if let Some(job) = dead.first() {
//!     admin.retry_dead(job.id).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Times are serialized as RFC 3339 strings (UTC, milliseconds).

mod store;

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Serialize, Serializer};
use tokio_postgres::types::Type;

use crate::changes::Changes;
use crate::client::PgPubSub;
use crate::durable::Durable;
use crate::error::{Error, Origin, Result};
use crate::queue::{check_queue, Queue};
use crate::schema::SchemaName;

/// The admin layer of one schema. Cheap to clone.
///
/// Made by [`PgPubSub::admin`] or [`Admin::with_schema`]; the schema is
/// installed on first use, like the capabilities'.
#[derive(Clone, Debug)]
pub struct Admin {
    queue: Queue,
    changes: Changes,
}

impl PgPubSub {
    /// The admin layer of the default schema (`pgpubsub`).
    pub fn admin(&self) -> Admin {
        Admin {
            queue: self.queue(),
            changes: self.changes(),
        }
    }
}

/// Serializes a time as RFC 3339 (UTC, milliseconds).
fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// [`rfc3339`] for optional times (`null` when absent).
fn rfc3339_opt<S: Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// Counts of one queue, from [`Admin::queues`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct QueueSummary {
    /// The queue.
    pub queue: String,
    /// Jobs due now, waiting for a worker.
    pub ready: u64,
    /// Jobs waiting for a later time (scheduled, or backing off).
    pub scheduled: u64,
    /// Jobs claimed by a worker.
    pub running: u64,
    /// Dead jobs.
    pub dead: u64,
    /// Completed jobs still in the history.
    pub completed: u64,
    /// Cancelled jobs still in the history.
    pub cancelled: u64,
    /// Whether the queue is paused ([`Admin::pause`]).
    pub paused: bool,
    /// How long the oldest due job has been due, in seconds (0: none).
    pub oldest_ready_age_seconds: f64,
}

/// Where a job is: derived from its table, `state` and `run_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum JobState {
    /// Due now, waiting for a worker.
    Ready,
    /// Waiting for a later time (scheduled, or backing off after a failure).
    Scheduled,
    /// Claimed by a worker.
    Running,
    /// Failed its last attempt; kept in `dead_jobs`.
    Dead,
    /// Done; kept in `finished_jobs` for the workers' history.
    Completed,
    /// Cancelled; kept in `finished_jobs` for the workers' history.
    Cancelled,
}

impl JobState {
    /// Every state, in the order a job goes through them.
    pub const ALL: [JobState; 6] = [
        JobState::Ready,
        JobState::Scheduled,
        JobState::Running,
        JobState::Dead,
        JobState::Completed,
        JobState::Cancelled,
    ];

    /// `ready`, `scheduled`, `running`, `dead`, `completed` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Dead => "dead",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether a job in this state may still be cancelled.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            JobState::Ready | JobState::Scheduled | JobState::Running
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                Error::new(
                    Origin::Config,
                    format!("unknown job state {s:?}: expected ready, scheduled, running, dead, completed or cancelled"),
                )
            })
    }
}

/// A page of a job list: the jobs with an id above `after`, by id, at most
/// `limit` of them (1 to [`Page::MAX_LIMIT`]). The next page starts after
/// the last id of this one (keyset paging: stable while jobs come and go).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page {
    /// Only jobs with a greater id (`None`: from the first).
    pub after: Option<i64>,
    /// At most this many (clamped to 1..=[`Page::MAX_LIMIT`]).
    pub limit: u32,
}

impl Page {
    /// The largest page.
    pub const MAX_LIMIT: u32 = 1000;

    /// `limit` jobs with an id above `after` (`None`: from the first).
    pub fn new(after: Option<i64>, limit: u32) -> Page {
        Page { after, limit }
    }

    /// The first `limit` jobs.
    pub fn first(limit: u32) -> Page {
        Page { after: None, limit }
    }

    /// `limit` jobs with an id above `id`.
    pub fn after(id: i64, limit: u32) -> Page {
        Page {
            after: Some(id),
            limit,
        }
    }
}

impl Default for Page {
    /// The first 100 jobs.
    fn default() -> Self {
        Page::first(100)
    }
}

/// A job in a list, from [`Admin::jobs`] and [`Admin::dead_jobs`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct JobSummary {
    /// The job's id (dead jobs keep theirs).
    pub id: i64,
    /// The queue.
    pub queue: String,
    /// Where it is.
    pub state: JobState,
    /// Higher runs first.
    pub priority: i16,
    /// Attempts made.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it is due (live jobs), when it died (dead ones) or when it
    /// ended (completed and cancelled ones).
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// When it was enqueued.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// The payload's first 200 characters (`None`: hidden by the caller).
    pub payload: Option<String>,
}

/// One job with its whole payload, from [`Admin::job`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct JobDetail {
    /// The job's id.
    pub id: i64,
    /// The queue.
    pub queue: String,
    /// Where it is.
    pub state: JobState,
    /// Higher runs first.
    pub priority: i16,
    /// Attempts made.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it is due (`None` for a dead job).
    #[serde(serialize_with = "rfc3339_opt")]
    pub run_at: Option<SystemTime>,
    /// Until when its worker holds it (running jobs).
    #[serde(serialize_with = "rfc3339_opt")]
    pub lease_until: Option<SystemTime>,
    /// Its unique key, if any.
    pub unique_key: Option<String>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was enqueued.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    /// When it died (dead jobs).
    #[serde(serialize_with = "rfc3339_opt")]
    pub died_at: Option<SystemTime>,
    /// When it ended (completed and cancelled jobs).
    #[serde(serialize_with = "rfc3339_opt")]
    pub finished_at: Option<SystemTime>,
    /// Its handler's output, JSON text (completed jobs; `None`: none, or
    /// hidden by the caller with the payload).
    pub output: Option<String>,
    /// The payload (`None`: hidden by the caller).
    pub payload: Option<String>,
}

/// A durable channel with its groups, from [`Admin::durable_channels`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ChannelSummary {
    /// The channel.
    pub channel: String,
    /// Published without NOTIFY (consumers poll).
    pub quiet: bool,
    /// Its maximum message age in seconds, if it has one.
    pub max_age_seconds: Option<f64>,
    /// Its consumer groups, by name.
    pub groups: Vec<GroupSummary>,
}

/// A consumer group's cursor and lag, from [`Admin::groups`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct GroupSummary {
    /// The group.
    pub group: String,
    /// Its cursor, as `tick/xid/seq` ([`Position`](crate::durable::Position)).
    pub position: String,
    /// When its cursor last moved.
    #[serde(serialize_with = "rfc3339")]
    pub acked_at: SystemTime,
    /// Messages stored and not yet acked by it.
    pub lag_messages: u64,
    /// Age of its oldest unacked message in seconds (0: caught up).
    pub lag_seconds: f64,
}

/// A trigger change feed, from [`Admin::change_feeds`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct FeedSummary {
    /// The table, as PostgreSQL prints it.
    pub table: String,
    /// The durable or NOTIFY channel its events go to.
    pub channel: String,
    /// `durable` or `notify`.
    pub target: &'static str,
    /// `statement` or `row`.
    pub level: &'static str,
    /// The captured operations (`insert`, `update`, `delete`, `truncate`).
    pub ops: Vec<String>,
    /// The kept columns (`None`: all).
    pub columns: Option<Vec<String>>,
    /// The left-out columns.
    pub exclude: Option<Vec<String>>,
}

/// A replication slot of the cluster, from [`Admin::wal_slots`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SlotInfo {
    /// The slot's name.
    pub name: String,
    /// Its output plugin (logical slots; `pgoutput` for the WAL feed).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub kind: String,
    /// Its database (logical slots).
    pub database: Option<String>,
    /// Whether a session streams from it now.
    pub active: bool,
    /// That session's process id.
    pub active_pid: Option<i32>,
    /// Dropped when its session ends.
    pub temporary: bool,
    /// WAL held for it, in bytes: from its confirmed position (or restart
    /// position) to the current one (`None` on a standby).
    pub lag_bytes: Option<u64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// An elected channel and its leader, from [`Admin::elected_channels`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ElectedChannel {
    /// The channel.
    pub channel: String,
    /// The leader's backend process id (`None`: nobody holds its lock).
    pub leader_pid: Option<i32>,
    /// The leader session's `application_name`.
    pub application_name: Option<String>,
    /// The leader session's client address.
    pub client_addr: Option<String>,
    /// When the leader's session started.
    #[serde(serialize_with = "rfc3339_opt")]
    pub leader_since: Option<SystemTime>,
}

impl Admin {
    /// The admin layer of the same handle in another `schema` (a lowercase
    /// identifier of at most 40 bytes).
    pub fn with_schema(&self, schema: &str) -> Result<Admin> {
        Ok(Admin {
            queue: self.queue.with_schema(schema)?,
            changes: self.changes.with_schema(schema)?,
        })
    }

    /// The schema.
    pub fn schema(&self) -> &SchemaName {
        self.queue.schema()
    }

    /// The [`PgPubSub`] this uses.
    pub fn pubsub(&self) -> &PgPubSub {
        self.queue.pubsub()
    }

    fn durable(&self) -> &Durable {
        self.changes.durable()
    }

    /// Whether the server answers a trivial statement on the pool (within
    /// the notify timeout): for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        self.pubsub()
            .exec()
            .run(Origin::Queue, "ping", |c| async move {
                c.simple_query("SELECT 1").await.map(drop)
            })
            .await
    }

    /// Counts per queue (every queue with a live or dead job), by name
    /// ([`Queue::stats`]).
    pub async fn queues(&self) -> Result<Vec<QueueSummary>> {
        Ok(self
            .queue
            .stats()
            .await?
            .into_iter()
            .map(|s| QueueSummary {
                queue: s.queue,
                ready: s.ready,
                scheduled: s.scheduled,
                running: s.running,
                dead: s.dead,
                completed: s.completed,
                cancelled: s.cancelled,
                paused: s.paused,
                oldest_ready_age_seconds: s.oldest_ready_age.as_secs_f64(),
            })
            .collect())
    }

    /// The jobs of `queue` in `state`, by id, one [`Page`] of them.
    /// Payloads are cut to their first 200 characters ([`job`](Self::job)
    /// has the whole).
    pub async fn jobs(&self, queue: &str, state: JobState, page: Page) -> Result<Vec<JobSummary>> {
        check_queue(queue)?;
        self.list(Some(queue), state, page, false).await
    }

    /// Dead jobs of one queue or all (`None`), by id, one [`Page`] of them.
    pub async fn dead_jobs(&self, queue: Option<&str>, page: Page) -> Result<Vec<JobSummary>> {
        if let Some(q) = queue {
            check_queue(q)?;
        }
        self.list(queue, JobState::Dead, page, true).await
    }

    async fn list(
        &self,
        queue: Option<&str>,
        state: JobState,
        page: Page,
        all_queues: bool,
    ) -> Result<Vec<JobSummary>> {
        let sql = store::jobs_sql(self.schema(), state, all_queues);
        let (after, limit) = store::page_params(page);
        self.queue
            .with_client("listing jobs", |c| async move {
                let rows = c
                    .query_p(
                        &sql,
                        &[
                            (&queue, Type::TEXT),
                            (&after, Type::INT8),
                            (&limit, Type::INT8),
                            (&store::PREVIEW_CHARS, Type::INT4),
                        ],
                    )
                    .await?;
                Ok(rows.iter().map(store::job_summary).collect())
            })
            .await
    }

    /// Job `id`, live, dead or finished (still in the history), with its
    /// whole payload; `None` when there is none.
    pub async fn job(&self, id: i64) -> Result<Option<JobDetail>> {
        let sql = store::job_sql(self.schema());
        self.queue
            .with_client("looking a job up", |c| async move {
                Ok(c.query_opt_p(&sql, &[(&id, Type::INT8)])
                    .await?
                    .as_ref()
                    .map(store::job_detail))
            })
            .await
    }

    /// Cancels job `id` ([`Queue::cancel`]).
    pub async fn cancel(&self, id: i64) -> Result<crate::queue::Cancelled> {
        self.queue.cancel(id).await
    }

    /// Pauses `queue` for every worker ([`Queue::pause`]); `false` if it
    /// was paused already.
    pub async fn pause(&self, queue: &str) -> Result<bool> {
        self.queue.pause(queue).await
    }

    /// Whether `queue` is paused ([`Queue::is_paused`]).
    pub async fn is_paused(&self, queue: &str) -> Result<bool> {
        self.queue.is_paused(queue).await
    }

    /// Resumes a paused `queue` ([`Queue::resume`]); `false` if it was not
    /// paused.
    pub async fn resume(&self, queue: &str) -> Result<bool> {
        self.queue.resume(queue).await
    }

    /// Puts dead job `id` back in its queue, due now, with fresh attempts
    /// ([`Queue::retry_dead`]); `false` if there is no such dead job.
    pub async fn retry_dead(&self, id: i64) -> Result<bool> {
        self.queue.retry_dead(id).await
    }

    /// Deletes dead job `id` ([`Queue::delete_dead`]); `false` if there was none.
    pub async fn delete_dead(&self, id: i64) -> Result<bool> {
        self.queue.delete_dead(id).await
    }

    /// Retries every dead job of `queue` (`None`: of every queue) in one
    /// transaction; how many. Fails, retrying none, when a job's unique
    /// key is taken by a live job.
    pub async fn retry_dead_all(&self, queue: Option<&str>) -> Result<u64> {
        if let Some(q) = queue {
            check_queue(q)?;
        }
        let sql = store::retry_dead_all_sql(self.schema());
        self.queue
            .with_client("retrying dead jobs", |c| async move {
                let n: i64 = c.query_one_p(&sql, &[(&queue, Type::TEXT)]).await?.get(0);
                Ok(n.max(0) as u64)
            })
            .await
    }

    /// Deletes every dead job of `queue` (`None`: of every queue); how many.
    pub async fn delete_dead_all(&self, queue: Option<&str>) -> Result<u64> {
        if let Some(q) = queue {
            check_queue(q)?;
        }
        let sql = store::delete_dead_all_sql(self.schema());
        self.queue
            .with_client("deleting dead jobs", |c| async move {
                c.execute_p(&sql, &[(&queue, Type::TEXT)]).await
            })
            .await
    }

    /// Rows ever removed from the jobs table (one per job completed or
    /// moved to the dead jobs), from the server's statistics: sample it to
    /// get a throughput. `None` when the statistics have no row for it.
    pub async fn jobs_finished_total(&self) -> Result<Option<u64>> {
        let sql = store::jobs_finished_sql(self.schema());
        self.queue
            .with_client("reading job statistics", |c| async move {
                Ok(c.query_opt_p(&sql, &[])
                    .await?
                    .and_then(|r| r.get::<_, Option<i64>>(0))
                    .map(|n| n.max(0) as u64))
            })
            .await
    }

    /// Durable channels (any with a group or settings), by name, each with
    /// its groups ([`Durable::groups`]: counting the lag reads every
    /// unacked message).
    pub async fn durable_channels(&self) -> Result<Vec<ChannelSummary>> {
        let sql = store::channels_sql(self.schema());
        let mut channels: Vec<ChannelSummary> = self
            .durable()
            .with_client("listing durable channels", |c| async move {
                Ok(c.query_p(&sql, &[])
                    .await?
                    .iter()
                    .map(store::channel_summary)
                    .collect())
            })
            .await?;
        for ch in &mut channels {
            ch.groups = self.groups(&ch.channel).await?;
        }
        Ok(channels)
    }

    /// The consumer groups of durable `channel`, with cursor and lag
    /// ([`Durable::groups`]).
    pub async fn groups(&self, channel: &str) -> Result<Vec<GroupSummary>> {
        Ok(self
            .durable()
            .groups(channel)
            .await?
            .into_iter()
            .map(|g| GroupSummary {
                lag_seconds: g.lag_age().as_secs_f64(),
                group: g.group,
                position: g.position.to_string(),
                acked_at: g.acked_at,
                lag_messages: g.lag_messages,
            })
            .collect())
    }

    /// The trigger change feeds of the schema, by table ([`Changes::feeds`]).
    pub async fn change_feeds(&self) -> Result<Vec<FeedSummary>> {
        Ok(self
            .changes
            .feeds()
            .await?
            .into_iter()
            .map(|f| FeedSummary {
                target: if f.notify { "notify" } else { "durable" },
                level: f.level.as_str(),
                ops: f.ops.iter().map(ToString::to_string).collect(),
                table: f.table,
                channel: f.channel,
                columns: f.columns,
                exclude: f.exclude,
            })
            .collect())
    }

    /// Every replication slot of the cluster (the WAL feed's and others),
    /// with the WAL each holds.
    pub async fn wal_slots(&self) -> Result<Vec<SlotInfo>> {
        self.pubsub()
            .exec()
            .run(
                Origin::Changes,
                "listing replication slots",
                |c| async move {
                    Ok(c.query_p(store::SLOTS_SQL, &[])
                        .await?
                        .iter()
                        .map(store::slot_info)
                        .collect())
                },
            )
            .await
    }

    /// The leader of each of `channels` (elected channels: see
    /// [`election`](crate::election)), by name. The election locks name
    /// no channel (their keys are hashes), so the names are the caller's:
    /// e.g. this handle's [`Stats::leading`](crate::Stats::leading), or
    /// the channels a fleet is configured with.
    pub async fn elected_channels(&self, channels: &[String]) -> Result<Vec<ElectedChannel>> {
        let sql = store::elected_sql();
        self.pubsub()
            .exec()
            .run(
                Origin::Listen,
                "looking election leaders up",
                |c| async move {
                    Ok(c.query_p(&sql, &[(&channels, Type::TEXT_ARRAY)])
                        .await?
                        .iter()
                        .map(store::elected)
                        .collect())
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>().ok(), Some(st));
        }
        assert!("done".parse::<JobState>().is_err());
    }

    #[test]
    fn pages_are_clamped() {
        assert_eq!(store::page_params(Page::first(0)), (0, 1));
        assert_eq!(store::page_params(Page::after(7, 5000)), (7, 1000));
    }
}
