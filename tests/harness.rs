//! Tests of the throwaway-PostgreSQL harness `pg_pubsub::testing`.
//!
//! Some tests re-run this test binary as a child process (see
//! [`child_entry`]) to check what happens when a process that started a
//! server exits without dropping it, is killed, or cannot get a server.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_pubsub::testing::TestServer;
use tokio_postgres::{Client, NoTls};

/// Environment variable that turns [`child_entry`] into a scenario.
const CHILD_ENV: &str = "PG_PUBSUB_HARNESS_CHILD";
/// Prefix of the line on which the child reports its data directory.
const DATA_DIR_LINE: &str = "PG_PUBSUB_DATA_DIR=";

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn select_one(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT 1", &[]).await?.get(0))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// The pid in the first line of `DATA/postmaster.pid`.
fn postmaster_pid(data_dir: &Path) -> u32 {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .expect("postmaster.pid of a running server");
    text.lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("pid in postmaster.pid")
}

fn process_alive(pid: u32) -> bool {
    // A zombie is gone for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(") ").next().unwrap_or("");
            !(state.starts_with('Z') || state.starts_with('X'))
        }
        Err(_) => false,
    }
}

/// Pids of processes whose command line mentions `needle` (servers started
/// on the cluster, reapers watching it).
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(&needle) && process_alive(pid) {
                found.push((pid, cmdline));
            }
        }
    }
    found
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that nothing of the cluster whose folder is `root` remains.
fn assert_cluster_gone(root: &Path, postmaster: u32) {
    assert!(!root.exists(), "{} still exists", root.display());
    assert!(
        !process_alive(postmaster),
        "postmaster {postmaster} still runs"
    );
    let left = processes_mentioning(root);
    assert!(
        left.is_empty(),
        "processes still mention {}: {left:?}",
        root.display()
    );
}

#[tokio::test]
async fn shared_server_accepts_connections() {
    let server = blocking(TestServer::shared).await;
    let client = connect(server.url())
        .await
        .expect("connect to shared server");
    assert_eq!(select_one(&client).await.expect("SELECT 1"), 1);

    // The parsed config reaches the same server.
    let (client, connection) = server
        .config()
        .connect(NoTls)
        .await
        .expect("connect via config");
    tokio::spawn(connection);
    assert_eq!(select_one(&client).await.expect("SELECT 1"), 1);
}

#[tokio::test]
async fn owned_server_stops_and_restarts() {
    let server = Arc::new(blocking(TestServer::start).await.expect("start server"));
    assert!(server.is_owned());
    assert!(
        server.url().starts_with("postgres://postgres@127.0.0.1:"),
        "unexpected url {}",
        server.url()
    );
    assert!(server
        .data_dir()
        .expect("owned server has a data dir")
        .is_dir());

    let before = connect(server.url()).await.expect("connect");
    assert_eq!(select_one(&before).await.expect("SELECT 1"), 1);
    let pid_before = postmaster_pid(server.data_dir().unwrap());

    let s = Arc::clone(&server);
    blocking(move || s.restart()).await.expect("restart");
    assert!(
        select_one(&before).await.is_err(),
        "a connection from before the restart must be broken"
    );
    assert!(
        !process_alive(pid_before),
        "old postmaster survived the restart"
    );
    let after = connect(server.url()).await.expect("connect after restart");
    assert_eq!(select_one(&after).await.expect("SELECT 1 after restart"), 1);

    let s = Arc::clone(&server);
    blocking(move || s.stop()).await.expect("stop");
    assert!(
        connect(server.url()).await.is_err(),
        "a stopped server must refuse connections"
    );
    let s = Arc::clone(&server);
    blocking(move || s.stop())
        .await
        .expect_err("stopping a stopped server is an error");

    let s = Arc::clone(&server);
    blocking(move || s.start_again())
        .await
        .expect("start again");
    let again = connect(server.url())
        .await
        .expect("connect after start_again");
    assert_eq!(
        select_one(&again)
            .await
            .expect("SELECT 1 after start_again"),
        1
    );
}

#[test]
fn dropping_an_owned_server_removes_it() {
    let server = TestServer::start().expect("start server");
    let data_dir = server.data_dir().expect("owned").to_path_buf();
    let root = data_dir
        .parent()
        .expect("data dir has a parent")
        .to_path_buf();
    let postmaster = postmaster_pid(&data_dir);
    assert!(process_alive(postmaster));
    assert!(
        !processes_mentioning(&root).is_empty(),
        "expected the server and its reaper to be running"
    );

    drop(server);
    // Drop is synchronous: everything is gone right away, reaper included.
    assert_cluster_gone(&root, postmaster);
}

