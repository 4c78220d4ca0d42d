//! Prometheus-style metrics (feature `metrics`), through the
//! [`metrics`](https://docs.rs/metrics) facade.
//!
//! Two kinds:
//!
//! * **Recorded where the work happens**, by the listener task, durable
//!   publishers and readers, queue workers and WAL feeds of every handle of
//!   the process: counters, a gauge and a histogram (see [`names`]). They
//!   go to whatever recorder the program installed; metric handles are
//!   registered once per channel, group, queue or slot and kept, so a
//!   message costs an atomic add. **Install the recorder before making the
//!   handles** ([`PgPubSub`], subscriptions, workers, feeds): what
//!   registered earlier records into the facade's no-op.
//! * **Read from the database on scrape** by [`Metrics::collect`]: queue
//!   depths, consumer-group lag, replication slots, the xmin horizon. One
//!   statement per family, pipelined on one pooled connection, none of
//!   them per row of anything (see each name for what it costs and means).
//!
//! ```no_run
//! # async fn demo() -> Result<(), pg_pubsub::Error> {
//! // First, before any handle: the process-wide recorder.
//! let prometheus = pg_pubsub::metrics::install_prometheus()?;
//! let pubsub = pg_pubsub::PgPubSub::connect("postgres://postgres@localhost/postgres").await?;
//! // ... listen, publish, run workers ...
//! // In the `/metrics` route: the database gauges, then everything as text.
//! let text = pg_pubsub::metrics::render(&pubsub, &prometheus).await?;
//! # let _ = text; Ok(()) }
//! ```
//!
//! With another recorder (a StatsD or OpenTelemetry bridge, or a
//! Prometheus recorder of your own), call [`describe`] once after
//! installing it, and [`Metrics::collect`] before each export.
//!
//! Without the feature nothing is recorded and the recording points
//! compile to nothing.

mod store;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ::metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
pub use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::client::PgPubSub;
use crate::error::{Error, Origin, Result};
use crate::schema::SchemaName;
use store::{Sql, LAG_CAP, OLDEST_XMIN, SLOTS};
use tokio_postgres::types::Type;

/// The metric names, and what each one means.
pub mod names {
    /// Gauge: listener connections up now, summed over the process's
    /// [`PgPubSub`](crate::PgPubSub) handles (1 for the usual one handle;
    /// 0 while it reconnects).
    pub const LISTENER_CONNECTED: &str = "pgpubsub_listener_connected";
    /// Counter: times a listener connection was re-established after a loss.
    pub const LISTENER_RECONNECTS: &str = "pgpubsub_listener_reconnects_total";
    /// Counter `{channel}`: gap markers queued to the channel's
    /// subscriptions (a reconnect with two subscriptions counts two; gaps
    /// merged before the consumer read them count once), as
    /// [`ChannelStats::gaps`](crate::ChannelStats::gaps).
    pub const GAPS: &str = "pgpubsub_gaps_total";
    /// Counter `{channel}`: notifications the listener received for a
    /// channel it delivers (counted once however many subscriptions share it).
    pub const NOTIFICATIONS_RECEIVED: &str = "pgpubsub_notifications_received_total";
    /// Counter `{channel}`: messages dropped because a subscription's queue
    /// was full ([`Delivery::Lagged`](crate::Delivery::Lagged)).
    pub const LAGGED: &str = "pgpubsub_lagged_total";
    /// Counter `{channel}`: messages published on a durable channel by this
    /// process (in the caller's transaction: counted when the insert ran,
    /// even if that transaction then rolls back).
    pub const DURABLE_PUBLISHED: &str = "pgpubsub_durable_published_total";
    /// Counter `{channel,group}`: durable messages read for this process's
    /// consumers and handed to their streams (not yet acked).
    pub const DURABLE_DELIVERED: &str = "pgpubsub_durable_delivered_total";
    /// Counter `{queue}`: jobs whose handler returned `Ok` in this process.
    pub const QUEUE_JOBS_COMPLETED: &str = "pgpubsub_queue_jobs_completed_total";
    /// Counter `{queue}`: attempts whose handler returned an error or
    /// panicked in this process (retried or dead).
    pub const QUEUE_JOBS_FAILED: &str = "pgpubsub_queue_jobs_failed_total";
    /// Histogram `{queue}`: how long handlers ran, in seconds, whatever
    /// their outcome.
    pub const QUEUE_JOB_DURATION: &str = "pgpubsub_queue_job_duration_seconds";
    /// Counter `{slot}`: row changes (insert, update, delete, truncate)
    /// decoded by this process's WAL feeds.
    pub const WAL_CHANGES: &str = "pgpubsub_wal_changes_total";
    /// Counter `{relay}`: messages a relay published and its broker
    /// confirmed (the relay's throughput is its rate).
    pub const RELAY_MESSAGES: &str = "pgpubsub_relay_messages_total";
    /// Counter `{relay}`: messages a relay moved to its dead-letter channel.
    pub const RELAY_DEAD_LETTERED: &str = "pgpubsub_relay_dead_lettered_total";
    /// Counter `{relay}`: publishes a relay retried (the broker was down or
    /// did not confirm).
    pub const RELAY_RETRIES: &str = "pgpubsub_relay_retries_total";
    /// Gauge `{relay}`: seconds from the publish (or commit) of the newest
    /// message a relay settled to the broker's confirm: how far behind the
    /// relay is.
    pub const RELAY_LAG_SECONDS: &str = "pgpubsub_relay_lag_seconds";

