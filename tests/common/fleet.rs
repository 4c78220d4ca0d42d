//! Several processes (`pg-pubsub listen --single-listener`, `pg-pubsub
//! queue work`, or the test binary itself as a queue worker): a fleet, for
//! tests with real processes and real faults.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{server, WAIT};

/// One line a process printed.
#[derive(Debug)]
pub enum Line {
    Out(usize, String),
    Err(usize, String),
}

pub struct Fleet {
    pub procs: Vec<Option<Child>>,
    lines: mpsc::UnboundedReceiver<Line>,
    tx: mpsc::UnboundedSender<Line>,
    /// Payloads received so far, by process.
    pub received: Vec<Vec<String>>,
    /// Who announced leadership, in order.
    pub leaders: Vec<usize>,
    /// Who announced losing it, in order.
    pub lost: Vec<usize>,
    /// Who reported a gap (`gap on <channel>`), in order.
    pub gaps: Vec<usize>,
    /// Every stderr line read so far, with its process, in order (lines
    /// read while waiting for another process to start are kept here).
    pub stderr: Vec<(usize, String)>,
    /// The server processes connect to (`DATABASE_URL`); `None`: the
    /// shared test server.
    pub database_url: Option<String>,
}

impl Fleet {
    pub fn new() -> Self {
        let (tx, lines) = mpsc::unbounded_channel();
        Fleet {
            procs: Vec::new(),
            lines,
            tx,
            received: Vec::new(),
            leaders: Vec::new(),
            lost: Vec::new(),
            gaps: Vec::new(),
            stderr: Vec::new(),
            database_url: None,
        }
    }

    /// Starts one more listener on `channel` and waits until it leads or stands by.
    pub async fn spawn(&mut self, channel: &str, extra: &[&str]) -> usize {
        let mut args = vec![channel, "--single-listener"];
        args.extend_from_slice(extra);
        self.spawn_with(&args).await
    }

    /// Starts `pg-pubsub listen ARGS...` and waits until it leads or stands by.
    pub async fn spawn_with(&mut self, args: &[&str]) -> usize {
        let mut all = vec!["listen"];
        all.extend_from_slice(args);
        self.spawn_cmd(&all, |l| l.contains("leading") || l.contains("standing by"))
            .await
    }

    /// Starts `pg-pubsub queue work ARGS...` and waits until it works.
    pub async fn spawn_worker(&mut self, args: &[&str]) -> usize {
        let mut all = vec!["queue", "work"];
        all.extend_from_slice(args);
        self.spawn_cmd(&all, |l| l.contains("working on queue"))
            .await
    }

    /// Starts `pg-pubsub ARGS...` and waits for a stderr line matching `ready`.
    pub async fn spawn_cmd(&mut self, args: &[&str], ready: fn(&str) -> bool) -> usize {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pg-pubsub"));
        cmd.args(args).stdout(Stdio::piped());
        self.spawn_command(cmd, ready).await
    }

    /// Starts this test binary again running only the test `entry`, with
    /// `envs` (the entry does nothing unless they are set), and waits for
    /// a stderr line matching `ready`. Its stdout (libtest's) is dropped:
    /// the child talks on stderr.
    pub async fn spawn_self(
        &mut self,
        entry: &str,
        envs: &[(&str, &str)],
        ready: fn(&str) -> bool,
    ) -> usize {
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.args([entry, "--exact", "--test-threads=1", "--nocapture"])
            .envs(envs.iter().copied())
            .stdout(Stdio::null());
        self.spawn_command(cmd, ready).await
    }

