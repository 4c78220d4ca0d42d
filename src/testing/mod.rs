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

mod binaries; // where initdb/pg_ctl are; running them as `postgres` when root
mod certs; // a throwaway CA and server certificate for TLS clusters
mod cluster; // an owned cluster: initdb, start, stop, destroy
mod probe; // does the server accept connections yet?
mod reaper; // cleanup when the owning process ends without dropping

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::OnceLock;

use cluster::Cluster;

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

/// How to set up a cluster started with [`TestServer::start_with`].
///
/// ```no_run
/// use pg_pubsub::testing::{TestOptions, TestServer};
/// let server = TestServer::start_with(TestOptions { tls: true, ..Default::default() })?;
/// let ca = server.ca_cert().expect("TLS is on");
/// let url = format!(
///     "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
///     server.port().expect("owned"),
///     ca.display()
/// );
/// # Ok::<(), pg_pubsub::testing::TestServerError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    /// Turn `ssl` on with a server certificate for the host name `localhost`
    /// (not `127.0.0.1`), signed by a CA made for this cluster
    /// ([`TestServer::ca_cert`]). Plain connections are still accepted.
    pub tls: bool,
    /// Lines put first in `pg_hba.conf`, e.g.
    /// `host all alice 127.0.0.1/32 scram-sha-256`. The rest stays `trust`.
    pub hba: Vec<String>,
    /// Server settings given at every start as `name=value` (`-c`), after
    /// (so winning over) the harness' own, e.g. `synchronous_commit=on`.
    pub settings: Vec<String>,
}

/// A PostgreSQL server for tests: either a throwaway cluster owned by this
/// value, or an external server named by `DATABASE_URL`.
///
/// An owned cluster listens on `127.0.0.1` on a free port, accepts the
/// superuser `postgres` without a password, runs with `wal_level=logical`
/// (for the WAL change feed) and is destroyed (server stopped,
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
        Self::start_with(TestOptions::default())
    }

    /// [`start`](Self::start), set up as `options` says (TLS, `pg_hba.conf`).
    pub fn start_with(options: TestOptions) -> Result<TestServer, TestServerError> {
        let cluster = Cluster::create(&options)?;
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
            Ok(_) | Err(std::env::VarError::NotPresent) => Self::start(),
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

    /// The TCP port of an owned cluster (on `127.0.0.1`).
    pub fn port(&self) -> Option<u16> {
        self.cluster.as_ref().map(|c| c.port)
    }

    /// The PEM file of the CA that signed the server's certificate, for a
    /// cluster started with [`TestOptions::tls`]; pass it as `sslrootcert`.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.cluster.as_ref().and_then(|c| c.ca_cert.as_deref())
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

    /// Stops an owned server at once (`pg_ctl stop -m immediate`: a crash,
    /// no shutdown checkpoint, nothing more sent to standbys), blocking
    /// until it is down. Errors for an external server.
    pub fn crash(&self) -> Result<(), TestServerError> {
        let cluster = self.owned("crash")?;
        let _guard = cluster.lock();
        cluster.stop("immediate")
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

    /// A streaming standby of this owned server (`pg_basebackup -R`, hot
    /// standby: read-only connections), its own throwaway cluster with
    /// `options`' settings (not this server's). It streams through a
    /// physical slot of its own on this server (`primary_slot_name`), and
    /// its `primary_conninfo` names a database, so on PostgreSQL 17+
    /// `sync_replication_slots=on` and `hot_standby_feedback=on` in its
    /// settings make it keep copies of failover slots. For synchronous
    /// replication, start this server with `synchronous_standby_names=*`
    /// and `synchronous_commit=on` in [`TestOptions::settings`].
    ///
    /// Blocks for the copy and the start; call through `spawn_blocking`.
    pub fn start_standby(&self, options: TestOptions) -> Result<TestServer, TestServerError> {
        let primary = self.owned("copy")?;
        let cluster = Cluster::create_standby(primary, &options)?;
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
        let config = parse_config(&url)?;
        tracing::info!(url = %url, primary = primary.port, "started throwaway standby");
        Ok(TestServer {
            url,
            config,
            cluster: Some(cluster),
        })
    }

    /// Promotes an owned standby to a primary (`pg_ctl promote -w`),
    /// blocking until it takes writes.
    pub fn promote(&self) -> Result<(), TestServerError> {
        let cluster = self.owned("promote")?;
        let _guard = cluster.lock();
        cluster.promote()
    }

    /// Stops this owned server (`-m fast`) and starts it again as a
    /// streaming standby of `primary` (an old primary rejoining after a
    /// failover, as failover tooling does). Its WAL must not be ahead of
    /// `primary`'s: stop it before promoting the standby that replaces it.
    pub fn restart_as_standby_of(&self, primary: &TestServer) -> Result<(), TestServerError> {
        let cluster = self.owned("demote")?;
        let port = primary.owned("follow")?.port;
        let _guard = cluster.lock();
        if cluster.data_dir.join("postmaster.pid").exists() {
            cluster.stop("fast")?;
        }
        cluster.make_standby_of(port)?;
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