    /// Gauge `{queue,state}` (on scrape): jobs per state: `ready` (due
    /// now), `scheduled` (due later, or retrying after a backoff),
    /// `running` (claimed), `dead` (kept in `dead_jobs`). Exact; one pass
    /// over the live and the dead jobs.
    pub const QUEUE_JOBS: &str = "pgpubsub_queue_jobs";
    /// Gauge `{queue}` (on scrape): how long the oldest due job has been
    /// due, in seconds; 0 when none is.
    pub const QUEUE_OLDEST_READY: &str = "pgpubsub_queue_oldest_ready_seconds";
    /// Gauge `{channel,group}` (on scrape): messages the group has not
    /// acked, as [`GroupInfo::lag_messages`](crate::durable::GroupInfo::lag_messages)
    /// counts them, but reading at most 10,000 messages per group: exact
    /// below that, **a lower bound** above it (the scan starts at the
    /// oldest transaction the group's batch could have left behind, so a
    /// writer transaction open for long also makes it one).
    pub const DURABLE_GROUP_LAG_MESSAGES: &str = "pgpubsub_durable_group_lag_messages";
    /// Gauge `{channel,group}` (on scrape): age of the group's oldest
    /// unacked message (among those counted), in seconds; 0 when caught up.
    pub const DURABLE_GROUP_LAG_SECONDS: &str = "pgpubsub_durable_group_lag_seconds";
    /// Gauge `{slot}` (on scrape): bytes of WAL a replication slot holds
    /// back (from its confirmed position, or its restart position for a
    /// physical slot). Every slot of the cluster.
    pub const WAL_SLOT_LAG_BYTES: &str = "pgpubsub_wal_slot_lag_bytes";
    /// Gauge `{slot}` (on scrape): 1 while a stream uses the slot, else 0.
    pub const WAL_SLOT_ACTIVE: &str = "pgpubsub_wal_slot_active";
    /// Gauge (on scrape): seconds the oldest open transaction of the
    /// database (or prepared transaction) has been holding back the xmin
    /// horizon; 0 when none. Other roles' sessions need
    /// `pg_read_all_stats` to be seen.
    pub const OLDEST_XMIN: &str = "pgpubsub_oldest_xmin_seconds";
}

/// Bucket bounds of [`names::QUEUE_JOB_DURATION`] in
/// [`prometheus_builder`], in seconds.
pub const JOB_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A [`PrometheusBuilder`] with this crate's settings (job durations as a
/// histogram with [`JOB_DURATION_BUCKETS`] rather than a summary), to add
/// your own settings to before installing it.
pub fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(names::QUEUE_JOB_DURATION.to_owned()),
            JOB_DURATION_BUCKETS,
        )
        // Only fails for an empty list of buckets.
        .unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Installs [`prometheus_builder`]'s recorder as the process's recorder
