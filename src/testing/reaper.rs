//! The detached reaper: removes a cluster when the process that started it
//! ends without dropping it (a static, `std::process::exit`, `SIGKILL`).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::binaries::Programs;
use super::TestServerError;

/// The `/bin/sh` script. Arguments: `$1` pid to watch, `$2` folder to delete,
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

/// Starts the reaper for the cluster in `root`, watching this process. It
/// runs in its own process group so Ctrl-C does not reach it first.
pub(super) fn spawn(
    programs: &Programs,
    root: &Path,
    data_dir: &Path,
) -> Result<Child, TestServerError> {
    let user = if programs.run_as_postgres() {
        "postgres"
    } else {
        ""
    };
    Command::new("/bin/sh")
        .arg("-c")
        .arg(REAPER_SCRIPT)
        .arg("pg-pubsub-reaper")
        .arg(std::process::id().to_string())
        .arg(root)
        .arg(data_dir)
        .arg(programs.path("pg_ctl"))
        .arg(user)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| TestServerError::io("cannot spawn the cleanup process /bin/sh", e))
}

/// Collects a reaper once the cluster folder is gone, so it does not linger
/// as a zombie. It notices within ~100 ms and exits; killed after 2 s.
pub(super) fn collect(mut reaper: Child) {
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
