//! Throwaway PostgreSQL servers for tests and examples.
//!
//! Enabled by the `testing` cargo feature. [`TestServer::start`] creates a
//! brand-new cluster in a unique directory under [`std::env::temp_dir`],
//! starts it on a free port of `127.0.0.1` with trust authentication and
//! durability switched off (fast, but never use it for real data), and
//! removes every trace of it again when the [`TestServer`] is dropped.
//!
//! Because statics are never dropped and tests may panic, call
//! [`std::process::exit`] or be killed with `SIGKILL`, each started cluster
//! is also watched by a tiny detached reaper process (`/bin/sh`, in its own
//! process group so Ctrl-C does not reach it first). As soon as the process
//! that started the cluster is gone, the reaper stops the server
//! (`pg_ctl stop -m immediate`) and deletes the directory; it exits on its
//! own once the directory is gone.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, `initdb`,
//! `pg_ctl` and the server run as the `postgres` OS user, which must exist
//! (installing the `postgresql` package creates it).
//!
//! The server binaries (`initdb`, `pg_ctl`) are taken from `PG_BIN_DIR` if
//! set, else from `pg_config --bindir`, else from the highest-versioned
//! `/usr/lib/postgresql/*/bin`, else from `PATH`.
//!
//! ```no_run
//! use pg_pubsub::testing::TestServer;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // One server per test process; `DATABASE_URL` wins if it is set.
//! let server = TestServer::shared();
//! let (client, connection) = tokio_postgres::connect(server.url(), tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//! let row = client.query_one("SELECT 1", &[]).await?;
//! assert_eq!(row.get::<_, i32>(0), 1);
//! # Ok(())
//! # }
//! ```
#![cfg(unix)]

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Seconds `pg_ctl` waits for the server to start or stop (`pg_ctl -t`).
const PG_CTL_TIMEOUT_SECS: u64 = 60;

/// How often a port is re-picked when another process grabbed it first.
const START_ATTEMPTS: usize = 5;

/// Lines of the server log included in error messages.
const LOG_TAIL_LINES: usize = 30;

/// Longest Unix socket path (`sun_path` is 104 bytes on BSDs, 108 on Linux).
const MAX_SOCKET_PATH: usize = 100;

/// The detached reaper. Arguments: `$1` pid to watch, `$2` folder to delete,
/// `$3` data directory, `$4` path of `pg_ctl`, `$5` user to run `pg_ctl` as
/// (empty: the current user).
const REAPER_SCRIPT: &str = r#"
trap '' HUP INT
pid=$1 root=$2 data=$3 pg_ctl=$4 user=$5
alive() {
    kill -0 "$pid" 2>/dev/null || return 1
    # A zombie still answers kill -0, but it is gone for our purposes.
    if [ -r "/proc/$pid/stat" ]; then
        st=
        { read -r st < "/proc/$pid/stat"; } 2>/dev/null
        st=${st##*) }
        case $st in Z*|X*) return 1 ;; esac
    fi
    return 0
}
nap() { sleep 0.1 2>/dev/null || sleep 1; }
while [ -d "$root" ] && alive; do nap; done
[ -d "$root" ] || exit 0
if [ -f "$data/postmaster.pid" ]; then
    if [ -n "$user" ]; then
        runuser -u "$user" -- "$pg_ctl" stop -m immediate -w -t 30 -D "$data" >/dev/null 2>&1 ||
            su -s /bin/sh -c '"$0" stop -m immediate -w -t 30 -D "$1"' "$user" "$pg_ctl" "$data" >/dev/null 2>&1
    else
        "$pg_ctl" stop -m immediate -w -t 30 -D "$data" >/dev/null 2>&1
    fi
fi
if [ -f "$data/postmaster.pid" ]; then
    # pg_ctl could not do it: signal the postmaster directly (SIGQUIT is an
    # immediate shutdown), then wait for it to go away.
    pm=
    { read -r pm < "$data/postmaster.pid"; } 2>/dev/null
    case $pm in
        ''|*[!0-9]*) ;;
        *)
            kill -QUIT "$pm" 2>/dev/null
            i=0
            while [ $i -lt 100 ] && kill -0 "$pm" 2>/dev/null; do nap; i=$((i + 1)); done
            kill -KILL "$pm" 2>/dev/null
            ;;
    esac