/// (the `metrics` facade has one per process, set once) and
/// [`describe`]s this crate's metrics. Call it before making any handle.
/// Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) when a
/// recorder is installed already.
pub fn install_prometheus() -> Result<PrometheusHandle> {
    let handle = prometheus_builder().install_recorder().map_err(|e| {
        Error::new(
            Origin::Config,
            format!("installing the Prometheus recorder: {e}"),
        )
        .with_source(e)
    })?;
    describe();
    Ok(handle)
}

/// Gives the installed recorder each metric's help text and unit (the
/// `# HELP` lines). [`install_prometheus`] does it; call it yourself after
/// installing another recorder.
pub fn describe() {
    use names::*;
    describe_gauge!(LISTENER_CONNECTED, "Listener connections up now");
    describe_counter!(
        LISTENER_RECONNECTS,
        "Listener connections re-established after a loss"
    );
    describe_counter!(GAPS, "Gap markers queued to subscriptions");
    describe_counter!(
        NOTIFICATIONS_RECEIVED,
        "Notifications received for delivered channels"
    );
    describe_counter!(LAGGED, "Messages dropped because a subscription was full");
    describe_counter!(DURABLE_PUBLISHED, "Durable messages published");
    describe_counter!(DURABLE_DELIVERED, "Durable messages handed to consumers");
    describe_counter!(QUEUE_JOBS_COMPLETED, "Jobs whose handler succeeded");
    describe_counter!(QUEUE_JOBS_FAILED, "Job attempts that failed");
    describe_histogram!(
        QUEUE_JOB_DURATION,
        Unit::Seconds,
        "How long job handlers ran"
    );
    describe_counter!(WAL_CHANGES, "Row changes decoded by WAL feeds");
    describe_counter!(
        RELAY_MESSAGES,
        "Messages relayed and confirmed by the broker"
    );
    describe_counter!(
        RELAY_DEAD_LETTERED,
        "Messages relays moved to their dead-letter channel"
    );
    describe_counter!(RELAY_RETRIES, "Relay publishes retried");
    describe_gauge!(
        RELAY_LAG_SECONDS,
        Unit::Seconds,
        "Publish-to-confirm time of the newest message a relay settled"
    );
    describe_gauge!(QUEUE_JOBS, "Jobs per queue and state");
    describe_gauge!(
        QUEUE_OLDEST_READY,
        Unit::Seconds,
        "How long the oldest due job has waited"
    );
    describe_gauge!(
        DURABLE_GROUP_LAG_MESSAGES,
        "Messages a consumer group has not acked (at most 10000 counted)"
    );
    describe_gauge!(
        DURABLE_GROUP_LAG_SECONDS,
        Unit::Seconds,
        "Age of a consumer group's oldest unacked message"
    );
    describe_gauge!(
        WAL_SLOT_LAG_BYTES,
        Unit::Bytes,
        "WAL held back by a replication slot"
    );
    describe_gauge!(WAL_SLOT_ACTIVE, "Whether a stream uses the slot");
    describe_gauge!(
        OLDEST_XMIN,
        Unit::Seconds,
        "Age of the oldest transaction holding back the xmin horizon"
    );
}

/// Collects the database gauges with `pubsub`'s default schema, then
/// renders everything `prometheus` holds as Prometheus text: what a
/// `/metrics` route answers. See [`Metrics::render`].
pub async fn render(pubsub: &PgPubSub, prometheus: &PrometheusHandle) -> Result<String> {
    pubsub.metrics().render(prometheus).await
}

/// The `state` label values of [`names::QUEUE_JOBS`], in the order of the
/// jobs statement's columns.
const STATES: [&str; 4] = ["ready", "scheduled", "running", "dead"];

/// The label sets a handle reported at its last collect, per schema, so a
/// queue, group or slot that vanished is set to 0 once rather than keep
/// its last value.
#[derive(Default)]
pub(crate) struct Reported(Mutex<std::collections::HashMap<SchemaName, Seen>>);

#[derive(Default)]
struct Seen {
    queues: HashSet<String>,
    groups: HashSet<(String, String)>,
    slots: HashSet<String>,
}

/// Reads the database-wide gauges of one schema on demand, from
/// [`PgPubSub::metrics`]. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pubsub: PgPubSub,
    schema: SchemaName,
    sql: Arc<Sql>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("schema", &self.schema)
            .finish()
    }
}

