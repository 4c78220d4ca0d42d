//! The worker's statements (claim, complete, extend, fail, rescue, give
//! back, vacuum), built once per schema. Statements only: who runs them is
//! the runner's, the completer's and the vacuum task's business.

use std::sync::Arc;

/// The worker's statements, for one schema.
pub(super) struct Sql {
    pub(super) claim: String,
    /// The claim of a queue with limits (`claim_limited`, migration 0002).
    pub(super) claim_limited: String,
    /// Whether the queue has limits: which claim to use.
    pub(super) has_limits: String,
    pub(super) complete: String,
    pub(super) complete_one: Arc<str>,
    pub(super) extend: String,
    pub(super) fail: String,
    pub(super) rescue: String,
    pub(super) give_back: String,
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
            has_limits: format!("SELECT EXISTS (SELECT 1 FROM {s}.queue_limits WHERE queue = $1)"),
            complete: format!(
                "DELETE FROM {s}.jobs j USING unnest($1::int8[], $2::int4[]) AS d(id, attempt) \
                 WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running'"
            ),
            complete_one: Arc::from(format!(
                "DELETE FROM {s}.jobs WHERE id = $1 AND attempt = $2 AND state = 'running'"
            )),
            extend: format!(
                "UPDATE {s}.jobs j SET lease_until = now() + make_interval(secs => $3::float8) \
                 FROM unnest($1::int8[], $2::int4[]) AS d(id, attempt) \
                 WHERE j.id = d.id AND j.attempt = d.attempt AND j.state = 'running'"
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
            // VACUUM's own rule: the table's owner, the database's, or a
            // superuser (a member of every role).
            may_vacuum: format!(
                "SELECT pg_has_role(c.relowner, 'MEMBER') OR pg_has_role(d.datdba, 'MEMBER') \
                 FROM pg_class c, pg_database d \
                 WHERE c.oid = '{s}.jobs'::regclass AND d.datname = current_database()"
            ),
            vacuum: format!("VACUUM (SKIP_LOCKED) {s}.jobs"),
            live_jobs: format!(
                "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = '{s}.jobs'::regclass"
            ),
        }
    }
}
