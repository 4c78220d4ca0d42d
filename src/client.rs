//! [`PgPubSub`], the handle, and its [`Builder`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use uuid::Uuid;

use crate::channel::ChannelName;
use crate::config::{Backoff, ListenOptions, Options};
use crate::connect::{SslMode, Target};
use crate::driver::{
    ChannelSet, Command, Driver, Endpoint, Leading, Mode, Shared, Status, CONTROL_CHANNEL,
};
use crate::error::{Error, Origin, Result};
use crate::event::EventStream;
use crate::inbox::Queue;
use crate::listen::Listen;
use crate::payload::Decode;
use crate::stats::{Board, Stats};
use crate::subscription::{Decoder, Subscription};
use crate::tls::Connector;

/// Anything that names a PostgreSQL server: a connection URL or key=value
/// string, or a [`tokio_postgres::Config`].
///
/// Strings may use libpq's `sslmode=verify-ca|verify-full` and
/// `sslrootcert=PATH`, which tokio-postgres alone rejects (see [`SslMode`]).
pub trait IntoConfig {
    /// Parses or converts. For a string, `sslmode` `verify-ca`/`verify-full`
    /// come out as `require`: use [`PgPubSub::builder`] to keep the verification.
    fn into_config(self) -> Result<tokio_postgres::Config>;

    #[doc(hidden)]
    fn into_target(self) -> Result<Target>
    where
        Self: Sized,
    {
        self.into_config().map(Target::from)
    }
}

impl IntoConfig for tokio_postgres::Config {
    fn into_config(self) -> Result<tokio_postgres::Config> {
        Ok(self)
    }
}

impl IntoConfig for &str {
    fn into_config(self) -> Result<tokio_postgres::Config> {
        self.into_target().map(|t| t.pg)
    }

    fn into_target(self) -> Result<Target> {
        Target::parse(self)
    }
}

impl IntoConfig for &String {
    fn into_config(self) -> Result<tokio_postgres::Config> {
        self.as_str().into_config()
    }

    fn into_target(self) -> Result<Target> {
        self.as_str().into_target()
    }
}

impl IntoConfig for String {
    fn into_config(self) -> Result<tokio_postgres::Config> {
        self.as_str().into_config()
    }

    fn into_target(self) -> Result<Target> {
        self.as_str().into_target()
    }
}

/// A handle to one listener connection and one publishing pool.
///
/// Cheap to clone; every clone talks to the same listener task. See the
/// [crate docs](crate) for an example.
#[derive(Clone)]
pub struct PgPubSub {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cmds: mpsc::UnboundedSender<Command>,
    /// Every pooled statement runs through it (and the shut-down flag is its).
    pub(crate) exec: crate::exec::Exec,
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) opts: Options,
    pub(crate) origin: Uuid,
    owns_pool: bool,
    /// The capability tasks started from this handle, stopped by `shutdown`.
    pub(crate) services: Arc<crate::service::Services>,
    /// The capabilities' own event streams.
    pub(crate) buses: crate::event::Buses,
    events: broadcast::Sender<crate::ConnectionEvent>,
    status: watch::Receiver<Status>,
    /// Channels this instance leads (read by durable readers too).
    pub(crate) leading: Leading,
    /// Channels with a filtered subscription: what this instance publishes
    /// there carries its origin.
    pub(crate) filtering: ChannelSet,
    board: Arc<Board>,
    next_id: AtomicU64,
    /// Behind a pooler in transaction mode: no LISTEN (see
    /// [`Builder::transaction_pooling`]).
    transaction_pooled: std::sync::atomic::AtomicBool,
    pub(crate) wakes: crate::wake::Wakes,
    /// Durable wake-ups, one subscription per schema, handed to each channel's readers.
    pub(crate) durable_wakeups: crate::durable::Dispatchers,
    /// What the last metrics collect reported, per schema.
    #[cfg(feature = "metrics")]
    pub(crate) metrics_reported: crate::metrics::Reported,
}

