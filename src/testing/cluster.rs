//! An owned throwaway cluster: create (initdb), start, stop, destroy, and
//! the server log for error messages.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::binaries::Programs;
use super::probe::probe;
use super::{certs, reaper, TestOptions, TestServerError};

/// Seconds `pg_ctl` waits for the server to start or stop (`pg_ctl -t`).
const PG_CTL_TIMEOUT_SECS: u64 = 60;

/// How often a port is re-picked when another process grabbed it first.
const START_ATTEMPTS: usize = 5;

/// Lines of the server log included in error messages.
const LOG_TAIL_LINES: usize = 30;

/// Longest Unix socket path (`sun_path` is 104 bytes on BSDs, 108 on Linux).
const MAX_SOCKET_PATH: usize = 100;

/// An owned throwaway cluster. Layout of `root`: `data/` (the data
/// directory), `log` (server log) and the Unix socket.
pub(super) struct Cluster {
    programs: Programs,
    root: PathBuf,
    pub(super) data_dir: PathBuf,
    log_file: PathBuf,
    pub(super) port: u16,
    /// The CA that signed the server's certificate, when TLS is on.
    pub(super) ca_cert: Option<PathBuf>,
    /// Extra `-c name=value` settings given at every start.
    settings: Vec<String>,
    /// Serialises stop / start of this cluster.
    lifecycle: Mutex<()>,
    reaper: Option<Child>,
    destroyed: bool,
}

impl Cluster {
    pub(super) fn create(options: &TestOptions) -> Result<Cluster, TestServerError> {
        let mut cluster = Cluster::prepare(options)?;
        cluster.initdb()?;
        if !options.hba.is_empty() {
            cluster.prepend_hba(&options.hba)?;
        }
        if options.tls {
            cluster.enable_tls()?;
        }
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    /// A streaming standby of `primary`: `pg_basebackup -R` (standby.signal
    /// and `primary_conninfo` written), started on a free port.
    pub(super) fn create_standby(
        primary: &Cluster,
        options: &TestOptions,
    ) -> Result<Cluster, TestServerError> {
        let mut cluster = Cluster::prepare(options)?;
        let slot = format!(
            "standby_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut cmd = cluster.command("pg_basebackup");
        cmd.arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(primary.port.to_string())
            .arg("-U")
            .arg("postgres")
            .arg("-D")
            .arg(&cluster.data_dir)
            // The standby's own physical slot on the primary (written as
            // `primary_slot_name`), and a database in `primary_conninfo`
            // (PostgreSQL 17+ writes it there): what slot sync needs.
            .arg("-C")
            .arg("-S")
            .arg(&slot)
            .arg("-d")
            .arg("dbname=postgres")
            .arg("-R")
            .arg("-X")
            .arg("stream")
            .arg("-c")
            .arg("fast")
            .arg("--no-sync");
        let out = cluster.output(&mut cmd, "pg_basebackup")?;
        if !out.status.success() {
            return Err(TestServerError::new(format!(
                "pg_basebackup from port {} failed ({}):\n{}",
                primary.port,
                out.status,
                command_output(&out)
            )));
        }
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    /// Turns this stopped cluster into a standby of the server on
    /// `primary_port`: `standby.signal` and a `primary_conninfo` (the last
    /// setting in `postgresql.auto.conf` wins).
    pub(super) fn make_standby_of(&self, primary_port: u16) -> Result<(), TestServerError> {
        let signal = self.data_dir.join("standby.signal");
        fs::write(&signal, "")
            .and_then(|()| self.programs.hand_over(&signal))
            .map_err(|e| TestServerError::io(format!("cannot write {}", signal.display()), e))?;
        let auto = self.data_dir.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "\nprimary_conninfo = 'host=127.0.0.1 port={primary_port} user=postgres'\n"
        ));
        fs::write(&auto, text)
            .map_err(|e| TestServerError::io(format!("cannot write {}", auto.display()), e))
    }

    /// `pg_ctl promote -w`: a standby becomes a primary.
    pub(super) fn promote(&self) -> Result<(), TestServerError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("promote")
            .arg("-w")
            .arg("-t")
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .arg("-D")
            .arg(&self.data_dir);
        let out = self.output(&mut cmd, "pg_ctl promote")?;
        if out.status.success() {
            return Ok(());
        }
        Err(TestServerError::new(format!(
            "pg_ctl promote failed ({}) for {}:\n{}\n{}",
            out.status,
            self.data_dir.display(),
            command_output(&out),
            self.log_tail()
        )))
    }

