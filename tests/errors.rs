//! Errors keep their cause: SQLSTATE and the server's text reach the caller,
//! connection losses say so, and no password leaks into errors or logs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use pg_pubsub::testing::TestOptions;
use pg_pubsub::tokio_postgres::error::SqlState;
use pg_pubsub::{Error, ErrorKind, PgPubSub};

/// Everything logged in this test binary, down to `trace`.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .try_init()
            .expect("install the capturing subscriber");
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Display, Debug and every source's Display and Debug.
fn all_text(err: &Error) -> String {
    let mut text = format!("{err}\n{err:?}\n");
    for e in chain(err) {
        text.push_str(&format!("{e}\n{e:?}\n"));
    }
    text
}

#[tokio::test]
async fn wrong_password_is_authentication_with_sqlstate_and_never_leaks() {
    const RIGHT: &str = "Right-Pa55word-7c1f";
    const WRONG: &str = "Wr0ng-Pa55word-93ab";
    let logs = logs();
    let server = own_cluster(TestOptions {
        hba: vec!["host all pw_user 127.0.0.1/32 scram-sha-256".to_owned()],
        ..Default::default()
    })
    .await;
    raw_client_to(&server)
        .await
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE pw_user LOGIN SUPERUSER PASSWORD '{RIGHT}'"
        ))
        .await
        .unwrap();
    // From here on (the setup's own CREATE ROLE is logged by tokio-postgres).
    let from = logs.lock().unwrap().len();
    let port = server.port().unwrap();
    let url = |pw: &str| format!("postgres://pw_user:{pw}@127.0.0.1:{port}/postgres");

    let err = PgPubSub::connect(url(WRONG)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Authentication, "{err:?}");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
    assert!(err.as_db_error().is_some());
    assert!(!err.is_connection(), "{err:?}");
    assert!(err.to_string().contains("28P01"), "{err}");

    // The right one works (so the failure above was the password).
    let ps = PgPubSub::connect(url(RIGHT)).await.unwrap();
    let ch = channel("pw");
    let mut sub = ps.listen::<u8>(&ch).await.unwrap();
    ps.notify(&ch, &1u8).await.unwrap();
    next_message(&mut sub).await;
    ps.shutdown().await;

    let text = all_text(&err);
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()[from..]).into_owned();
    assert!(!logged.is_empty(), "the subscriber captured nothing");
    for pw in [RIGHT, WRONG] {
        assert!(!text.contains(pw), "password in the error: {text}");
        let leaks: Vec<&str> = logged.lines().filter(|l| l.contains(pw)).collect();
        assert!(leaks.is_empty(), "password in the logs: {leaks:#?}");
    }
}

#[tokio::test]
async fn connect_and_notify_errors_keep_the_server_error() {
    let bad_db = format!(
        "{}?dbname=no_such_db",
        server().url().split('?').next().unwrap()
    );
    let err = PgPubSub::connect(bad_db).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err:?}");
    assert!(!err.is_connection(), "retrying will not create it: {err:?}");

    let ps = pubsub().await;
    let mut client = raw_client().await;
    let tx = client.transaction().await.unwrap();
    assert!(tx.batch_execute("SELECT 1/0").await.is_err());
    let err = ps.notify_tx(&tx, "errors", &1u8).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server, "{err:?}");
    assert_eq!(err.stage(), Some(pg_pubsub::Stage::Notify), "{err:?}");
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    assert!(err.to_string().contains("25P02"), "{err}");
    assert!(!err.is_connection());
    // One error, several waiters: clones share the source.
    let copy = err.clone();
    assert_eq!(copy.code(), err.code());
    assert_eq!(copy.to_string(), err.to_string());
    drop(tx);
    ps.shutdown().await;
}

#[tokio::test]
async fn connection_losses_are_connection_errors_with_their_cause() {
    let server = own_cluster(TestOptions::default()).await;
    let ps = PgPubSub::builder(server.url())
        .unwrap()
        .notify_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let ch = channel("loss");
    ps.notify(&ch, &0u32).await.unwrap();

    // Stopped: each notify gives up within its timeout, saying why.
    let server = Arc::new(server);
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.stop())
        .await
        .unwrap()
        .unwrap();
    // A pooled connection whose end was not yet noticed fails first.
    let mut err = ps.notify(&ch, &1u32).await.unwrap_err();
    for _ in 0..3 {
        assert!(err.is_connection(), "{err:?}");
        if err.kind() == ErrorKind::Timeout {
            break;
        }
        err = ps.notify(&ch, &1u32).await.unwrap_err();
    }
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(
        chain(&err).iter().any(|e| e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)),
        "the io error is kept: {err:?}"
    );

    let s = server.clone();
    tokio::task::spawn_blocking(move || s.start_again())
        .await
        .unwrap()
        .unwrap();
    notify_until_ok(&ps, &ch).await;

    // Restart while 16 tasks publish: every failure is a connection error.
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let ps = ps.clone();
            let ch = ch.clone();
            let restarted = restarted.clone();
            tokio::spawn(async move {
                let mut errors = Vec::new();
                let mut sent = 0u32;
                loop {
                    let after = restarted.load(std::sync::atomic::Ordering::Acquire);
                    match ps.notify(&ch, &(i * 1_000_000 + sent)).await {
                        Ok(()) if after => return (sent, errors),
                        Ok(()) => sent += 1,
                        Err(e) => errors.push(e),
                    }
                }
            })
        })
        .collect();
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.restart())
        .await
        .unwrap()
        .unwrap();
    restarted.store(true, std::sync::atomic::Ordering::Release);
    let mut failures = Vec::new();
    let mut sent = 0;
    for task in tasks {
        let (n, errors) = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        sent += n;
        failures.extend(errors);
    }
    eprintln!(
        "restart under load: {sent} sent, {} failed: {:?}",
        failures.len(),
        failures.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    for err in &failures {
        assert!(err.is_connection(), "{err:?}");
    }
    ps.shutdown().await;
}