/// Configures and connects a [`PgPubSub`].
///
/// Precedence: an explicit call on the builder wins; otherwise what the URL
/// or [`tokio_postgres::Config`] sets (e.g. `?application_name=x&connect_timeout=2`);
/// otherwise the defaults documented on each method.
///
/// ```no_run
/// # async fn demo() -> Result<(), pg_pubsub::Error> {
/// use std::time::Duration;
/// let pubsub = pg_pubsub::PgPubSub::builder("postgres://app@db/app")?
///     .application_name("orders-service")
///     .health_check(Duration::from_secs(5), Duration::from_secs(2))
///     .queue_capacity(10_000)
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until .connect() is awaited"]
pub struct Builder {
    target: Target,
    pool: Option<Pool>,
    opts: Options,
    tls: Option<Connector>,
    explicit: Explicit,
}

/// Options set by a builder call, which win over the URL's.
#[derive(Debug, Default)]
struct Explicit {
    application_name: bool,
    connect_timeout: bool,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("Builder")
            .field("target", &self.target)
            .field("own_pool", &self.pool.is_some())
            .field("own_tls", &self.tls.is_some())
            .field("opts", &self.opts)
            .finish()
    }
}

impl Builder {
    /// Reconnect delays. Default: immediate, then 100 ms doubling to 10 s, jitter 0.3.
    /// Reconnecting never gives up.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.opts.backoff = backoff;
        self
    }

    /// How often the listener connection is checked with a round trip when
    /// idle, and how long any statement on it may take before the connection
    /// is declared dead and replaced. Default: every 10 s, 5 s timeout.
    /// TCP keepalives are also enabled on the listener connection.
    pub fn health_check(mut self, interval: Duration, timeout: Duration) -> Self {
        self.opts.health_check_interval = interval;
        self.opts.health_check_timeout = timeout;
        self
    }

    /// Messages each subscription may hold before it starts dropping
    /// (and reporting) them. Default: 65 536.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.opts.queue_capacity = capacity;
        self
    }

    /// `application_name` of this crate's sessions, shown in `pg_stat_activity`.
    /// Default: the connection string's `application_name`, else `pg-pubsub`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.opts.application_name = name.into();
        self.explicit.application_name = true;
        self
    }

    /// The settings parsed from the connection string, before the builder's
    /// own are applied by [`connect`](Self::connect) (e.g. `None` from
    /// `get_connect_timeout()` when the string sets no `connect_timeout`).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.target.pg
    }

    /// Time allowed to open a connection. Default: the connection string's
    /// `connect_timeout`, else 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.opts.connect_timeout = timeout;
        self.explicit.connect_timeout = true;
        self
    }

    /// Whether to use TLS and how much to verify; wins over the connection
    /// string's `sslmode`. Default: the connection string's, else [`SslMode::Prefer`].
    /// Modes above `Prefer` need the `tls` feature (or [`Builder::tls`]).
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.target.ssl_mode = mode;
        self
    }

    /// PEM file of the certificate authorities to trust (libpq's
    /// `sslrootcert`); wins over the connection string's. Without one, the
    /// verifying modes trust the Mozilla roots and the platform's.
    pub fn ssl_root_cert(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.target.root_cert = Some(path.into());
        self
    }

    /// Uses this TLS implementation for every connection (listener and
    /// pool) instead of the built-in one, with any `sslmode` but `disable`
    /// (the `verify-*` modes become `require`: verifying is then the
    /// connector's job). With `prefer`, TLS is tried first.
    pub fn tls<T>(mut self, tls: T) -> Self
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>
            + Clone
            + Send
            + Sync
            + 'static,
        T::Stream: Send + Sync + 'static,
        T::TlsConnect: Send + Sync + 'static,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future:
            Send + 'static,
    {
        self.tls = Some(Connector::new(tls));
        self
    }

    /// Uses this rustls configuration (its roots, verifier, client
    /// certificate) for every connection. As with [`Builder::tls`], the
    /// `sslmode` only decides whether TLS is used.
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Some(crate::tls::Connector::rustls(config));
        self
    }

    /// How long `notify` may wait (for a pooled connection and the server)
    /// before returning [`ErrorKind::Timeout`](crate::ErrorKind::Timeout). Default: 10 s.
    pub fn notify_timeout(mut self, timeout: Duration) -> Self {
        self.opts.notify_timeout = timeout;
        self
    }

    /// Whether the first use of a durable, queue or change-feed handle may
    /// apply pending schema migrations itself (default: `true`). With
    /// `false`, a handle only checks the schema and fails with
    /// [`ErrorKind::Schema`](crate::ErrorKind::Schema) while anything is
    /// pending: migrate from a deploy step with [`PgPubSub::migrate`] or
    /// `pg-pubsub migrate up`. See [`schema`](crate::schema).
    pub fn auto_migrate(mut self, auto: bool) -> Self {
        self.opts.auto_migrate = auto;
        self
    }

    /// Bound on [`PgPubSub::shutdown`] talking to the server. Default: 5 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.opts.shutdown_timeout = timeout;
        self
    }

    /// Size of the publishing pool this crate creates (ignored with [`Builder::pool`]). Default: 16.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.opts.pool_size = size;
        self
    }

    /// Publish through this existing pool instead of creating one.
    /// The listener still uses its own dedicated connection. For failover,
    /// build the pool's config with `target_session_attrs=read-write`
    /// (pg-pubsub sets it on the connections it opens itself, not on a
    /// pool it is given).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Default for every subscription: don't deliver this instance's own
    /// messages to it. Per subscription: [`Listen::filtered`](crate::Listen::filtered).
    ///
    /// Messages this instance publishes on a channel with a filtered
    /// subscription (on every channel, with this default on) carry its origin
    /// id (see [`wire`](crate::wire)); messages from anyone else are never
    /// filtered. Filtering is a convenience, not access control (see the
    /// README's security considerations).
    pub fn filtered(mut self, filtered: bool) -> Self {
        self.opts.filtered = filtered;
        self
    }

    /// Default for every subscription: elect one instance per channel,
    /// across every process that elects it on the same database, to receive
    /// that channel's messages; the others stand by and take over when it
    /// stops, dies or loses its connection. Per subscription:
    /// [`Listen::single_listener`](crate::Listen::single_listener).
    ///
    /// The election uses a session advisory lock held on the listener
    /// connection itself, so the lock and the `LISTEN` end together. See
    /// the crate docs ("Single listener") for the protocol.
    pub fn single_listener(mut self, single: bool) -> Self {
        self.opts.single_listener = single;
        self
    }

    /// How often a standby tries for the lock of a channel whose leader
    /// vanished without releasing it (killed, or its connection lost).
    /// A graceful release wakes standbys at once. Default: 500 ms.
    pub fn lock_retry_interval(mut self, interval: Duration) -> Self {
        self.opts.lock_retry_interval = interval;
        self
    }

    /// How long [`PgPubSub::shutdown`] keeps delivering an elected channel
    /// while waiting for a standby to announce it took over. Default: 1 s.
    pub fn handover_timeout(mut self, timeout: Duration) -> Self {
        self.opts.handover_timeout = timeout;
        self
    }

    /// Capacity of the [`PgPubSub::events`] buffer, and of each
    /// capability's event buffer ([`Durable::events`](crate::durable::Durable::events),
    /// [`Queue::events`](crate::queue::Queue::events), `WalFeed::events`). Default: 1024.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.opts.event_capacity = capacity;
        self
    }

    /// Whether the connection goes through a pooler in transaction mode
    /// (PgBouncer's `pool_mode = transaction`). Default: probed at connect
    /// (a notification sent through the pool must reach the listener,
    /// within the health-check timeout; behind transaction pooling it
    /// never does). Declaring it skips the probe.
    ///
    /// Behind transaction pooling every statement goes unnamed (PgBouncer
    /// before 1.21 cannot carry named prepared statements); queue workers,
    /// their schedulers and durable consumers poll instead of waiting for
    /// `LISTEN` wake-ups, and a durable group's active consumer is elected
    /// by a lease row ([`lease_duration`](Self::lease_duration)) instead
    /// of a session advisory lock. What needs a session of its own
    /// (`listen`, elected channels) fails with
    /// [`ErrorKind::Pooler`](crate::ErrorKind::Pooler). See the README's
    /// PgBouncer table.
    pub fn transaction_pooling(mut self, pooled: bool) -> Self {
        self.opts.transaction_pooling = Some(pooled);
        self
    }

    /// How long a lease lasts without renewal: the election of a durable
    /// consumer group's active consumer behind a pooler in transaction
    /// mode ([`transaction_pooling`](Self::transaction_pooling)), where no
    /// session holds an advisory lock. The holder renews it every third of
    /// this and stops delivering once this has passed since its last
    /// successful renewal was sent; a standby tries every
    /// [`lock_retry_interval`](Self::lock_retry_interval) and takes the
    /// lease once the server's clock says it expired. So after the active
    /// consumer dies, a standby takes over within this plus the retry
    /// interval; a graceful close releases it at once. Default: 10 s; at
    /// least 100 ms.
    pub fn lease_duration(mut self, duration: Duration) -> Self {
        self.opts.lease_duration = duration;
        self
    }

    /// Opens the listener connection and starts its task.
    ///
    /// Fails if the first connection cannot be opened (wrong address,
    /// credentials, ...); after that, connection losses are healed in the background.
    pub async fn connect(self) -> Result<PgPubSub> {
        let Builder {
            target,
            pool,
            mut opts,
            tls,
            explicit,
        } = self;
        opts.validate()?;
        let (mut pg, tls) = target.connector(tls.as_ref())?;
        // The connection string wins over defaults, explicit calls over both.
        match pg.get_application_name() {
            Some(name) if !explicit.application_name => opts.application_name = name.to_owned(),
            _ => {
                pg.application_name(&opts.application_name);
            }
        }
        match pg.get_connect_timeout() {
            Some(timeout) if !explicit.connect_timeout => opts.connect_timeout = *timeout,
            _ => {
                pg.connect_timeout(opts.connect_timeout);
            }
        }
        crate::connect::require_primary(&mut pg)?;
        let owns_pool = pool.is_none();
        let pool = match pool {
            Some(pool) => pool,
            None => build_pool(pg.clone(), tls.clone(), &opts)?,
        };
        // Only the dedicated listener gets keepalives tuned to notice a dead peer.
        let mut listener_pg = pg.clone();
        listener_pg
            .keepalives(true)
            // The kernel takes whole seconds, at least one.
            .keepalives_idle(opts.health_check_interval.max(Duration::from_secs(1)))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let origin = Uuid::new_v4();
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(opts.event_capacity);
        let (status_tx, status) = watch::channel(Status::default());
        let leading = Leading::default();
        let filtering = ChannelSet::default();
        let board = Arc::new(Board::default());
        let exec = crate::exec::Exec::new(pool, opts.notify_timeout, opts.backoff, tls.clone());
        let driver = Driver::new(
            Endpoint {
                config: listener_pg,
                tls,
            },
            opts.clone(),
            cmd_rx,
            events.clone(),
            status_tx,
            Shared {
                origin,
                leading: leading.clone(),
                filtering: filtering.clone(),
                board: board.clone(),
            },
        );
        let task = driver.start().await?;
        tokio::spawn(tracing::Instrument::instrument(
            task,
            tracing::info_span!("pg_pubsub_listener", %origin),
        ));
        let (wakes, wake_queue) = crate::wake::Wakes::new();
        let buses = crate::event::Buses::new(opts.event_capacity);
        let inner = Arc::new(Inner {
            cmds,
            exec: exec.clone(),
            pg,
            opts,
            origin,
            owns_pool,
            services: Arc::new(crate::service::Services::default()),
            buses,
            events,
            status,
            leading,
            filtering,
            board,
            next_id: AtomicU64::new(1),
            transaction_pooled: std::sync::atomic::AtomicBool::new(false),
            wakes,
            durable_wakeups: crate::durable::Dispatchers::default(),
            #[cfg(feature = "metrics")]
            metrics_reported: Default::default(),
        });
        crate::wake::spawn(wake_queue, exec);
        let ps = PgPubSub { inner };
        let pooled = match ps.inner.opts.transaction_pooling {
            Some(declared) => declared,
            // A probe that cannot run (the server went away just now) says
            // nothing about poolers: assume none, as before the probe existed.
            None => match ps.listen_probe().await {
                Ok(heard) => !heard,
                Err(err) => {
                    tracing::warn!(%err, "pg-pubsub: the pooler probe failed; assuming a direct connection");
                    false
                }
            },
        };
        if pooled {
            tracing::warn!(
                "pg-pubsub: the connection goes through a pooler in transaction mode: \
                 unnamed statements; workers and durable consumers poll (no LISTEN \
                 wake-ups) and durable groups elect their active consumer by a lease \
                 row; LISTEN and elected channels need a direct connection or session \
                 pooling"
            );
        }
        ps.inner
            .transaction_pooled
            .store(pooled, std::sync::atomic::Ordering::Release);
        ps.inner.exec.set_unnamed(pooled);
        Ok(ps)
    }
}