fi
rm -rf "$root"
exit 0
"#;

/// Error returned when a [`TestServer`] cannot be found, started, stopped or
/// restarted.
///
/// Its [`Display`](fmt::Display) output is a complete, human-readable
/// explanation: what failed, the output of the failing command and, when the
/// server itself failed, the tail of the server log. When the PostgreSQL
/// server binaries are missing it lists every place that was searched and
/// what to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestServerError {
    message: String,
}

impl TestServerError {
    fn new(message: impl Into<String>) -> Self {
        TestServerError {
            message: message.into(),
        }
    }

    fn io(what: impl fmt::Display, err: io::Error) -> Self {
        TestServerError::new(format!("{what}: {err}"))
    }
}

impl fmt::Display for TestServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TestServerError {}

/// A PostgreSQL server for tests: either a throwaway cluster owned by this
/// value, or an external server named by `DATABASE_URL`.
///
/// An owned cluster listens on `127.0.0.1` on a free port, accepts the
/// superuser `postgres` without a password and is destroyed (server stopped,
/// directory removed) when the value is dropped, or by a reaper process when
/// the test process ends without dropping it.
///
/// `Display` and `Debug` never show a password from `DATABASE_URL`.
pub struct TestServer {
    url: String,
    config: tokio_postgres::Config,
    cluster: Option<Cluster>,
}

impl TestServer {
    /// Creates and starts a fresh throwaway cluster owned by the returned
    /// value, ignoring `DATABASE_URL`.
    ///
    /// Blocks until the server accepts connections (typically one to a few
    /// seconds). From async code, call it through
    /// `tokio::task::spawn_blocking`.
    pub fn start() -> Result<TestServer, TestServerError> {
        let cluster = Cluster::create()?;
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
        let config = parse_config(&url)?;
        tracing::info!(
            url = %url,
            data_dir = %cluster.data_dir.display(),
            "started throwaway PostgreSQL server"
        );
        Ok(TestServer {
            url,
            config,
            cluster: Some(cluster),
        })
    }

    /// Uses the server named by the `DATABASE_URL` environment variable if it
    /// is set and not empty (an external server: not owned, never stopped or
    /// modified by this type), and otherwise [`start`](Self::start)s a
    /// throwaway cluster.
    pub fn from_env_or_start() -> Result<TestServer, TestServerError> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => {
                let config = parse_config(&url)?;
                tracing::info!(url = %redact(&url), "using PostgreSQL server from DATABASE_URL");
                Ok(TestServer {
                    url,
                    config,
                    cluster: None,
                })
            }
            Ok(_) => Self::start(),
            Err(std::env::VarError::NotPresent) => Self::start(),
            Err(std::env::VarError::NotUnicode(_)) => Err(TestServerError::new(
                "DATABASE_URL is set but is not valid UTF-8",
            )),
        }
    }

    /// The server shared by the whole test process, created on first use by
    /// [`from_env_or_start`](Self::from_env_or_start).
    ///
    /// If it cannot be provided, the error is printed to stderr once and the
    /// process exits with status 2, so a test binary shows one clear message
    /// instead of one failure per test. The server lives until the process
    /// ends; the reaper then removes it.
    ///
    /// Tests share this server concurrently: do not [`stop`](Self::stop) or
    /// [`restart`](Self::restart) it, use a server of your own for that.
    pub fn shared() -> &'static TestServer {
        static SHARED: OnceLock<TestServer> = OnceLock::new();
        SHARED.get_or_init(|| match TestServer::from_env_or_start() {
            Ok(server) => server,
            Err(err) => {
                // Not eprintln!: the test harness would capture that, and the
                // captured output is lost when we exit.
                let _ = writeln!(
                    io::stderr().lock(),
                    "pg_pubsub::testing: cannot provide a PostgreSQL server for the tests:\n{err}"
                );
                std::process::exit(2);
            }
        })
    }

    /// The connection URL, e.g. `postgres://postgres@127.0.0.1:PORT/postgres`
    /// for an owned cluster, or `DATABASE_URL` verbatim (password included:
    /// do not log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection configuration parsed from [`url`](Self::url).
    pub fn config(&self) -> tokio_postgres::Config {
        self.config.clone()
    }

    /// Whether this value owns a throwaway cluster (`false` for a server from
    /// `DATABASE_URL`).
    pub fn is_owned(&self) -> bool {
        self.cluster.is_some()
    }

    /// The data directory of an owned cluster (`None` for an external
    /// server). Its parent folder, which also holds the server log, is
    /// removed with it.
    pub fn data_dir(&self) -> Option<&Path> {
        self.cluster.as_ref().map(|c| c.data_dir.as_path())
    }

    /// Stops an owned server (`pg_ctl stop -m fast`), blocking until it is
    /// down. Open connections are terminated. Errors for an external server.
    pub fn stop(&self) -> Result<(), TestServerError> {
        let cluster = self.owned("stop")?;
        let _guard = cluster.lock();
        cluster.stop("fast")
    }

    /// Starts a stopped owned server again, on the same port and with the
    /// same data, and blocks until it accepts connections. Errors for an
    /// external server.
    pub fn start_again(&self) -> Result<(), TestServerError> {
        let cluster = self.owned("start again")?;
        let _guard = cluster.lock();
        cluster.start_server().map_err(|(err, _)| err)?;
        cluster.wait_accepting()
    }

    /// [`stop`](Self::stop) followed by [`start_again`](Self::start_again):
    /// every connection is dropped and new ones succeed afterwards.
    pub fn restart(&self) -> Result<(), TestServerError> {
        let cluster = self.owned("restart")?;
        let _guard = cluster.lock();
        cluster.stop("fast")?;
        cluster.start_server().map_err(|(err, _)| err)?;
        cluster.wait_accepting()
    }

    fn owned(&self, what: &str) -> Result<&Cluster, TestServerError> {
        self.cluster.as_ref().ok_or_else(|| {
            TestServerError::new(format!(
                "cannot {what} the PostgreSQL server at {}: it comes from DATABASE_URL and is not owned by this TestServer",
                redact(&self.url)
            ))
        })
    }
}

