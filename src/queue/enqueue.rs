//! Enqueueing: one job, a batch, or inside the caller's transaction, each
//! a request ([`Enqueue`], [`EnqueueBatch`]) whose options are set before
//! it is awaited.

use std::borrow::Cow;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use tokio_postgres::types::{ToSql, Type};

use super::{check_queue, Queue};
use crate::error::{Error, Origin, Result};
use crate::payload::Encode;
use crate::tx::Executor;

/// Attempts before a job is dead, unless its options say otherwise; the
/// jobs table's column default too.
const DEFAULT_MAX_ATTEMPTS: i32 = 25;

/// Jobs per `enqueue_many` statement in [`Queue::enqueue_batch`].
const BATCH_SIZE: usize = 1000;

/// The options of one enqueue request. The default: due now, priority 0,
/// 25 attempts, no unique key.
#[derive(Debug, Clone, Default)]
struct JobOptions {
    run_at: Option<SystemTime>,
    delay: Option<Duration>,
    priority: i16,
    max_attempts: Option<i32>,
    unique_key: Option<String>,
    key: Option<String>,
}

impl JobOptions {
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
        if self.key.as_deref().is_some_and(|k| k.contains('\0')) {
            return Err(Error::new(Origin::Config, "job key contains a NUL byte"));
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
            && self.key.is_none()
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
            "INSERT INTO {jobs} (queue, payload, run_at, priority, max_attempts, unique_key, \
             concurrency_key) \
             VALUES ($1, $2, coalesce($3::timestamptz, now() + make_interval(secs => $4::float8)), \
             $5::int2, $6::int4, $7::text, $8::text) {} RETURNING id{notify}",
            if options.unique_key.is_some() {
                "ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL DO NOTHING"
            } else {
                ""
            },
        )
    }

    /// Enqueues `payload` on `queue`: `&value` for any `serde` type (stored
    /// as JSON), or [`Text`](crate::Text) (stored as is, any text without
    /// NUL). Set options on the returned [`Enqueue`], then await it: the
    /// job is committed in a transaction of its own.
    ///
    /// ```no_run
    /// # async fn demo(queue: pg_pubsub::queue::Queue) -> Result<(), pg_pubsub::Error> {
    /// use std::time::Duration;
    /// let email = serde_json::json!({"to": "a@b"});
    /// queue.enqueue("emails", &email).await?;
    /// queue
    ///     .enqueue("emails", &email)
    ///     .delay(Duration::from_secs(60))
    ///     .priority(5)
    ///     .unique_key("welcome:a@b")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn enqueue<'a, P: Encode>(&'a self, queue: &'a str, payload: P) -> Enqueue<'a, P> {
        Enqueue::new(Cow::Borrowed(self), queue, payload, OwnTransaction)
    }

    /// Enqueues `payload` (as in [`enqueue`](Self::enqueue)) inside the
    /// caller's transaction: the job exists (and workers are woken) if it
    /// commits, never if it rolls back. The schema must be installed
    /// already ([`install`](Self::install)).
    pub fn enqueue_tx<'a, E, P>(
        &'a self,
        tx: &'a E,
        queue: &'a str,
        payload: P,
    ) -> Enqueue<'a, P, &'a E>
    where
        E: Executor + ?Sized,
        P: Encode,
    {
        Enqueue::new(Cow::Borrowed(self), queue, payload, tx)
    }

    /// Enqueues many payloads on `queue` (each as in
    /// [`enqueue`](Self::enqueue)) with the same options, a thousand per
    /// statement and transaction, one wake-up per transaction. Awaiting the
    /// returned [`EnqueueBatch`] gives how many were enqueued; an error says
    /// how many were before it. There is no unique key here: enqueue such
    /// jobs one by one.
    pub fn enqueue_batch<'a, I>(&'a self, queue: &'a str, payloads: I) -> EnqueueBatch<'a, I>
    where
        I: IntoIterator,
        I::Item: Encode,
    {
        Enqueue::new(Cow::Borrowed(self), queue, Batch(payloads), OwnTransaction)
    }

    async fn enqueue_pooled(
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
                let p = params(queue, payload, options);
                let all = p.typed();
                let typed = if lean { &all[..2] } else { &all[..] };
                let rows = client.query_p(&sql, typed).await?;
                Ok(rows.first().map(|row| row.get::<_, i64>(0)))
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

    async fn enqueue_in<E: Executor + ?Sized>(
        &self,
        tx: &E,
        queue: &str,
        payload: &str,
        options: &JobOptions,
    ) -> Result<Enqueued> {
        check_queue(queue)?;
        check_payload(payload)?;
        options.check()?;
        let p = params(queue, payload, options);
        let typed = p.typed();
        if options.key.is_some() {
            // The `enqueue` SQL function has no key (its signature stays
            // what older builds call): the same insert as a statement.
            let sql = self.insert_sql(options, false, options.due_now());
            let rows = crate::tx::query(tx, &sql, &typed)
                .await
                .map_err(|e| Error::pg(Origin::Queue, "enqueue in transaction", e))?;
            return Ok(enqueued(rows.first().map(|row| row.get::<_, i64>(0))));
        }
        let rows = crate::tx::query(tx, &self.enqueue_sql(), &typed[..7])
            .await
            .map_err(|e| Error::pg(Origin::Queue, "enqueue in transaction", e))?;
        // `SELECT enqueue(..)`: one row, the id (NULL: unique key taken).
        let row = rows
            .first()
            .ok_or_else(|| Error::new(Origin::Queue, "enqueue in transaction returned no row"))?;
        Ok(enqueued(row.get::<_, Option<i64>>(0)))
    }

    async fn enqueue_many<P: Encode>(
        &self,
        queue: &str,
        items: Vec<P>,
        options: &JobOptions,
    ) -> Result<usize> {
        check_queue(queue)?;
        options.check()?;
        let texts = items
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.encode()
                    .and_then(|text| check_payload(&text).map(|()| text))
                    .map_err(|e| e.context(format!("payload #{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let sql = format!(
            "SELECT {}($1, $2, coalesce($3::timestamptz, now() + make_interval(secs => $4::float8)), \
             $5::int2, $6::int4)",
            self.obj("enqueue_many")
        );
        let mut sent = 0;
        for chunk in texts.chunks(BATCH_SIZE) {
            let texts: Vec<&str> = chunk.iter().map(AsRef::as_ref).collect();
            let sql = &sql;
            self.with_client("enqueue_batch", |client| async move {
                let delay = options.delay_secs().unwrap_or(0.0);
                let attempts = options.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
                client
                    .execute_p(
                        sql,
                        &[
                            (&queue, Type::TEXT),
                            (&texts, Type::TEXT_ARRAY),
                            (&options.run_at, Type::TIMESTAMPTZ),
                            (&delay, Type::FLOAT8),
                            (&options.priority, Type::INT2),
                            (&attempts, Type::INT4),
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

/// Where an [`Enqueue`] writes its job: in a transaction of its own
/// ([`Queue::enqueue`]), or in the caller's (`&E`, [`Queue::enqueue_tx`]).
#[derive(Debug, Clone, Copy)]
pub struct OwnTransaction;

/// One job to enqueue, from [`Queue::enqueue`] or [`Queue::enqueue_tx`]
/// (or many: [`EnqueueBatch`]): set its options, then `.await` it for what
/// it did ([`Enqueued`]; for a batch, how many were enqueued).
#[must_use = "an enqueue does nothing until it is awaited"]
pub struct Enqueue<'a, P, X = OwnTransaction> {
    queue: Cow<'a, Queue>,
    name: &'a str,
    payload: P,
    options: JobOptions,
    target: X,
}

/// The payloads of an [`EnqueueBatch`].
#[derive(Debug)]
pub struct Batch<I>(I);

/// Many jobs to enqueue with the same options, from
/// [`Queue::enqueue_batch`]: an [`Enqueue`] without
/// [`unique_key`](Enqueue::unique_key).
pub type EnqueueBatch<'a, I> = Enqueue<'a, Batch<I>>;

impl<'a, P, X> Enqueue<'a, P, X> {
    pub(super) fn new(queue: Cow<'a, Queue>, name: &'a str, payload: P, target: X) -> Self {
        Enqueue {
            queue,
            name,
            payload,
            options: JobOptions::default(),
            target,
        }
    }

    /// Not before this time (the server's clock decides when it is due).
    /// Replaces any [`delay`](Self::delay).
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.options.run_at = Some(at);
        self.options.delay = None;
        self
    }

    /// Not before this long after the start of the enqueueing transaction
    /// (the server's `now()`). Replaces any [`run_at`](Self::run_at).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = Some(delay);
        self.options.run_at = None;
        self
    }

    /// Higher runs first among due jobs of a queue. Default 0.
    pub fn priority(mut self, priority: i16) -> Self {
        self.options.priority = priority;
        self
    }

    /// Attempts before the job is dead (at least 1). Default 25.
    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.options.max_attempts = Some(attempts);
        self
    }
}

impl<P: Encode, X> Enqueue<'_, P, X> {
    /// While a job of the queue with this key is ready or running,
    /// enqueueing another with the same key does nothing and gives
    /// [`Enqueued::Duplicate`]. Not for batches.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.options.unique_key = Some(key.into());
        self
    }

    /// The job's key for the queue's per-key limit
    /// ([`Limits::per_key`](super::Limits::per_key)): at most that many
    /// jobs with the same key run at once (with 1, one at a time in claim
    /// order). No effect on a queue without that limit.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.options.key = Some(key.into());
        self
    }
}

impl<'a, P: Encode + Send + 'a> IntoFuture for Enqueue<'a, P, OwnTransaction> {
    type Output = Result<Enqueued>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let payload = self.payload.encode()?;
            self.queue
                .enqueue_pooled(self.name, &payload, &self.options)
                .await
        })
    }
}

