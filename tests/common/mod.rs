//! Shared helpers for the integration tests: one PostgreSQL per test binary.
#![allow(dead_code)]

#[cfg(feature = "cli")]
pub mod fleet;

use std::time::Duration;

use futures::{Stream, StreamExt};
use pg_pubsub::testing::TestServer;
use pg_pubsub::{Builder, ConnectionEvent, Delivery, GapCause, Message, PgPubSub};

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
    let (client, conn) = tokio_postgres::connect(server().url(), tokio_postgres::NoTls)
        .await
        .expect("raw connect");
    tokio::spawn(conn);
    client
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
    let client = raw_client().await;
    let row = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend");
    assert!(row.get::<_, bool>(0), "backend {pid} was not terminated");
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
    S: Stream<Item = pg_pubsub::durable::DurableDelivery<String>> + Unpin,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let m = next_durable(stream).await;
        m.ack();
        out.push(m.into_payload());
    }
    out
}
