//! The admin layer's statements (those the capabilities do not already have).

use tokio_postgres::Row;

use super::{ChannelSummary, ElectedChannel, JobDetail, JobState, JobSummary, Page, SlotInfo};
use crate::schema::SchemaName;

/// Characters of a payload shown in a job list.
pub(super) const PREVIEW_CHARS: i32 = 200;

/// Columns shared by the job lists, live and dead (same order).
const LIVE_COLUMNS: &str = "id, queue, \
     CASE WHEN state = 'running' THEN 'running' \
          WHEN run_at > now() THEN 'scheduled' ELSE 'ready' END, \
     priority, attempt, max_attempts, run_at, created_at, last_error, left(payload, $4)";
const DEAD_COLUMNS: &str = "id, queue, 'dead', priority, attempt, max_attempts, died_at, \
     created_at, last_error, left(payload, $4)";
const FINISHED_COLUMNS: &str = "id, queue, state, priority, attempt, max_attempts, finished_at, \
     created_at, last_error, left(payload, $4)";

/// Jobs of `queue` (`None`: every queue; only for dead jobs) in `state`,
/// after the page's key, by id. Parameters: queue, after, limit, preview.
pub(super) fn jobs_sql(s: &SchemaName, state: JobState, all_queues: bool) -> String {
    let s = s.as_str();
    let queue = if all_queues {
        "($1::text IS NULL OR queue = $1)"
    } else {
        "queue = $1"
    };
    let (table, columns, filter) = match state {
        JobState::Ready => ("jobs", LIVE_COLUMNS, "state = 'ready' AND run_at <= now()"),
        JobState::Scheduled => ("jobs", LIVE_COLUMNS, "state = 'ready' AND run_at > now()"),
        JobState::Running => ("jobs", LIVE_COLUMNS, "state = 'running'"),
        JobState::Dead => ("dead_jobs", DEAD_COLUMNS, "true"),
        JobState::Completed => ("finished_jobs", FINISHED_COLUMNS, "state = 'completed'"),
        JobState::Cancelled => ("finished_jobs", FINISHED_COLUMNS, "state = 'cancelled'"),
    };
    format!(
        "SELECT {columns} FROM {s}.{table} \
         WHERE {queue} AND {filter} AND id > $2 ORDER BY id LIMIT $3"
    )
}

/// The parameters of [`jobs_sql`] for a page.
pub(super) fn page_params(page: Page) -> (i64, i64) {
    (
        page.after.unwrap_or(0),
        i64::from(page.limit.clamp(1, Page::MAX_LIMIT)),
    )
}

/// Maps a row of [`jobs_sql`].
pub(super) fn job_summary(r: &Row) -> JobSummary {
    JobSummary {
        id: r.get(0),
        queue: r.get(1),
        state: r.get::<_, &str>(2).parse().unwrap_or(JobState::Ready),
        priority: r.get(3),
        attempt: r.get(4),
        max_attempts: r.get(5),
        at: r.get(6),
        created_at: r.get(7),
        last_error: r.get(8),
        payload: Some(r.get(9)),
    }
}

/// One job, live, dead or finished, by id.
pub(super) fn job_sql(s: &SchemaName) -> String {
    let s = s.as_str();
    format!(
        "SELECT id, queue, CASE WHEN state = 'running' THEN 'running' \
                WHEN run_at > now() THEN 'scheduled' ELSE 'ready' END, \
                priority, attempt, max_attempts, run_at, lease_until, unique_key, \
                last_error, created_at, NULL::timestamptz, payload, NULL::timestamptz, NULL::text \
           FROM {s}.jobs WHERE id = $1 \
         UNION ALL \
         SELECT id, queue, 'dead', priority, attempt, max_attempts, NULL, NULL, unique_key, \
                last_error, created_at, died_at, payload, NULL, NULL \
           FROM {s}.dead_jobs WHERE id = $1 \
         UNION ALL \
         SELECT id, queue, state, priority, attempt, max_attempts, NULL, NULL, unique_key, \
                last_error, created_at, NULL, payload, finished_at, output \
           FROM {s}.finished_jobs WHERE id = $1 \
         LIMIT 1"
    )
}