/// The channel of the pooler probe (see `listen_probe`).
const PROBE_CHANNEL: &str = "pg_pubsub_probe";

fn build_pool(pg: tokio_postgres::Config, tls: Connector, opts: &Options) -> Result<Pool> {
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(opts.pool_size)
        // Reuse the most recently used connection: one publishing task keeps
        // one warm backend instead of cycling through all of them.
        .queue_mode(deadpool_postgres::QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(opts.notify_timeout))
        .create_timeout(Some(opts.connect_timeout))
        .recycle_timeout(Some(opts.notify_timeout))
        .build()
        .map_err(|e| Error::new(Origin::Config, format!("building the pool: {e}")).with_source(e))
}

impl PgPubSub {
    /// Connects with default options. Same as `PgPubSub::builder(config)?.connect()`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), pg_pubsub::Error> {
    /// let pubsub = pg_pubsub::PgPubSub::connect("postgres://postgres@localhost/postgres").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: impl IntoConfig) -> Result<PgPubSub> {
        Self::builder(config)?.connect().await
    }

    /// A [`Builder`] for the server named by `config` (URL, key=value string,
    /// or [`tokio_postgres::Config`]).
    pub fn builder(config: impl IntoConfig) -> Result<Builder> {
        Ok(Builder {
            target: config.into_target()?,
            pool: None,
            opts: Options::default(),
            tls: None,
            explicit: Explicit::default(),
        })
    }

    /// Subscribes to `channel`: `listen::<T>` decodes each payload as JSON
    /// into `T`, `listen::<Text>` gives it as is ([`Text`](crate::Text)).
    /// Await the returned [`Listen`](crate::Listen), after setting this
    /// subscription's options on it if needed.
    ///
    /// The subscription exists once the server listens (so anything
    /// published afterwards is received). While the listener is
    /// reconnecting it exists at once: it takes effect on reconnect, and
    /// starts with a [`Gap`](crate::Gap). On an elected channel
    /// ([`Listen::single_listener`](crate::Listen::single_listener)) it
    /// exists once this instance either leads the channel or knows another
    /// one does ([`is_leader`](Self::is_leader) tells which).
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
    /// use pg_pubsub::Text;
    /// #[derive(serde::Deserialize)]
    /// struct Job { id: u64 }
    /// let jobs = pubsub.listen::<Job>("jobs").single_listener(true).await?;
    /// let log = pubsub.listen::<Text>("log").await?;
    /// # Ok(()) }
    /// ```
    pub fn listen<'a, T: Decode>(&'a self, channel: &'a str) -> Listen<'a, T> {
        Listen::new(self, channel)
    }

    pub(crate) async fn subscribe<T: Decode>(
        &self,
        channel: &str,
        options: ListenOptions,
    ) -> Result<Subscription<T>> {
        self.subscribe_with(channel, options, T::decode).await
    }

    async fn subscribe_with<T>(
        &self,
        channel: &str,
        options: ListenOptions,
        decode: Decoder<T>,
    ) -> Result<Subscription<T>> {
        self.needs_session(&format!("LISTEN on {channel:?}"))?;
        self.subscribe_unchecked(channel, options, decode).await
    }

    /// Refuses `what` behind a pooler in transaction mode, with
    /// [`ErrorKind::Pooler`](crate::ErrorKind::Pooler).
    pub(crate) fn needs_session(&self, what: &str) -> Result<()> {
        if !self.is_transaction_pooled() {
            return Ok(());
        }
        Err(Error::new(
            Origin::Pooler,
            format!(
                "cannot {what}: the connection goes through a pooler in transaction mode \
                 (e.g. PgBouncer pool_mode=transaction), where no server session is ours: \
                 LISTEN and elected channels (session advisory locks) need a direct \
                 connection or session pooling. Publishing, enqueueing, workers and \
                 durable consumers (poll-only, elected by a lease row) work through it."
            ),
        ))
    }

    /// Whether this handle found (or was told) that it is behind a pooler
    /// in transaction mode ([`Builder::transaction_pooling`]).
    pub fn is_transaction_pooled(&self) -> bool {
        self.inner
            .transaction_pooled
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the listener hears what the pool sends: `LISTEN` on the
    /// probe channel, a notification through the pool (an unnamed
    /// statement, which any pooler runs), and a bounded wait. Behind a
    /// transaction-pooling PgBouncer the `LISTEN` ran on some server
    /// connection that is not the listener's between transactions, so the
    /// notification never arrives.
    async fn listen_probe(&self) -> Result<bool> {
        // One name for every process (one metrics series): another
        // process's probe heard here proves the same, that LISTEN works.
        let channel = PROBE_CHANNEL.to_owned();
        let options = ListenOptions {
            single_listener: Some(false),
            filtered: Some(false),
        };
        let mut sub = self
            .subscribe_unchecked(&channel, options, <crate::Text as Decode>::decode)
            .await?;
        let sent = channel.clone();
        self.inner
            .exec
            .run(Origin::Notify, "pooler probe", |client| async move {
                use tokio_postgres::types::Type;
                client
                    .query_typed(
                        "SELECT pg_notify($1, 'probe')",
                        &[(&sent.as_str(), Type::TEXT)],
                    )
                    .await
                    .map(drop)
            })
            .await?;
        let heard = tokio::time::timeout(self.inner.opts.health_check_timeout, sub.recv()).await;
        Ok(matches!(heard, Ok(Some(crate::Delivery::Message(_)))))
    }

    async fn subscribe_unchecked<T>(
        &self,
        channel: &str,
        options: ListenOptions,
        decode: Decoder<T>,
    ) -> Result<Subscription<T>> {
        let channel = ChannelName::new(channel)?;
        if channel.as_str() == CONTROL_CHANNEL {
            return Err(Error::new(
                Origin::Config,
                format!("channel {CONTROL_CHANNEL:?} is reserved for the single-listener election"),
            ));
        }
        self.check_open()?;
        let inner = &self.inner;
        let mode = Mode {
            elected: options
                .single_listener
                .unwrap_or(inner.opts.single_listener),
            filtered: options.filtered.unwrap_or(inner.opts.filtered),
        };
        let counters = inner.board.join(&channel);
        let queue = Arc::new(Queue::new(inner.opts.queue_capacity, counters));
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Created first so that a cancelled `listen` unsubscribes on drop.
        let sub = Subscription::new(
            channel.clone(),
            id,
            queue.clone(),
            decode,
            inner.cmds.clone(),
            inner.board.clone(),
        );
        let (reply, answer) = oneshot::channel();
        inner
            .cmds
            .send(Command::Listen {
                channel,
                id,
                queue,
                mode,
                reply,
            })
            .map_err(|_| Error::shut_down())?;
        match answer.await {
            Ok(Ok(())) => Ok(sub),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::shut_down()),
        }
    }

    /// Whether capability handles may migrate the schema on first use.
    pub(crate) fn auto_migrate(&self) -> bool {
        self.inner.opts.auto_migrate
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.exec.is_shut_down() || self.inner.cmds.is_closed() {
            return Err(Error::shut_down());
        }
        Ok(())
    }

    /// Whether [`shutdown`](Self::shutdown) was called (or the listener task ended).
    pub fn is_shut_down(&self) -> bool {
        self.check_open().is_err()
    }

    /// Connection-level events from now on: the listener connection, its
    /// subscriptions and elections. Durable consumers, workers and WAL
    /// feeds report on their own streams ([`Durable::events`](crate::durable::Durable::events),
    /// [`Queue::events`](crate::queue::Queue::events), `WalFeed::events`).
    pub fn events(&self) -> EventStream {
        EventStream::new(self.inner.events.subscribe())
    }

    /// Backend PID of the listener session, or `None` while reconnecting.
    pub fn listener_pid(&self) -> Option<i32> {
        self.inner.status.borrow().process_id
    }

    /// Whether this instance currently leads `channel` (always false for a
    /// channel that is not elected).
    pub fn is_leader(&self, channel: &str) -> bool {
        self.inner.leading.contains(channel)
    }

    /// A snapshot of this instance's counters, for metrics: per channel,
    /// messages delivered, lagged and gaps, and subscriptions; reconnects,
    /// led channels and the listener PID. Cheap: it reads atomics and does
    /// not wait for the listener task.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) {
    /// for ch in pubsub.stats().channels {
    ///     println!("{}: {} delivered, {} lagged", ch.channel, ch.delivered, ch.lagged);
    /// }
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let leading = self.inner.leading.channels();
        self.inner.board.snapshot(leading, self.listener_pid())
    }

    /// Whether the listener connection is up.
    pub fn is_connected(&self) -> bool {
        self.listener_pid().is_some()
    }

    /// This instance's origin id, carried by its messages on channels it filters.
    pub fn origin(&self) -> Uuid {
        self.inner.origin
    }

    /// The publishing pool.
    pub fn pool(&self) -> &Pool {
        self.inner.exec.pool()
    }

    /// The executor every pooled statement runs through.
    pub(crate) fn exec(&self) -> &crate::exec::Exec {
        &self.inner.exec
    }

    /// The connection settings in use (with `application_name`,
    /// `connect_timeout` and the `sslmode` given to tokio-postgres resolved).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.inner.pg
    }

    /// Stops, in order: first every worker, durable consumer and WAL feed
    /// started from this handle (they stop claiming and reading, let
    /// running jobs finish or give them back, write their acks and confirm
    /// the WAL they acked), then every subscription (after what it already
    /// queued is read), `UNLISTEN`s, closes the listener and the pool
    /// (unless it was given with [`Builder::pool`]). Each step is bounded by
    /// the shutdown timeout, even when the server is unreachable.
    /// Afterwards `listen` and `notify` return [`ErrorKind::ShutDown`](crate::ErrorKind::ShutDown), and
    /// starting a worker, consumer or feed fails the same way. Idempotent.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.exec.set_shut_down();
        let by = tokio::time::Instant::now() + inner.opts.shutdown_timeout;
        if !inner.services.stop_all(by).await {
            tracing::warn!(
                "pg-pubsub: shutdown: workers, consumers or feeds still running after {:?}",
                inner.opts.shutdown_timeout
            );
        }
        let (reply, done) = oneshot::channel();
        if inner.cmds.send(Command::Shutdown { reply }).is_ok() {
            // The task bounds its whole shutdown by the timeout; the margin
            // covers a listener task that is busy when asked.
            let bound = inner.opts.shutdown_timeout + Duration::from_millis(250);
            if tokio::time::timeout(bound, done).await.is_err() {
                tracing::warn!("pg-pubsub: shutdown did not finish within {bound:?}");
            }
        }
        if inner.owns_pool {
            inner.exec.pool().close();
        }
    }
}

