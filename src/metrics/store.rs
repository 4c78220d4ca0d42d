//! The statements a scrape runs: one per family, each over the schema's
//! tables or the server's views, none of them per row of anything.

use crate::schema::SchemaName;

/// Most messages read per group: a scrape's cost is bounded by groups ×
/// this, however far behind a group is. A group further behind reports
/// at most this many.
pub(crate) const LAG_CAP: i64 = 10_000;

/// The scrape's statements, for one schema.
pub(crate) struct Sql {
    /// queue, ready, scheduled, running, dead, oldest ready age (s).
    pub(crate) jobs: String,
    /// channel, group, unacked messages (at most `$1`), oldest unacked age (s).
    pub(crate) groups: String,
    /// The tables whose absence means "not installed": no queue rows, no
    /// group rows.
    pub(crate) jobs_table: String,
    pub(crate) groups_table: String,
}

impl Sql {
    pub(crate) fn new(schema: &SchemaName) -> Sql {
        let s = schema.as_str();
        Sql {
            jobs_table: format!("{s}.jobs"),
            groups_table: format!("{s}.groups"),
            // One pass over the live jobs, one over the dead ones (the
            // same counts as `Queue::stats`, without its per-queue
            // subquery). Linear in jobs: the live table holds only waiting
            // and running work.
            jobs: format!(
                "WITH j AS (SELECT queue, \
                   count(*) FILTER (WHERE state = 'ready' AND run_at <= now()) AS ready, \
                   count(*) FILTER (WHERE state = 'ready' AND run_at > now()) AS scheduled, \
                   count(*) FILTER (WHERE state = 'running') AS running, \
                   min(run_at) FILTER (WHERE state = 'ready' AND run_at <= now()) AS oldest \
                 FROM {s}.jobs GROUP BY queue), \
                 d AS (SELECT queue, count(*) AS dead FROM {s}.dead_jobs GROUP BY queue) \
                 SELECT coalesce(j.queue, d.queue), coalesce(j.ready, 0), \
                   coalesce(j.scheduled, 0), coalesce(j.running, 0), coalesce(d.dead, 0), \
                   coalesce(extract(epoch FROM now() - j.oldest), 0)::float8 \
                 FROM j FULL JOIN d ON d.queue = j.queue"
            ),
            // Per group, what `Durable::groups` counts (messages its cursor
            // has not passed), but reading at most `$1` entries of the
            // (channel, xid, seq) index, from the oldest transaction its
            // cursor's batch could still leave behind (`lo`, the xmin of
            // the tick before it: older ones were all passed). Exact while
            // that window holds fewer than `$1` messages; beyond, a lower
            // bound. A message of a transaction that started after both of
            // the cursor's snapshots (`xid >= after`: most of a lag) cannot
            // have been passed, so the count is the window's entries (the
            // index alone, no filter) minus the passed ones among the few
            // in `[lo, after)`: 66 ms of server CPU instead of 89 for the
            // bench's 3,000 groups (300k messages behind). The oldest
            // unacked message is the first not passed in index order.
            // `OFFSET 0` keeps the tick snapshots from being looked up
            // again for every message.
            groups: format!(
                "SELECT g.channel, g.group_name, greatest(c.n - p.n, 0), \
                   coalesce(extract(epoch FROM now() - o.oldest), 0)::float8 \
                 FROM {s}.groups g \
                 CROSS JOIN LATERAL (SELECT t.pv, t.nx, pg_snapshot_xmin(t.pv) AS lo, \
                   greatest(pg_snapshot_xmax(t.pv), pg_snapshot_xmax(t.nx)) AS after \
                   FROM (SELECT {s}.snap_before(g.channel, g.tick_id) AS pv, \
                                {s}.snap_at(g.channel, g.tick_id) AS nx OFFSET 0) t) sn \
                 CROSS JOIN LATERAL (SELECT count(*) AS n FROM \
                   (SELECT 1 FROM {s}.messages m \
                    WHERE m.channel = g.channel AND m.xid >= sn.lo LIMIT $1) w) c \
                 CROSS JOIN LATERAL (SELECT count(*) AS n FROM \
                   (SELECT m.xid, m.seq FROM {s}.messages m \
                    WHERE m.channel = g.channel AND m.xid >= sn.lo AND m.xid < sn.after \
                    LIMIT $1) w \
                   WHERE {s}.passed(w.xid, w.seq, g.xid, g.seq, sn.pv, sn.nx)) p \
                 LEFT JOIN LATERAL (SELECT w.published_at AS oldest FROM \
                   (SELECT m.xid, m.seq, m.published_at FROM {s}.messages m \
                    WHERE m.channel = g.channel AND m.xid >= sn.lo \
                    ORDER BY m.xid, m.seq LIMIT $1) w \
                   WHERE w.xid >= sn.after \
                      OR NOT {s}.passed(w.xid, w.seq, g.xid, g.seq, sn.pv, sn.nx) \
                   LIMIT 1) o ON true"
            ),
        }
    }
}

/// Every replication slot of the cluster (they all hold WAL on this
/// server): name, whether a stream uses it, the WAL it holds back.
pub(crate) const SLOTS: &str = "\
SELECT s.slot_name::text, s.active,
       coalesce((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                      ELSE pg_current_wal_lsn() END
                 - coalesce(s.confirmed_flush_lsn, s.restart_lsn))::int8, 0)
  FROM pg_replication_slots s";

/// How long the oldest transaction of this database (sessions but the
/// asking one, and prepared transactions) has held back the xmin horizon,
/// in seconds; 0 when none does. The sessions of other roles need
/// `pg_read_all_stats` to be seen (see `Queue::horizon_holder`).
pub(crate) const OLDEST_XMIN: &str = "\
SELECT coalesce(max(age), 0)::float8 FROM (
  SELECT extract(epoch FROM now() - a.xact_start) AS age
    FROM pg_stat_activity a
   WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
     AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
  UNION ALL
  SELECT extract(epoch FROM now() - p.prepared)
    FROM pg_prepared_xacts p WHERE p.database = current_database()
) h";