    /// A new folder with its reaper, before there is a data directory.
    fn prepare(options: &TestOptions) -> Result<Cluster, TestServerError> {
        let programs = Programs::find()?;

        let root = std::env::temp_dir().join(format!("pg-pubsub-test-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&root)
            .map_err(|e| TestServerError::io(format!("cannot create {}", root.display()), e))?;
        let mut cluster = Cluster {
            programs,
            data_dir: root.join("data"),
            log_file: root.join("log"),
            root,
            port: 0,
            ca_cert: None,
            settings: options.settings.clone(),
            lifecycle: Mutex::new(()),
            reaper: None,
            destroyed: false,
        };
        // From here on, dropping `cluster` cleans up.
        fs::set_permissions(&cluster.root, fs::Permissions::from_mode(0o700)).map_err(|e| {
            TestServerError::io(format!("cannot chmod {}", cluster.root.display()), e)
        })?;
        cluster.programs.hand_over(&cluster.root).map_err(|e| {
            TestServerError::io(
                format!(
                    "cannot chown {} to the postgres user",
                    cluster.root.display()
                ),
                e,
            )
        })?;
        cluster.reaper = Some(reaper::spawn(
            &cluster.programs,
            &cluster.root,
            &cluster.data_dir,
        )?);
        Ok(cluster)
    }

    /// Starts the server on a free port, picking another one when someone
    /// else took it first, and waits until it accepts connections.
    fn start_on_free_port(&mut self) -> Result<(), TestServerError> {
        let cluster = self;
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
        cluster.wait_accepting()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, ()> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A command for a PostgreSQL program, run in the cluster folder.
    fn command(&self, program: &str) -> Command {
        self.programs.command(program, &self.root)
    }

    /// Runs a command made by [`command`](Self::command), capturing output.
    fn output(&self, cmd: &mut Command, what: &str) -> Result<Output, TestServerError> {
        cmd.output().map_err(|e| {
            TestServerError::new(format!(
                "cannot run {what} ({}): {e}{}",
                cmd.get_program().to_string_lossy(),
                self.programs.run_as_hint(&self.root)
            ))
        })
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
        msg.push_str(&self.programs.run_as_hint(&self.root));
        Err(TestServerError::new(msg))
    }

    /// Puts `lines` first in `pg_hba.conf` (the first matching line wins).
    fn prepend_hba(&self, lines: &[String]) -> Result<(), TestServerError> {
        let path = self.data_dir.join("pg_hba.conf");
        let old = fs::read_to_string(&path)
            .map_err(|e| TestServerError::io(format!("cannot read {}", path.display()), e))?;
        let new = format!("{}\n{old}", lines.join("\n"));
        // Writing an existing file keeps its owner.
        fs::write(&path, new)
            .map_err(|e| TestServerError::io(format!("cannot write {}", path.display()), e))
    }

    /// Writes a new CA (`ca.pem` beside the data directory) and a server
    /// certificate for `localhost` signed by it, and turns `ssl` on.
    fn enable_tls(&mut self) -> Result<(), TestServerError> {
        let certs = certs::generate(&["localhost"])?;
        let write = |path: &Path, text: &str| {
            fs::write(path, text)
                .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o600)))
                // The server checks that it owns its key.
                .and_then(|()| self.programs.hand_over(path))
                .map_err(|e| TestServerError::io(format!("cannot write {}", path.display()), e))
        };
        write(&self.data_dir.join("server.crt"), &certs.server_cert)?;
        write(&self.data_dir.join("server.key"), &certs.server_key)?;
        let ca = self.root.join("ca.pem");
        write(&ca, &certs.ca)?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf)
            .map_err(|e| TestServerError::io(format!("cannot read {}", conf.display()), e))?;
        text.push_str("\nssl = on\n");
        fs::write(&conf, text)
            .map_err(|e| TestServerError::io(format!("cannot write {}", conf.display()), e))?;
        self.ca_cert = Some(ca);
        Ok(())
    }

    /// `pg_ctl start -w` on `self.port`. On error, also says whether the port
    /// was taken by someone else.
    pub(super) fn start_server(&self) -> Result<(), (TestServerError, bool)> {
        let log_offset = fs::metadata(&self.log_file).map_or(0, |m| m.len());
        let socket_dir = if self.root.as_os_str().len() + "/.s.PGSQL.65535".len() <= MAX_SOCKET_PATH
        {
            shell_quote(self.root.as_os_str())
        } else {
            // Too long for a Unix socket path: TCP only.
            "''".to_string()
        };
        let mut options = format!(
            "-p {} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 \
             -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20",
            self.port
        );
        // Later `-c` of the same setting win.
        for setting in &self.settings {
            options.push_str(" -c ");
            options.push_str(&shell_quote(OsStr::new(setting)));
        }
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

    pub(super) fn stop(&self, mode: &str) -> Result<(), TestServerError> {
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
    pub(super) fn wait_accepting(&self) -> Result<(), TestServerError> {
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
    pub(super) fn destroy(&mut self) {
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
        if let Some(child) = self.reaper.take() {
            reaper::collect(child);
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
