//! Every statement of periodic jobs, built once per schema.

/// Key of the transaction advisory lock one scheduler tick holds, so that
/// schedulers take turns rather than contend for rows: FNV-1a 64 of
/// `pgpubsub-schedules NUL <schema>`.
pub(super) fn tick_lock_key(schema: &str) -> i64 {
    let mut key = b"pgpubsub-schedules\0".to_vec();
    key.extend_from_slice(schema.as_bytes());
    crate::schema::fnv1a64(&key) as i64
}

/// The columns `ScheduleInfo` is read from, in order.
pub(super) const COLUMNS: &str = "name, kind, expr, every_us, time_zone, catch_up, target_kind, \
     target, payload, paused, next_at, last_slot, last_fired_at, fired, last_error, created_at, \
     updated_at";

pub(super) struct Sql {
    pub(super) now: String,
    pub(super) upsert: String,
    pub(super) list: String,
    pub(super) get: String,
    pub(super) remove: String,
    pub(super) pause: String,
    pub(super) lock_one: String,
    pub(super) resume: String,
    pub(super) try_tick: &'static str,
    pub(super) due: String,
    pub(super) enqueue: String,
    pub(super) publish: String,
    pub(super) fired: String,
    pub(super) broken: String,
    pub(super) wait: String,
}

impl Sql {
    pub(super) fn new(s: &str) -> Self {
        Sql {
            now: "SELECT now()".to_owned(),
            // Upserting the same rule again (every deploy does) keeps the
            // pending slot; a new rule starts from its next slot.
            upsert: format!(
                "INSERT INTO {s}.schedules AS o (name, kind, expr, every_us, time_zone, catch_up, \
                   target_kind, target, payload, next_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, expr = EXCLUDED.expr, \
                   every_us = EXCLUDED.every_us, time_zone = EXCLUDED.time_zone, \
                   catch_up = EXCLUDED.catch_up, target_kind = EXCLUDED.target_kind, \
                   target = EXCLUDED.target, payload = EXCLUDED.payload, last_error = NULL, \
                   updated_at = now(), \
                   next_at = CASE WHEN o.next_at IS NOT NULL AND \
                     (o.kind, o.expr, o.every_us, o.time_zone) IS NOT DISTINCT FROM \
                     (EXCLUDED.kind, EXCLUDED.expr, EXCLUDED.every_us, EXCLUDED.time_zone) \
                     THEN o.next_at ELSE EXCLUDED.next_at END \
                 RETURNING {COLUMNS}"
            ),
            list: format!("SELECT {COLUMNS} FROM {s}.schedules ORDER BY name"),
            get: format!("SELECT {COLUMNS} FROM {s}.schedules WHERE name = $1"),
            remove: format!("DELETE FROM {s}.schedules WHERE name = $1"),
            pause: format!(
                "UPDATE {s}.schedules SET paused = true, updated_at = now() WHERE name = $1"
            ),
            lock_one: format!("SELECT {COLUMNS} FROM {s}.schedules WHERE name = $1 FOR UPDATE"),
            // Slots that fell while paused are not caught up.
            resume: format!(
                "UPDATE {s}.schedules SET paused = false, next_at = $2, last_error = NULL, \
                 updated_at = now() WHERE name = $1"
            ),
            try_tick: "SELECT pg_try_advisory_xact_lock($1)",
            due: format!(
                "SELECT {COLUMNS} FROM {s}.schedules WHERE NOT paused AND next_at <= now() \
                 ORDER BY next_at LIMIT 100 FOR UPDATE SKIP LOCKED"
            ),
            // A job's run_at is its slot: the handler (and an operator) can
            // tell which slot it is for.
            enqueue: format!("SELECT {s}.enqueue($1, $2, p_run_at => $3)"),
            publish: format!("SELECT {s}.publish($1, $2)"),
            fired: format!(
                "UPDATE {s}.schedules SET next_at = $2, \
                   last_slot = coalesce($3, last_slot), \
                   last_fired_at = CASE WHEN $4::int8 > 0 THEN now() ELSE last_fired_at END, \
                   fired = fired + $4::int8 WHERE name = $1"
            ),
            broken: format!(
                "UPDATE {s}.schedules SET next_at = NULL, last_error = $2 WHERE name = $1"
            ),
            wait: format!(
                "SELECT extract(epoch FROM min(next_at) - clock_timestamp())::float8 \
                 FROM {s}.schedules WHERE NOT paused"
            ),
        }
    }
}
