//! The `pg-pubsub` binary end to end, against the test server.
#![cfg(feature = "cli")]

mod common;

use std::process::{Output, Stdio};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use common::{channel, raw_client, raw_listener, recv, recv_until, server, WAIT};
use pg_pubsub::Text;

/// The binary with `DATABASE_URL` set; killed if the test ends before it does.
fn cli(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pg-pubsub"));
    cmd.args(args)
        .env("DATABASE_URL", server().url())
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs to completion within [`WAIT`].
async fn run(mut cmd: Command) -> Output {
    let child = cmd.spawn().expect("spawn pg-pubsub");
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("pg-pubsub did not exit in time")
        .expect("wait for pg-pubsub")
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A failed run must say why in exactly one `pg-pubsub: error:` line.
fn assert_one_error_line(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure: {out:?}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = stderr_lines(out);
    assert_eq!(lines.len(), 1, "expected one stderr line: {lines:?}");
    let line = lines.into_iter().next().unwrap_or_default();
    assert!(line.starts_with("pg-pubsub: error: "), "{line}");
    assert!(!line.contains("panicked"), "{line}");
    assert!(out.stdout.is_empty(), "{out:?}");
    line
}

async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut Lines<R>) -> String {
    tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("timed out waiting for a line")
        .expect("read a line")
        .expect("output ended")
}

/// A running `pg-pubsub listen`.
struct Listener {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl Listener {
    /// Starts listening and returns once the binary says it listens.
    async fn start(channels: &[&str]) -> (Listener, String) {
        let mut args = vec!["listen"];
        args.extend_from_slice(channels);
        Listener::spawn(&args).await
    }

    /// Starts any long-running subcommand; returns its first stderr line.
    async fn spawn(args: &[&str]) -> (Listener, String) {
        let mut child = cli(args).spawn().expect("spawn pg-pubsub");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut l = Listener {
            child,
            stdout,
            stderr,
        };
        let first = next_line(&mut l.stderr).await;
        (l, first)
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    async fn wait(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("pg-pubsub did not exit in time")
            .expect("wait for pg-pubsub")
    }
}

#[tokio::test]
async fn listen_prints_json_lines_and_exits_cleanly_on_sigterm() {
    let orders = channel("cli_orders");
    let other = channel("cli_Other");
    let (mut l, first) = Listener::start(&[&orders, &other]).await;
    assert_eq!(first, format!("pg-pubsub: listening on {orders}, {other}"));

    let client = raw_client().await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let payload = r#"{"id":1} with "quotes", é and \ backslash"#;
    client
        .execute("SELECT pg_notify($1, $2)", &[&other, &payload])
        .await
        .expect("notify");

    let line = next_line(&mut l.stdout).await;
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["channel"], other.as_str(), "{line}");
    assert_eq!(v["payload"], payload, "{line}");
    assert_eq!(v["process_id"], pid, "{line}");
    assert!(v["origin"].is_null(), "{line}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(4), "{line}");

    l.signal("-TERM");
    let status = l.wait().await;
    assert!(status.success(), "{status:?}");
    // Nothing else was printed on stdout, and no panic on stderr.
    assert_eq!(l.stdout.next_line().await.expect("read"), None);
    while let Some(line) = l.stderr.next_line().await.expect("read") {
        assert!(line.starts_with("pg-pubsub: "), "{line}");
        assert!(!line.contains("panicked"), "{line}");
    }
}

/// `pg-pubsub dev`: a server one can connect to at the printed URL, gone
/// (port closed) after SIGINT.
#[tokio::test]
async fn dev_starts_a_throwaway_server_and_removes_it_on_sigint() {
    let (mut dev, first) = Listener::spawn(&["dev"]).await;
    assert!(first.starts_with("pg-pubsub: starting"), "{first}");
    let export = next_line(&mut dev.stdout).await;
    let url = export
        .strip_prefix("export DATABASE_URL=")
        .unwrap_or_else(|| panic!("an export line: {export}"))
        .to_owned();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the dev server");
    let conn = tokio::spawn(conn);
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(level, "logical");
    drop(client);
    let _ = conn.await;
    dev.signal("-INT");
    let status = dev.wait().await;
    assert!(status.success(), "{status:?}");
    let gone = tokio_postgres::connect(&url, tokio_postgres::NoTls).await;
    assert!(gone.is_err(), "the server still answers after exit");
}

#[tokio::test]
async fn listen_exits_cleanly_on_sigint() {
    let ch = channel("cli_int");
    let (mut l, first) = Listener::start(&[&ch]).await;
    assert_eq!(first, format!("pg-pubsub: listening on {ch}"));
    l.signal("-INT");
    let status = l.wait().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn notify_reaches_a_plain_listener() {
    let ch = channel("cli_notify");
    let (_client, mut rx) = raw_listener(&ch).await;
    let out = run(cli(&["notify", &ch, "hello 'world'"])).await;
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let (channel, payload, pid) = recv(&mut rx).await;
    assert_eq!(channel, ch);
    assert_eq!(payload, "hello 'world'");
    assert!(pid > 0);
}

#[tokio::test]
async fn notify_stdin_sends_every_line_in_order() {
    let ch = channel("cli_stdin");
    let (_client, mut rx) = raw_listener(&ch).await;
    // Repeats, both adjacent and spread out, must not be merged by the server.
    let lines: Vec<String> = (0..2500)
        .map(|i| match i % 10 {
            0 | 1 => "same".to_owned(),
            5 => format!("group {}", i % 3),
            _ => format!("line {i}"),
        })
        .collect();

    let mut cmd = cli(&["notify", &ch, "--stdin"]);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn pg-pubsub notify --stdin");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = lines.join("\n") + "\n";
    let writer = tokio::spawn(async move {
        stdin
            .write_all(input.as_bytes())
            .await
            .expect("write stdin");
        // Dropping stdin closes it: end of input.
    });
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("pg-pubsub did not exit in time")
        .expect("wait for pg-pubsub");
    writer.await.expect("writer");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stderr_lines(&out), ["pg-pubsub: sent 2500 notifications"]);

    let mut received = Vec::with_capacity(lines.len());
    while received.len() < lines.len() {
        let (channel, payload, _) = recv(&mut rx).await;
        assert_eq!(channel, ch);
        received.push(payload);
    }
    assert_eq!(received, lines);
}

#[tokio::test]
async fn overlong_channel_is_one_error_line() {
    let ch = "c".repeat(64);
    let out = run(cli(&["notify", &ch, "x"])).await;
    let line = assert_one_error_line(&out);
    assert!(line.contains("64 bytes"), "{line}");
    let out = run(cli(&["listen", "ok", &ch])).await;
    assert_one_error_line(&out);
}

#[tokio::test]
async fn oversized_payload_is_one_error_line() {
    let ch = channel("cli_big");
    let out = run(cli(&["notify", &ch, &"p".repeat(8000)])).await;
    let line = assert_one_error_line(&out);
    assert!(
        line.contains("payload is 8000 bytes") && line.contains("7999"),
        "{line}"
    );
}

/// Runs `notify --stdin` on `channel` with `input`, which it may stop reading early.
async fn notify_stdin(channel: &str, input: Vec<u8>) -> Output {
    let mut cmd = cli(&["notify", channel, "--stdin"]);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn pg-pubsub notify --stdin");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        // The binary may exit before reading it all.
        let _ = stdin.write_all(&input).await;
    });
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("pg-pubsub did not exit in time")
        .expect("wait for pg-pubsub");
    writer.await.expect("writer");
    out
}

#[tokio::test]
async fn oversized_stdin_line_is_one_error_line() {
    let ch = channel("cli_big_stdin");
    let input = format!("ok\n{}\n", "p".repeat(8000));
    let out = notify_stdin(&ch, input.into_bytes()).await;
    let line = assert_one_error_line(&out);
    assert!(line.contains("line 2") && line.contains("7999"), "{line}");
}

#[tokio::test]
async fn endless_stdin_line_is_refused_without_reading_it_all() {
    let ch = channel("cli_endless");
    let (_listener, mut rx) = raw_listener(&ch).await;
    // 50 MB and no newline: the old reader held all of it before checking.
    let mut input = b"ok\n".to_vec();
    input.resize(50 << 20, b'p');
    let out = notify_stdin(&ch, input).await;
    let line = assert_one_error_line(&out);
    assert!(
        line.contains("line 2: payload is more than 7999 bytes")
            && line.ends_with("nothing was sent before"),
        "{line}"
    );
    send_sentinel(&ch).await;
    assert_eq!(recv_until(&mut rx, "sentinel").await, Vec::<String>::new());
}

#[tokio::test]
async fn bad_stdin_line_stops_after_the_batches_it_reports() {
    let ch = channel("cli_bad_line");
    let (_listener, mut rx) = raw_listener(&ch).await;
    let good: Vec<String> = (1..=2500).map(|i| format!("line {i}")).collect();
    let input = format!("{}\na\0b\nnever read\n", good.join("\n"));
    let out = notify_stdin(&ch, input.into_bytes()).await;
    let line = assert_one_error_line(&out);
    assert!(
        line.contains("line 2501: payload contains a NUL byte"),
        "{line}"
    );
    // Batches of 1000: the first two went out whole, the third not at all.
    assert!(line.ends_with("lines 1 to 2000 were sent before"), "{line}");
    send_sentinel(&ch).await;
    assert_eq!(recv_until(&mut rx, "sentinel").await, good[..2000]);
}

/// Notifies `sentinel` on `channel` after everything else committed.
async fn send_sentinel(channel: &str) {
    raw_client()
        .await
        .execute("SELECT pg_notify($1, 'sentinel')", &[&channel])
        .await
        .expect("notify the sentinel");
}

#[tokio::test]
async fn unreachable_server_is_one_error_line() {
    let out = run(cli(&[
        "--url",
        "postgres://postgres@127.0.0.1:1/x",
        "notify",
        "ch",
        "x",
    ]))
    .await;
    let line = assert_one_error_line(&out);
    assert!(line.contains("connect"), "{line}");
    let mut cmd = cli(&["listen", "ch"]);
    cmd.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x");
    assert_one_error_line(&run(cmd).await);
}

#[tokio::test]
async fn missing_url_is_one_error_line() {
    let mut cmd = cli(&["notify", "ch", "x"]);
    cmd.env_remove("DATABASE_URL");
    let line = assert_one_error_line(&run(cmd).await);
    assert!(line.contains("DATABASE_URL"), "{line}");
}

#[tokio::test]
async fn usage_errors_keep_clap_exit_code() {
    let out = run(cli(&["notify", "ch"])).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(cli(&["notify", "ch", "x", "--stdin"])).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test]
async fn listener_loss_is_reported_on_stderr_and_healed() {
    let ch = channel("cli_gap");
    let (mut l, first) = Listener::start(&[&ch]).await;
    assert_eq!(first, format!("pg-pubsub: listening on {ch}"));

    let client = raw_client().await;
    let pattern = format!("%{ch}%");
    let pids: Vec<i32> = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
            &[&pattern],
        )
        .await
        .expect("find the listener")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids.len(), 1, "the listener session: {pids:?}");
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .expect("terminate");

    let mut seen = Vec::new();
    loop {
        let line = next_line(&mut l.stderr).await;
        let done = line.starts_with(&format!("pg-pubsub: gap on {ch}: "));
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(
        seen[0].starts_with("pg-pubsub: disconnected: ") && seen[0].contains("57P01"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.starts_with("pg-pubsub: reconnected after ")),
        "{seen:?}"
    );
    let gap = seen.last().cloned().unwrap_or_default();
    assert!(
        gap.contains("listener reconnected after")
            && gap.ends_with("messages may have been missed"),
        "{gap}"
    );

    // Healed: later messages arrive.
    client
        .execute("SELECT pg_notify($1, 'after')", &[&ch])
        .await
        .expect("notify");
    let v: serde_json::Value =
        serde_json::from_str(&next_line(&mut l.stdout).await).expect("a JSON line");
    assert_eq!(v["payload"], "after");
    l.signal("-TERM");
    assert!(l.wait().await.success());
}