impl Drop for TestServer {
    /// For an owned cluster: stops the server at once
    /// (`pg_ctl stop -m immediate`) and removes its directory.
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.destroy();
        }
    }
}

impl fmt::Display for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("url", &redact(&self.url))
            .field("owned", &self.is_owned())
            .field("data_dir", &self.data_dir())
            .finish()
    }
}

fn parse_config(url: &str) -> Result<tokio_postgres::Config, TestServerError> {
    url.parse::<tokio_postgres::Config>().map_err(|err| {
        TestServerError::new(format!(
            "invalid PostgreSQL connection string {}: {err}",
            redact(url)
        ))
    })
}

/// Replaces passwords in a URL (`user:secret@`, `?password=secret`) or a
/// key-value connection string (`password=secret`) with `***`.
fn redact(conn: &str) -> String {
    let mut out = conn.to_string();
    if let Some(scheme_end) = out.find("://") {
        let start = scheme_end + 3;
        let end = out[start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| start + i);
        if let Some(at) = out[start..end].rfind('@') {
            let at = start + at;
            if let Some(colon) = out[start..at].find(':') {
                out.replace_range(start + colon + 1..at, "***");
            }
        }
    }
    let mut from = 0;
    while let Some(pos) = out[from..].to_ascii_lowercase().find("password") {
        let mut i = from + pos + "password".len();
        let bytes = out.as_bytes();
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            from = i;
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let value_start = i;
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
        } else {
            while i < bytes.len() && !matches!(bytes[i], b'&' | b' ' | b'\t' | b'\n') {
                i += 1;
            }
        }
        out.replace_range(value_start..i, "***");
        from = value_start + 3;
    }
    out
}

/// An OS user to run the PostgreSQL programs as.
#[derive(Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// An owned throwaway cluster. Layout of `root`: `data/` (the data
/// directory), `log` (server log) and the Unix socket.
struct Cluster {
    bin_dir: PathBuf,
    root: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    /// Serialises stop / start of this cluster.
    lifecycle: Mutex<()>,
    reaper: Option<Child>,
    destroyed: bool,
}

