//! Finding the PostgreSQL server programs, and running them as the
//! `postgres` OS user when we are root (PostgreSQL refuses to run as root).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::TestServerError;

/// The server programs (`initdb`, `pg_ctl`, `postgres`) and the OS user
/// they run as.
pub(super) struct Programs {
    bin_dir: PathBuf,
    /// `Some` when we are root.
    run_as: Option<RunAs>,
}

/// An OS user to run the PostgreSQL programs as.
#[derive(Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl Programs {
    pub(super) fn find() -> Result<Programs, TestServerError> {
        let bin_dir = find_bin_dir()?;
        let run_as = postgres_user_if_root()?;
        Ok(Programs { bin_dir, run_as })
    }

    pub(super) fn path(&self, program: &str) -> PathBuf {
        self.bin_dir.join(program)
    }

    /// Whether the programs run as the `postgres` OS user.
    pub(super) fn run_as_postgres(&self) -> bool {
        self.run_as.is_some()
    }

    /// Gives `dir` to the `postgres` user if the programs run as it.
    pub(super) fn hand_over(&self, dir: &Path) -> io::Result<()> {
        match self.run_as {
            Some(ids) => std::os::unix::fs::chown(dir, Some(ids.uid), Some(ids.gid)),
            None => Ok(()),
        }
    }

    /// A command for a PostgreSQL program, run in `dir` as the postgres user
    /// when we are root.
    pub(super) fn command(&self, program: &str, dir: &Path) -> Command {
        let mut cmd = Command::new(self.path(program));
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .env_remove("PGDATA")
            .env_remove("PGOPTIONS");
        if let Some(ids) = self.run_as {
            cmd.uid(ids.uid).gid(ids.gid);
        }
        cmd
    }

    /// Explains the `postgres` user when running as root (empty otherwise).
    pub(super) fn run_as_hint(&self, root: &Path) -> String {
        if self.run_as.is_none() {
            return String::new();
        }
        format!(
            "\n(PostgreSQL refuses to run as root, so its programs run as the `postgres` OS user; \
             that user must be able to reach {}: set TMPDIR to a directory it can access, e.g. /tmp)",
            root.display()
        )
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
