//! Shared helpers for the integration tests: one PostgreSQL per test binary.
#![allow(dead_code)]

#[cfg(feature = "cli")]
pub mod fleet;

use std::time::Duration;

use futures::{Stream, StreamExt};
use pg_pubsub::testing::{TestOptions, TestServer};
use pg_pubsub::{Builder, ConnectionEvent, Delivery, Message, PgPubSub};

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

/// Waits for the first event matching `pred`.
pub async fn wait_event<S, F>(events: &mut S, mut pred: F) -> ConnectionEvent
where
    S: Stream<Item = ConnectionEvent> + Unpin,
    F: FnMut(&ConnectionEvent) -> bool,
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

/// Backend PID holding the election lock of `channel` (the documented key).
pub async fn lock_holder(client: &tokio_postgres::Client, channel: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = 1885827187::oid AND objsubid = 2 \
             AND objid = (hashtext($1)::bigint & 4294967295)::oid",
            &[&channel],
        )
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