impl Cluster {
    fn create() -> Result<Cluster, TestServerError> {
        let bin_dir = find_bin_dir()?;
        let run_as = postgres_user_if_root()?;

        let root = std::env::temp_dir().join(format!("pg-pubsub-test-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&root)
            .map_err(|e| TestServerError::io(format!("cannot create {}", root.display()), e))?;
        let mut cluster = Cluster {
            bin_dir,
            data_dir: root.join("data"),
            log_file: root.join("log"),
            root,
            port: 0,
            run_as,
            lifecycle: Mutex::new(()),
            reaper: None,
            destroyed: false,
        };
        // From here on, dropping `cluster` cleans up.
        fs::set_permissions(&cluster.root, fs::Permissions::from_mode(0o700)).map_err(|e| {
            TestServerError::io(format!("cannot chmod {}", cluster.root.display()), e)
        })?;
        if let Some(ids) = run_as {
            std::os::unix::fs::chown(&cluster.root, Some(ids.uid), Some(ids.gid)).map_err(|e| {
                TestServerError::io(
                    format!(
                        "cannot chown {} to the postgres user",
                        cluster.root.display()
                    ),
                    e,
                )
            })?;
        }
        cluster.reaper = Some(cluster.spawn_reaper()?);
        cluster.initdb()?;

        let mut attempt = 1;
        loop {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => break,
                Err((err, port_taken)) => {
                    if port_taken && attempt < START_ATTEMPTS {
                        tracing::debug!(port = cluster.port, "port was taken, retrying");
                        attempt += 1;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
        cluster.wait_accepting()?;
        Ok(cluster)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_reaper(&self) -> Result<Child, TestServerError> {
        let user = if self.run_as.is_some() {
            "postgres"
        } else {
            ""
        };
        Command::new("/bin/sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("pg-pubsub-reaper")
            .arg(std::process::id().to_string())
            .arg(&self.root)
            .arg(&self.data_dir)
            .arg(self.bin_dir.join("pg_ctl"))
            .arg(user)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| TestServerError::io("cannot spawn the cleanup process /bin/sh", e))
    }

    /// A command for a PostgreSQL program, run as the postgres user when we
    /// are root.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .env_remove("PGDATA")
            .env_remove("PGOPTIONS");
        if let Some(ids) = self.run_as {
            cmd.uid(ids.uid).gid(ids.gid);
        }
        cmd
    }

    /// Runs a command made by [`command`](Self::command), capturing output.
    fn output(&self, cmd: &mut Command, what: &str) -> Result<Output, TestServerError> {
        cmd.output().map_err(|e| {
            TestServerError::new(format!(
                "cannot run {what} ({}): {e}{}",
                cmd.get_program().to_string_lossy(),
                self.run_as_hint()
            ))
        })
    }

    /// Explains the `postgres` user when running as root.
    fn run_as_hint(&self) -> String {
        if self.run_as.is_none() {
            return String::new();
        }
        format!(
            "\n(PostgreSQL refuses to run as root, so its programs run as the `postgres` OS user; \
             that user must be able to reach {}: set TMPDIR to a directory it can access, e.g. /tmp)",
            self.root.display()
        )
    }

    fn initdb(&self) -> Result<(), TestServerError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-A")
            .arg("trust")
            .arg("-U")
            .arg("postgres")
            .arg("-E")
            .arg("UTF8")
            .arg("--locale=C")
            .arg("--no-sync")
            .arg("-D")
            .arg(&self.data_dir);
        let out = self.output(&mut cmd, "initdb")?;
        if out.status.success() {
            return Ok(());
        }
        let mut msg = format!(
            "initdb failed ({}) creating {}:\n{}",
            out.status,
            self.data_dir.display(),
            command_output(&out)
        );
        msg.push_str(&self.run_as_hint());
        Err(TestServerError::new(msg))
    }

    /// `pg_ctl start -w` on `self.port`. On error, also says whether the port
    /// was taken by someone else.
    fn start_server(&self) -> Result<(), (TestServerError, bool)> {
        let log_offset = fs::metadata(&self.log_file).map_or(0, |m| m.len());
        let socket_dir = if self.root.as_os_str().len() + "/.s.PGSQL.65535".len() <= MAX_SOCKET_PATH
        {
            shell_quote(self.root.as_os_str())
        } else {
            // Too long for a Unix socket path: TCP only.
            "''".to_string()
        };
        let options = format!(
            "-p {} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            self.port
        );
        let mut cmd = self.command("pg_ctl");
        cmd.arg("start")
            .arg("-w")
            .arg("-t")
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .arg("-o")
            .arg(options);
        let out = self
            .output(&mut cmd, "pg_ctl start")
            .map_err(|e| (e, false))?;
        if out.status.success() {
            return Ok(());
        }
        let new_log = read_log_from(&self.log_file, log_offset);
        let port_taken =
            new_log.contains("could not bind") || new_log.contains("Address already in use");
        let err = TestServerError::new(format!(
            "pg_ctl start failed ({}) for {} on port {}:\n{}\n{}",
            out.status,
            self.data_dir.display(),
            self.port,
            command_output(&out),
            self.log_tail()
        ));
        Err((err, port_taken))
    }

    fn stop(&self, mode: &str) -> Result<(), TestServerError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop")
            .arg("-w")
            .arg("-t")
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .arg("-m")
            .arg(mode)
            .arg("-D")
            .arg(&self.data_dir);
        let out = self.output(&mut cmd, "pg_ctl stop")?;
        if out.status.success() {
            return Ok(());
        }
        Err(TestServerError::new(format!(
            "pg_ctl stop -m {mode} failed ({}) for {}:\n{}\n{}",
            out.status,
            self.data_dir.display(),
            command_output(&out),
            self.log_tail()
        )))
    }

    /// Waits until a startup packet is answered with an authentication
    /// request (rather than e.g. "the database system is starting up").
    fn wait_accepting(&self) -> Result<(), TestServerError> {
        let deadline = Instant::now() + Duration::from_secs(PG_CTL_TIMEOUT_SECS);
        loop {
            let last_error = match probe(self.port) {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                return Err(TestServerError::new(format!(
                    "PostgreSQL on 127.0.0.1:{} did not accept connections within {PG_CTL_TIMEOUT_SECS}s (last error: {last_error})\n{}",
                    self.port,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        match fs::read(&self.log_file) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
                format!(
                    "last lines of the server log {}:\n{}",
                    self.log_file.display(),
                    tail.join("\n")
                )
            }
            Err(err) => format!("(server log {} unreadable: {err})", self.log_file.display()),
        }
    }

    /// Stops the server immediately and removes the folder. Idempotent.
    fn destroy(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        if self.data_dir.join("postmaster.pid").exists() {
            if let Err(err) = self.stop("immediate") {
                tracing::warn!(error = %err, "could not stop throwaway PostgreSQL server");
            }
        }
        match fs::remove_dir_all(&self.root) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                // Leave the reaper running: it retries when we exit.
                tracing::warn!(
                    dir = %self.root.display(),
                    error = %err,
                    "could not remove throwaway PostgreSQL cluster"
                );
                return;
            }
        }
        // The reaper notices the folder is gone within ~100 ms and exits;
        // collect it so it does not linger as a zombie.
        if let Some(mut reaper) = self.reaper.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match reaper.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = reaper.kill();
                        let _ = reaper.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.destroy();
    }
}

fn command_output(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = format!("{}\n{}", stdout.trim(), stderr.trim());
    let text = text.trim();
    if text.is_empty() {
        "(no output)".to_string()
    } else {
        text.to_string()
    }
}

fn read_log_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let mut bytes = Vec::new();
            if file.read_to_end(&mut bytes).is_ok() {
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
    }
    text
}

/// Quotes a string for `/bin/sh` (`pg_ctl -o` goes through the shell).
fn shell_quote(s: &OsStr) -> String {
    format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
}

fn free_port() -> Result<u16, TestServerError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| TestServerError::io("cannot find a free TCP port on 127.0.0.1", e))
}

/// Sends a startup packet; `Ok` once the server answers with an
/// authentication message.
fn probe(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    let timeout = Some(Duration::from_secs(5));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| e.to_string())?;