/// Maps a row of [`job_sql`].
pub(super) fn job_detail(r: &Row) -> JobDetail {
    JobDetail {
        id: r.get(0),
        queue: r.get(1),
        state: r.get::<_, &str>(2).parse().unwrap_or(JobState::Ready),
        priority: r.get(3),
        attempt: r.get(4),
        max_attempts: r.get(5),
        run_at: r.get(6),
        lease_until: r.get(7),
        unique_key: r.get(8),
        last_error: r.get(9),
        created_at: r.get(10),
        died_at: r.get(11),
        payload: Some(r.get(12)),
        finished_at: r.get(13),
        output: r.get(14),
    }
}

/// Retries every dead job of queue `$1` (`NULL`: all), oldest first; the
/// count retried. One statement: a taken unique key fails all of it.
pub(super) fn retry_dead_all_sql(s: &SchemaName) -> String {
    let s = s.as_str();
    format!(
        "SELECT count(*) FILTER (WHERE r) FROM \
           (SELECT {s}.retry_dead(id) AS r FROM \
              (SELECT id FROM {s}.dead_jobs WHERE $1::text IS NULL OR queue = $1 \
               ORDER BY id) ids) done"
    )
}

/// Deletes every dead job of queue `$1` (`NULL`: all).
pub(super) fn delete_dead_all_sql(s: &SchemaName) -> String {
    format!(
        "DELETE FROM {}.dead_jobs WHERE $1::text IS NULL OR queue = $1",
        s.as_str()
    )
}

/// Durable channels: any with a group or settings.
pub(super) fn channels_sql(s: &SchemaName) -> String {
    let s = s.as_str();
    format!(
        "SELECT c.channel, coalesce(ch.quiet, false), \
                extract(epoch FROM ch.max_age)::float8 \
         FROM (SELECT channel FROM {s}.groups UNION SELECT channel FROM {s}.channels) c \
         LEFT JOIN {s}.channels ch ON ch.channel = c.channel \
         ORDER BY c.channel"
    )
}

/// Maps a row of [`channels_sql`] (groups filled in later).
pub(super) fn channel_summary(r: &Row) -> ChannelSummary {
    ChannelSummary {
        channel: r.get(0),
        quiet: r.get(1),
        max_age_seconds: r.get(2),
        groups: Vec::new(),
    }
}

/// Rows deleted from the jobs table since the statistics were reset: one
/// per job completed or moved to the dead jobs.
pub(super) fn jobs_finished_sql(s: &SchemaName) -> String {
    format!(
        "SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = '{}.jobs'::regclass",
        s.as_str()
    )
}

/// Every replication slot of the cluster; the lag is how much WAL it holds.
pub(super) const SLOTS_SQL: &str = "\
SELECT slot_name::text, plugin::text, slot_type, database::text, active, active_pid, temporary,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(),
                                 coalesce(confirmed_flush_lsn, restart_lsn))::int8 END,
       wal_status
  FROM pg_replication_slots ORDER BY slot_name";

/// Maps a row of [`SLOTS_SQL`].
pub(super) fn slot_info(r: &Row) -> SlotInfo {
    SlotInfo {
        name: r.get(0),
        plugin: r.get(1),
        kind: r.get(2),
        database: r.get(3),
        active: r.get(4),
        active_pid: r.get(5),
        temporary: r.get(6),
        lag_bytes: r.get::<_, Option<i64>>(7).map(|b| b.max(0) as u64),
        wal_status: r.get(8),
    }
}

/// The leader of each channel of `$1` (see
/// [`LEADER_PID_SQL`](crate::election::LEADER_PID_SQL), the same lock key),
/// with its session's name and address.
pub(super) fn elected_sql() -> String {
    format!(
        "SELECT c.name, l.pid, a.application_name, a.client_addr::text, a.backend_start \
         FROM unnest($1::text[]) AS c(name) \
         CROSS JOIN LATERAL (SELECT hashtextextended(c.name, {seed}) AS k) key \
         LEFT JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
              AND l.classid = ((key.k >> 32) & 4294967295)::oid \
              AND l.objid = (key.k & 4294967295)::oid \
         LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         ORDER BY c.name",
        seed = crate::election::LOCK_SEED
    )
}

/// Maps a row of [`elected_sql`].
pub(super) fn elected(r: &Row) -> ElectedChannel {
    ElectedChannel {
        channel: r.get(0),
        leader_pid: r.get(1),
        application_name: r.get(2),
        client_addr: r.get(3),
        leader_since: r.get(4),
    }
}