impl fmt::Debug for PgPubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgPubSub")
            .field("origin", &self.inner.origin)
            .field("listener_pid", &self.listener_pid())
            .finish()
    }
}

/// A reference to a [`PgPubSub`] that does not keep it alive, for tasks that
/// serve an instance (`shutdown_on_signal`'s) and must end with it.
#[cfg(feature = "signal")]
pub(crate) struct WeakPgPubSub {
    inner: std::sync::Weak<Inner>,
    /// Reaches the listener while subscriptions outlive every handle.
    cmds: mpsc::WeakUnboundedSender<Command>,
    /// Its sender is the listener task's: closed when that task has ended.
    status: watch::Receiver<Status>,
}

#[cfg(feature = "signal")]
impl PgPubSub {
    pub(crate) fn downgrade(&self) -> WeakPgPubSub {
        WeakPgPubSub {
            inner: Arc::downgrade(&self.inner),
            cmds: self.inner.cmds.downgrade(),
            status: self.inner.status.clone(),
        }
    }
}

#[cfg(feature = "signal")]
impl WeakPgPubSub {
    pub(crate) fn upgrade(&self) -> Option<PgPubSub> {
        self.inner.upgrade().map(|inner| PgPubSub { inner })
    }

    /// [`PgPubSub::shutdown`]; when only subscriptions are left, asks the
    /// listener task directly (they then end after what they received).
    pub(crate) async fn shutdown(&self) {
        if let Some(pubsub) = self.upgrade() {
            return pubsub.shutdown().await;
        }
        let Some(cmds) = self.cmds.upgrade() else {
            return;
        };
        let (reply, done) = oneshot::channel();
        if cmds.send(Command::Shutdown { reply }).is_ok() {
            drop(cmds);
            // The task bounds its own server calls; an error means it ended.
            let _ = done.await;
        }
    }

    /// Resolves once the listener task has ended: after a shutdown, or when
    /// every handle and subscription is gone.
    pub(crate) fn listener_ended(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut status = self.status.clone();
        async move { while status.changed().await.is_ok() {} }
    }
}