    let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for part in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let len = u32::try_from(body.len() + 4).map_err(|e| e.to_string())?;
    let mut packet = len.to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    stream
        .write_all(&packet)
        .map_err(|e| format!("send startup packet: {e}"))?;

    let mut tag = [0u8; 1];
    stream
        .read_exact(&mut tag)
        .map_err(|e| format!("read reply: {e}"))?;
    match tag[0] {
        b'R' => {
            let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
            Ok(())
        }
        b'E' => {
            let mut len = [0u8; 4];
            stream
                .read_exact(&mut len)
                .map_err(|e| format!("read error reply: {e}"))?;
            let len = (u32::from_be_bytes(len) as usize)
                .saturating_sub(4)
                .min(8192);
            let mut fields = vec![0u8; len];
            stream
                .read_exact(&mut fields)
                .map_err(|e| format!("read error reply: {e}"))?;
            let message = fields
                .split(|b| *b == 0)
                .find(|f| f.first() == Some(&b'M'))
                .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                .unwrap_or_else(|| "unknown error".to_string());
            Err(format!("server replied: {message}"))
        }
        other => Err(format!("unexpected reply message type {:?}", other as char)),
    }
}

/// When running as root, the uid/gid of the `postgres` OS user.
fn postgres_user_if_root() -> Result<Option<RunAs>, TestServerError> {
    if !running_as_root() {
        return Ok(None);
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .arg(flag)
            .arg("postgres")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(Some(RunAs { uid, gid })),
        _ => Err(TestServerError::new(
            "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
             OS user to run it as (`id postgres` failed). Install the server package \
             (Debian/Ubuntu: `apt-get install postgresql`), which creates that user, or create it \
             (`useradd --system postgres`), or run the tests as a non-root user.",
        )),
    }
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the effective uid (Linux).
    if let Ok(meta) = fs::metadata("/proc/self") {
        return meta.uid() == 0;
    }
    Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|name| {
        fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
    })
}

