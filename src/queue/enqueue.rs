//! Enqueueing: one job, a batch, or inside the caller's transaction.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};

use super::{check_queue, Queue};
use crate::error::{Error, Origin, Result};
use crate::publish::to_json;
use crate::tx::Executor;

/// Attempts before a job is dead, unless its options say otherwise; the
/// jobs table's column default too.
const DEFAULT_MAX_ATTEMPTS: i32 = 25;

/// Jobs per `enqueue_many` statement in [`Queue::enqueue_batch`].
const BATCH_SIZE: usize = 1000;

/// Options for one enqueue. The default: due now, priority 0, 25 attempts,
/// no unique key.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    run_at: Option<SystemTime>,
    delay: Option<Duration>,
    priority: i16,
    max_attempts: Option<i32>,
    unique_key: Option<String>,
}

impl JobOptions {
    /// The default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Not before this time (the server's clock decides when it is due).
    /// Replaces any [`delay`](Self::delay).
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }

    /// Not before this long after the start of the enqueueing transaction
    /// (the server's `now()`). Replaces any [`run_at`](Self::run_at).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.run_at = None;
        self
    }

    /// Higher runs first among due jobs of a queue. Default 0.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Attempts before the job is dead (at least 1). Default 25.
    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// While a job of the queue with this key is ready or running, enqueueing
    /// another with the same key does nothing and returns [`Enqueued::Duplicate`].
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    fn check(&self) -> Result<()> {
        if self.max_attempts.is_some_and(|n| n < 1) {
            return Err(Error::new(
                Origin::Config,
                "max_attempts must be at least 1",
            ));
        }
        if self.unique_key.as_deref().is_some_and(|k| k.contains('\0')) {
            return Err(Error::new(Origin::Config, "unique key contains a NUL byte"));
        }
        Ok(())
    }

    /// Due at once by this process's clock (a wrong guess only costs a
    /// spurious wake-up, or a poll interval).
    fn due_now(&self) -> bool {
        self.delay.is_none_or(|d| d.is_zero())
            && self.run_at.is_none_or(|at| at <= SystemTime::now())
    }

    /// Every option at its default, which the jobs table's column
    /// defaults give too.
    fn is_default(&self) -> bool {
        self.run_at.is_none()
            && self.delay.is_none_or(|d| d.is_zero())
            && self.priority == 0
            && self.max_attempts.is_none_or(|n| n == DEFAULT_MAX_ATTEMPTS)
            && self.unique_key.is_none()
    }

    fn delay_secs(&self) -> Option<f64> {
        self.delay.map(|d| d.as_secs_f64())
    }
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Enqueued {
    /// A new job, with its id.
    New(i64),
    /// Nothing: a ready or running job of the queue holds the unique key.
    Duplicate,
}

impl Enqueued {
    /// The new job's id; `None` for a duplicate.
    pub fn id(self) -> Option<i64> {
        match self {
            Enqueued::New(id) => Some(id),
            Enqueued::Duplicate => None,
        }
    }
}

fn check_payload(payload: &str) -> Result<()> {
    if payload.contains('\0') {
        return Err(Error::new(Origin::Limit, "job payload contains a NUL byte"));
    }
    Ok(())
}

impl Queue {
    fn enqueue_sql(&self) -> String {
        // The delay is added to the server's now(): no clock skew between
        // the enqueuer and the database.
        format!(
            "SELECT {}($1, $2, coalesce($3::timestamptz, now() + make_interval(secs => $4::float8)), \
             $5::int2, $6::int4, $7::text)",
            self.obj("enqueue")
        )
    }

