//! Every scenario with real processes and real faults, in one command:
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! Uses `DATABASE_URL` when set, else starts a throwaway PostgreSQL (the
//! binaries must be installed). For each of the four scenarios it starts three
//! worker processes (this program re-executed with `--worker`), lets them and
//! a plain SQL client publish for a second, and reports who received what.
//! Then it deals faults to the leader of a single-listener fleet (SIGTERM,
//! SIGKILL, `pg_terminate_backend`) while the SQL client publishes every
//! 20 ms, and reports how long each hand-over took and what was lost.
//!
//! Exits non-zero when something is wrong: a message received by the wrong
//! process, a single-listener message handled twice, a message lost in a
//! graceful hand-over, a worker that did not stop cleanly.

#[path = "scenario/mod.rs"]
mod scenario;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pg_pubsub::testing::TestServer;
use scenario::fleet::{Fleet, Role};
use scenario::foreign::{self, Publisher, SQL};
use scenario::handover::{explain, fate, fault_and_measure, Fault, Takeover};
use scenario::{Mode, Result};

const NAMES: [&str; 3] = ["alice", "bob", "carol"];
/// How often everyone publishes in the scenario runs, and for how long.
const EVERY: Duration = Duration::from_millis(100);
const PUBLISH_FOR: Duration = Duration::from_secs(1);
/// The SQL client's pace during the hand-overs.
const FAST: Duration = Duration::from_millis(20);
/// No line for this long: everything in flight has arrived.
const QUIET: Duration = Duration::from_millis(300);

fn main() -> ExitCode {
    match scenario::main_or_worker("demo", demo) {
        Ok(problems) if problems.is_empty() => {
            println!("\nall checks passed");
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            println!("\nPROBLEMS:");
            for p in problems {
                println!("  - {p}");
            }
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// Runs everything; returns the problems found.
async fn demo() -> Result<Vec<String>> {
    let started = Instant::now();
    let server = TestServer::from_env_or_start()?;
    let url = server.url().to_owned();
    let admin = foreign::connect(&url).await?;
    println!(
        "pg-pubsub demo on {} ({})",
        foreign::server_version(&admin).await?,
        if server.is_owned() {
            "throwaway cluster started for this run"
        } else {
            "DATABASE_URL"
        }
    );
    println!(
        "each scenario: 3 processes (alice, bob, carol) and a plain SQL client \
         publish every {} ms for {} s\n",
        EVERY.as_millis(),
        PUBLISH_FOR.as_secs()
    );
    let mut problems = Vec::new();
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        println!("{}. {}: {}", i + 1, mode.name(), mode.rule());
        match run_scenario(&url, mode).await {
            Ok(found) => problems.extend(found),
            Err(e) => problems.push(format!("{}: {e}", mode.name())),
        }
        println!();
    }
    println!(
        "5. hand-overs: single_listener, default settings; the SQL client publishes every {} ms",
        FAST.as_millis()
    );
    match run_handovers(&url, &admin).await {
        Ok(found) => problems.extend(found),
        Err(e) => problems.push(format!("hand-overs: {e}")),
    }
    println!("\nfinished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(problems)
}

fn fresh_channel(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("demo_{prefix}_{}", &id[..8])
}

/// Three workers and the SQL client publish for a while; checks that each
/// worker handled exactly what its scenario says it should.
async fn run_scenario(url: &str, mode: Mode) -> Result<Vec<String>> {
    let mut fleet = Fleet::new(url, mode, &fresh_channel(mode.name()), EVERY)?;
    for name in NAMES {
        fleet.spawn(name).await?;
    }
    let publisher = Publisher::start(url, &fleet.channel, EVERY).await?;
    fleet.order_all("go").await?;
    fleet.read_for(PUBLISH_FOR).await;
    fleet.order_all("hold").await?;
    let sql_sent = publisher.finish().await?;
    fleet.settle(QUIET).await;

    let sent = sent_by_sender(&fleet, sql_sent.iter().map(|s| s.seq).collect());
    let leader = fleet.leader();
    let mut problems = report_scenario(&fleet, &sent, leader);
    for name in fleet.close().await {
        problems.push(format!("{}: {name} did not stop cleanly", mode.name()));
    }
    Ok(problems)
}

/// Sender name -> sequence numbers it published.
type Sent = BTreeMap<String, Vec<u64>>;

fn sent_by_sender(fleet: &Fleet, sql: Vec<u64>) -> Sent {
    let mut sent: Sent = (0..fleet.procs.len())
        .map(|who| (fleet.procs[who].name.clone(), fleet.sent_by(who)))
        .collect();
    sent.insert(SQL.to_owned(), sql);
    sent
}

/// What `who` should handle in this scenario, given who leads.
fn expected(fleet: &Fleet, sent: &Sent, who: usize, leader: Option<usize>) -> Vec<(String, u64)> {
    let mode = fleet.mode;
    let me = &fleet.procs[who].name;
    if mode.single_listener && leader != Some(who) {
        return Vec::new();
    }
    sent.iter()
        .filter(|(from, _)| !(mode.filtered && *from == me))
        .flat_map(|(from, seqs)| seqs.iter().map(move |s| (from.clone(), *s)))
        .collect()
}

/// Prints one line per worker and the verdict; returns the problems.
fn report_scenario(fleet: &Fleet, sent: &Sent, leader: Option<usize>) -> Vec<String> {
    let mode = fleet.mode;
    let total: usize = sent.values().map(Vec::len).sum();
    println!(
        "   published {total} messages ({})",
        counts(sent.iter().map(|(k, v)| (k.clone(), v.len())))
    );
    let mut problems = Vec::new();
    if mode.single_listener && leader.is_none() {
        problems.push(format!("{}: not exactly one leader", mode.name()));
    }
    let mut handled_by: HashMap<(String, u64), Vec<usize>> = HashMap::new();
    for (who, from, seq, _) in fleet.handled() {
        handled_by
            .entry((from.to_owned(), seq))
            .or_default()
            .push(who);
    }
    for who in 0..fleet.procs.len() {
        let got: Vec<(String, u64)> = fleet
            .handled()
            .filter(|h| h.0 == who)
            .map(|(_, from, seq, _)| (from.to_owned(), seq))
            .collect();
        let want = expected(fleet, sent, who, leader);
        let verdict = compare(&got, &want);
        let name = &fleet.procs[who].name;
        let role = match fleet.procs[who].role {
            _ if !mode.single_listener => "",
            Role::Leader => "leader ",
            Role::Standby => "standby",
            _ => "?      ",
        };
        let by_sender = counts(tally(got.iter().map(|(from, _)| from.clone())));
        let detail = if got.is_empty() {
            String::new()
        } else {
            format!(" ({by_sender})")
        };
        let verb = if mode.single_listener {
            "handled"
        } else {
            "received"
        };
        println!(
            "   {name:<6} {role} {verb} {:>3}{detail}  {}",
            got.len(),
            verdict.as_deref().unwrap_or("as expected")
        );
        if let Some(v) = verdict {
            problems.push(format!("{}: {name} {v}", mode.name()));
        }
    }
    summarize_scenario(fleet, sent, leader, &handled_by, &mut problems);
    problems
}

/// The scenario's one-line conclusion, plus what only the whole fleet shows.
fn summarize_scenario(
    fleet: &Fleet,
    sent: &Sent,
    leader: Option<usize>,
    handled_by: &HashMap<(String, u64), Vec<usize>>,
    problems: &mut Vec<String>,
) {
    let mode = fleet.mode;
    if !mode.single_listener {
        return;
    }
    let doubled = handled_by.values().filter(|w| w.len() > 1).count();
    if doubled > 0 {
        problems.push(format!(
            "{}: {doubled} message(s) handled by more than one process",
            mode.name()
        ));
    }
    let Some(leader) = leader else { return };
    let name = &fleet.procs[leader].name;
    let once = handled_by.values().filter(|w| w.len() == 1).count();
    let own = sent.get(name).map_or(0, Vec::len);
    if mode.filtered {
        println!(
            "   each of the other {once} messages was handled exactly once, by {name}; \
             {name}'s own {own} were handled by nobody (filtered)"
        );
    } else {
        println!("   each of the {once} messages was handled exactly once, by {name}");
    }
}

/// `None` when `got` is exactly `want` (each once); else what differs.
fn compare(got: &[(String, u64)], want: &[(String, u64)]) -> Option<String> {
    let mut seen: HashMap<&(String, u64), usize> = HashMap::new();
    for m in got {
        *seen.entry(m).or_default() += 1;
    }
    let missing: Vec<_> = want.iter().filter(|m| !seen.contains_key(m)).collect();
    let twice = seen.values().filter(|&&n| n > 1).count();
    let extra = seen.keys().filter(|m| !want.contains(m)).count();
    if missing.is_empty() && twice == 0 && extra == 0 {
        return None;
    }
    let mut text = String::from("WRONG:");
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .take(5)
            .map(|(f, s)| format!("{f} #{s}"))
            .collect();
        let _ = write!(text, " missed {} ({})", missing.len(), list.join(", "));
    }
    if twice > 0 {
        let _ = write!(text, " got {twice} twice");
    }
    if extra > 0 {
        let _ = write!(text, " got {extra} it should not have");
    }
    Some(text)
}

fn tally(names: impl Iterator<Item = String>) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        *counts.entry(n).or_default() += 1;
    }
    counts.into_iter().collect()
}

fn counts(items: impl IntoIterator<Item = (String, usize)>) -> String {
    items
        .into_iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// One fault dealt during the hand-over run.
struct Dealt {
    fault: Fault,
    /// Who led when it was dealt.
    old: String,
    took: Takeover,
    /// What changed in the fleet just before it, to print.
    before: Option<String>,
}

/// SIGTERM, SIGKILL, then `pg_terminate_backend` on whoever leads, with
/// the SQL client publishing throughout; returns the problems found.
async fn run_handovers(url: &str, admin: &tokio_postgres::Client) -> Result<Vec<String>> {
    let channel = fresh_channel("handover");
    let mut fleet = Fleet::new(url, Mode::SINGLE_LISTENER, &channel, EVERY)?;
    for name in NAMES {
        fleet.spawn(name).await?;
    }
    let publisher = Publisher::start(url, &fleet.channel, FAST).await?;
    fleet.read_for(QUIET).await;
    println!("   {}", roles(&fleet));
    let mut dealt = Vec::new();
    for fault in Fault::ALL {
        let mut before = None;
        if fault == Fault::TerminateBackend {
            // Only two were left: a standby makes the race for the lock real.
            fleet.spawn("dave").await?;
            before = Some(format!("dave started; {}", roles(&fleet)));
        }
        let old = fleet.leader().map(|i| fleet.procs[i].name.clone());
        let took = fault_and_measure(&mut fleet, admin, fault).await?;
        // The publisher keeps going: messages after the take-over count too.
        fleet.read_for(QUIET).await;
        dealt.push(Dealt {
            fault,
            old: old.unwrap_or_default(),
            took,
            before,
        });
    }
    let sql_sent = publisher.finish().await?;
    fleet.settle(QUIET).await;

    let mut problems = Vec::new();
    for (i, d) in dealt.iter().enumerate() {
        if let Some(before) = &d.before {
            println!("   {before}");
        }
        // Each fault owns what was sent from it to the next (the first, also before it).
        let from = if i == 0 { 0 } else { d.took.fault_us };
        let to = dealt.get(i + 1).map_or(u64::MAX, |next| next.took.fault_us);
        let fate = fate(&fleet, &sql_sent, from, to);
        println!(
            "{}",
            describe_takeover(&fleet, d, fate.sent, fate.lost.len())
        );
        for &seq in &fate.doubled {
            let how = explain(&fleet, &sql_sent, seq, d.took.fault_us);
            problems.push(format!("{}: handled twice: {how}", d.fault.label()));
        }
        if d.fault == Fault::Graceful && !fate.lost.is_empty() {
            problems.push(format!("graceful hand-over lost sql {:?}", fate.lost));
        }
    }
    for name in fleet.close().await {
        problems.push(format!("hand-overs: {name} did not stop cleanly"));
    }
    if problems.is_empty() {
        println!("   no message was handled twice; none was lost in the graceful hand-over");
    }
    Ok(problems)
}

/// `alice leads; bob, carol stand by`.
fn roles(fleet: &Fleet) -> String {
    let named = |role: Role| {
        let names: Vec<&str> = fleet
            .procs
            .iter()
            .filter(|p| p.role == role)
            .map(|p| p.name.as_str())
            .collect();
        (names.join(", "), if names.len() == 1 { "s" } else { "" })
    };
    let (leader, _) = named(Role::Leader);
    let (standbys, s) = named(Role::Standby);
    format!("{leader} leads; {standbys} stand{s} by")
}

fn describe_takeover(fleet: &Fleet, dealt: &Dealt, sent: usize, lost: usize) -> String {
    let Dealt {
        fault, old, took, ..
    } = dealt;
    let new = &fleet.procs[took.new].name;
    let action = match fault {
        Fault::Graceful => format!("SIGTERM {old}"),
        Fault::Kill => format!("SIGKILL {old}"),
        Fault::TerminateBackend => format!("terminate {old}'s backend"),
    };
    let who = if took.new == took.old {
        format!("{new} (reconnected) leads again")
    } else {
        format!("{new} leads")
    };
    let target = Duration::from_millis(match fault {
        Fault::Graceful => 100,
        _ => 750,
    });
    let pace = if took.to_first <= target {
        "within"
    } else {
        "SLOWER than"
    };
    let note = match (*fault, lost) {
        (Fault::Graceful, _) => " (none may be lost)",
        (_, 0) => "",
        _ => " (sent while nobody listened: LISTEN/NOTIFY keeps nothing)",
    };
    format!(
        "   {action:<26} -> {who} after {}, first message handled after {} \
         ({pace} the {} ms target)\n   {:<26}    {lost} of {sent} messages lost{note}",
        ms(took.to_lead),
        ms(took.to_first),
        target.as_millis(),
        ""
    )
}
