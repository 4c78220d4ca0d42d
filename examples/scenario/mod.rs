//! The four scenarios as one program, shared by `examples/listen_all.rs`,
//! `filtered.rs`, `single_listener.rs`, `single_listener_filtered.rs`, by
//! `examples/demo.rs` and by `benches/handover.rs`.
//!
//! A scenario process publishes `{"from": NAME, "seq": n}` on one channel on a
//! timer and prints what it receives. Started by hand it prints readable
//! lines. Started as a worker (`--worker MODE ...`, by the demo or the bench
//! re-executing itself) it prints one JSON [`Line`] per event, publishes only
//! between `go` and `hold` orders read from stdin, and stops when stdin closes,
//! so it never outlives the process that started it.
//!
//! `worker` is the process itself; `fleet` starts and watches workers;
//! `foreign` is a plain SQL client (publisher, lock holder, terminations);
//! `handover` deals faults to a leader and times the take-over.

// Each program that includes this module uses a different part of it.
#![allow(dead_code)]

pub mod fleet;
pub mod foreign;
pub mod handover;
mod worker;

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// First argument that makes a program a scenario worker.
pub const WORKER_FLAG: &str = "--worker";

/// Which of the four scenarios: the two builder switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub filtered: bool,
    pub single_listener: bool,
}

impl Mode {
    pub const LISTEN_ALL: Mode = Mode {
        filtered: false,
        single_listener: false,
    };
    pub const FILTERED: Mode = Mode {
        filtered: true,
        single_listener: false,
    };
    pub const SINGLE_LISTENER: Mode = Mode {
        filtered: false,
        single_listener: true,
    };
    pub const SINGLE_LISTENER_FILTERED: Mode = Mode {
        filtered: true,
        single_listener: true,
    };
    pub const ALL: [Mode; 4] = [
        Mode::LISTEN_ALL,
        Mode::FILTERED,
        Mode::SINGLE_LISTENER,
        Mode::SINGLE_LISTENER_FILTERED,
    ];

    /// Also the example's name and its default channel.
    pub fn name(self) -> &'static str {
        match (self.filtered, self.single_listener) {
            (false, false) => "listen_all",
            (true, false) => "filtered",
            (false, true) => "single_listener",
            (true, true) => "single_listener_filtered",
        }
    }

    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Who receives a message, in a few words.
    pub fn rule(self) -> &'static str {
        match (self.filtered, self.single_listener) {
            (false, false) => "every process receives every message, its own too",
            (true, false) => "every process receives every message except its own",
            (false, true) => "one elected process handles each message; the others stand by",
            (true, true) => {
                "one elected process handles each message, except its own (nobody handles those)"
            }
        }
    }
}

/// What every scenario process publishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping {
    pub from: String,
    pub seq: u64,
}

/// One line a worker prints on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Line {
    /// When it happened, microseconds since the Unix epoch (the same clock
    /// for every process on the machine, so workers and parent compare).
    pub t_us: u64,
    #[serde(flatten)]
    pub ev: Ev,
}

/// What a worker reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Ev {
    /// Subscribed (for an elected channel: leading or standing by).
    Ready {
        backend: Option<i32>,
    },
    Leading,
    Standby,
    /// The lock went with the lost session.
    Lost {
        reason: String,
    },
    /// Gave the lock up (shutdown) and woke the standbys.
    Released,
    Sent {
        seq: u64,
    },
    Got {
        from: String,
        seq: u64,
    },
    Gap {
        reason: String,
        /// `None` for a take-over gap.
        downtime_ms: Option<u64>,
    },
    Note {
        text: String,
    },
    /// Shut down cleanly; the last line.
    Bye,
    /// Parent side only: the worker's stdout closed (it exited or was killed).
    Closed,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Options of a scenario process.
#[derive(Debug, Clone)]
pub struct Args {
    pub name: String,
    pub channel: String,
    /// Zero: never publish.
    pub every: Duration,
    /// JSON lines and stdin orders instead of readable lines.
    pub worker: bool,
}

impl Args {
    fn defaults(mode: Mode) -> Args {
        Args {
            name: format!("p{}", std::process::id()),
            channel: mode.name().to_owned(),
            every: Duration::from_secs(1),
            worker: false,
        }
    }

