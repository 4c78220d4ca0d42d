//! Single-listener hand-over latency: the time from the leader's death to the
//! first message handled by the new leader, at default settings, for
//!
//! * a graceful stop (SIGTERM -> `shutdown()`), target < 100 ms, none lost;
//! * SIGKILL, target < lock retry interval (500 ms) + 250 ms;
//! * `pg_terminate_backend` of the leader's listener session, same target.
//!
//! Run with `cargo bench --bench handover`. Each run starts three worker
//! processes (this binary re-executed with `--worker`, see
//! `examples/scenario/`) on a fresh channel while a plain SQL client publishes
//! every 20 ms, deals the fault, and counts messages lost and handled twice.
//!
//! Env: `BENCH_RUNS` (runs per case, default 5), `BENCH_CASES` (a
//! comma-separated subset of `graceful,kill,terminate`), `BENCH_PACE_MS`
//! (publisher interval, default 20: the targets assume it), `DATABASE_URL`
//! (else a throwaway cluster). Exits non-zero when a target is missed.

#[path = "../examples/scenario/mod.rs"]
mod scenario;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use pg_pubsub::testing::TestServer;
use scenario::fleet::Fleet;
use scenario::foreign::{self, Publisher};
use scenario::handover::{explain, fate, fault_and_measure, Fault, Takeover};
use scenario::{Ev, Mode, Result};

const WORKERS: [&str; 3] = ["a", "b", "c"];
/// The publisher's default pace (the graceful target assumes it).
const PACE_MS: u64 = 20;
/// Steady state before the fault, and delivery after the take-over.
const SETTLE: Duration = Duration::from_millis(200);
/// The builder's default `lock_retry_interval`.
const RETRY: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    match scenario::main_or_worker("handover bench", bench) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(code) => code,
    }
}

/// What to run, from the environment.
struct Settings {
    runs: usize,
    faults: Vec<Fault>,
    pace: Duration,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let var = |name| std::env::var(name).ok();
        let faults = match var("BENCH_CASES") {
            None => Fault::ALL.to_vec(),
            Some(list) => list
                .split(',')
                .map(|name| match name.trim() {
                    "graceful" => Ok(Fault::Graceful),
                    "kill" => Ok(Fault::Kill),
                    "terminate" => Ok(Fault::TerminateBackend),
                    other => Err(format!("BENCH_CASES: unknown case {other:?}")),
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Settings {
            runs: var("BENCH_RUNS").map_or(Ok(5), |v| v.parse())?,
            faults,
            pace: Duration::from_millis(var("BENCH_PACE_MS").map_or(Ok(PACE_MS), |v| v.parse())?),
        })
    }
}

/// Runs every case; `Ok(true)` when every target was met.
async fn bench() -> Result<bool> {
    let settings = Settings::from_env()?;
    let runs = settings.runs;
    let started = Instant::now();
    let server = TestServer::from_env_or_start()?;
    let admin = foreign::connect(server.url()).await?;
    let version = foreign::server_version(&admin).await?;
    let mut cases = Vec::new();
    for &fault in &settings.faults {
        let mut results = Vec::new();
        for run in 1..=runs {
            let result = one_run(server.url(), &admin, fault, settings.pace).await?;
            eprintln!(
                "  {} run {run}/{runs}: {:.1} ms, lost {}, doubled {}",
                fault.label(),
                ms(result.took.to_first),
                result.lost,
                result.doubled
            );
            results.push(result);
        }
        cases.push(Case {
            fault,
            runs: results,
        });
    }
    println!(
        "\nsingle-listener hand-over on {version}, default settings (lock retry {} ms); \
         3 worker processes; a SQL client publishes every {} ms; {runs} runs per case\n\
         time = from the fault to the first message handled by the new leader\n",
        RETRY.as_millis(),
        settings.pace.as_millis()
    );
    println!("{}", table(&cases, settings.pace));
    let met = cases.iter().all(Case::met);
    println!(
        "\n{}; bench took {:.1} s",
        if met {
            "all targets met"
        } else {
            "TARGET MISSED"
        },
        started.elapsed().as_secs_f64()
    );
    Ok(met)
}

/// One measured fault.
struct Run {
    took: Takeover,
    sent: usize,
    lost: usize,
    doubled: usize,
    /// Some were lost and no subscription after the fault reported a gap.
    silent: bool,
}

async fn one_run(
    url: &str,
    admin: &tokio_postgres::Client,
    fault: Fault,
    pace: Duration,
) -> Result<Run> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    // Workers never publish (zero interval): the SQL client's pace is the only one.
    let mut fleet = Fleet::new(
        url,
        Mode::SINGLE_LISTENER,
        &format!("bench_handover_{}", &id[..8]),
        Duration::ZERO,
    )?;
    for name in WORKERS {
        fleet.spawn(name).await?;
    }
    let publisher = Publisher::start(url, &fleet.channel, pace).await?;
    // A random phase against the standbys' retry timer, so runs differ.
    fleet
        .read_for(SETTLE + RETRY.mul_f64(fastrand::f64()))
        .await;
    let took = fault_and_measure(&mut fleet, admin, fault).await?;
    fleet.read_for(SETTLE).await;
    let sent = publisher.finish().await?;
    fleet.settle(SETTLE).await;
    let fate = fate(&fleet, &sent, 0, u64::MAX);
    for &seq in &fate.doubled {
        eprintln!(
            "  handled twice: {}",
            explain(&fleet, &sent, seq, took.fault_us)
        );
    }
    let gapped = fleet
        .log
        .iter()
        .any(|e| e.t_us >= took.fault_us && matches!(e.ev, Ev::Gap { .. }));
    // Killing is quicker than stopping cleanly, and the channel is not reused.
    fleet.kill_all();
    Ok(Run {
        took,
        sent: fate.sent,
        lost: fate.lost.len(),
        doubled: fate.doubled.len(),
        silent: !fate.lost.is_empty() && !gapped,
    })
}

