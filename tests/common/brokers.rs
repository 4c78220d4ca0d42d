//! Message brokers for the relay tests: real servers from Debian's
//! packages (`nats-server`, `redis-server`, `rabbitmq-server`, installed
//! by `.ci/run`), each started on loopback with free ports and a throwaway
//! data directory, stopped and killed with its process group on drop.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to accept connections (RabbitMQ takes about
/// 10 s on a busy two-core machine).
const START_WAIT: Duration = Duration::from_secs(90);

/// A free TCP port on loopback (the kernel's pick; released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pg-pubsub-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::create_dir_all(&dir).expect("broker data dir");
    dir
}

/// `name` on the PATH, else in /usr/sbin or /usr/bin (Debian puts the
/// servers in /usr/sbin, which a non-root PATH may lack).
fn program(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/bin"].map(|d| Path::new(d).join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `uid`, `gid` of an OS user, from /etc/passwd.
fn os_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.first() == Some(&name))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            chown_tree(&path, uid, gid);
        } else {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
        }
    }
}

/// Waits until `port` accepts TCP connections, or panics naming `what`
/// with the end of its log.
fn wait_port(port: u16, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + START_WAIT;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before listening: {}", tail(log));
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {START_WAIT:?}: {}",
            tail(log)
        );
        // No event to wait on for a port opening: poll, briefly.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last: Vec<char> = text.chars().rev().take(2000).collect();
    last.into_iter().rev().collect()
}

/// A server process in its own process group.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("broker log");
        let err = out.try_clone().expect("log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {:?}: {e} (installed by .ci/run)",
                    cmd.get_program()
                )
            });
        Proc { child }
    }

    /// Sends `sig` to the whole group.
    fn signal(&self, sig: i32) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) with a process group we created.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }

    /// Stops the group (`sig`, then SIGKILL after 30 s) and reaps the leader.
    fn stop(mut self, sig: i32) {
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // The rest of the group (e.g. erl_child_setup) goes too.
                self.signal(libc::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// `nats-server -js` on a free port, its store in a throwaway directory.
pub struct Nats {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Nats {
    pub fn start() -> Nats {
        let mut nats = Nats {
            port: free_port(),
            dir: temp_dir("nats"),
            proc: None,
        };
        nats.start_again();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let mut cmd = Command::new(program("nats-server"));
        cmd.args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-sd",
        ])
        .arg(self.dir.join("store"));
        let log = self.dir.join("nats.log");
        let mut proc = Proc::spawn(cmd, &log);
        wait_port(self.port, "nats-server", &mut proc.child, &log);
        self.proc = Some(proc);
    }

    /// A clean stop (SIGTERM: JetStream flushes its store).
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop(libc::SIGTERM);
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-server` on a free port, with an append-only file synced on each
/// write (an `XADD` reply then means on disk, and the restart keeps it).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    pub fn start() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            dir: temp_dir("redis"),
            proc: None,
        };
        redis.start_again();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn start_again(&mut self) {
        let mut cmd = Command::new(program("redis-server"));
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
        .arg(&self.dir);
        let log = self.dir.join("redis.log");
        let mut proc = Proc::spawn(cmd, &log);
        wait_port(self.port, "redis-server", &mut proc.child, &log);
        self.proc = Some(proc);
    }

    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop(libc::SIGTERM);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `rabbitmq-server` as the `rabbitmq` OS user when we are root, with its
/// own node name, ports, Erlang cookie and port mapper (`epmd` on a free
/// port, so nothing outlives the test), in a throwaway directory.
pub struct Rabbit {
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    dir: PathBuf,
    epmd: Option<Proc>,
    proc: Option<Proc>,
}

impl Rabbit {
    pub fn start() -> Rabbit {
        let dir = temp_dir("rabbitmq");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("rabbitmq dirs");
        }
        let mut rabbit = Rabbit {
            port: free_port(),
            dist_port: free_port(),
            epmd_port: free_port(),
            dir,
            epmd: None,
            proc: None,
        };
        if let Some((uid, gid)) = rabbit.run_as() {
            // The temp dir's parent must be searchable: it is /tmp.
            chown_tree(&rabbit.dir, uid, gid);
        }
        let mut epmd = Command::new(program("epmd"));
        epmd.args(["-port", &rabbit.epmd_port.to_string()])
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        let log = rabbit.dir.join("epmd.log");
        let mut proc = Proc::spawn(epmd, &log);
        wait_port(rabbit.epmd_port, "epmd", &mut proc.child, &log);
        rabbit.epmd = Some(proc);
        rabbit.start_again();
        rabbit
    }

    fn run_as(&self) -> Option<(u32, u32)> {
        // SAFETY: geteuid has no preconditions.
        (unsafe { libc::geteuid() } == 0)
            .then(|| os_user("rabbitmq"))
            .flatten()
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn start_again(&mut self) {
        let d = &self.dir;
        let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        cmd.current_dir(d)
            .env("HOME", d)
            .env(
                "RABBITMQ_NODENAME",
                format!("pgpubsub{}@localhost", self.port),
            )
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_PID_FILE", d.join("pid"));
        if let Some((uid, gid)) = self.run_as() {
            cmd.uid(uid).gid(gid);
        }
        let log = d.join("server.log");
        let mut proc = Proc::spawn(cmd, &log);
        wait_port(self.port, "rabbitmq-server", &mut proc.child, &log);
        self.proc = Some(proc);
    }

    /// A clean stop (SIGTERM: confirmed persistent messages are on disk anyway).
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop(libc::SIGTERM);
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        drop(self.proc.take());
        drop(self.epmd.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