    /// Starts `cmd` against the test server (stdout as the caller set it:
    /// piped lines are JSON payloads) and waits for a stderr line matching `ready`.
    async fn spawn_command(&mut self, mut cmd: Command, ready: fn(&str) -> bool) -> usize {
        let i = self.procs.len();
        let mut child = cmd
            .env(
                "DATABASE_URL",
                self.database_url.as_deref().unwrap_or(server().url()),
            )
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn a fleet process");
        let err = child.stderr.take().expect("stderr");
        if let Some(out) = child.stdout.take() {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let mut out = BufReader::new(out).lines();
                while let Ok(Some(l)) = out.next_line().await {
                    let _ = tx.send(Line::Out(i, l));
                }
            });
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut err = BufReader::new(err).lines();
            while let Ok(Some(l)) = err.next_line().await {
                let _ = tx.send(Line::Err(i, l));
            }
        });
        self.procs.push(Some(child));
        self.received.push(Vec::new());
        self.wait_err(|p, l| p == i && ready(l)).await;
        i
    }

    fn record(&mut self, line: &Line) {
        if let Line::Err(i, l) = line {
            self.stderr.push((*i, l.clone()));
        }
        match line {
            Line::Out(i, l) => {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
                // `listen`/`durable tail` lines carry a payload; other
                // commands' lines (e.g. `changes tail`) are kept whole.
                let payload = match v["payload"].as_str() {
                    Some(p) => p.to_owned(),
                    None => l.clone(),
                };
                self.received[*i].push(payload);
            }
            Line::Err(i, l) if l.contains("leading") => self.leaders.push(*i),
            Line::Err(i, l) if l.contains("lost the lead") => self.lost.push(*i),
            Line::Err(i, l) if l.contains("gap on ") => self.gaps.push(*i),
            Line::Err(..) => {}
        }
    }

    /// Reads lines until `pred` matches a stderr line; returns its process.
    pub async fn wait_err(&mut self, mut pred: impl FnMut(usize, &str) -> bool) -> usize {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let line = self.lines.recv().await.expect("line");
                self.record(&line);
                if let Line::Err(i, l) = &line {
                    if pred(*i, l) {
                        return *i;
                    }
                }
            }
        })
        .await;
        match found {
            Ok(i) => i,
            Err(_) => {
                let last = &self.stderr[self.stderr.len().saturating_sub(20)..];
                panic!("timed out waiting for a process line; the last ones: {last:#?}")
            }
        }
    }

    /// Reads lines until `cond` holds for the fleet.
    pub async fn wait_for(&mut self, cond: impl Fn(&Fleet) -> bool) {
        tokio::time::timeout(WAIT, async {
            while !cond(self) {
                let line = self.lines.recv().await.expect("line");
                self.record(&line);
            }
        })
        .await
        .expect("timed out waiting for the fleet")
    }

    /// Reads lines until `total` payloads arrived in all, then for `quiet` more.
    pub async fn collect(&mut self, total: usize, quiet: Duration) {
        tokio::time::timeout(WAIT, async {
            while self.received.iter().map(Vec::len).sum::<usize>() < total {
                let line = self.lines.recv().await.expect("line");
                self.record(&line);
            }
        })
        .await
        .expect("timed out waiting for messages");
        while let Ok(Some(line)) = tokio::time::timeout(quiet, self.lines.recv()).await {
            self.record(&line);
        }
    }

    /// The process that currently leads, per the last announcement.
    pub fn leader(&self) -> usize {
        *self.leaders.last().expect("nobody leads")
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.procs[i].as_ref().and_then(Child::id).expect("running")
    }

    /// Sends `sig` (e.g. "-KILL", "-TERM") to process `i` and reaps it.
    pub async fn signal(&mut self, i: usize, sig: &str) -> std::process::ExitStatus {
        super::send_signal(self.pid(i), sig);
        let mut child = self.procs[i].take().expect("running");
        tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("process did not exit")
            .expect("wait")
    }

    /// Payloads received by everyone, each with who got it.
    pub fn all_received(&self) -> Vec<(usize, &str)> {
        self.received
            .iter()
            .enumerate()
            .flat_map(|(i, v)| v.iter().map(move |p| (i, p.as_str())))
            .collect()
    }
}
