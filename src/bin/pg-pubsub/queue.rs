//! `pg-pubsub queue …`: the work queue from the shell (enqueue, a worker
//! that runs a command per job, stats, dead jobs).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::{FutureExt, StreamExt};
use pg_pubsub::admin::{JobState, Page};
use pg_pubsub::event::QueueEvent;
use pg_pubsub::queue::{Cancelled, Enqueued, Job, Limits, Queue};
use pg_pubsub::PgPubSub;
use pg_pubsub::Text;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    connect, human, note, print_json_lines, report_event, send_stdin_lines, ConnOpts, Failure,
    Result, Stop, Tuning,
};

/// Bytes of a failed command's stderr kept as the job's error.
const STDERR_TAIL: usize = 4096;

#[derive(Args)]
pub(crate) struct QueueArgs {
    /// Schema holding the queue tables.
    #[arg(long, default_value = pg_pubsub::schema::DEFAULT_SCHEMA, global = true)]
    schema: String,
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Enqueue a job, or one per line of stdin; prints each new job's id.
    Enqueue(EnqueueArgs),
    /// Run COMMAND once per job: payload on its stdin, PGPUBSUB_JOB_ID and
    /// PGPUBSUB_ATTEMPT in its environment. Exit 0 completes the job; any
    /// other exit fails it with the tail of its stderr as the error.
    /// Retries, dead jobs and connection losses are reported on stderr.
    /// SIGTERM/SIGINT: stop claiming, let running commands finish, exit 0.
    /// A command dies with its worker, even a SIGKILLed one (Linux). A job
    /// cancelled while its command runs (`queue cancel`): SIGTERM to the
    /// command's process group, SIGKILL after --cancel-grace; the job ends
    /// cancelled. A paused queue (`queue pause`): nothing is claimed.
    Work(WorkArgs),
    /// Cancel job ID: a waiting job never runs; a running one's worker
    /// stops its command; the job ends cancelled, never retried.
    Cancel(JobArgs),
    /// Pause QUEUE for every worker (kept in the database until resumed):
    /// workers claim nothing from it and finish what they run.
    Pause(QueueName),
    /// Resume a paused QUEUE.
    Resume(QueueName),
    /// Completed and cancelled jobs still in the history (most recent
    /// first), one JSON object per line, with their output.
    Finished(FinishedArgs),
    /// Per-queue counts, one JSON object per line.
    Stats,
    /// List dead jobs (one JSON object per line), or retry or delete one.
    Dead(DeadArgs),
    /// List a queue's jobs in one state, by id, one JSON object per line
    /// (payloads cut to 200 characters). A full page ends with a note
    /// giving the `--after` of the next one.
    Jobs(JobsArgs),
    /// Print one job, live or dead, with its whole payload, as JSON.
    Job(JobArgs),
    /// Set a queue's limits (replacing those it had), or print them as
    /// JSON when no option is given. Workers take them up within a poll.
    Limit(LimitArgs),
}

#[derive(Args)]
struct LimitArgs {
    /// Queue name.
    queue: String,
    /// Jobs of the queue running at once, across every worker.
    #[arg(long, value_name = "N")]
    concurrency: Option<u32>,
    /// Running jobs per key (`enqueue --key`); 1 runs each key's jobs in order.
    #[arg(long, value_name = "N")]
    per_key: Option<u32>,
    /// Jobs started per interval: N/INTERVAL, INTERVAL as 500ms, 1s, 5m, 1h
    /// (or s, m, h for one).
    #[arg(long, value_name = "N/INTERVAL", value_parser = parse_rate)]
    rate: Option<(u32, Duration)>,
    /// Remove every limit of the queue.
    #[arg(long, conflicts_with_all = ["concurrency", "per_key", "rate"])]
    clear: bool,
}

/// `N/INTERVAL`: `100/1s`, `5/500ms`, `1000/h`.
fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("{s:?}: expected N/INTERVAL, e.g. 100/1s, 5/500ms, 1000/h");
    let (n, per) = s.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let per = per.trim();
    let split = per
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(bad)?;
    let (num, unit) = per.split_at(split);
    let num: f64 = if num.is_empty() {
        1.0
    } else {
        num.parse().map_err(|_| bad())?
    };
    let unit_secs = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let per = Duration::try_from_secs_f64(num * unit_secs).map_err(|_| bad())?;
    Ok((n, per))
}