/// Runs this test binary again, running only [`child_entry`] in `scenario`.
fn spawn_child(scenario: &str, configure: impl FnOnce(&mut Command)) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    // Without --nocapture: what the child reports must get through libtest's
    // output capture, which process::exit would otherwise swallow.
    cmd.args(["child_entry", "--exact", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut cmd);
    cmd.spawn().expect("spawn child test process")
}

/// Kills the child if the test fails halfway.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads the child's stdout until it reports its data directory (libtest
/// may print `test child_entry ... ` on the same line).
fn read_data_dir(child: &mut Child) -> PathBuf {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(pos) = line.find(DATA_DIR_LINE) {
                let _ = tx.send(Ok(PathBuf::from(&line[pos + DATA_DIR_LINE.len()..])));
                return;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = tx.send(Err(seen));
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(dir)) => dir,
        Ok(Err(seen)) => {
            let _ = child.wait();
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
            }
            panic!("child never reported a data dir; stdout:\n{seen}\nstderr:\n{stderr}");
        }
        Err(_) => panic!("child did not report a data dir within 120 s"),
    }
}

/// The child started a server and then vanished without dropping it in the
/// way `scenario` describes; the reaper must remove the cluster.
fn check_reaper(scenario: &str) {
    let mut child = ChildGuard(spawn_child(scenario, |_| {}));
    let data_dir = read_data_dir(&mut child.0);
    let root = data_dir.parent().expect("parent").to_path_buf();
    let postmaster = postmaster_pid(&data_dir);
    assert!(process_alive(postmaster));

    if scenario == "kill" {
        child.0.kill().expect("SIGKILL child");
    }
    let status = child.0.wait().expect("wait for child");
    if scenario == "exit" {
        assert!(status.success(), "child exited with {status}");
    }

    // The reaper polls every ~100 ms; stopping PostgreSQL takes a moment.
    wait_until(
        Duration::from_secs(30),
        "the reaper removed the cluster",
        || !root.exists() && !process_alive(postmaster) && processes_mentioning(&root).is_empty(),
    );
    assert_cluster_gone(&root, postmaster);
}

#[test]
fn reaper_cleans_up_after_process_exit() {
    check_reaper("exit");
}

#[test]
fn reaper_cleans_up_after_sigkill() {
    check_reaper("kill");
}

#[test]
fn shared_exits_with_one_clear_message_when_binaries_are_missing() {
    let missing = "/nonexistent/pg-pubsub-harness/bin";
    let child = spawn_child("shared", |cmd| {
        cmd.env("PG_BIN_DIR", missing).env_remove("DATABASE_URL");
    });
    let out = child.wait_with_output().expect("wait for child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("apt-get install postgresql"),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains(missing), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}

#[test]
fn database_url_is_used_unowned_and_its_password_never_shown() {
    let child = spawn_child("external", |cmd| {
        cmd.env("DATABASE_URL", "postgres://alice:s3cret@127.0.0.1:1/app");
    });
    let out = child.wait_with_output().expect("wait for child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("EXTERNAL_OK"), "stdout:\n{stdout}");
    assert!(!stdout.contains("s3cret") && !stderr.contains("s3cret"));
}

/// Does nothing in a normal test run. Run as a child by the tests above with
/// `PG_PUBSUB_HARNESS_CHILD` set to a scenario.
#[test]
fn child_entry() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return;
    };
    match scenario.as_str() {
        "exit" | "kill" => {
            let server = TestServer::start().expect("start server in child");
            let data_dir = server.data_dir().expect("owned").display().to_string();
            // Straight to the stdout handle: println! would be captured.
            writeln!(std::io::stdout().lock(), "{DATA_DIR_LINE}{data_dir}").expect("write stdout");
            if scenario == "exit" {
                // Leaves without running destructors.
                std::process::exit(0);
            }
            // Wait for the parent's SIGKILL.
            std::thread::sleep(Duration::from_secs(300));
            panic!("parent did not kill us");
        }
        "shared" => {
            let _ = TestServer::shared();
            panic!("shared() returned although no server can be started");
        }
        "external" => {
            let server = TestServer::from_env_or_start().expect("server from DATABASE_URL");
            assert!(!server.is_owned());
            assert!(server.data_dir().is_none());
            assert_eq!(server.url(), "postgres://alice:s3cret@127.0.0.1:1/app");
            assert_eq!(server.config().get_user(), Some("alice"));
            for shown in [format!("{server}"), format!("{server:?}")] {
                assert!(!shown.contains("s3cret"), "password shown in {shown}");
                assert!(shown.contains("alice"), "{shown}");
            }
            let err = server
                .stop()
                .expect_err("an external server cannot be stopped");
            assert!(!err.to_string().contains("s3cret"), "{err}");
            assert!(server.restart().is_err());
            writeln!(std::io::stdout().lock(), "EXTERNAL_OK").expect("write stdout");
        }
        other => panic!("unknown {CHILD_ENV} scenario {other:?}"),
    }
}
