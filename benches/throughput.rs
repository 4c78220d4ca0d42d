//! pg-pubsub against bare tokio-postgres: receive throughput, latency,
//! publish throughput and memory. Run with `cargo bench --bench throughput`.
//!
//! Env: `BENCH_ALLOCS=1` counts heap allocations per notification in phases
//! 1b and 2 (a counter in this binary's allocator; off by default, as it
//! costs a little everywhere), `BENCH_MESSAGES` (default 1 000 000), `BENCH_LATENCY_MESSAGES`
//! (default 20 000), `BENCH_RUNS` (runs per case of phases 1b and 2, default
//! 3; the median is reported), `BENCH_PHASES` (comma-separated subset of
//! `receive,same,latency,publish,memory`; default all), `DATABASE_URL` (else
//! a throwaway cluster).
//!
//! Phase 1 publishes from a child process (this binary re-executed in
//! publisher mode), so that `getrusage(RUSAGE_SELF)` counts the consumer only.
//! Phase 1b publishes from a task on the same runtime, as a service that
//! publishes and listens does: publisher, listener and consumers compete for
//! the same workers, and the CPU column includes the publisher's client.

#[path = "common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::error::Error;
use std::future::Future;
use std::process::Stdio;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use futures::FutureExt;
use pg_pubsub::testing::TestServer;
use pg_pubsub::Text;
use pg_pubsub::{Delivery, PgPubSub};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

type BoxError = Box<dyn Error + Send + Sync>;

/// The system allocator, counting allocations when `BENCH_ALLOCS=1`.
struct Counting;