#[derive(Args)]
struct JobsArgs {
    /// Queue name.
    queue: String,
    /// ready, scheduled, running or dead.
    #[arg(long, default_value = "ready", value_parser = parse_state)]
    state: JobState,
    /// Only jobs with a greater id (the next page).
    #[arg(long, value_name = "ID")]
    after: Option<i64>,
    /// At most this many (up to 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(Args)]
struct QueueName {
    /// Queue name.
    queue: String,
}

#[derive(Args)]
struct FinishedArgs {
    /// Only this queue.
    queue: Option<String>,
    /// List at most this many.
    #[arg(long, default_value_t = 100)]
    limit: i64,
}

#[derive(Args)]
struct JobArgs {
    /// The job's id.
    id: i64,
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse().map_err(|e: pg_pubsub::Error| e.to_string())
}

#[derive(Args)]
struct EnqueueArgs {
    /// Queue name.
    queue: String,
    /// Payload text.
    #[arg(required_unless_present = "stdin", conflicts_with = "stdin")]
    payload: Option<String>,
    /// Enqueue one job per line of standard input (in batches of 1000).
    #[arg(long)]
    stdin: bool,
    /// Run no earlier than this many seconds from now.
    #[arg(long, value_name = "SECONDS")]
    delay: Option<f64>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    priority: i16,
    /// Attempts before the job is dead.
    #[arg(long, default_value_t = 25)]
    max_attempts: i32,
    /// At most one ready or running job of the queue with this key.
    #[arg(long, conflicts_with = "stdin")]
    unique_key: Option<String>,
    /// The job's key for the queue's per-key limit (`queue limit --per-key`).
    #[arg(long, conflicts_with = "stdin")]
    key: Option<String>,
}

#[derive(Args)]
struct WorkArgs {
    /// Queue name.
    queue: String,
    /// Commands running at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Lease in seconds: a job of a killed worker runs again this long later.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    lease: f64,
    /// On SIGTERM, how long running commands may take before they are
    /// killed and their jobs given back.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    shutdown_timeout: f64,
    /// When a running job is cancelled, how long its command may take
    /// after SIGTERM before it gets SIGKILL.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    cancel_grace: f64,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct DeadArgs {
    /// Only this queue.
    queue: Option<String>,
    /// Put dead job ID back in its queue with fresh attempts.
    #[arg(long, value_name = "ID", conflicts_with = "delete")]
    retry: Option<i64>,
    /// Delete dead job ID.
    #[arg(long, value_name = "ID")]
    delete: Option<i64>,
    /// List at most this many.
    #[arg(long, default_value_t = 100)]
    limit: i64,
}

fn seconds(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| Failure(format!("--{what}: {e}")))
}

pub(crate) async fn run(conn: &ConnOpts, args: QueueArgs) -> Result<()> {
    pg_pubsub::schema::SchemaName::new(&args.schema)?;
    if let QueueCommand::Work(w) = args.command {
        return work(conn, &args.schema, w).await;
    }
    let ps = connect(conn, Tuning::default()).await?;
    let q = ps.queue().with_schema(&args.schema)?;
    let result = match args.command {
        QueueCommand::Enqueue(e) => enqueue(&q, e).await,
        QueueCommand::Stats => stats(&q).await,
        QueueCommand::Limit(l) => limit(&q, l).await,
        QueueCommand::Dead(d) => dead(&q, d).await,
        QueueCommand::Jobs(j) => jobs(&ps, &args.schema, j).await,
        QueueCommand::Job(j) => job(&ps, &args.schema, j).await,
        QueueCommand::Cancel(j) => cancel(&q, j.id).await,
        QueueCommand::Pause(n) => pause(&q, &n.queue, true).await,
        QueueCommand::Resume(n) => pause(&q, &n.queue, false).await,
        QueueCommand::Finished(f) => finished(&q, f).await,
        QueueCommand::Work(_) => Ok(()),
    };
    ps.shutdown().await;
    result
}