    /// The `enqueue` SQL function's insert without the function (a
    /// PL/pgSQL call costs about as much as the insert) and without a
    /// data-modifying CTE (a tenth). `lean` (default options): only `$1,
    /// $2` are sent and the table's defaults fill the rest (another tenth of a
    /// one-job enqueue). `ON CONFLICT` only with a key: a speculative
    /// insertion costs too. With `notify`, the wake-up is sent in the
    /// transaction (when nothing else of the handle is being published: see
    /// `wake.rs`); a duplicate inserts no row and sends none.
    fn insert_sql(&self, options: &JobOptions, lean: bool, notify: bool) -> String {
        let notify = if notify {
            format!(", pg_notify('{}', $1)", self.schema.jobs_channel())
        } else {
            String::new()
        };
        let jobs = self.obj("jobs");
        if lean {
            return format!(
                "INSERT INTO {jobs} (queue, payload) VALUES ($1, $2) RETURNING id{notify}"
            );
        }
        format!(
            "INSERT INTO {jobs} (queue, payload, run_at, priority, max_attempts, unique_key) \
             VALUES ($1, $2, coalesce($3::timestamptz, now() + make_interval(secs => $4::float8)), \
             $5::int2, $6::int4, $7::text) {} RETURNING id{notify}",
            if options.unique_key.is_some() {
                "ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING"
            } else {
                ""
            },
        )
    }

    /// Enqueues `value` as JSON on `queue`, in a transaction of its own.
    pub async fn enqueue<T: Serialize + ?Sized>(&self, queue: &str, value: &T) -> Result<Enqueued> {
        self.enqueue_raw_with(queue, &to_json(value)?, &JobOptions::default())
            .await
    }

    /// [`enqueue`](Self::enqueue) with options.
    pub async fn enqueue_with<T: Serialize + ?Sized>(
        &self,
        queue: &str,
        value: &T,
        options: &JobOptions,
    ) -> Result<Enqueued> {
        self.enqueue_raw_with(queue, &to_json(value)?, options)
            .await
    }

    /// Enqueues `payload` as is (any text without NUL).
    pub async fn enqueue_raw(&self, queue: &str, payload: &str) -> Result<Enqueued> {
        self.enqueue_raw_with(queue, payload, &JobOptions::default())
            .await
    }

    /// [`enqueue_raw`](Self::enqueue_raw) with options.
    pub async fn enqueue_raw_with(
        &self,
        queue: &str,
        payload: &str,
        options: &JobOptions,
    ) -> Result<Enqueued> {
        check_queue(queue)?;
        check_payload(payload)?;
        options.check()?;
        let publishing = self.pubsub.inner.wakes.start_publish();
        let now = publishing.alone() && options.due_now();
        let lean = options.is_default();
        let sql = self.insert_sql(options, lean, now);
        let done = self
            .with_client("enqueue", |client| async move {
                let stmt = client.prepare_cached(&sql).await?;
                let p = params(queue, payload, options);
                let all = p.as_refs();
                let refs = if lean { &all[..2] } else { &all[..] };
                let row = client.query_opt(&stmt, refs).await?;
                Ok(row.map(|row| row.get::<_, i64>(0)))
            })
            .await
            .map(enqueued)?;
        drop(publishing);
        // Committed: the wake-up follows, merged with concurrent enqueuers'.
        if done.id().is_some() && options.due_now() && !now {
            self.pubsub
                .inner
                .wakes
                .wake_after_commit(self.schema.jobs_channel(), queue.to_owned());
        }
        Ok(done)
    }

    /// Enqueues `value` as JSON inside the caller's transaction: the job
    /// exists (and workers are woken) if it commits, never if it rolls
    /// back. The schema must be installed already ([`install`](Self::install)).
    pub async fn enqueue_tx<E, T>(
        &self,
        tx: &E,
        queue: &str,
        value: &T,
        options: &JobOptions,
    ) -> Result<Enqueued>
    where
        E: Executor + ?Sized,
        T: Serialize + ?Sized,
    {
        self.enqueue_raw_tx(tx, queue, &to_json(value)?, options)
            .await
    }