impl PgPubSub {
    /// The database gauges of the default schema (`pgpubsub`); see
    /// [`crate::metrics`].
    pub fn metrics(&self) -> Metrics {
        Metrics::new(self.clone(), SchemaName::default())
    }
}

/// Rows of a statement, or none when `skip` (its tables are not there).
/// Unnamed behind a pooler in transaction mode (a statement cached on the
/// pooled client would be missing on the next server connection).
async fn rows(
    tx: &deadpool_postgres::Transaction<'_>,
    unnamed: bool,
    skip: bool,
    sql: &str,
    params: &crate::tx::Params<'_>,
    origin: Origin,
    stage: &str,
) -> Result<Vec<tokio_postgres::Row>> {
    if skip {
        return Ok(Vec::new());
    }
    let run = async {
        if unnamed {
            let plain: &tokio_postgres::Transaction<'_> = tx;
            crate::tx::query(plain, sql, params).await
        } else {
            crate::tx::query(tx, sql, params).await
        }
    };
    run.await.map_err(|e| Error::pg(origin, stage, e))
}

impl Metrics {
    fn new(pubsub: PgPubSub, schema: SchemaName) -> Metrics {
        Metrics {
            sql: Arc::new(Sql::new(&schema)),
            pubsub,
            schema,
        }
    }

    /// The same gauges for another `schema` (a lowercase identifier of at
    /// most 40 bytes). Its series carry no schema label: collect one
    /// schema per recorder, or tell them apart with a global label.
    pub fn with_schema(&self, schema: &str) -> Result<Metrics> {
        Ok(Metrics::new(self.pubsub.clone(), SchemaName::new(schema)?))
    }

    /// The schema.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Reads the database-wide gauges and sets them through the installed
    /// recorder: [`names::QUEUE_JOBS`], [`names::QUEUE_OLDEST_READY`],
    /// [`names::DURABLE_GROUP_LAG_MESSAGES`],
    /// [`names::DURABLE_GROUP_LAG_SECONDS`], [`names::WAL_SLOT_LAG_BYTES`],
    /// [`names::WAL_SLOT_ACTIVE`], [`names::OLDEST_XMIN`]. One pooled
    /// connection, within the notify timeout: a read-only transaction
    /// that checks which tables exist (and turns JIT off: compiling the
    /// plan of many groups costs more than running it), then the four
    /// statements pipelined. Never installs the schema (not installed: no
    /// queue or group series).
    /// A queue, group or slot reported by the previous collect of this
    /// [`PgPubSub`] and gone now is set to 0 (the recorder keeps every
    /// series it saw; see `PrometheusBuilder::idle_timeout` to drop them).
    pub async fn collect(&self) -> Result<()> {
        let sql = &*self.sql;
        let (jobs, groups, slots, xmin) = self
            .pubsub
            .exec()
            .run_with("collecting metrics", |mut c| async move {
                const STAGE: &str = "metrics: starting";
                let pg = |origin, stage| move |e| Error::pg(origin, stage, e);
                let unnamed = c.unnamed();
                let tx = c
                    .build_transaction()
                    .read_only(true)
                    .start()
                    .await
                    .map_err(pg(Origin::Queue, STAGE))?;
                // No JIT: compiling the plans of many groups costs more
                // than running them; and no rows for tables not installed.
                let (jobs_table, groups_table) = (&sql.jobs_table, &sql.groups_table);
                let found = tx
                    .query_typed_one(
                        "SELECT set_config('jit', 'off', true), \
                         to_regclass($1::text) IS NULL, to_regclass($2::text) IS NULL",
                        &[(jobs_table, Type::TEXT), (groups_table, Type::TEXT)],
                    )
                    .await
                    .map_err(pg(Origin::Queue, STAGE))?;
                let (no_jobs, no_groups): (bool, bool) = (found.get(1), found.get(2));
                let cap: &crate::tx::Params = &[(&LAG_CAP, Type::INT8)];
                let got = futures::try_join!(
                    rows(
                        &tx,
                        unnamed,
                        no_jobs,
                        &sql.jobs,
                        &[],
                        Origin::Queue,
                        "metrics: queue jobs"
                    ),
                    rows(
                        &tx,
                        unnamed,
                        no_groups,
                        &sql.groups,
                        cap,
                        Origin::Durable,
                        "metrics: durable group lag"
                    ),
                    rows(
                        &tx,
                        unnamed,
                        false,
                        SLOTS,
                        &[],
                        Origin::Wal,
                        "metrics: replication slots"
                    ),
                    rows(
                        &tx,
                        unnamed,
                        false,
                        OLDEST_XMIN,
                        &[],
                        Origin::Queue,
                        "metrics: xmin horizon"
                    ),
                )?;
                // Read only: ending it either way is the same.
                tx.commit().await.map_err(pg(Origin::Queue, STAGE))?;
                Ok(got)
            })
            .await?;
        let mut now = Seen::default();
        for r in &jobs {
            let queue: String = r.get(0);
            for (i, state) in STATES.iter().enumerate() {
                let n: i64 = r.get(i + 1);
                gauge!(names::QUEUE_JOBS, "queue" => queue.clone(), "state" => *state)
                    .set(n.max(0) as f64);
            }
            gauge!(names::QUEUE_OLDEST_READY, "queue" => queue.clone())
                .set(r.get::<_, f64>(5).max(0.0));
            now.queues.insert(queue);
        }
        for r in &groups {
            let (channel, group): (String, String) = (r.get(0), r.get(1));
            let labels = [("channel", channel.clone()), ("group", group.clone())];
            gauge!(names::DURABLE_GROUP_LAG_MESSAGES, &labels).set(r.get::<_, i64>(2) as f64);
            gauge!(names::DURABLE_GROUP_LAG_SECONDS, &labels).set(r.get::<_, f64>(3).max(0.0));
            now.groups.insert((channel, group));
        }
        for r in &slots {
            let slot: String = r.get(0);
            let active: bool = r.get(1);
            gauge!(names::WAL_SLOT_LAG_BYTES, "slot" => slot.clone())
                .set(r.get::<_, i64>(2).max(0) as f64);
            gauge!(names::WAL_SLOT_ACTIVE, "slot" => slot.clone()).set(u8::from(active));
            now.slots.insert(slot);
        }
        let oldest = xmin.first().map_or(0.0, |r| r.get::<_, f64>(0).max(0.0));
        gauge!(names::OLDEST_XMIN).set(oldest);
        self.forget(now);
        Ok(())
    }