fn find_bin_dir() -> Result<PathBuf, TestServerError> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        return Err(missing_binaries(&[format!(
            "{} (from PG_BIN_DIR, which overrides every other place)",
            dir.display()
        )]));
    }

    let mut looked = Vec::new();
    match Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            looked.push(format!("{} (from `pg_config --bindir`)", dir.display()));
        }
        _ => looked.push("`pg_config --bindir` (pg_config not found on PATH)".to_string()),
    }

    let base = Path::new("/usr/lib/postgresql");
    let mut versioned: Vec<(Vec<u64>, PathBuf)> = fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned
        .iter()
        .rev()
        .find(|(_, dir)| has_server_binaries(dir))
    {
        return Ok(dir.clone());
    }
    looked.push(format!("{}/*/bin", base.display()));

    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| has_server_binaries(dir)) {
            return Ok(dir);
        }
        looked.push(format!(
            "every directory on PATH ({})",
            path.to_string_lossy()
        ));
    } else {
        looked.push("PATH (not set)".to_string());
    }
    Err(missing_binaries(&looked))
}

fn missing_binaries(looked: &[String]) -> TestServerError {
    let mut msg = String::from(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found.\nLooked in:\n",
    );
    for place in looked {
        msg.push_str("  - ");
        msg.push_str(place);
        msg.push('\n');
    }
    msg.push_str(
        "Install the PostgreSQL server: on Debian/Ubuntu run `apt-get install postgresql` \
         (Fedora/RHEL: `dnf install postgresql-server`, macOS: `brew install postgresql`).\n\
         Or set PG_BIN_DIR to the directory containing initdb and pg_ctl, \
         or set DATABASE_URL to use an existing server.",
    );
    TestServerError::new(msg)
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://alice:s3cret@db:5432/app?sslmode=disable"),
            "postgres://alice:***@db:5432/app?sslmode=disable"
        );
        assert_eq!(redact("postgres://alice@db/app"), "postgres://alice@db/app");
        assert_eq!(
            redact("postgresql://db/app?user=a&password=s3cret&x=1"),
            "postgresql://db/app?user=a&password=***&x=1"
        );
        assert_eq!(
            redact("host=db user=a password='s3 cret' dbname=app"),
            "host=db user=a password=*** dbname=app"
        );
        assert_eq!(
            redact("host=db PASSWORD = s3cret"),
            "host=db PASSWORD = ***"
        );
    }
}