async fn enqueue(q: &Queue, args: EnqueueArgs) -> Result<()> {
    let delay = args.delay.map(|d| seconds(d, "delay")).transpose()?;
    if let Some(payload) = args.payload {
        let mut job = q
            .enqueue(&args.queue, Text(&payload))
            .priority(args.priority)
            .max_attempts(args.max_attempts);
        if let Some(d) = delay {
            job = job.delay(d);
        }
        if let Some(k) = args.unique_key {
            job = job.unique_key(k);
        }
        if let Some(k) = args.key {
            job = job.key(k);
        }
        match job.await? {
            Enqueued::New(id) => println!("{id}"),
            _ => note("not enqueued: a ready or running job holds this unique key"),
        }
        return Ok(());
    }
    if args.unique_key.is_some() {
        return Err(Failure(
            "--unique-key needs a PAYLOAD: jobs read from stdin are enqueued in batches".to_owned(),
        ));
    }
    let (queue, priority, attempts) = (args.queue.as_str(), args.priority, args.max_attempts);
    let sent = send_stdin_lines("jobs", |chunk| async move {
        let mut batch = q
            .enqueue_batch(queue, chunk.iter().map(Text))
            .priority(priority)
            .max_attempts(attempts);
        if let Some(d) = delay {
            batch = batch.delay(d);
        }
        batch.await
    })
    .await?;
    note(&format!("enqueued {sent} jobs"));
    Ok(())
}

async fn work(conn: &ConnOpts, schema: &str, args: WorkArgs) -> Result<()> {
    let lease = seconds(args.lease, "lease")?;
    let shutdown_timeout = seconds(args.shutdown_timeout, "shutdown-timeout")?;
    let grace = seconds(args.cancel_grace, "cancel-grace")?;
    // A missing command would fail every attempt of every job it claimed.
    let program = args.command.first().map(String::as_str).unwrap_or_default();
    find_program(program)?;
    let mut stop = Stop::new()?;
    let ps: PgPubSub = match stop.or(connect(conn, Tuning::default())).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    // Subscribed before the first claim: no retry or dead job goes unreported.
    let mut events = ps.events().fuse();
    let queue = ps.queue().with_schema(schema)?;
    let mut jobs = queue.events().fuse();
    let command = std::sync::Arc::new(args.command);
    let worker = queue
        .worker(&args.queue)
        .concurrency(args.concurrency)
        .lease(lease)
        .shutdown_timeout(shutdown_timeout)
        .run(move |job: Job| run_command(command.clone(), job, grace))
        .await;
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            ps.shutdown().await;
            return Err(e.into());
        }
    };
    note(&format!(
        "working on queue {} with concurrency {}",
        args.queue, args.concurrency
    ));
    loop {
        tokio::select! {
            biased;
            _ = stop.recv() => break,
            Some(event) = events.next() => report_event(&event),
            Some(event) = jobs.next() => report_queue_event(&event),
        }
    }
    note("stopping: letting running jobs finish");
    let result = worker.shutdown().await;
    // The fates of the jobs that were running are queued by now.
    while let Some(Some(event)) = events.next().now_or_never() {
        report_event(&event);
    }
    while let Some(Some(event)) = jobs.next().now_or_never() {
        report_queue_event(&event);
    }
    ps.shutdown().await;
    Ok(result?)
}

/// Prints a retried or dead job as a `pg-pubsub:` line.
fn report_queue_event(event: &QueueEvent) {
    match event {
        QueueEvent::JobRetried {
            queue,
            job_id,
            attempt,
            error,
            retry_in,
        } => note(&format!(
            "job {job_id} of queue {queue} failed (attempt {attempt}): {error}; retrying in {}",
            human(*retry_in)
        )),
        QueueEvent::JobDead {
            queue,
            job_id,
            attempts,
            error,
        } => note(&format!(
            "job {job_id} of queue {queue} is dead after {attempts} attempt(s): {error} \
             (see pg-pubsub queue dead)"
        )),
        QueueEvent::JobCancelled { queue, job_id, .. } => {
            note(&format!("job {job_id} of queue {queue} was cancelled"))
        }
        QueueEvent::PauseChanged { queue, paused } => note(&match paused {
            true => format!("queue {queue} is paused: claiming nothing until it is resumed"),
            false => format!("queue {queue} is resumed"),
        }),
        QueueEvent::Lagged { missed } => note(&format!("{missed} job event(s) not shown")),
        _ => {}
    }
}