static COUNT_ALLOCS: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNT_ALLOCS.load(Relaxed) {
            ALLOCS.fetch_add(1, Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNT_ALLOCS.load(Relaxed) {
            ALLOCS.fetch_add(1, Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations (and reallocations) so far, when counted.
fn allocations() -> Option<u64> {
    COUNT_ALLOCS.load(Relaxed).then(|| ALLOCS.load(Relaxed))
}
type Res<T> = Result<T, BoxError>;

/// Set (to the server URL) in the re-executed publisher child.
const CHILD_URL_ENV: &str = "PG_PUBSUB_BENCH_CHILD_URL";
const CHILD_CHANNEL_ENV: &str = "PG_PUBSUB_BENCH_CHILD_CHANNEL";
const CHILD_COUNT_ENV: &str = "PG_PUBSUB_BENCH_CHILD_COUNT";
const CHILD_SENTINEL_ENV: &str = "PG_PUBSUB_BENCH_CHILD_SENTINEL";

/// One statement (= one transaction) publishes this many.
const CHUNK: i32 = 1000;
const PUBLISH_SQL: &str = r#"SELECT pg_notify($1, format('{"seq":%s,"kind":"order","amount":42}', g)) FROM generate_series($2::int, $3::int) g"#;
const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";
const NOTIFY_MANY_SQL: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";

/// A consumer that hears nothing for this long gives up (messages were lost).
const IDLE: Duration = Duration::from_secs(10);
const FANOUT: usize = 10;
const LATENCY_RATE: u64 = 5_000;
const PUBLISH_COUNT: u64 = 20_000;
const PUBLISH_TASKS: usize = 16;
/// The builder's documented default (`Builder::queue_capacity`).
const DEFAULT_QUEUE_CAPACITY: u64 = 65_536;

/// The payload of every phase; `t` (send time, ns) only in the latency phase.
#[derive(Serialize, Deserialize)]
struct Order {
    seq: u64,
    kind: String,
    amount: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<u64>,
}

fn order(seq: u64) -> Order {
    Order {
        seq,
        kind: "order".to_owned(),
        amount: 42,
        t: None,
    }
}

fn main() -> Res<()> {
    if let Ok(url) = std::env::var(CHILD_URL_ENV) {
        return publisher_child(&url);
    }
    COUNT_ALLOCS.store(env_u64("BENCH_ALLOCS", 0)? == 1, Relaxed);
    let plan = Plan {
        messages: env_u64("BENCH_MESSAGES", 1_000_000)?,
        latency_messages: env_u64("BENCH_LATENCY_MESSAGES", 20_000)?,
        runs: env_u64("BENCH_RUNS", 3)?.max(1) as usize,
        phases: std::env::var("BENCH_PHASES")
            .unwrap_or_else(|_| "receive,same,latency,publish,memory".to_owned()),
    };
    // Kept until the end: dropping an owned cluster removes it.
    let server = TestServer::from_env_or_start()?;
    let started = Instant::now();
    let report = runtime()?.block_on(run_all(&server, &plan))?;
    println!("{report}");
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn env_u64(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Ok(v) => Ok(v.replace('_', "").parse()?),
        Err(_) => Ok(default),
    }
}

/// What to run (from the environment).
struct Plan {
    messages: u64,
    latency_messages: u64,
    runs: usize,
    phases: String,
}

impl Plan {
    fn has(&self, phase: &str) -> bool {
        self.phases.split(',').any(|p| p.trim() == phase)
    }
}

async fn run_all(server: &TestServer, plan: &Plan) -> Res<String> {
    let url = server.url();
    let (n, m, runs) = (plan.messages, plan.latency_messages, plan.runs);
    let machine = describe_machine(server).await?;
    let mut sections = Vec::new();
    let mut typed_peak = None;
    if plan.has("receive") {
        eprintln!("phase 1: receive throughput, {n} messages per case");
        let receive = receive_phase(url, n).await?;
        typed_peak = receive.get(1).and_then(|r| r.peak_rss_kb);
        sections.push((
            "1. receive throughput (publisher in a child process)".to_owned(),
            receive,
        ));
    }
    if plan.has("same") {
        eprintln!("phase 1b: receive throughput, same process, {n} messages per case, {runs} runs");
        sections.push((
            format!(
                "1b. receive throughput (publisher task on the same runtime; median of {runs})"
            ),
            same_process_phase(url, n, runs).await?,
        ));
    }
    if plan.has("latency") {
        eprintln!("phase 2: latency, {m} messages per case, {runs} runs");
        sections.push((
            format!("2. latency (paced single notifications, same process; median of {runs})"),
            latency_phase(url, m, runs).await?,
        ));
    }
    if plan.has("publish") {
        eprintln!("phase 3: publish throughput");
        sections.push((
            "3. publish throughput (nobody listening)".to_owned(),
            publish_phase(url).await?,
        ));
    }
    if plan.has("memory") {
        eprintln!("phase 4: memory");
        sections.push((
            "4. memory".to_owned(),
            vec![backlog_case(url, n, typed_peak).await?],
        ));
    }
    Ok(format!("{machine}\n{}", render(&sections)))
}

// ---------------------------------------------------------------- measuring

fn now_ns() -> u64 {
    // CLOCK_MONOTONIC is shared by the publisher child and this process.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.trim();
        rest.strip_suffix("kB")?.trim().parse().ok()
    })
}

fn rss_kb() -> Option<u64> {
    status_kb("VmRSS:")
}

/// CPU time and peak RSS of one case.
struct Probe {
    cpu: Duration,
    allocs: Option<u64>,
    /// Whether VmHWM was reset, i.e. means "peak during this case".
    peak_reset: bool,
}

impl Probe {
    fn start() -> Probe {
        let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        Probe {
            cpu: common::cpu_time(),
            allocs: allocations(),
            peak_reset,
        }
    }

    /// Allocations since the start, per message, as a detail.
    fn allocs_per(&self, msgs: u64) -> String {
        match (self.allocs, allocations()) {
            (Some(a), Some(b)) => format!("; {:.2} allocs/msg", (b - a) as f64 / msgs as f64),
            _ => String::new(),
        }
    }

    fn stop(&self) -> (Duration, Option<u64>) {
        let peak = self.peak_reset.then(|| status_kb("VmHWM:")).flatten();
        (common::cpu_time().saturating_sub(self.cpu), peak)
    }
}

// ------------------------------------------------------------------- report

#[derive(Default)]
struct Row {
    case: String,
    msgs: u64,
    wall: Duration,
    cpu: Duration,
    lost: Option<u64>,
    dup: Option<u64>,
    peak_rss_kb: Option<u64>,
    ratio: Option<f64>,
    cpu_ratio: Option<f64>,
    detail: String,
}

impl Row {
    fn rate(&self) -> f64 {
        self.msgs as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Throughput and CPU relative to `base`.
    fn compare_to(&mut self, base: (f64, Duration)) {
        self.ratio = Some(self.rate() / base.0);
        self.cpu_ratio = Some(self.cpu.as_secs_f64() / base.1.as_secs_f64().max(1e-9));
    }
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or("n/a".to_owned(), |kb| {
        format!("{:.1} MiB", kb as f64 / 1024.0)
    })
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

fn render(sections: &[(String, Vec<Row>)]) -> String {
    let header = [
        "case",
        "msgs",
        "wall s",
        "msgs/s",
        "ratio",
        "cpu s",
        "cpu ratio",
        "lost",
        "dup",
        "peak RSS",
        "detail",
    ];
    let cells = |r: &Row| {
        [
            r.case.clone(),
            r.msgs.to_string(),
            format!("{:.3}", r.wall.as_secs_f64()),
            format!("{:.0}", r.rate()),
            opt(r.ratio.map(|x| format!("{x:.2}"))),
            format!("{:.3}", r.cpu.as_secs_f64()),
            opt(r.cpu_ratio.map(|x| format!("{x:.2}"))),
            opt(r.lost),
            opt(r.dup),
            mib(r.peak_rss_kb),
            r.detail.clone(),
        ]
    };
    let rows: Vec<(&str, Vec<[String; 11]>)> = sections
        .iter()
        .map(|(title, rows)| (title.as_str(), rows.iter().map(cells).collect()))
        .collect();
    let mut width = header.map(str::len);
    for row in rows.iter().flat_map(|(_, r)| r) {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cols.iter().zip(width).enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            if i == 0 || i == cols.len() - 1 {
                s += &format!("{c:<w$} | ");
            } else {
                s += &format!("{c:>w$} | ");
            }
        }
        s.trim_end_matches([' ', '|']).to_owned()
    };
    let total: usize = width.iter().sum::<usize>() + 3 * (width.len() - 1);
    let mut out = line(&header.map(str::to_owned)) + "\n";
    for (title, rows) in &rows {
        out += &format!("{}\n-- {title}\n", "-".repeat(total.min(160)));
        for row in rows {
            out += &(line(row) + "\n");
        }
    }
    out += "ratio = msgs/s / baseline msgs/s (higher is better); cpu ratio = cpu / baseline cpu \
            (lower is better); baseline = the bare tokio-postgres row of the section.\n";
    out
}

async fn describe_machine(server: &TestServer) -> Res<String> {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    // Other load skews every number on a small machine: show it.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let client = bare_client(server.url()).await?;
    let version: String = client.query_one("SELECT version()", &[]).await?.get(0);
    let kind = if server.is_owned() {
        "throwaway cluster"
    } else {
        "DATABASE_URL"
    };
    Ok(format!(
        "machine: nproc {nproc}, CPU {cpu}, load average {load}\n\
         server:  {version} ({kind}: {server})\n"
    ))
}

// ---------------------------------------------------------------- consumers

/// What one received item was.
enum Seen {
    Msg { seq: u64, sent_ns: Option<u64> },
    Lagged(u64),
    Gap,
    Bad,
}

fn seen_order(order: Option<&Order>) -> Seen {
    match order {
        Some(o) if o.kind == "order" && o.amount == 42 => Seen::Msg {
            seq: o.seq,
            sent_ns: o.t,
        },
        _ => Seen::Bad,
    }
}

fn seen_bare(note: Notification) -> Seen {
    seen_order(serde_json::from_str::<Order>(note.payload()).ok().as_ref())
}

fn seen_typed(d: Delivery<Order>) -> Seen {
    match d {
        Delivery::Message(m) => seen_order(Some(m.payload())),
        other => seen_signal(other),
    }
}

/// Raw text: digits after `"seq":` (and `"t":`) without a JSON parser.
fn seen_raw(d: Delivery<Text>) -> Seen {
    let Delivery::Message(m) = d else {
        return seen_signal(d);
    };
    let text = m.payload();
    let number_after = |key: &str| {
        let rest = &text[text.find(key)? + key.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    match number_after(r#""seq":"#) {
        Some(seq) => Seen::Msg {
            seq,
            sent_ns: number_after(r#""t":"#),
        },
        None => Seen::Bad,
    }
}

fn seen_signal<T>(d: Delivery<T>) -> Seen {
    match d {
        Delivery::Lagged(n) => Seen::Lagged(n),
        Delivery::Gap(_) => Seen::Gap,
        _ => Seen::Bad,
    }
}

/// Exactly-once bookkeeping of seq 1..=n for one consumer.
struct Tally {
    n: u64,
    /// A bit per seq: small enough not to dominate the peak RSS.
    seen: Vec<u64>,
    distinct: u64,
    dups: u64,
    lagged: u64,
    gaps: u64,
    bad: u64,
    /// When the last message was handled (read when the consumer is about
    /// to wait, and at the end: a clock read per message cost 14% of the
    /// client's CPU with ten consumers).
    last_ns: u64,
    /// A message was handled since `last_ns` was read.
    unstamped: bool,
    latencies_ns: Vec<u64>,
}

impl Tally {
    fn new(n: u64) -> Tally {
        Tally {
            n,
            seen: vec![0; n.div_ceil(64) as usize],
            distinct: 0,
            dups: 0,
            lagged: 0,
            gaps: 0,
            bad: 0,
            last_ns: 0,
            unstamped: false,
            latencies_ns: Vec::new(),
        }
    }

    /// Reads the clock if a message was handled since it was last read.
    fn stamp(&mut self) {
        if std::mem::take(&mut self.unstamped) {
            self.last_ns = now_ns();
        }
    }

    fn record(&mut self, seen: Seen) {
        match seen {
            Seen::Msg { seq, sent_ns } => {
                let i = seq.wrapping_sub(1);
                let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
                if i >= self.n {
                    self.bad += 1;
                } else if self.seen[word] & bit != 0 {
                    self.dups += 1;
                } else {
                    self.seen[word] |= bit;
                    self.distinct += 1;
                }
                if let Some(sent) = sent_ns {
                    self.last_ns = now_ns();
                    self.latencies_ns.push(self.last_ns.saturating_sub(sent));
                } else {
                    self.unstamped = true;
                }
            }
            Seen::Lagged(n) => self.lagged += n,
            Seen::Gap => self.gaps += 1,
            Seen::Bad => self.bad += 1,
        }
    }

    /// Every message arrived or was reported lost.
    fn complete(&self) -> bool {
        self.distinct + self.lagged >= self.n
    }

    fn missing(&self) -> u64 {
        self.n - self.distinct
    }
}

/// Consumes until every message is accounted for or nothing comes for `IDLE`.
async fn drain<S, F>(mut stream: S, n: u64, classify: F) -> Tally
where
    S: Stream + Unpin,
    F: Fn(S::Item) -> Seen,
{
    let mut tally = Tally::new(n);
    while !tally.complete() {
        // The idle timer is armed only when nothing is ready: a timer per
        // item (a runtime-handle clone each) would cost more than a delivery.
        let item = match stream.next().now_or_never() {
            Some(item) => item,
            None => {
                tally.stamp();
                match timeout(IDLE, stream.next()).await {
                    Ok(item) => item,
                    Err(_) => break,
                }
            }
        };
        let Some(item) = item else { break };
        tally.record(classify(item));
    }
    tally.stamp();
    tally
}

async fn bare_client(url: &str) -> Res<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A bare listener: the connection driven in its own task, notifications
/// forwarded over an unbounded channel.
async fn bare_listener(
    url: &str,
    channel: &str,
) -> Res<(Client, mpsc::UnboundedReceiver<Notification>)> {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if tx.send(note).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bare listener: {e}");
                    break;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    Ok((client, rx))
}

#[derive(Clone, Copy)]
enum Receiver {
    Bare,
    Typed,
    Raw,
    /// `FANOUT` typed subscribers on one channel.
    Fanout,
}

/// What keeps the listening session(s) alive until the case ends.
enum Session {
    Bare(Client),
    Lib(PgPubSub),
}

impl Session {
    async fn close(self) {
        match self {
            Session::Bare(client) => drop(client),
            Session::Lib(pubsub) => pubsub.shutdown().await,
        }
    }
}

/// Listens on `channel` (returns once the server listens) and spawns the consumers.
async fn start_receivers(
    url: &str,
    channel: &str,
    n: u64,
    kind: Receiver,
) -> Res<(Session, Vec<JoinHandle<Tally>>)> {
    if let Receiver::Bare = kind {
        let (client, mut rx) = bare_listener(url, channel).await?;
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let task = tokio::spawn(drain(stream, n, seen_bare));
        return Ok((Session::Bare(client), vec![task]));
    }
    // Default builder settings, as an application would start.
    let pubsub = PgPubSub::connect(url).await?;
    let mut tasks = Vec::new();
    match kind {
        Receiver::Raw => {
            let sub = pubsub.listen::<Text>(channel).await?;
            tasks.push(tokio::spawn(drain(sub, n, seen_raw)));
        }
        _ => {
            let count = if let Receiver::Fanout = kind {
                FANOUT
            } else {
                1
            };
            for _ in 0..count {
                let sub = pubsub.listen::<Order>(channel).await?;
                tasks.push(tokio::spawn(drain(sub, n, seen_typed)));
            }
        }
    }
    Ok((Session::Lib(pubsub), tasks))
}

async fn join_all(tasks: Vec<JoinHandle<Tally>>) -> Res<Vec<Tally>> {
    let mut tallies = Vec::new();
    for task in tasks {
        tallies.push(task.await?);
    }
    Ok(tallies)
}

/// Loss, duplicates and signals summed over consumers, and the detail text.
fn summarize(row: &mut Row, tallies: &[Tally]) {
    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    row.lost = Some(sum(Tally::missing));
    row.dup = Some(sum(|t| t.dups));
    let (lagged, gaps, bad) = (sum(|t| t.lagged), sum(|t| t.gaps), sum(|t| t.bad));
    if lagged + gaps + bad > 0 {
        row.detail += &format!("Lagged {lagged}, gaps {gaps}, bad {bad}; ");
    }
}

fn fresh_channel(prefix: &str) -> String {
    format!(
        "bench_{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

// -------------------------------------------------------- publisher child

fn publisher_child(url: &str) -> Res<()> {
    let channel = std::env::var(CHILD_CHANNEL_ENV)?;
    let n: u64 = std::env::var(CHILD_COUNT_ENV)?.parse()?;
    let sentinel = std::env::var(CHILD_SENTINEL_ENV).ok();
    runtime()?.block_on(async {
        let client = bare_client(url).await?;
        let (first, last) = publish_chunks(&client, &channel, n).await?;
        if let Some(sentinel) = sentinel {
            // Commits after every message, so it is received after them too.
            client
                .execute("SELECT pg_notify($1, 'done')", &[&sentinel])
                .await?;
        }
        println!("{first} {last}");
        Ok(())
    })
}

/// Publishes seq 1..=n, `CHUNK` per transaction; returns the time just
/// before the first statement and after the last commit.
async fn publish_chunks(client: &Client, channel: &str, n: u64) -> Res<(u64, u64)> {
    let n = i32::try_from(n)?;
    let stmt = client.prepare(PUBLISH_SQL).await?;
    let first = now_ns();
    let mut lo = 1;
    while lo <= n {
        let hi = lo.saturating_add(CHUNK - 1).min(n);
        client.execute(&stmt, &[&channel, &lo, &hi]).await?;
        lo = hi + 1;
    }
    Ok((first, now_ns()))
}

/// Runs the publisher child; returns its first-publish and last-commit times.
async fn publish_in_child(
    url: &str,
    channel: &str,
    n: u64,
    sentinel: Option<&str>,
) -> Res<(u64, u64)> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.env(CHILD_URL_ENV, url)
        .env(CHILD_CHANNEL_ENV, channel)
        .env(CHILD_COUNT_ENV, n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(sentinel) = sentinel {
        cmd.env(CHILD_SENTINEL_ENV, sentinel);
    }
    let out = cmd.output().await?;
    if !out.status.success() {
        return Err(format!("publisher child failed: {}", out.status).into());
    }
    let text = String::from_utf8(out.stdout)?;
    let mut times = text.split_whitespace().map(str::parse::<u64>);
    match (times.next(), times.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Ok((first, last)),
        _ => Err(format!("publisher child printed {text:?}").into()),
    }
}

// ------------------------------------------------- phase 1: receive throughput

async fn receive_phase(url: &str, n: u64) -> Res<Vec<Row>> {
    let cases = [
        ("(a) bare tokio-postgres + mpsc", Receiver::Bare),
        ("(b) listen::<T>", Receiver::Typed),
        ("(c) listen_raw", Receiver::Raw),
        ("(d) 10 x listen::<T>", Receiver::Fanout),
    ];
    let mut rows = Vec::new();
    for (name, kind) in cases {
        eprintln!("  {name}");
        rows.push(receive_case(url, n, name, kind).await?);
    }
    let base = (rows[0].rate(), rows[0].cpu);
    rows.iter_mut().for_each(|r| r.compare_to(base));
    Ok(rows)
}

/// A receive case's row: wall time from the first publish to the last receipt.
fn received_row(
    name: &str,
    n: u64,
    first: u64,
    tallies: &[Tally],
    cpu: Duration,
    peak_rss_kb: Option<u64>,
) -> Row {
    let last = tallies.iter().map(|t| t.last_ns).max().unwrap_or(first);
    let mut row = Row {
        case: name.to_owned(),
        msgs: n,
        wall: Duration::from_nanos(last.saturating_sub(first)),
        cpu,
        peak_rss_kb,
        ..Row::default()
    };
    summarize(&mut row, tallies);
    row
}

async fn receive_case(url: &str, n: u64, name: &str, kind: Receiver) -> Res<Row> {
    let channel = fresh_channel("recv");
    let (session, tasks) = start_receivers(url, &channel, n, kind).await?;
    let probe = Probe::start();
    let (first, last_sent) = publish_in_child(url, &channel, n, None).await?;
    let tallies = join_all(tasks).await?;
    let (cpu, peak) = probe.stop();
    session.close().await;
    let mut row = received_row(name, n, first, &tallies, cpu, peak);
    let publish_secs = (last_sent - first) as f64 / 1e9;
    row.detail += &format!("publisher alone {:.0}/s", n as f64 / publish_secs);
    if tallies.len() > 1 {
        row.detail += &format!("; {} deliveries", n * tallies.len() as u64);
    }
    Ok(row)
}

// ------------------------------------- phase 1b: receive throughput, same process

const SAME_PROCESS_CASES: [(&str, Receiver); 4] = [
    ("(a) bare tokio-postgres + mpsc", Receiver::Bare),
    ("(b) listen::<T>", Receiver::Typed),
    ("(c) listen_raw", Receiver::Raw),
    ("(d) 10 x listen::<T>", Receiver::Fanout),
];

/// Runs every case `runs` times, interleaved so that drifting background
/// load hits every case alike, and reports each case's median.
async fn same_process_phase(url: &str, n: u64, runs: usize) -> Res<Vec<Row>> {
    // `BENCH_CASES=c` runs case (c) alone (for profiling); ratios need (a).
    let only = std::env::var("BENCH_CASES").ok();
    let cases: Vec<_> = SAME_PROCESS_CASES
        .iter()
        .filter(|(name, _)| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|c| name.starts_with(&format!("({c})"))))
        })
        .collect();
    let mut all: Vec<Vec<Row>> = cases.iter().map(|_| Vec::new()).collect();
    for run in 1..=runs {
        for ((name, kind), rows) in cases.iter().zip(&mut all) {
            eprintln!("  run {run}/{runs}: {name}");
            rows.push(same_process_case(url, n, name, *kind).await?);
        }
    }
    let mut rows: Vec<Row> = all.into_iter().map(median_row).collect();
    if only.is_none() {
        let base = (rows[0].rate(), rows[0].cpu);
        rows.iter_mut().for_each(|r| r.compare_to(base));
        let one = rows[1].wall.as_secs_f64();
        let fanout = &mut rows[3];
        fanout.detail += &format!("; x{:.2} the time of (b)", fanout.wall.as_secs_f64() / one);
    }
    Ok(rows)
}

async fn same_process_case(url: &str, n: u64, name: &str, kind: Receiver) -> Res<Row> {
    let channel = fresh_channel("same");
    let (session, tasks) = start_receivers(url, &channel, n, kind).await?;
    let publisher = bare_client(url).await?;
    let probe = Probe::start();
    let publish = {
        let channel = channel.clone();
        tokio::spawn(async move { publish_chunks(&publisher, &channel, n).await })
    };
    let (first, last_sent) = publish.await??;
    let tallies = join_all(tasks).await?;
    let (cpu, peak) = probe.stop();
    let allocs = probe.allocs_per(n);
    session.close().await;
    let mut row = received_row(name, n, first, &tallies, cpu, peak);
    let publish_secs = (last_sent - first) as f64 / 1e9;
    row.detail += &format!("publishing took {publish_secs:.3} s{allocs}");
    Ok(row)
}

/// The median wall and CPU of several runs of one case (each column on its
/// own), with their spread in the detail.
fn median_row(mut runs: Vec<Row>) -> Row {
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort_unstable();
        v[v.len() / 2]
    }
    let walls: Vec<Duration> = runs.iter().map(|r| r.wall).collect();
    let cpus: Vec<Duration> = runs.iter().map(|r| r.cpu).collect();
    let spread = |v: &[Duration]| {
        let (lo, hi) = (v.iter().min(), v.iter().max());
        match (lo, hi) {
            (Some(lo), Some(hi)) => format!("{:.3}-{:.3}", lo.as_secs_f64(), hi.as_secs_f64()),
            _ => String::new(),
        }
    };
    let detail = format!(
        "wall {} cpu {} over {} runs; ",
        spread(&walls),
        spread(&cpus),
        runs.len()
    );
    // The run with the median wall time supplies the other columns.
    let wall = median(walls);
    let i = runs.iter().position(|r| r.wall == wall).unwrap_or(0);
    let mut row = runs.swap_remove(i);
    row.wall = wall;
    row.cpu = median(cpus);
    row.detail = detail + &row.detail;
    row
}

// ------------------------------------------------------------ phase 2: latency

async fn latency_phase(url: &str, m: u64, runs: usize) -> Res<Vec<Row>> {
    let cases = [
        ("bare tokio-postgres + mpsc", Receiver::Bare),
        ("listen_raw", Receiver::Raw),
        ("listen::<T>", Receiver::Typed),
    ];
    let mut all: Vec<Vec<(Row, u64)>> = cases.iter().map(|_| Vec::new()).collect();
    for run in 1..=runs {
        for ((name, kind), results) in cases.iter().zip(&mut all) {
            eprintln!("  run {run}/{runs}: {name}");
            results.push(latency_case(url, m, name, *kind).await?);
        }
    }
    let mut rows = Vec::new();
    let mut bare_p99 = None;
    for results in all {
        // The run with the median p99 is the row.
        let mut p99s: Vec<u64> = results.iter().map(|(_, p)| *p).collect();
        p99s.sort_unstable();
        let p99 = p99s[p99s.len() / 2];
        let (mut row, _) = results
            .into_iter()
            .find(|(_, p)| *p == p99)
            .ok_or("no latency run")?;
        let all_p99: Vec<String> = p99s
            .iter()
            .map(|p| format!("{:.0}", *p as f64 / 1e3))
            .collect();
        row.detail += &format!("; p99 of each run (us): {}", all_p99.join(" "));
        if let Some(base) = bare_p99 {
            row.detail += &format!(" (median p99 x{:.2} bare)", p99 as f64 / base as f64);
        }
        bare_p99.get_or_insert(p99);
        rows.push(row);
    }
    let base = (rows[0].rate(), rows[0].cpu);
    rows.iter_mut().for_each(|r| r.compare_to(base));
    Ok(rows)
}

async fn latency_case(url: &str, m: u64, name: &str, kind: Receiver) -> Res<(Row, u64)> {
    let channel = fresh_channel("lat");
    let (session, tasks) = start_receivers(url, &channel, m, kind).await?;
    let publisher = bare_client(url).await?;
    let probe = Probe::start();
    let start = Instant::now();
    paced_publish(&publisher, &channel, m).await?;
    let mut tallies = join_all(tasks).await?;
    let wall = start.elapsed();
    let (cpu, peak) = probe.stop();
    let allocs = probe.allocs_per(m);
    session.close().await;
    let mut lat = std::mem::take(&mut tallies[0].latencies_ns);
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)));
    let us = |v: Option<&u64>| v.map_or("n/a".to_owned(), |v| format!("{:.0}us", *v as f64 / 1e3));
    let mut row = Row {
        case: name.to_owned(),
        msgs: m,
        wall,
        cpu,
        peak_rss_kb: peak,
        ..Row::default()
    };
    summarize(&mut row, &tallies);
    row.detail += &format!(
        "p50 {} p99 {} p99.9 {} max {}",
        us(pct(0.50)),
        us(pct(0.99)),
        us(pct(0.999)),
        us(lat.last())
    );
    row.detail += &allocs;
    Ok((row, pct(0.99).copied().unwrap_or(0)))
}

/// One autocommit `pg_notify` per tick at `LATENCY_RATE`, pipelined so a slow
/// round trip does not delay the next send. The send time is taken when the
/// request is first polled, i.e. just before it is written.
async fn paced_publish(client: &Client, channel: &str, m: u64) -> Res<()> {
    let stmt = client.prepare(NOTIFY_SQL).await?;
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / LATENCY_RATE));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < m || !in_flight.is_empty() {
        tokio::select! {
            _ = ticker.tick(), if sent < m => {
                sent += 1;
                let (stmt, seq) = (&stmt, sent);
                in_flight.push(async move {
                    let mut o = order(seq);
                    o.t = Some(now_ns());
                    let payload = serde_json::to_string(&o).expect("serializes");
                    client.execute(stmt, &[&channel, &payload]).await
                });
            }
            Some(res) = in_flight.next() => { res?; }
        }
    }
    Ok(())
}

