//! The parent side: scenario workers on one channel, run as child processes
//! of this very program (re-executed with `--worker`), and what they printed.
//!
//! Children never outlive the parent: each has a piped stdin and stops when
//! it closes (also when the parent is killed), and is killed when its handle
//! is dropped.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{now_us, Args, Ev, Line, Mode, Result, WORKER_FLAG};

/// What a worker is, as far as its lines tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Starting,
    /// Subscribed, no election.
    Plain,
    Leader,
    Standby,
    Gone,
}

/// One line from one worker.
#[derive(Debug, Clone)]
pub struct Event {
    pub who: usize,
    pub t_us: u64,
    pub ev: Ev,
}

pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub role: Role,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

pub struct Fleet {
    exe: PathBuf,
    url: String,
    pub mode: Mode,
    pub channel: String,
    every: Duration,
    pub procs: Vec<Proc>,
    /// Everything the workers printed, in the order it was read.
    pub log: Vec<Event>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
}

/// Longest wait for anything a worker should do promptly.
pub const WAIT: Duration = Duration::from_secs(10);

impl Fleet {
    /// Workers of `mode` on `channel` publishing every `every` once told to go.
    pub fn new(url: &str, mode: Mode, channel: &str, every: Duration) -> Result<Fleet> {
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Fleet {
            exe: std::env::current_exe()?,
            url: url.to_owned(),
            mode,
            channel: channel.to_owned(),
            every,
            procs: Vec::new(),
            log: Vec::new(),
            tx,
            rx,
        })
    }

    /// Starts a worker and waits until it is subscribed (and, for an
    /// elected channel, leads or stands by). Returns its index.
    pub async fn spawn(&mut self, name: &str) -> Result<usize> {
        let who = self.procs.len();
        let args = Args {
            name: name.to_owned(),
            channel: self.channel.clone(),
            every: self.every,
            worker: true,
        };
        let mut child = Command::new(&self.exe)
            .arg(WORKER_FLAG)
            .arg(self.mode.name())
            .args(args.to_worker_args())
            .env("DATABASE_URL", &self.url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("worker has no stdout")?;
        let stdin = child.stdin.take();
        let pid = child.id().ok_or("worker exited at once")?;
        tokio::spawn(read_lines(who, stdout, self.tx.clone()));
        self.procs.push(Proc {
            name: name.to_owned(),
            pid,
            role: Role::Starting,
            child: Some(child),
            stdin,
        });
        self.wait_for(&format!("{name} to start"), WAIT, |f, e| {
            e.who == who && f.procs[who].role != Role::Starting
        })
        .await?;
        if self.procs[who].role == Role::Gone {
            return Err(format!("worker {name} exited while starting").into());
        }
        Ok(who)
    }

    /// The next line, if one comes before `deadline`.
    pub async fn next_until(&mut self, deadline: Instant) -> Option<Event> {
        let event = tokio::time::timeout_at(deadline, self.rx.recv())
            .await
            .ok()??;
        self.record(&event);
        Some(event)
    }

    fn record(&mut self, event: &Event) {
        let single = self.mode.single_listener;
        let role = &mut self.procs[event.who].role;
        *role = match (&event.ev, *role) {
            (Ev::Ready { .. }, Role::Starting) if !single => Role::Plain,
            (Ev::Leading, _) => Role::Leader,
            (Ev::Standby | Ev::Lost { .. } | Ev::Released, _) => Role::Standby,
            (Ev::Bye | Ev::Closed, _) => Role::Gone,
            (_, role) => role,
        };
        self.log.push(event.clone());
    }

    /// Reads lines until `pred` holds for one (seeing the fleet after it).
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Fleet, &Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        while let Some(event) = self.next_until(deadline).await {
            if pred(self, &event) {
                return Ok(event);
            }
        }
        Err(format!("timed out after {timeout:?} waiting for {what}").into())
    }

    /// Reads lines until none has come for `quiet` (at most `WAIT`).
    pub async fn settle(&mut self, quiet: Duration) {
        let end = Instant::now() + WAIT;
        while self
            .next_until((Instant::now() + quiet).min(end))
            .await
            .is_some()
        {}
    }

    /// Reads lines for `period`.
    pub async fn read_for(&mut self, period: Duration) {
        let end = Instant::now() + period;
        while self.next_until(end).await.is_some() {}
    }

    /// The one worker that leads, if exactly one does.
    pub fn leader(&self) -> Option<usize> {
        let mut leaders = (0..self.procs.len()).filter(|&i| self.procs[i].role == Role::Leader);
        match (leaders.next(), leaders.next()) {
            (Some(i), None) => Some(i),
            _ => None,
        }
    }

    /// Tells every running worker to publish (`go`) or to stop publishing (`hold`).
    pub async fn order_all(&mut self, order: &str) -> Result<()> {
        for proc in &mut self.procs {
            if let Some(stdin) = &mut proc.stdin {
                stdin.write_all(format!("{order}\n").as_bytes()).await?;
                stdin.flush().await?;
            }
        }
        Ok(())
    }

    /// Sends SIGTERM: the worker shuts down cleanly.
    pub fn terminate(&mut self, who: usize) -> Result<()> {
        let pid = libc::pid_t::try_from(self.procs[who].pid)?;
        // SAFETY: kill(2) has no memory effects; the pid is our unreaped
        // child, so it cannot have been reused by another process.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Sends SIGKILL: the worker dies on the spot.
    pub fn kill(&mut self, who: usize) -> Result<()> {
        let child = self.procs[who].child.as_mut().ok_or("already reaped")?;
        child.start_kill()?;
        Ok(())
    }

    /// Waits for a worker to exit and reaps it.
    pub async fn wait_exit(&mut self, who: usize, timeout: Duration) -> Result<ExitStatus> {
        let proc = &mut self.procs[who];
        let mut child = proc.child.take().ok_or("already reaped")?;
        proc.stdin = None;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let name = proc.name.clone();
                proc.child = Some(child);
                Err(format!("{name} did not exit within {timeout:?}").into())
            }
        }
    }

    /// Stops every worker cleanly (closes its stdin), reads their last
    /// lines, and kills any that does not exit in time. Returns the names
    /// of workers that failed (non-zero exit or killed).
    pub async fn close(&mut self) -> Vec<String> {
        for proc in &mut self.procs {
            proc.stdin = None;
        }
        let mut failed = Vec::new();
        for who in 0..self.procs.len() {
            if self.procs[who].child.is_none() {
                continue;
            }
            match self.wait_exit(who, WAIT).await {
                Ok(status) if status.success() => {}
                _ => failed.push(self.procs[who].name.clone()),
            }
        }
        self.kill_all();
        self.settle(Duration::from_millis(50)).await;
        failed
    }

    /// Kills whatever still runs; used on every way out.
    pub fn kill_all(&mut self) {
        for proc in &mut self.procs {
            proc.stdin = None;
            if let Some(child) = &mut proc.child {
                let _ = child.start_kill();
            }
        }
    }

    /// `(who, from, seq, t_us)` of every message a worker handled.
    pub fn handled(&self) -> impl Iterator<Item = (usize, &str, u64, u64)> {
        self.log.iter().filter_map(|e| match &e.ev {
            Ev::Got { from, seq } => Some((e.who, from.as_str(), *seq, e.t_us)),
            _ => None,
        })
    }

    /// Sequence numbers a worker published.
    pub fn sent_by(&self, who: usize) -> Vec<u64> {
        self.log
            .iter()
            .filter(|e| e.who == who)
            .filter_map(|e| match e.ev {
                Ev::Sent { seq } => Some(seq),
                _ => None,
            })
            .collect()
    }

    /// Notes (errors, gaps, ...) a worker printed, for diagnosing.
    pub fn notes(&self, who: usize) -> Vec<String> {
        self.log
            .iter()
            .filter(|e| e.who == who)
            .filter_map(|e| match &e.ev {
                Ev::Note { text } => Some(text.clone()),
                Ev::Gap { reason, .. } => Some(format!("gap: {reason}")),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Forwards a worker's stdout lines, then `Closed`.
async fn read_lines(who: usize, stdout: ChildStdout, tx: mpsc::UnboundedSender<Event>) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(text)) = lines.next_line().await {
        let line = serde_json::from_str::<Line>(&text).unwrap_or_else(|_| Line {
            t_us: now_us(),
            ev: Ev::Note { text },
        });
        let _ = tx.send(Event {
            who,
            t_us: line.t_us,
            ev: line.ev,
        });
    }
    let _ = tx.send(Event {
        who,
        t_us: now_us(),
        ev: Ev::Closed,
    });
}