impl<'a, P, E> IntoFuture for Enqueue<'a, P, &'a E>
where
    P: Encode + Send + 'a,
    E: Executor + ?Sized,
{
    type Output = Result<Enqueued>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let payload = self.payload.encode()?;
            self.queue
                .enqueue_in(self.target, self.name, &payload, &self.options)
                .await
        })
    }
}

impl<'a, I> IntoFuture for EnqueueBatch<'a, I>
where
    I: IntoIterator,
    I::Item: Encode + Send + 'a,
{
    type Output = Result<usize>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        // Collected here: the future holds the items, not the iterator.
        let items: Vec<I::Item> = self.payload.0.into_iter().collect();
        Box::pin(async move {
            self.queue
                .enqueue_many(self.name, items, &self.options)
                .await
        })
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
    key: Option<&'a str>,
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
        key: o.key.as_deref(),
    }
}

impl Params<'_> {
    /// The parameters of [`Queue::insert_sql`] with their types (the
    /// first seven: [`Queue::enqueue_sql`]'s).
    fn typed(&self) -> [(&(dyn ToSql + Sync), Type); 8] {
        [
            (&self.queue, Type::TEXT),
            (&self.payload, Type::TEXT),
            (&self.run_at, Type::TIMESTAMPTZ),
            (&self.delay, Type::FLOAT8),
            (&self.priority, Type::INT2),
            (&self.max_attempts, Type::INT4),
            (&self.unique_key, Type::TEXT),
            (&self.key, Type::TEXT),
        ]
    }
}