/// Every run of one fault.
struct Case {
    fault: Fault,
    runs: Vec<Run>,
}

impl Case {
    fn target(&self) -> Duration {
        match self.fault {
            Fault::Graceful => Duration::from_millis(100),
            _ => RETRY + Duration::from_millis(250),
        }
    }

    fn sorted(&self, time: fn(&Takeover) -> Duration) -> Vec<Duration> {
        let mut times: Vec<Duration> = self.runs.iter().map(|r| time(&r.took)).collect();
        times.sort();
        times
    }

    fn sum(&self, count: fn(&Run) -> usize) -> usize {
        self.runs.iter().map(count).sum()
    }

    /// Every run within the target; never a message twice; none lost when graceful.
    fn met(&self) -> bool {
        let slowest = self.sorted(|t| t.to_first).last().copied();
        slowest.is_some_and(|s| s <= self.target())
            && self.sum(|r| r.doubled) == 0
            && self.sum(|r| usize::from(r.silent)) == 0
            && (self.fault != Fault::Graceful || self.sum(|r| r.lost) == 0)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(sorted: &[Duration]) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

fn table(cases: &[Case], pace: Duration) -> String {
    let mut out = format!(
        "{:<31} {:>4} {:>8} {:>9} {:>8} {:>12} {:>10} {:>7} {:>6}  {:<22} {}\n",
        "case",
        "runs",
        "min ms",
        "median ms",
        "max ms",
        "to-lead med",
        "lost/sent",
        "doubled",
        "silent",
        "target",
        "met"
    );
    for case in cases {
        let first = case.sorted(|t| t.to_first);
        let lead = case.sorted(|t| t.to_lead);
        let target = match case.fault {
            Fault::Graceful => format!("< {} ms, none lost", case.target().as_millis()),
            _ => format!("< {} ms", case.target().as_millis()),
        };
        let same = case
            .runs
            .iter()
            .filter(|r| r.took.new == r.took.old)
            .count();
        out += &format!(
            "{:<31} {:>4} {:>8.1} {:>9.1} {:>8.1} {:>9.1} ms {:>10} {:>7} {:>6}  {:<22} {}\n",
            case.fault.label(),
            case.runs.len(),
            ms(first.first().copied().unwrap_or_default()),
            ms(median(&first)),
            ms(first.last().copied().unwrap_or_default()),
            ms(median(&lead)),
            format!("{}/{}", case.sum(|r| r.lost), case.sum(|r| r.sent)),
            case.sum(|r| r.doubled),
            case.sum(|r| usize::from(r.silent)),
            target,
            if case.met() { "yes" } else { "NO" }
        );
        if case.fault == Fault::TerminateBackend {
            out += &format!(
                "  (the old leader reconnected and led again in {same} of {} runs)\n",
                case.runs.len()
            );
        }
    }
    out += &format!(
        "\nlost: sent while nobody listened (at-most-once; expected after SIGKILL and a \
         terminated backend).\nsilent: runs that lost messages with no gap reported by any subscription after \
         the fault (must be 0).\nfirst-message times include up to {} ms waiting for the next \
         publish; to-lead is the new leader's LockAcquired.",
        pace.as_millis()
    );
    out
}