// ------------------------------------------------- phase 3: publish throughput

async fn publish_phase(url: &str) -> Res<Vec<Row>> {
    let channel = fresh_channel("pub");
    let pubsub = PgPubSub::builder(url)?
        .pool_size(PUBLISH_TASKS)
        .connect()
        .await?;
    warm_pool(&pubsub, &channel).await?;
    let mut rows = Vec::new();
    for tasks in [1, PUBLISH_TASKS] {
        eprintln!("  notify from {tasks} task(s)");
        let mut bare = bare_notify(url, &channel, tasks).await?;
        let base = (bare.rate(), bare.cpu);
        bare.compare_to(base);
        let mut lib = lib_notify(&pubsub, &channel, tasks).await?;
        lib.compare_to(base);
        rows.extend([bare, lib]);
    }
    eprintln!("  batches");
    let payloads: Vec<String> = (1..=PUBLISH_COUNT)
        .map(|seq| serde_json::to_string(&order(seq)))
        .collect::<Result<_, _>>()?;
    let mut bare = bare_batch(url, &channel, &payloads).await?;
    let base = (bare.rate(), bare.cpu);
    bare.compare_to(base);
    let mut lib = timed("notify_batch (1000/stmt)", PUBLISH_COUNT, async {
        pubsub
            .notify_batch(&channel, payloads.iter().map(Text))
            .await?;
        Ok(())
    })
    .await?;
    lib.compare_to(base);
    rows.extend([bare, lib]);
    pubsub.shutdown().await;
    Ok(rows)
}