#[tokio::test]
async fn url_sslmode_is_honoured() {
    let server = tokio::task::spawn_blocking(|| {
        pg_pubsub::testing::TestServer::start_with(pg_pubsub::testing::TestOptions {
            tls: true,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("TLS cluster");
    let port = server.port().unwrap();
    let ca = server.ca_cert().unwrap().display().to_string();
    let verified = format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    let out = run(cli(&["--url", &verified, "notify", "ch", "x"])).await;
    assert!(out.status.success(), "{out:?}");
    let required = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=require");
    let out = run(cli(&["--url", &required, "notify", "ch", "x"])).await;
    assert!(out.status.success(), "{out:?}");
    // The certificate names localhost, not 127.0.0.1.
    let wrong_name = verified.replace("localhost", "127.0.0.1");
    let line = assert_one_error_line(&run(cli(&["--url", &wrong_name, "notify", "ch", "x"])).await);
    assert!(line.contains("certificate"), "{line}");
}

/// A session that holds `channel`'s election lock without leading it (a
/// foreign advisory lock on the same key): the standby says so on one line.
#[tokio::test]
async fn a_blocked_election_is_one_readable_line() {
    let ch = channel("cli_blocked");
    let holder = raw_client().await;
    let seed = pg_pubsub::election::LOCK_SEED;
    holder
        .execute(
            &format!(
                "SELECT pg_advisory_lock((hashtextextended($1::text, {seed}) >> 32)::int4, \
                 hashtextextended($1::text, {seed})::bit(32)::int4)"
            ),
            &[&ch],
        )
        .await
        .expect("take the lock");
    let (mut l, _) = Listener::start(&["--elect", &ch]).await;
    let line = loop {
        let line = next_line(&mut l.stderr).await;
        if line.contains("cannot lead") {
            break line;
        }
    };
    assert!(line.contains("which does not lead it"), "{line}");
    assert!(!line.contains("  "), "a run of spaces: {line:?}");
    l.signal("-TERM");
    assert!(l.wait().await.success());
}

/// A server that accepts connections and never answers; the address to
/// give `--url` (loopback, a port of its own).
async fn silent_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

#[tokio::test]
async fn the_urls_connect_timeout_wins_over_the_default() {
    let addr = silent_server().await;
    let url = format!("postgres://postgres@{addr}/x?connect_timeout=2");
    for args in [
        &["notify", "ch", "x"][..],
        &["queue", "stats"],
        &["listen", "ch"],
    ] {
        let mut cmd = cli(args);
        cmd.env("DATABASE_URL", &url);
        let started = std::time::Instant::now();
        let out = run(cmd).await;
        let took = started.elapsed();
        let line = assert_one_error_line(&out);
        // The CLI's own default is 10 s.
        assert!(
            took >= std::time::Duration::from_millis(1500)
                && took < std::time::Duration::from_secs(7),
            "{args:?} took {took:?}: {line}"
        );
        assert!(
            line.contains(&format!("cannot connect to {addr}: ")) && line.contains("2s"),
            "{line}"
        );
        assert!(!line.contains("listener"), "{line}");
    }
}

#[tokio::test]
async fn connection_errors_name_the_server_and_the_reason() {
    let out = run(cli(&[
        "--url",
        "postgres://postgres@127.0.0.1:1/x",
        "queue",
        "stats",
    ]))
    .await;
    let line = assert_one_error_line(&out);
    assert!(
        line.starts_with("pg-pubsub: error: cannot connect to 127.0.0.1:1: ")
            && line.contains("refused"),
        "{line}"
    );
    let out = run(cli(&[
        "--url",
        "postgres://u@h/x?bogus=1",
        "notify",
        "ch",
        "x",
    ]))
    .await;
    let line = assert_one_error_line(&out);
    assert!(
        line.ends_with("invalid connection string: unknown option `bogus`"),
        "{line}"
    );
    let out = run(cli(&["--url", "host=h port=abc", "notify", "ch", "x"])).await;
    let line = assert_one_error_line(&out);
    assert!(line.contains("`port`"), "{line}");
}

#[tokio::test]
async fn an_unquoted_odd_table_name_hints_at_quoting() {
    let (ps, _q) = common::queue().await;
    ps.changes().durable().install().await.expect("install");
    let out = run(cli(&["changes", "install", "--table", "Order Items"])).await;
    let line = assert_one_error_line(&out);
    assert!(
        line.contains("42602") && line.contains(r#"--table '"Order Items"'"#),
        "{line}"
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn queue_work_refuses_a_command_it_cannot_run() {
    // No server: the command is checked before connecting.
    let unreachable = "postgres://postgres@127.0.0.1:1/x";
    let dir = std::env::temp_dir().join(format!("pg-pubsub-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let plain = dir.join("not-executable.sh");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").expect("write script");
    let plain = plain.display().to_string();
    for (command, why) in [
        ("pg-pubsub-no-such-command", "command not found in PATH"),
        ("/nonexistent/handler", "No such file"),
        (plain.as_str(), "not executable"),
    ] {
        let out = run(cli(&[
            "--url",
            unreachable,
            "queue",
            "work",
            "q",
            "--",
            command,
        ]))
        .await;
        let line = assert_one_error_line(&out);
        assert!(
            line.contains(&format!("cannot run {command}")) && line.contains(why),
            "{line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn queue_work_reports_retries_and_dead_jobs() {
    let (ps, q) = common::queue().await;
    let name = channel("cli_retry");
    let id = q
        .enqueue(&name, Text("x"))
        .max_attempts(2)
        .await
        .expect("enqueue")
        .id()
        .expect("new job");
    let mut fleet = common::fleet::Fleet::new();
    let script = "echo \"boom on attempt $PGPUBSUB_ATTEMPT\" >&2; exit 3";
    let worker = fleet.spawn_worker(&[&name, "--", "sh", "-c", script]).await;
    fleet.wait_err(|_, l| l.contains("is dead")).await;
    assert!(fleet.signal(worker, "-TERM").await.success());
    let lines: Vec<&str> = fleet.stderr.iter().map(|(_, l)| l.as_str()).collect();
    let retried = format!("pg-pubsub: job {id} of queue {name} failed (attempt 1): ");
    assert!(
        lines.iter().any(|l| l.starts_with(&retried)
            && l.contains("boom on attempt 1")
            && l.contains("retrying in")),
        "{lines:#?}"
    );
    let dead = format!("pg-pubsub: job {id} of queue {name} is dead after 2 attempt(s): ");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&dead) && l.contains("boom on attempt 2")),
        "{lines:#?}"
    );
    ps.shutdown().await;
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn process_ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_sigkilled_workers_command_dies_with_it() {
    let (ps, q) = common::queue().await;
    let name = channel("cli_orphan");
    let started = channel("cli_orphan_started");
    let (_listener, mut rx) = raw_listener(&started).await;
    let mut fleet = common::fleet::Fleet::new();
    let bin = env!("CARGO_BIN_EXE_pg-pubsub");
    // Says its pid, then becomes a long sleep (same pid).
    let script = format!("'{bin}' notify '{started}' $$ >/dev/null; exec sleep 300");
    let worker = fleet
        .spawn_worker(&[&name, "--", "sh", "-c", &script])
        .await;
    q.enqueue(&name, Text("x")).await.expect("enqueue");
    let pid: i32 = recv(&mut rx).await.1.parse().expect("a pid");
    assert!(!process_ended(pid), "the command runs");
    assert!(!fleet.signal(worker, "-KILL").await.success());
    let gone = async {
        while !process_ended(pid) {
            // No event for another process's end: poll.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(WAIT, gone).await.is_err() {
        common::send_signal(pid, "-KILL");
        panic!("the command {pid} outlived its SIGKILLed worker");
    }
    ps.shutdown().await;
}

/// A fresh table `schema.t` of its own and a slot name for it.
async fn wal_table(prefix: &str) -> (String, String) {
    let s = channel(prefix);
    raw_client()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {s}; CREATE TABLE {s}.t (id int PRIMARY KEY)"
        ))
        .await
        .expect("create the table");
    (format!("{s}.t"), format!("{s}_slot"))
}

async fn slot_exists(slot: &str) -> bool {
    raw_client()
        .await
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("pg_replication_slots")
        .is_some()
}

#[tokio::test]
async fn changes_tail_wal_keeps_its_slot_until_drop_slot() {
    let (table, slot) = wal_table("cli_slot").await;
    let mut fleet = common::fleet::Fleet::new();
    let args = [
        "changes", "tail", "--table", &table, "--wal", "--slot", &slot,
    ];
    let tail = fleet.spawn_cmd(&args, |l| l.contains("tailing")).await;
    let creating = format!("pg-pubsub: creating slot {slot}: waiting for the transactions");
    assert!(
        fleet.stderr.iter().any(|(_, l)| l.starts_with(&creating)),
        "{:?}",
        fleet.stderr
    );
    // Refused while it streams, saying why.
    let line = assert_one_error_line(&run(cli(&["changes", "drop-slot", &slot])).await);
    assert!(
        line.contains("55006") && line.contains("stop it first"),
        "{line}"
    );

    assert!(fleet.signal(tail, "-TERM").await.success());
    let kept = fleet
        .wait_err(|i, l| i == tail && l.contains("is kept"))
        .await;
    let line = &fleet.stderr.last().expect("a line").1;
    assert_eq!(kept, tail);
    assert!(
        line.contains(&format!("pg-pubsub changes drop-slot {slot}")),
        "{line}"
    );
    assert!(slot_exists(&slot).await);
    // Right after the exit: the server has let go of the slot.
    let out = run(cli(&["changes", "drop-slot", &slot])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        [format!("pg-pubsub: dropped slot {slot}")]
    );
    assert!(!slot_exists(&slot).await);
    let line = assert_one_error_line(&run(cli(&["changes", "drop-slot", &slot])).await);
    assert!(
        line.ends_with(&format!("no replication slot {slot}")),
        "{line}"
    );
}

#[tokio::test]
async fn changes_tail_wal_can_drop_its_slot_on_exit() {
    let (table, slot) = wal_table("cli_slot_exit").await;
    let mut fleet = common::fleet::Fleet::new();
    let args = [
        "changes",
        "tail",
        "--table",
        &table,
        "--wal",
        "--slot",
        &slot,
        "--drop-slot-on-exit",
    ];
    common::create_slot(&slot).await;
    let tail = fleet.spawn_cmd(&args, |l| l.contains("tailing")).await;
    assert!(fleet.signal(tail, "-TERM").await.success());
    fleet
        .wait_err(|i, l| i == tail && l.contains(&format!("dropped slot {slot}")))
        .await;
    assert!(!slot_exists(&slot).await);
    assert!(
        !fleet.stderr.iter().any(|(_, l)| l.contains("is kept")),
        "{:?}",
        fleet.stderr
    );
}

/// `changes tail --wal --snapshot` over 100,000 rows while rows are
/// inserted, updated and deleted, SIGKILLed once mid-snapshot and once
/// after it: the replica built from all the lines printed is the table,
/// every row that existed and was not touched is read, no row twice
/// within a run, and only the chunk in flight at the kill twice in all.
#[tokio::test]
async fn changes_tail_snapshot_survives_sigkill_mid_snapshot_and_after() {
    use common::snapshot::{insert_sentinel, Replica, Writer};
    const ROWS: i64 = 100_000;
    let (table, slot) = wal_table("cli_snap").await;
    raw_client()
        .await
        .batch_execute(&format!(
            "ALTER TABLE {table} ADD COLUMN v text; \
             INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, {ROWS}) g"
        ))
        .await
        .expect("fill the table");
    let writer = Writer::start(&table, ROWS);
    let mut fleet = common::fleet::Fleet::new();
    let args = [
        "changes",
        "tail",
        "--table",
        &table,
        "--wal",
        "--slot",
        &slot,
        "--snapshot",
        "--chunk-rows",
        "5000",
    ];
    let tailing = |l: &str| l.contains("tailing");
    let first = fleet.spawn_cmd(&args, tailing).await;
    // 30,000 lines hold at most 30,000 of the 100,000 reads: mid-snapshot.
    wait_lines(&mut fleet, first, |f| f.received[first].len() >= 30_000).await;
    let walsender = slot_pid(&slot).await;
    fleet.signal(first, "-KILL").await;
    if let Some(pid) = walsender {
        common::wait_backend_gone(pid).await;
    }

    let second = fleet.spawn_cmd(&args, tailing).await;
    let finished = |f: &common::fleet::Fleet| {
        f.stderr.iter().any(|(i, l)| {
            *i == second && l.starts_with("pg-pubsub: snapshot ") && l.contains(" finished ")
        })
    };
    wait_lines(&mut fleet, second, finished).await;
    let walsender = slot_pid(&slot).await;
    fleet.signal(second, "-KILL").await;
    if let Some(pid) = walsender {
        common::wait_backend_gone(pid).await;
    }
    let touched = writer.stop().await;
    insert_sentinel(&table).await;

    // The snapshot is done: a third run only has changes.
    let third = fleet.spawn_cmd(&args, tailing).await;
    fleet
        .wait_for(|f| {
            f.received[third]
                .last()
                .is_some_and(|l| l.contains("\"sentinel\""))
        })
        .await;
    assert!(fleet.signal(third, "-TERM").await.success());

    let runs: Vec<Vec<serde_json::Value>> = [first, second, third]
        .iter()
        .map(|i| {
            fleet.received[*i]
                .iter()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect()
        })
        .collect();
    // Reads of each run: id -> the watermark (chunk) that carried it.
    let reads = |run: &[serde_json::Value]| {
        let mut by_id = std::collections::HashMap::new();
        for line in run.iter().filter(|l| l["op"] == "read") {
            let id = line["new"]["id"].as_i64().expect("id");
            let chunk = line["lsn"].as_str().expect("lsn").to_owned();
            assert!(
                by_id.insert(id, chunk).is_none(),
                "id {id} read twice in a run"
            );
        }
        by_id
    };
    let (one, two, three) = (reads(&runs[0]), reads(&runs[1]), reads(&runs[2]));
    assert!(three.is_empty(), "a completed snapshot was read again");
    let last_chunk = runs[0]
        .iter()
        .rev()
        .find(|l| l["op"] == "read")
        .map(|l| l["lsn"].clone())
        .expect("reads in the first run");
    for (id, chunk) in &one {
        if two.contains_key(id) {
            assert_eq!(
                chunk.as_str(),
                last_chunk.as_str().unwrap_or_default(),
                "id {id} read again, but not from the chunk in flight at the kill"
            );
        }
    }
    for id in (1..=ROWS).filter(|id| !touched.contains(id)) {
        assert!(
            one.contains_key(&id) || two.contains_key(&id),
            "id {id} was never read"
        );
    }
    let mut replica = Replica::default();
    for line in runs.iter().flatten() {
        replica.apply_json(line);
    }
    replica.assert_is(&table, |_| true).await;
}

/// Reads the fleet's lines until `done`, as long as process `i` prints
/// 5,000 lines within each [`WAIT`] (a debug build prints 100,000 slowly).
async fn wait_lines(
    fleet: &mut common::fleet::Fleet,
    i: usize,
    done: impl Fn(&common::fleet::Fleet) -> bool,
) {
    while !done(fleet) {
        let seen = fleet.received[i].len();
        fleet
            .wait_for(|f| f.received[i].len() >= seen + 5000 || done(f))
            .await;
    }
}

/// The pid of the walsender streaming from `slot`, if one does.
async fn slot_pid(slot: &str) -> Option<i32> {
    raw_client()
        .await
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("pg_replication_slots")
        .and_then(|r| r.get(0))
}

/// JSON lines of a successful run's stdout.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A dead job of `queue` made by hand, as a worker would move it; its id.
async fn make_dead_job(queue: &str, payload: &str) -> i64 {
    let ps = common::pubsub().await;
    ps.queue().install().await.expect("install");
    ps.shutdown().await;
    common::insert_dead_job(queue, payload, 2, "exit 1").await
}

#[tokio::test]
async fn queue_jobs_and_job_print_json_lines_from_the_admin_layer() {
    let q = channel("cli_jobs");
    let mut ids = Vec::new();
    for i in 0..3 {
        let out = run(cli(&["queue", "enqueue", &q, &format!("job {i}")])).await;
        assert!(out.status.success(), "{out:?}");
        ids.push(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<i64>()
                .expect("id"),
        );
    }
    let dead = make_dead_job(&q, "dead one").await;

    let out = run(cli(&["queue", "jobs", &q, "--limit", "2"])).await;
    let lines = json_lines(&out);
    let got: Vec<i64> = lines
        .iter()
        .map(|l| l["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(got, ids[..2]);
    assert_eq!(lines[0]["state"], "ready");
    assert_eq!(lines[0]["payload"], "job 0");
    let next = format!("pg-pubsub: more jobs may follow: --after {}", ids[1]);
    assert_eq!(stderr_lines(&out), [next]);
    let after = ids[1].to_string();
    let out = run(cli(&["queue", "jobs", &q, "--after", &after])).await;
    assert_eq!(json_lines(&out)[0]["id"], ids[2]);

    let out = run(cli(&["queue", "jobs", &q, "--state", "dead"])).await;
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], dead);
    assert_eq!(lines[0]["last_error"], "exit 1");

    let out = run(cli(&["queue", "job", &dead.to_string()])).await;
    let lines = json_lines(&out);
    assert_eq!(lines[0]["state"], "dead");
    assert_eq!(lines[0]["payload"], "dead one");
    assert!(lines[0]["died_at"].is_string());

    let out = run(cli(&["queue", "job", "9223372036854775807"])).await;
    let line = assert_one_error_line(&out);
    assert!(line.contains("no job"), "{line}");
    let out = run(cli(&["queue", "jobs", &q, "--state", "done"])).await;
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");
}

#[tokio::test]
async fn durable_groups_and_changes_slots_print_json_lines() {
    let ch = channel("cli_groups");
    let ps = common::pubsub().await;
    ps.durable()
        .publish(&ch, &serde_json::json!(1))
        .await
        .expect("publish");
    let _sub = ps
        .durable()
        .subscribe::<serde_json::Value>(&ch, "g")
        .await
        .expect("subscribe");
    let out = run(cli(&["durable", "groups", &ch])).await;
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["channel"], ch.as_str());
    assert_eq!(lines[0]["group"], "g");
    assert!(lines[0]["lag_messages"].is_u64());
    ps.shutdown().await;

    let table = channel("cli_feeds");
    raw_client()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("table");
    let out = run(cli(&[
        "changes", "install", "--table", &table, "--level", "row",
    ]))
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = run(cli(&["changes", "feeds"])).await;
    let lines = json_lines(&out);
    let feed = lines
        .iter()
        .find(|l| l["table"] == table.as_str())
        .unwrap_or_else(|| panic!("{table} missing: {lines:?}"));
    assert_eq!(feed["level"], "row");
    assert_eq!(feed["target"], "durable");

    let slot = channel("cli_slots");
    common::create_slot(&slot).await;
    let out = run(cli(&["changes", "slots"])).await;
    let lines = json_lines(&out);
    let mine = lines
        .iter()
        .find(|l| l["name"] == slot.as_str())
        .unwrap_or_else(|| panic!("{slot} missing: {lines:?}"));
    assert_eq!(mine["plugin"], "pgoutput");
    assert_eq!(mine["kind"], "logical");
    raw_client()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
}

/// `pg-pubsub serve` on a free loopback port; the process and its base URL.
async fn start_serve(token: Option<&str>) -> (Listener, String) {
    let mut cmd = cli(&["serve", "--listen", "127.0.0.1:0", "--sample-every", "1"]);
    cmd.env_remove("PGPUBSUB_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("PGPUBSUB_ADMIN_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("spawn pg-pubsub serve");
    let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut l = Listener {
        child,
        stdout,
        stderr,
    };
    let first = next_line(&mut l.stderr).await;
    let url = first
        .strip_prefix("pg-pubsub: serving the dashboard on ")
        .and_then(|rest| rest.split_once("/ ("))
        .map(|(url, _)| url.to_owned())
        .unwrap_or_else(|| panic!("unexpected first line: {first}"));
    let mode = if token.is_some() {
        "(admin token set)"
    } else {
        "(read-only (no admin token))"
    };
    assert!(first.ends_with(mode), "{first}");
    (l, url)
}

#[tokio::test]
async fn serve_binds_loopback_is_read_only_without_a_token_and_logs_mutations() {
    let q = channel("cli_serve");
    let dead = make_dead_job(&q, "<script>x</script>").await;
    let http = reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client");

    let (mut ro, url) = start_serve(None).await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let resp = http
        .get(format!("{url}/api/dead?queue={q}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["jobs"][0]["id"], dead);
    let resp = http
        .post(format!("{url}/api/dead/{dead}/retry"))
        .header("authorization", "Bearer anything")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN);
    ro.signal("-TERM");
    assert!(ro.wait().await.success());

    let (mut rw, url) = start_serve(Some("cli-t0ken")).await;
    let resp = http
        .post(format!("{url}/api/dead/{dead}/retry"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    let resp = http
        .post(format!("{url}/api/dead/{dead}/retry"))
        .header("authorization", "Bearer cli-t0ken")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    // The mutation is logged on stderr.
    loop {
        let line = next_line(&mut rw.stderr).await;
        if line.contains("admin: dead job retried") {
            assert!(line.contains(&dead.to_string()), "{line}");
            break;
        }
    }
    assert_eq!(common::where_is(dead).await, "ready");
    rw.signal("-TERM");
    assert!(rw.wait().await.success());
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn queue_cancel_stops_a_running_command_with_sigterm_and_the_job_ends_cancelled() {
    let (ps, q) = common::queue().await;
    let name = channel("cli_cancel");
    let said = channel("cli_cancel_said");
    let (_listener, mut rx) = raw_listener(&said).await;
    let mut fleet = common::fleet::Fleet::new();
    let bin = env!("CARGO_BIN_EXE_pg-pubsub");
    // Says it started, then sleeps; says when SIGTERM reaches it.
    let script = format!(
        "trap \"'{bin}' notify '{said}' term >/dev/null; exit 143\" TERM; \
         '{bin}' notify '{said}' started >/dev/null; sleep 30 & wait"
    );
    let worker = fleet
        .spawn_worker(&[&name, "--cancel-grace", "20", "--", "sh", "-c", &script])
        .await;
    let id = q
        .enqueue(&name, Text("x"))
        .await
        .expect("enqueue")
        .id()
        .expect("new");
    assert_eq!(recv(&mut rx).await.1, "started");
    let asked = std::time::Instant::now();
    let out = run(cli(&["queue", "cancel", &id.to_string()])).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr_lines(&out)
            .iter()
            .any(|l| l.contains("its worker was told")),
        "{out:?}"
    );
    assert_eq!(recv(&mut rx).await.1, "term");
    let ended = format!("pg-pubsub: job {id} of queue {name} was cancelled");
    fleet.wait_err(|_, l| l == ended).await;
    eprintln!("cancelled in {:?}", asked.elapsed());
    assert!(
        !fleet.stderr.iter().any(|(_, l)| l.contains("retrying in")),
        "{:#?}",
        fleet.stderr
    );
    let out = run(cli(&["queue", "finished", &name])).await;
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{out:?}");
    assert_eq!(
        (lines[0]["id"].as_i64(), lines[0]["state"].as_str()),
        (Some(id), Some("cancelled"))
    );
    let out = run(cli(&["queue", "cancel", &id.to_string()])).await;
    assert!(
        stderr_lines(&out)
            .iter()
            .any(|l| l.contains("already finished")),
        "{out:?}"
    );
    assert!(fleet.signal(worker, "-TERM").await.success());
    ps.shutdown().await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn queue_pause_stops_claims_of_a_worker_process_until_resume() {
    let (ps, q) = common::queue().await;
    let name = channel("cli_pause");
    let said = channel("cli_pause_said");
    let (_listener, mut rx) = raw_listener(&said).await;
    let dir = std::env::temp_dir().join(channel("cli_pause_gate"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let gate = dir.join("gate");
    let made = std::process::Command::new("mkfifo")
        .arg(&gate)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let gate_path = gate.display().to_string();
    let bin = env!("CARGO_BIN_EXE_pg-pubsub");
    // A "block" job waits for a byte on the FIFO before it ends.
    let script = format!(
        "p=$(cat); '{bin}' notify '{said}' \"started $p\" >/dev/null; \
         if [ \"$p\" = block ]; then head -c1 '{gate_path}' >/dev/null; fi; \
         '{bin}' notify '{said}' \"done $p\" >/dev/null"
    );
    let mut fleet = common::fleet::Fleet::new();
    let worker = fleet
        .spawn_worker(&[&name, "--concurrency", "2", "--", "sh", "-c", &script])
        .await;
    q.enqueue(&name, Text("block")).await.expect("enqueue");
    assert_eq!(recv(&mut rx).await.1, "started block");
    let out = run(cli(&["queue", "pause", &name])).await;
    assert!(out.status.success(), "{out:?}");
    let paused = format!("pg-pubsub: queue {name} is paused: claiming nothing until it is resumed");
    fleet.wait_err(|_, l| l == paused).await;
    q.enqueue(&name, Text("after")).await.expect("enqueue");
    // The running command finishes while the queue is paused.
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&gate)?;
        f.write_all(b"x")
    });
    writer.await.expect("join").expect("write the gate");
    assert_eq!(recv(&mut rx).await.1, "done block");
    // Nothing is claimed while paused.
    let quiet = tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv()).await;
    assert!(quiet.is_err(), "claimed while paused: {quiet:?}");
    let out = run(cli(&["queue", "stats"])).await;
    let stats = json_lines(&out);
    let s = stats
        .iter()
        .find(|s| s["queue"] == name.as_str())
        .expect("stats line");
    assert_eq!(
        (s["paused"].as_bool(), s["ready"].as_u64()),
        (Some(true), Some(1)),
        "{s}"
    );
    let out = run(cli(&["queue", "resume", &name])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(recv(&mut rx).await.1, "started after");
    assert_eq!(recv(&mut rx).await.1, "done after");
    assert!(fleet.signal(worker, "-TERM").await.success());
    let _ = std::fs::remove_dir_all(&dir);
    ps.shutdown().await;
}

#[tokio::test]
async fn queue_limit_sets_shows_and_clears_limits() {
    let queue = channel("cli_lim");
    let out = run(cli(&[
        "queue",
        "limit",
        &queue,
        "--concurrency",
        "3",
        "--per-key",
        "1",
        "--rate",
        "10/500ms",
    ]))
    .await;
    assert!(out.status.success(), "{out:?}");
    let set: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(
        set["limits"],
        serde_json::json!({"concurrency": 3, "per_key": 1,
                           "rate": {"count": 10, "per_seconds": 0.5}})
    );
    let out = run(cli(&["queue", "stats"])).await;
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&queue))
        .map(str::to_owned)
        .expect("the limited queue is listed");
    let stats: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(stats["limits"], set["limits"]);
    let out = run(cli(&["queue", "limit", &queue, "--clear"])).await;
    let cleared: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        cleared["limits"],
        serde_json::json!({"concurrency": null, "per_key": null, "rate": null})
    );
    let out = run(cli(&["queue", "limit", &queue, "--rate", "ten/s"])).await;
    assert_eq!(out.status.code(), Some(2), "a usage error");
}