/// Checks that `program` can be run (a name is looked up in `PATH`, as the
/// OS does); the error names the problem.
fn find_program(program: &str) -> Result<()> {
    if program.is_empty() {
        return Err(Failure("no command given after --".to_owned()));
    }
    if program.contains('/') {
        return match executable(Path::new(program)) {
            Ok(()) => Ok(()),
            Err(why) => Err(Failure(format!("cannot run {program}: {why}"))),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut found_unrunnable = None;
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        match executable(&candidate) {
            Ok(()) => return Ok(()),
            Err(why) if candidate.exists() => {
                found_unrunnable.get_or_insert(format!("{}: {why}", candidate.display()));
            }
            Err(_) => {}
        }
    }
    Err(Failure(match found_unrunnable {
        Some(why) => format!("cannot run {program}: {why}"),
        None => format!("cannot run {program}: command not found in PATH"),
    }))
}

/// `Ok` when `path` is a file this process may execute.
fn executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("is a directory".to_owned());
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| "contains a NUL byte".to_owned())?;
        // SAFETY: `c_path` is a valid NUL-terminated string for the call.
        if unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } != 0 {
            return Err("not executable (permission denied)".to_owned());
        }
    }
    Ok(())
}

/// Makes the command's process die with the worker, however the worker
/// ends: a SIGKILLed worker cannot kill its children, and a command left
/// running would go on after its job was handed to another worker. Also a
/// process group of its own, so a terminal's Ctrl-C reaches the worker
/// (which lets the commands finish) and not the commands themselves.
fn die_with_worker(cmd: &mut tokio::process::Command) {
    #[cfg(unix)]
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid is async-signal-safe; read before fork.
        let worker = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe calls (prctl, getppid) and no
        // allocation.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The worker died before the line above: nobody will send it.
                if libc::getppid() != worker {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

/// Sends SIGTERM (or SIGKILL when `kill`) to the process group `pgid`: the
/// command and what it started.
fn signal_group(pgid: Option<u32>, kill: bool) {
    #[cfg(unix)]
    if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
        // SAFETY: kill has no memory effects; a group already gone is ESRCH.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
    #[cfg(not(unix))]
    let _ = (pgid, kill);
}

/// Runs the command for one job; `Err` is the job's error text. A
/// cancelled job's command gets SIGTERM, then SIGKILL after `grace`.
async fn run_command(
    command: std::sync::Arc<Vec<String>>,
    job: Job,
    grace: Duration,
) -> Result<(), String> {
    let (program, rest) = command.split_first().ok_or("no command")?;
    let mut cmd = tokio::process::Command::new(program);
    die_with_worker(&mut cmd);
    let mut child = cmd
        .args(rest)
        .env("PGPUBSUB_JOB_ID", job.id().to_string())
        .env("PGPUBSUB_ATTEMPT", job.attempt().to_string())
        .env("PGPUBSUB_QUEUE", job.queue())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        // A job given back at shutdown must not keep running.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let payload = job.payload().as_bytes().to_vec();
    // Written concurrently with reading stderr: neither pipe can fill up
    // and block the command.
    let feed = async move {
        // A command that does not read its stdin is fine.
        let _ = stdin.write_all(&payload).await;
        drop(stdin);
    };
    let drain = async move {
        let mut tail = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
            }
        }
        if tail.len() > STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        tail
    };
    let pgid = child.id();
    let finish = async {
        let ((), tail) = tokio::join!(feed, drain);
        (tail, child.wait().await)
    };
    tokio::pin!(finish);
    let (tail, status) = tokio::select! {
        done = &mut finish => done,
        () = job.cancelled() => {
            note(&format!("job {} was cancelled: sending SIGTERM to {program}", job.id()));
            signal_group(pgid, false);
            match tokio::time::timeout(grace, &mut finish).await {
                Ok(done) => done,
                Err(_) => {
                    note(&format!("job {}: {program} is still running after {}: sending SIGKILL", job.id(), human(grace)));
                    signal_group(pgid, true);
                    finish.await
                }
            }
        }
    };
    let status = status.map_err(|e| format!("waiting for {program}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&tail);
    Err(format!(
        "{program} exited with {status}: {}",
        text.trim_end()
    ))
}

/// Limits as JSON: `null` for each one that is off.
fn limits_json(l: &Limits) -> serde_json::Value {
    serde_json::json!({
        "concurrency": l.concurrency,
        "per_key": l.per_key,
        "rate": l.rate.map(|r| serde_json::json!({
            "count": r.count,
            "per_seconds": r.per.as_secs_f64(),
        })),
    })
}

async fn limit(q: &Queue, args: LimitArgs) -> Result<()> {
    let given = args.concurrency.is_some() || args.per_key.is_some() || args.rate.is_some();
    if given || args.clear {
        let mut limits = Limits::new();
        if let Some(n) = args.concurrency {
            limits = limits.concurrency(n);
        }
        if let Some(n) = args.per_key {
            limits = limits.per_key(n);
        }
        if let Some((n, per)) = args.rate {
            limits = limits.rate(n, per);
        }
        q.set_limits(&args.queue, limits).await?;
    }
    let line = serde_json::json!({
        "queue": args.queue,
        "limits": limits_json(&q.limits(&args.queue).await?),
    });
    println!("{line}");
    Ok(())
}

async fn stats(q: &Queue) -> Result<()> {
    for s in q.stats().await? {
        let line = serde_json::json!({
            "queue": s.queue,
            "ready": s.ready,
            "scheduled": s.scheduled,
            "running": s.running,
            "dead": s.dead,
            "completed": s.completed,
            "cancelled": s.cancelled,
            "paused": s.paused,
            "oldest_ready_age_seconds": s.oldest_ready_age.as_secs_f64(),
            "limits": limits_json(&s.limits),
        });
        println!("{line}");
    }
    if let Some(h) = q.horizon_holder().await? {
        if h.is_held(Duration::from_secs(60)) {
            let age = h
                .age
                .map_or(String::new(), |a| format!(" for {}", human(a)));
            note(&format!(
                "the xmin horizon is held by {:?} {} (pid {:?}, {}){age}, {} transactions \
                 ago: claims slow down until it ends",
                h.kind,
                h.name,
                h.pid,
                h.state.as_deref().unwrap_or("-"),
                h.xid_age
            ));
        }
    }
    Ok(())
}

async fn dead(q: &Queue, args: DeadArgs) -> Result<()> {
    if let Some(id) = args.retry {
        if !q.retry_dead(id).await? {
            return Err(Failure(format!("no dead job {id}")));
        }
        note(&format!("dead job {id} is queued again"));
        return Ok(());
    }
    if let Some(id) = args.delete {
        if !q.delete_dead(id).await? {
            return Err(Failure(format!("no dead job {id}")));
        }
        note(&format!("dead job {id} deleted"));
        return Ok(());
    }
    for d in q.dead_jobs(args.queue.as_deref(), args.limit).await? {
        let line = serde_json::json!({
            "id": d.id,
            "queue": d.queue,
            "attempts": d.attempts,
            "last_error": d.last_error,
            "payload": d.payload,
        });
        println!("{line}");
    }
    Ok(())
}

async fn jobs(ps: &PgPubSub, schema: &str, args: JobsArgs) -> Result<()> {
    let admin = ps.admin().with_schema(schema)?;
    let page = Page::new(args.after, args.limit.clamp(1, Page::MAX_LIMIT));
    let jobs = admin.jobs(&args.queue, args.state, page).await?;
    print_json_lines(&jobs).await?;
    if jobs.len() >= page.limit as usize {
        if let Some(last) = jobs.last() {
            note(&format!("more jobs may follow: --after {}", last.id));
        }
    }
    Ok(())
}

async fn job(ps: &PgPubSub, schema: &str, args: JobArgs) -> Result<()> {
    let admin = ps.admin().with_schema(schema)?;
    match admin.job(args.id).await? {
        Some(job) => print_json_lines(&[job]).await,
        None => Err(Failure(format!(
            "no job {} (finished jobs are deleted: see queue finished)",
            args.id
        ))),
    }
}

async fn cancel(q: &Queue, id: i64) -> Result<()> {
    match q.cancel(id).await? {
        Cancelled::Removed => note(&format!("job {id} cancelled: it will not run")),
        Cancelled::Signalled => note(&format!(
            "job {id} is running: its worker was told to stop it; it ends cancelled"
        )),
        Cancelled::AlreadyFinished => {
            note(&format!("job {id} already finished: nothing to cancel"))
        }
        _ => return Err(Failure(format!("no job {id}"))),
    }
    Ok(())
}

async fn pause(q: &Queue, queue: &str, pause: bool) -> Result<()> {
    let (changed, done, already) = match pause {
        true => (q.pause(queue).await?, "paused", "was paused already"),
        false => (q.resume(queue).await?, "resumed", "was not paused"),
    };
    note(&match changed {
        true => format!("queue {queue} {done}"),
        false => format!("queue {queue} {already}"),
    });
    Ok(())
}

async fn finished(q: &Queue, args: FinishedArgs) -> Result<()> {
    let jobs = q.finished_jobs(args.queue.as_deref(), args.limit).await?;
    print_json_lines(&jobs).await
}
