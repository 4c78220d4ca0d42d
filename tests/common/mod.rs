//! Shared helpers for the integration tests: one PostgreSQL per test binary.
#![allow(dead_code)]

#[cfg(any(
    feature = "relay-nats",
    feature = "relay-redis",
    feature = "relay-amqp"
))]
pub mod brokers;
#[cfg(feature = "cli")]
pub mod fleet;
pub mod ha;
pub mod pgbouncer;
#[cfg(feature = "cli")]
pub mod relay;
#[cfg(feature = "wal")]
pub mod snapshot;
#[cfg(feature = "ui")]
pub mod ui;

use std::time::Duration;

use futures::{Stream, StreamExt};
use pg_pubsub::testing::{TestOptions, TestServer};
use pg_pubsub::Text;
use pg_pubsub::{Builder, Delivery, GapCause, Message, PgPubSub};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// How long any awaited event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn server() -> &'static TestServer {
    TestServer::shared()
}

/// Whether the test server is this run's own cluster; if not (DATABASE_URL),
/// says why the calling test is skipped.
pub fn own_server(needed_for: &str) -> bool {
    let owned = server().is_owned();
    if !owned {
        eprintln!("skipped: DATABASE_URL names a server this test cannot {needed_for}");
    }
    owned
}

pub fn builder() -> Builder {
    PgPubSub::builder(server().url()).expect("valid url")
}

pub async fn pubsub() -> PgPubSub {
    builder().connect().await.expect("connect")
}

/// A channel name no other test uses.
pub fn channel(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A plain connection for publishing like a foreign client (psql, a trigger).
pub async fn raw_client() -> tokio_postgres::Client {
    raw_client_to(server()).await
}

/// A plain superuser connection to `server`.
pub async fn raw_client_to(server: &TestServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(server.url(), tokio_postgres::NoTls)
        .await
        .expect("raw connect");
    tokio::spawn(conn);
    client
}

/// A plain session listening on `channel`, forwarding (channel, payload, pid):
/// what a foreign client receives, with nothing of this crate in between.
pub async fn raw_listener(
    channel: &str,
) -> (
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<(String, String, i32)>,
) {
    let (client, mut conn) = tokio_postgres::connect(server().url(), tokio_postgres::NoTls)
        .await
        .expect("raw connect");
    let (tx, rx) = mpsc::unbounded_channel();
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(n) = msg {
                let item = (
                    n.channel().to_owned(),
                    n.payload().to_owned(),
                    n.process_id(),
                );
                if tx.send(item).is_err() {
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .expect("LISTEN");
    (client, rx)
}

/// The next item from a [`raw_listener`], failing the test after [`WAIT`].
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a notification")
        .expect("listener connection ended")
}

/// The payloads a [`raw_listener`] receives until `sentinel` (excluded).
/// Send the sentinel after the thing under test: notifications arrive in
/// commit order, so whatever that thing committed arrives before it.
pub async fn recv_until(
    rx: &mut mpsc::UnboundedReceiver<(String, String, i32)>,
    sentinel: &str,
) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let (_, payload, _) = recv(rx).await;
        if payload == sentinel {
            return got;
        }
        got.push(payload);
    }
}

/// A throwaway cluster of this test's own (to stop, restart, reconfigure).
pub async fn own_cluster(options: TestOptions) -> TestServer {
    tokio::task::spawn_blocking(move || TestServer::start_with(options))
        .await
        .expect("start task")
        .expect("start an own cluster")
}

/// One TLS cluster per test binary (certificate for `localhost`, see
/// [`TestOptions::tls`]).
pub fn tls_server() -> &'static TestServer {
    static TLS: std::sync::OnceLock<TestServer> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        TestServer::start_with(TestOptions {
            tls: true,
            ..Default::default()
        })
        .expect("start a TLS cluster")
    })
}

/// A URL for `server` through `host`, with `query` appended.
pub fn url_via(server: &TestServer, host: &str, query: &str) -> String {
    let port = server.port().expect("an owned cluster");
    format!("postgres://postgres@{host}:{port}/postgres?{query}")
}

/// Every error in `err`'s source chain, `err` first.
pub fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source()).collect()
}

/// The next delivery, failing the test after [`WAIT`].
pub async fn next<S: Stream + Unpin>(stream: &mut S) -> S::Item {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("timed out waiting for the stream")
        .expect("stream ended")
}