    /// Sets to 0 what the previous collect reported and this one did not,
    /// and remembers this one's.
    fn forget(&self, now: Seen) {
        let mut all = self
            .pubsub
            .inner
            .metrics_reported
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(before) = all.remove(&self.schema) {
            for queue in before.queues.difference(&now.queues) {
                for state in STATES {
                    gauge!(names::QUEUE_JOBS, "queue" => queue.clone(), "state" => state).set(0);
                }
                gauge!(names::QUEUE_OLDEST_READY, "queue" => queue.clone()).set(0);
            }
            for (channel, group) in before.groups.difference(&now.groups) {
                let labels = [("channel", channel.clone()), ("group", group.clone())];
                gauge!(names::DURABLE_GROUP_LAG_MESSAGES, &labels).set(0);
                gauge!(names::DURABLE_GROUP_LAG_SECONDS, &labels).set(0);
            }
            for slot in before.slots.difference(&now.slots) {
                gauge!(names::WAL_SLOT_LAG_BYTES, "slot" => slot.clone()).set(0);
                gauge!(names::WAL_SLOT_ACTIVE, "slot" => slot.clone()).set(0);
            }
        }
        all.insert(self.schema.clone(), now);
    }

    /// [`collect`](Self::collect), then everything `prometheus` holds
    /// (this crate's metrics and any others of the program) as Prometheus
    /// text, for a `/metrics` route. Fails, rendering nothing, when the
    /// database gauges cannot be read (the route answers an error and the
    /// scrape is marked down).
    pub async fn render(&self, prometheus: &PrometheusHandle) -> Result<String> {
        self.collect().await?;
        // No exporter task runs the recorder's upkeep (idle series,
        // histogram buffers): each scrape does.
        prometheus.run_upkeep();
        Ok(prometheus.render())
    }
}