/// Notifies until it works (the server is coming back).
async fn notify_until_ok(ps: &PgPubSub, ch: &str) {
    tokio::time::timeout(WAIT, async {
        while let Err(e) = ps.notify(ch, &0u32).await {
            assert!(e.is_connection(), "{e:?}");
        }
    })
    .await
    .expect("notify works again");
}

/// An instance named `app` (for `pg_stat_activity`) with a pool of one and
/// `timeout`, a queue schema `app`, and a session holding an exclusive lock
/// on its jobs table (`ROLLBACK` on it releases the lock).
async fn locked_jobs(
    app: &str,
    timeout: Duration,
) -> (PgPubSub, pg_pubsub::queue::Queue, tokio_postgres::Client) {
    let ps = builder()
        .application_name(app)
        .notify_timeout(timeout)
        .pool_size(1)
        .connect()
        .await
        .expect("connect");
    let q = ps.queue().with_schema(app).expect("schema");
    q.install().await.expect("install");
    let locker = raw_client().await;
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {app}.jobs IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .expect("lock");
    (ps, q, locker)
}

/// Waits until a session of `app` waits for a lock, failing after [`WAIT`].
async fn wait_lock_wait(client: &tokio_postgres::Client, app: &str) {
    let sql = "SELECT 1 FROM pg_stat_activity \
               WHERE application_name = $1 AND wait_event_type = 'Lock'";
    let seen = async {
        // The server has no event for it: poll.
        while client
            .query(sql, &[&app])
            .await
            .expect("pg_stat_activity")
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, seen)
        .await
        .expect("the statement never waited for the lock");
}

/// The statement abandoned by the call left no trace: its connection is
/// out of the pool (size 0), the server no longer runs it (while the lock
/// is still held: only a cancel could end it), the next call is not stuck
/// behind it, and it did not commit.
async fn assert_abandoned_statement_gone(
    ps: &PgPubSub,
    app: &str,
    locker: &tokio_postgres::Client,
) {
    assert_eq!(ps.pool().status().size, 0, "{:?}", ps.pool().status());
    wait_lock_waits_gone(app).await;
    ps.notify(app, &"after")
        .await
        .expect("notify after the abandoned call");
    locker.batch_execute("ROLLBACK").await.expect("rollback");
    let jobs: i64 = locker
        .query_one(&format!("SELECT count(*) FROM {app}.jobs"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(jobs, 0, "the cancelled enqueue did not commit");
}

/// A statement past the notify timeout is cancelled on the server and its
/// connection leaves the pool: with a pool of one, the next call gets a new
/// connection instead of queueing behind the abandoned statement.
#[tokio::test]
async fn a_statement_past_the_timeout_is_cancelled_and_does_not_block_the_pool() {
    let app = channel("exec_timeout");
    let (ps, q, locker) = locked_jobs(&app, Duration::from_millis(500)).await;
    let err = q.enqueue("q", &1).await.expect_err("blocked by the lock");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(err.may_have_committed(), "it was sent: {err:?}");
    assert_abandoned_statement_gone(&ps, &app, &locker).await;
    ps.shutdown().await;
}

/// The same when the caller gives up first (drops the call).
#[tokio::test]
async fn a_statement_whose_call_is_dropped_is_cancelled_too() {
    let app = channel("exec_dropped");
    let (ps, q, locker) = locked_jobs(&app, Duration::from_secs(60)).await;
    // Dropped once the server shows the statement waiting for the lock.
    tokio::select! {
        res = q.enqueue("q", &1) => panic!("blocked by the lock, yet: {res:?}"),
        () = wait_lock_wait(&locker, &app) => {}
    }
    assert_abandoned_statement_gone(&ps, &app, &locker).await;
    ps.shutdown().await;
}

/// Nothing was sent when no connection could be had.
#[tokio::test]
async fn a_timeout_without_a_connection_did_not_commit() {
    let ps = PgPubSub::builder(server().url())
        .expect("url")
        .notify_timeout(Duration::from_millis(300))
        .pool_size(1)
        .connect()
        .await
        .expect("connect");
    // Hold the only pooled connection in a call that outlasts the timeout.
    let held = ps.pool().get().await.expect("pooled");
    let err = ps.notify("exec_none", &1).await.expect_err("no connection");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(!err.may_have_committed(), "{err:?}");
    drop(held);
    ps.shutdown().await;
}