    /// The arguments that start a worker like this one (after `--worker MODE`).
    pub fn to_worker_args(&self) -> Vec<String> {
        vec![
            "--name".into(),
            self.name.clone(),
            "--channel".into(),
            self.channel.clone(),
            "--every-ms".into(),
            self.every.as_millis().to_string(),
        ]
    }
}

fn usage(mode: Mode) -> String {
    format!(
        "usage: cargo run --example {} -- [--name NAME] [--channel CH] [--every-ms N]\n\
         \x20 Scenario: {}.\n\
         \x20 Publishes {{\"from\": NAME, \"seq\": n}} on CH (default {:?}) every N ms\n\
         \x20 (default 1000; 0 = never) and prints what it receives. Start it in several\n\
         \x20 terminals with DATABASE_URL set; Ctrl-C stops it cleanly.",
        mode.name(),
        mode.rule(),
        mode.name()
    )
}

/// Parses `--name X`, `--channel X`, `--every-ms N` (also `--flag=value`).
fn parse_args(mode: Mode, args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut out = Args::defaults(mode);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        if !["--name", "--channel", "--every-ms"].contains(&flag.as_str()) {
            return Err(format!("unknown option {flag}"));
        }
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--name" => out.name = value,
            "--channel" => out.channel = value,
            _ => {
                let ms = value
                    .parse()
                    .map_err(|_| format!("--every-ms takes a number, not {value:?}"))?;
                out.every = Duration::from_millis(ms);
            }
        }
    }
    Ok(out)
}

/// `main` of the four scenario examples.
pub fn example_main(mode: Mode) -> ExitCode {
    let args = match parse_args(mode, std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!("{}", usage(mode));
            return ExitCode::from(2);
        }
    };
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!(
            "error: DATABASE_URL is not set.\n\
             Set it to a PostgreSQL server, e.g.\n\
             \x20 DATABASE_URL=postgres://postgres@localhost/postgres cargo run --example {}\n\
             (`cargo run --example demo` starts a throwaway server by itself.)",
            mode.name()
        );
        return ExitCode::from(2);
    };
    run(mode, args, &url)
}

/// When this process was started as a worker (`--worker MODE ...` and
/// `DATABASE_URL`), runs it and returns its exit code; otherwise `None`.
/// The `main` of a program that re-executes itself as its workers: a worker
/// runs its scenario and exits; otherwise `body` runs on a fresh runtime.
/// `Err` is the exit code to return at once (failures are already printed).
pub fn main_or_worker<T, F>(what: &str, body: impl FnOnce() -> F) -> Result<T, ExitCode>
where
    F: std::future::Future<Output = Result<T>>,
{
    if let Some(code) = worker_main_if_asked() {
        return Err(code);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{what}: starting the runtime: {e}");
            ExitCode::FAILURE
        })?;
    runtime.block_on(body()).map_err(|e| {
        eprintln!("\n{what} failed: {e}");
        ExitCode::FAILURE
    })
}

fn worker_main_if_asked() -> Option<ExitCode> {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() != Some(WORKER_FLAG) {
        return None;
    }
    let parsed = argv
        .next()
        .and_then(|m| Mode::from_name(&m))
        .ok_or_else(|| "--worker needs a scenario name".to_owned())
        .and_then(|mode| Ok((mode, parse_args(mode, argv)?)));
    let url = std::env::var("DATABASE_URL");
    Some(match (parsed, url) {
        (Ok((mode, mut args)), Ok(url)) => {
            args.worker = true;
            run(mode, args, &url)
        }
        (Err(msg), _) => {
            eprintln!("worker: {msg}");
            ExitCode::from(2)
        }
        (_, Err(_)) => {
            eprintln!("worker: DATABASE_URL is not set");
            ExitCode::from(2)
        }
    })
}

fn run(mode: Mode, args: Args, url: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("[{}] error: starting the runtime: {e}", args.name);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(worker::run(mode, &args, url)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[{}] error: {e}", args.name);
            ExitCode::FAILURE
        }
    }
}
