//! The worker's statements (claim, complete, extend, fail, rescue, give
//! back, snooze, pause and limits check, history retention, vacuum), built once per
//! schema. Statements only: who runs them is the runner's, the
//! completer's and the vacuum task's business.

use std::sync::Arc;

/// Finished jobs deleted per retention statement at most.
pub(super) const RETAIN_BATCH: i64 = 1000;

/// The columns of `finished_jobs` a completion fills, and the `SELECT`
/// list giving them from a deleted `jobs` row `d` (with `d.out` the output).
const FINISHED_COLUMNS: &str = "id, queue, state, priority, attempt, max_attempts, unique_key, \
     output, last_error, created_at, payload";
const FINISHED_VALUES: &str = "d.id, d.queue, \
     CASE WHEN d.cancel_requested THEN 'cancelled' ELSE 'completed' END, \
     d.priority, d.attempt, d.max_attempts, d.unique_key, d.out, d.last_error, d.created_at, \
     d.payload";
const DELETED: &str = "j.id, j.queue, j.priority, j.attempt, j.max_attempts, j.unique_key, \
     j.last_error, j.created_at, j.payload, j.cancel_requested";

/// The worker's statements, for one schema.
pub(super) struct Sql {
    pub(super) claim: String,
    /// The claim of a queue with limits (`claim_limited`, migration 0002).
    pub(super) claim_limited: String,
    /// Whether the queue is paused and has limits (which claim to use):
    /// read at every poll.
    pub(super) queue_state: String,
    pub(super) complete: String,
    pub(super) complete_one: Arc<str>,
    pub(super) extend: String,
    pub(super) fail: String,
    pub(super) rescue: String,
    pub(super) give_back: String,
    pub(super) snooze: String,
    pub(super) retain: String,
    pub(super) may_vacuum: String,
    pub(super) vacuum: String,
    pub(super) live_jobs: String,
}

impl Sql {
    pub(super) fn new(s: &str) -> Self {
        Sql {
            // `{s}.claim()` written out, so its plan is prepared once rather
            // than at every call of the SQL function (see it for `ANY`).
            claim: format!(
                "UPDATE {s}.jobs j SET state = 'running', attempt = j.attempt + 1, \
                   lease_until = now() + make_interval(secs => $3::float8) \
                 WHERE j.id = ANY (ARRAY(SELECT p.id FROM {s}.jobs p \
                   WHERE p.queue = $1 AND p.state = 'ready' AND p.run_at <= now() \
                   ORDER BY p.priority DESC, p.run_at, p.id LIMIT $2::int4 FOR UPDATE SKIP LOCKED)) \
                 RETURNING j.id, j.attempt, j.max_attempts, j.priority, j.created_at, j.payload"
            ),
            // Same columns as `claim`.
            claim_limited: format!("SELECT * FROM {s}.claim_limited($1, $2::int4, $3::float8)"),
            queue_state: format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.paused_queues WHERE queue = $1), \
                   EXISTS (SELECT 1 FROM {s}.queue_limits WHERE queue = $1)"
            ),
            // Deletes the batch and, in the same statement, keeps the jobs
            // in finished_jobs: completed ones when history is on ($4),
            // cancelled ones always. Returns how many claims were current
            // and the ids of those that ended cancelled.
            complete: format!(
                "WITH d AS (DELETE FROM {s}.jobs j \
                   USING unnest($1::int8[], $2::int4[], $3::text[]) AS c(id, attempt, out) \
                   WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'running' \
                   RETURNING {DELETED}, c.out), \
                 k AS (INSERT INTO {s}.finished_jobs ({FINISHED_COLUMNS}) \
                   SELECT {FINISHED_VALUES} FROM d WHERE $4::bool OR d.cancel_requested) \
                 SELECT count(*), coalesce(array_agg(d.id) FILTER (WHERE d.cancel_requested), '{{}}') \
                 FROM d"
            ),
            // For `Job::complete_tx`, in the handler's transaction: one row
            // when the claim was current. Always kept in history.
            complete_one: Arc::from(format!(
                "WITH d AS (DELETE FROM {s}.jobs j \
                   WHERE j.id = $1 AND j.attempt = $2 AND j.state = 'running' \
                   RETURNING {DELETED}, NULL::text AS out), \
                 k AS (INSERT INTO {s}.finished_jobs ({FINISHED_COLUMNS}) \
                   SELECT {FINISHED_VALUES} FROM d) \
                 SELECT 1 FROM d"
            )),
            // Also the polling fallback of cancellation: the ids of the
            // extended jobs someone asked to cancel.
            extend: format!(
                "WITH u AS (UPDATE {s}.jobs j \
                   SET lease_until = now() + make_interval(secs => $3::float8) \
                   FROM unnest($1::int8[], $2::int4[]) AS d(id, attempt) \
                   WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running' \
                   RETURNING j.id, j.cancel_requested) \
                 SELECT id FROM u WHERE cancel_requested"
            ),
            fail: format!("SELECT {s}.fail($1, $2, $3, make_interval(secs => $4::float8))"),
            rescue: format!("SELECT job_id, attempt, dead, error FROM {s}.rescue($1)"),
            // Given-back jobs did not really get their attempt; others are
            // woken at once rather than at their next poll.
            give_back: format!(
                "WITH u AS (UPDATE {s}.jobs j SET state = 'ready', attempt = j.attempt - 1, \
                 lease_until = NULL FROM unnest($1::int8[], $2::int4[]) AS d(id, attempt) \
                 WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running' RETURNING 1) \
                 SELECT count(*), pg_notify($3, $4) FROM u HAVING count(*) > 0"
            ),
            // A snoozed job runs again later without spending its attempt
            // (as a given-back one); a cancelled one is not snoozed.
            snooze: format!(
                "UPDATE {s}.jobs SET state = 'ready', attempt = attempt - 1, lease_until = NULL, \
                   run_at = now() + make_interval(secs => $3::float8) \
                 WHERE id = $1 AND attempt = $2 AND state = 'running' AND NOT cancel_requested"
            ),
            retain: format!(
                "DELETE FROM {s}.finished_jobs WHERE id = ANY (ARRAY( \
                   SELECT f.id FROM {s}.finished_jobs f \
                   WHERE f.queue = $1 AND f.finished_at < now() - make_interval(secs => $2::float8) \
                   ORDER BY f.finished_at LIMIT {RETAIN_BATCH} FOR UPDATE SKIP LOCKED))"
            ),
            // VACUUM's own rule: the table's owner, the database's, or a
            // superuser (a member of every role).
            may_vacuum: format!(
                "SELECT pg_has_role(c.relowner, 'MEMBER') OR pg_has_role(d.datdba, 'MEMBER') \
                 FROM pg_class c, pg_database d \
                 WHERE c.oid = '{s}.jobs'::regclass AND d.datname = current_database()"
            ),
            // No truncation: giving the empty tail of the file back takes
            // an exclusive lock, again and again while claims and
            // completions keep asking for the table (a drain of 50k jobs
            // ran at a tenth of its speed behind it); the space is reused.
            vacuum: format!("VACUUM (SKIP_LOCKED, TRUNCATE false) {s}.jobs"),
            live_jobs: format!(
                "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = '{s}.jobs'::regclass"
            ),
        }
    }
}