    /// [`enqueue_tx`](Self::enqueue_tx) with a text payload.
    pub async fn enqueue_raw_tx<E: Executor + ?Sized>(
        &self,
        tx: &E,
        queue: &str,
        payload: &str,
        options: &JobOptions,
    ) -> Result<Enqueued> {
        check_queue(queue)?;
        check_payload(payload)?;
        options.check()?;
        let rows = crate::tx::query(
            tx,
            &self.enqueue_sql(),
            &params(queue, payload, options).typed(),
        )
        .await
        .map_err(|e| Error::pg(Origin::Queue, "enqueue in transaction", e))?;
        // `SELECT enqueue(..)`: one row, the id (NULL: unique key taken).
        let row = rows
            .first()
            .ok_or_else(|| Error::new(Origin::Queue, "enqueue in transaction returned no row"))?;
        Ok(enqueued(row.get::<_, Option<i64>>(0)))
    }

    /// Enqueues many text payloads on `queue` with the same options (a
    /// unique key is not allowed here), a thousand per statement and
    /// transaction, one wake-up per transaction. Returns how many were
    /// enqueued; an error says how many were before it.
    pub async fn enqueue_batch<I, S>(
        &self,
        queue: &str,
        payloads: I,
        options: &JobOptions,
    ) -> Result<usize>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        check_queue(queue)?;
        options.check()?;
        if options.unique_key.is_some() {
            return Err(Error::new(
                Origin::Config,
                "enqueue_batch takes no unique key; enqueue such jobs one by one",
            ));
        }
        let items: Vec<S> = payloads.into_iter().collect();
        for (i, p) in items.iter().enumerate() {
            check_payload(p.as_ref()).map_err(|e| e.context(format!("payload #{i}")))?;
        }
        let sql = format!(
            "SELECT {}($1, $2, coalesce($3::timestamptz, now() + make_interval(secs => $4::float8)), \
             $5::int2, $6::int4)",
            self.obj("enqueue_many")
        );
        let mut sent = 0;
        for chunk in items.chunks(BATCH_SIZE) {
            let texts: Vec<&str> = chunk.iter().map(AsRef::as_ref).collect();
            let sql = &sql;
            self.with_client("enqueue_batch", |client| async move {
                let stmt = client.prepare_cached(sql).await?;
                let delay = options.delay_secs().unwrap_or(0.0);
                let attempts = options.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
                client
                    .execute(
                        &stmt,
                        &[
                            &queue,
                            &texts,
                            &options.run_at,
                            &delay,
                            &options.priority,
                            &attempts,
                        ],
                    )
                    .await?;
                Ok(())
            })
            .await
            .map_err(|e| e.context(format!("{sent} were enqueued before it")))?;
            sent += chunk.len();
        }
        Ok(sent)
    }
}

fn enqueued(id: Option<i64>) -> Enqueued {
    id.map_or(Enqueued::Duplicate, Enqueued::New)
}

/// The parameters of the enqueue statement, owned so they can be borrowed
/// as `&[&dyn ToSql]`.
struct Params<'a> {
    queue: &'a str,
    payload: &'a str,
    run_at: Option<SystemTime>,
    delay: f64,
    priority: i16,
    max_attempts: i32,
    unique_key: Option<&'a str>,
}

fn params<'a>(queue: &'a str, payload: &'a str, o: &'a JobOptions) -> Params<'a> {
    Params {
        queue,
        payload,
        run_at: o.run_at,
        delay: o.delay_secs().unwrap_or(0.0),
        priority: o.priority,
        max_attempts: o.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        unique_key: o.unique_key.as_deref(),
    }
}

impl Params<'_> {
    /// The parameters of [`Queue::enqueue_sql`] with their types.
    fn typed(&self) -> [(&(dyn ToSql + Sync), Type); 7] {
        [
            (&self.queue, Type::TEXT),
            (&self.payload, Type::TEXT),
            (&self.run_at, Type::TIMESTAMPTZ),
            (&self.delay, Type::FLOAT8),
            (&self.priority, Type::INT2),
            (&self.max_attempts, Type::INT4),
            (&self.unique_key, Type::TEXT),
        ]
    }

    fn as_refs(&self) -> [&(dyn ToSql + Sync); 7] {
        self.typed().map(|(value, _)| value)
    }
}