/// Runs `work` as one case: wall time, CPU and peak RSS.
async fn timed(case: &str, msgs: u64, work: impl Future<Output = Res<()>>) -> Res<Row> {
    let probe = Probe::start();
    let start = Instant::now();
    work.await?;
    let wall = start.elapsed();
    let (cpu, peak) = probe.stop();
    Ok(Row {
        case: case.to_owned(),
        msgs,
        wall,
        cpu,
        peak_rss_kb: peak,
        ..Row::default()
    })
}

/// Opens every pooled connection and prepares its statements, as the bare
/// side does before its clock starts.
async fn warm_pool(pubsub: &PgPubSub, channel: &str) -> Res<()> {
    let mut tasks = Vec::new();
    for _ in 0..PUBLISH_TASKS {
        let (pubsub, channel) = (pubsub.clone(), channel.to_owned());
        tasks.push(tokio::spawn(async move {
            for seq in 0..10 {
                pubsub.notify(&channel, &order(seq)).await?;
            }
            pubsub.notify_batch(&channel, ["warm"].map(Text)).await?;
            Ok::<_, pg_pubsub::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// `PUBLISH_COUNT` notifications split over `tasks` concurrent tasks.
fn shares(tasks: usize) -> impl Iterator<Item = std::ops::Range<u64>> {
    let per = PUBLISH_COUNT / tasks as u64;
    (0..tasks as u64).map(move |i| {
        let end = if i + 1 == tasks as u64 {
            PUBLISH_COUNT
        } else {
            (i + 1) * per
        };
        i * per + 1..end + 1
    })
}

async fn bare_notify(url: &str, channel: &str, tasks: usize) -> Res<Row> {
    let mut clients = Vec::new();
    for _ in 0..tasks {
        let client = Arc::new(bare_client(url).await?);
        let stmt = client.prepare(NOTIFY_SQL).await?;
        clients.push((client, stmt));
    }
    let case = format!("bare pg_notify, {tasks} conn(s)");
    timed(&case, PUBLISH_COUNT, async {
        let mut handles = Vec::new();
        for ((client, stmt), range) in clients.into_iter().zip(shares(tasks)) {
            let channel = channel.to_owned();
            handles.push(tokio::spawn(async move {
                for seq in range {
                    let payload = serde_json::to_string(&order(seq))?;
                    client.execute(&stmt, &[&channel, &payload]).await?;
                }
                Ok::<_, BoxError>(())
            }));
        }
        for h in handles {
            h.await??;
        }
        Ok(())
    })
    .await
}

async fn lib_notify(pubsub: &PgPubSub, channel: &str, tasks: usize) -> Res<Row> {
    let case = format!("notify, {tasks} task(s), pool 16");
    timed(&case, PUBLISH_COUNT, async {
        let mut handles = Vec::new();
        for range in shares(tasks) {
            let (pubsub, channel) = (pubsub.clone(), channel.to_owned());
            handles.push(tokio::spawn(async move {
                for seq in range {
                    pubsub.notify(&channel, &order(seq)).await?;
                }
                Ok::<_, pg_pubsub::Error>(())
            }));
        }
        for h in handles {
            h.await??;
        }
        Ok(())
    })
    .await
}

async fn bare_batch(url: &str, channel: &str, payloads: &[String]) -> Res<Row> {
    let client = bare_client(url).await?;
    let stmt = client.prepare(NOTIFY_MANY_SQL).await?;
    timed("bare unnest (1000/stmt)", payloads.len() as u64, async {
        for chunk in payloads.chunks(CHUNK as usize) {
            client.execute(&stmt, &[&channel, &chunk]).await?;
        }
        Ok(())
    })
    .await
}

// ------------------------------------------------------------- phase 4: memory

/// A subscriber that reads nothing while `n` messages arrive: it must then
/// yield its full queue, then one `Lagged` for the rest.
async fn backlog_case(url: &str, n: u64, reader_peak_kb: Option<u64>) -> Res<Row> {
    let channel = fresh_channel("backlog");
    let sentinel = fresh_channel("done");
    let pubsub = PgPubSub::connect(url).await?;
    let mut idle = pubsub.listen::<Order>(&channel).await?;
    let mut done = pubsub.listen::<Text>(&sentinel).await?;
    let rss_before = rss_kb();
    let probe = Probe::start();
    let (first, _) = publish_in_child(url, &channel, n, Some(&sentinel)).await?;
    // The sentinel arrives after every message was dispatched to the queue.
    timeout(Duration::from_secs(120), done.next())
        .await?
        .ok_or("sentinel subscription ended")?;
    let burst_end = now_ns();
    let (cpu, peak) = probe.stop();
    let rss_after = rss_kb();

    let (mut queued, mut lagged, mut markers, mut in_order) = (0u64, 0u64, 0, true);
    while let Ok(Some(d)) = timeout(Duration::from_secs(1), idle.next()).await {
        match seen_typed(d) {
            Seen::Msg { seq, .. } => {
                in_order &= markers == 0 && seq == queued + 1;
                queued += 1;
            }
            Seen::Lagged(k) => {
                lagged += k;
                markers += 1;
            }
            _ => in_order = false,
        }
    }
    let rss_drained = rss_kb();
    pubsub.shutdown().await;

    let expected_queue = DEFAULT_QUEUE_CAPACITY.min(n);
    let ok = in_order && markers <= 1 && queued == expected_queue && queued + lagged == n;
    Ok(Row {
        case: "1 listen::<T> reading nothing".to_owned(),
        msgs: n,
        wall: Duration::from_nanos(burst_end.saturating_sub(first)),
        cpu,
        lost: Some(lagged),
        dup: Some(0),
        peak_rss_kb: peak,
        detail: format!(
            "queue capacity {DEFAULT_QUEUE_CAPACITY} (default): yielded {queued} in order, \
             then Lagged({lagged}) x{markers}; {queued}+{lagged}={} {}; RSS before {}, \
             after burst {}, after draining {}; reading subscriber (1b) peak {}",
            queued + lagged,
            if ok { "OK" } else { "UNEXPECTED" },
            mib(rss_before),
            mib(rss_after),
            mib(rss_drained),
            mib(reader_peak_kb),
        ),
        ..Row::default()
    })
}