/// The next delivery, which must be a message.
pub async fn next_message<T: std::fmt::Debug + 'static, S>(stream: &mut S) -> Message<T>
where
    S: Stream<Item = Delivery<T>> + Unpin,
{
    match next(stream).await {
        Delivery::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The next delivery, which must be a gap of `cause` (e.g. the take-over gap
/// a channel's first leader gets).
pub async fn expect_gap<T: std::fmt::Debug + 'static, S>(stream: &mut S, cause: GapCause)
where
    S: Stream<Item = Delivery<T>> + Unpin,
{
    match next(stream).await {
        Delivery::Gap(gap)
            if std::mem::discriminant(&gap.cause()) == std::mem::discriminant(&cause) => {}
        other => panic!("expected a {cause:?} gap, got {other:?}"),
    }
}

/// Waits for the first event matching `pred`.
pub async fn wait_event<S, E, F>(events: &mut S, mut pred: F) -> E
where
    S: Stream<Item = E> + Unpin,
    F: FnMut(&E) -> bool,
{
    tokio::time::timeout(WAIT, async {
        while let Some(e) = events.next().await {
            if pred(&e) {
                return e;
            }
        }
        panic!("event stream ended")
    })
    .await
    .expect("timed out waiting for an event")
}

/// Asserts nothing arrives on `stream` within `d`.
pub async fn assert_quiet<S: Stream + Unpin>(stream: &mut S, d: Duration)
where
    S::Item: std::fmt::Debug,
{
    if let Ok(item) = tokio::time::timeout(d, stream.next()).await {
        panic!("expected nothing, got {item:?}");
    }
}

/// Terminates a backend from a separate session.
pub async fn terminate(pid: i32) {
    terminate_on(server(), pid).await
}

/// Terminates a backend of `server` from a separate session.
pub async fn terminate_on(server: &TestServer, pid: i32) {
    let client = raw_client_to(server).await;
    let row = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend");
    assert!(row.get::<_, bool>(0), "backend {pid} was not terminated");
}

/// Waits until backend `pid` has left `pg_stat_activity`, failing after [`WAIT`].
pub async fn wait_backend_gone(pid: i32) {
    wait_no_session("pid = $1", &pid, &format!("backend {pid}")).await;
}

/// Waits until no session with `application_name` is left (the process
/// that had them was killed: what they were committing is committed or
/// rolled back), failing after [`WAIT`].
pub async fn wait_sessions_gone(application_name: &str) {
    let what = format!("sessions of {application_name}");
    wait_no_session("application_name = $1", &application_name, &what).await;
}

/// Waits until no session with `application_name` waits for a lock (its
/// statement was cancelled, or got the lock), failing after [`WAIT`].
pub async fn wait_lock_waits_gone(application_name: &str) {
    let what = format!("lock waits of {application_name}");
    let filter = "application_name = $1 AND wait_event_type = 'Lock'";
    wait_no_session(filter, &application_name, &what).await;
}

/// Waits until no row of `pg_stat_activity` matches `filter` (with `$1`
/// bound to `arg`), failing after [`WAIT`] and naming `what`.
async fn wait_no_session(
    filter: &str,
    arg: &(dyn tokio_postgres::types::ToSql + Sync),
    what: &str,
) {
    let client = raw_client().await;
    let sql = format!("SELECT 1 FROM pg_stat_activity WHERE {filter}");
    let gone = async {
        loop {
            let rows = client.query(&sql, &[arg]).await.expect("pg_stat_activity");
            if rows.is_empty() {
                return;
            }
            // The server has no event for a session's end: poll.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, gone)
        .await
        .unwrap_or_else(|_| panic!("{what} still there after {WAIT:?}"));
}

/// Backend PID holding the election lock of `channel` (the documented key).
pub async fn lock_holder(client: &tokio_postgres::Client, channel: &str) -> Option<i32> {
    client
        .query_opt(pg_pubsub::election::LEADER_PID_SQL, &[&channel])
        .await
        .expect("pg_locks")
        .map(|r| r.get(0))
}

/// Sends `sig` (e.g. "-STOP", "-KILL") to a process on this machine.
pub fn send_signal(pid: impl std::fmt::Display, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// The next durable delivery, which must be a message.
pub async fn next_durable<T: std::fmt::Debug, S>(
    stream: &mut S,
) -> pg_pubsub::durable::DurableMessage<T>
where
    S: Stream<Item = pg_pubsub::durable::DurableDelivery<T>> + Unpin,
{
    match next(stream).await {
        pg_pubsub::durable::DurableDelivery::Message(m) => m,
        other => panic!("expected a durable message, got {other:?}"),
    }
}

/// The next `n` durable messages' text payloads, acking each one.
pub async fn take_acked<S>(stream: &mut S, n: usize) -> Vec<String>
where
    S: Stream<Item = pg_pubsub::durable::DurableDelivery<Text>> + Unpin,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let m = next_durable(stream).await;
        m.ack();
        out.push(m.into_payload().into_string());
    }
    out
}

/// Creates the logical slot `slot` (pgoutput), as `changes tail --wal`
/// would. The server holds it back until every transaction of the cluster
/// running now has ended: another test's long one (a 100k-row transaction
/// on a loaded machine) can take far longer than [`WAIT`], so this waits
/// for the slot with a bound of its own, and the command then starts at once.
pub async fn create_slot(slot: &str) {
    let client = raw_client().await;
    let sql = "SELECT pg_create_logical_replication_slot($1, 'pgoutput')";
    tokio::time::timeout(6 * WAIT, client.execute(sql, &[&slot]))
        .await
        .expect("slot creation waited for a transaction that never ended")
        .expect("create the slot");
}

/// A connected instance and its work queues (default schema, installed).
pub async fn queue() -> (PgPubSub, pg_pubsub::queue::Queue) {
    let ps = pubsub().await;
    let q = ps.queue();
    q.install().await.expect("install");
    (ps, q)
}

/// `(state, attempt)` of each live job of `queue`, by id.
pub async fn job_states(client: &tokio_postgres::Client, queue: &str) -> Vec<(String, i32)> {
    job_states_in(client, "pgpubsub.jobs", queue).await
}

/// [`job_states`] in the jobs table `table` (`schema.jobs`).
pub async fn job_states_in(
    client: &tokio_postgres::Client,
    table: &str,
    queue: &str,
) -> Vec<(String, i32)> {
    client
        .query(
            &format!("SELECT state, attempt FROM {table} WHERE queue = $1 ORDER BY id"),
            &[&queue],
        )
        .await
        .expect("job states")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Runs `worker` with a handler that succeeds and reports
/// `(id, attempt, payload)` of each job it runs.
pub async fn run_reporting(
    worker: pg_pubsub::queue::WorkerBuilder,
) -> (
    pg_pubsub::queue::Worker,
    mpsc::UnboundedReceiver<(i64, i32, String)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = worker
        .run(move |job: pg_pubsub::queue::Job| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((job.id(), job.attempt(), job.payload().to_owned()));
                Ok::<_, String>(())
            }
        })
        .await
        .expect("worker");
    (worker, rx)
}

/// A worker of `name` with fast retries and polls so tests finish quickly
/// (no test relies on them for anything but speed).
pub fn fast(q: &pg_pubsub::queue::Queue, name: &str) -> pg_pubsub::queue::WorkerBuilder {
    q.worker(name)
        .poll_interval(Duration::from_millis(50))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(40))
}

/// A dead job of `queue` made by hand in the installed default schema, as a
/// worker would move it after `attempts` attempts, the last failing with
/// `last_error`; its id.
pub async fn insert_dead_job(queue: &str, payload: &str, attempts: i32, last_error: &str) -> i64 {
    raw_client()
        .await
        .query_one(
            "INSERT INTO pgpubsub.dead_jobs (id, queue, priority, attempt, max_attempts, \
                 last_error, created_at, payload) \
             VALUES (nextval('pgpubsub.jobs_id_seq'), $1, 0, $3, $3, $4, now(), $2) \
             RETURNING id",
            &[&queue, &payload, &attempts, &last_error],
        )
        .await
        .expect("insert dead job")
        .get(0)
}

/// Where job `id` of the default schema is: its `jobs.state`, `dead`, or `gone`.
pub async fn where_is(id: i64) -> String {
    raw_client()
        .await
        .query_one(
            "SELECT coalesce((SELECT state FROM pgpubsub.jobs WHERE id = $1), \
                    (SELECT 'dead' FROM pgpubsub.dead_jobs WHERE id = $1), 'gone')",
            &[&id],
        )
        .await
        .expect("query")
        .get(0)
}
