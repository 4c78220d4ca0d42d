//! A real PgBouncer (Debian's `pgbouncer`) in front of a test server, on a
//! free loopback port, in session or transaction pooling mode.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pg_pubsub::testing::TestServer;

/// A running PgBouncer; stopped (SIGKILL) and its folder removed on drop.
pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PgBouncer {
    /// Starts PgBouncer for `server`'s `postgres` database with
    /// `pool_mode` and at most `pool_size` server connections, handed out
    /// round robin (`server_round_robin`): a small pool makes transactions
    /// of different clients share server connections, as in production,
    /// and round robin makes a client's consecutive transactions land on
    /// different ones, so a named prepared statement fails at once instead
    /// of by chance. Waits until it accepts connections.
    pub fn start(server: &TestServer, mode: PoolMode, pool_size: usize) -> PgBouncer {
        let binary = "/usr/sbin/pgbouncer";
        assert!(
            std::path::Path::new(binary).exists(),
            "{binary} is missing: apt-get install pgbouncer (.ci/run installs it)"
        );
        let dir = std::env::temp_dir().join(format!("pg-pubsub-bouncer-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).expect("bouncer dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mode_name = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        let ini = format!(
            "[databases]\n\
             postgres = host=127.0.0.1 port={} dbname=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = {mode_name}\n\
             default_pool_size = {pool_size}\n\
             server_round_robin = 1\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {dir}/log\n\
             pidfile = {dir}/pid\n",
            server.port().expect("an owned server"),
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("ini");
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        let mut cmd = Command::new(binary);
        // PgBouncer refuses to run as root: it switches to `postgres`.
        let root = std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the bouncer folder to postgres");
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = PgBouncer { child, dir, port };
        let deadline = Instant::now() + super::WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen: {}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// The URL of the `postgres` database through this bouncer.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// PgBouncer's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
