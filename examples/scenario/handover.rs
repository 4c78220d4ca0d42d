//! Faults on the leader of a single-listener fleet, and how long the
//! hand-over took: from the fault to the first message the new leader handled.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use super::fleet::{Fleet, WAIT};
use super::foreign::{self, SentAt, SQL};
use super::{now_us, Ev, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGTERM: the worker calls `shutdown()`, which hands over.
    Graceful,
    /// SIGKILL: the process vanishes; its backend ends and the lock with it.
    Kill,
    /// `pg_terminate_backend` of the leader's listener session.
    TerminateBackend,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::Graceful, Fault::Kill, Fault::TerminateBackend];

    pub fn label(self) -> &'static str {
        match self {
            Fault::Graceful => "graceful (SIGTERM -> shutdown)",
            Fault::Kill => "SIGKILL",
            Fault::TerminateBackend => "pg_terminate_backend",
        }
    }
}

/// One measured hand-over.
#[derive(Debug, Clone)]
pub struct Takeover {
    pub old: usize,
    pub new: usize,
    /// When the fault was dealt (µs since the epoch).
    pub fault_us: u64,
    /// Fault to the new leader's `LockAcquired`.
    pub to_lead: Duration,
    /// Fault to the first message the new leader handled.
    pub to_first: Duration,
}

fn since(from_us: u64, to_us: u64) -> Duration {
    Duration::from_micros(to_us.saturating_sub(from_us))
}

/// Deals `fault` to the current leader, waits for a leader to take over and
/// handle a message (someone must be publishing), and reaps a dead leader.
pub async fn fault_and_measure(
    fleet: &mut Fleet,
    admin: &Client,
    fault: Fault,
) -> Result<Takeover> {
    let old = fleet.leader().ok_or("no single leader before the fault")?;
    let backend = match fault {
        Fault::TerminateBackend => Some(
            foreign::lock_holder(admin, &fleet.channel)
                .await?
                .ok_or("nobody holds the election lock")?,
        ),
        _ => None,
    };
    let fault_us = now_us();
    match (fault, backend) {
        (Fault::Graceful, _) => fleet.terminate(old)?,
        (Fault::Kill, _) => fleet.kill(old)?,
        (Fault::TerminateBackend, Some(pid)) => {
            if !foreign::terminate_backend(admin, pid).await? {
                return Err(format!("backend {pid} was not terminated").into());
            }
        }
        (Fault::TerminateBackend, None) => unreachable!("looked up above"),
    }
    // After a terminated backend the old leader may win the lock again.
    let lead = fleet
        .wait_for("a new leader", WAIT, |_, e| {
            e.ev == Ev::Leading && e.t_us >= fault_us && (e.who != old || backend.is_some())
        })
        .await?;
    let new = lead.who;
    let first = fleet
        .wait_for("the new leader's first message", WAIT, |_, e| {
            e.who == new && e.t_us >= lead.t_us && matches!(e.ev, Ev::Got { .. })
        })
        .await?;
    if fault != Fault::TerminateBackend {
        let status = fleet.wait_exit(old, WAIT).await?;
        if fault == Fault::Graceful && !status.success() {
            return Err(format!("the leader exited with {status} after SIGTERM").into());
        }
    }
    Ok(Takeover {
        old,
        new,
        fault_us,
        to_lead: since(fault_us, lead.t_us),
        to_first: since(fault_us, first.t_us),
    })
}

/// Fate of the foreign publisher's messages sent within `from_us..to_us`.
#[derive(Debug, Clone, Default)]
pub struct Fate {
    pub sent: usize,
    /// Handled by nobody.
    pub lost: Vec<u64>,
    /// Handled more than once.
    pub doubled: Vec<u64>,
}

pub fn fate(fleet: &Fleet, sent: &[SentAt], from_us: u64, to_us: u64) -> Fate {
    let mut handled: HashMap<u64, usize> = HashMap::new();
    for (_, from, seq, _) in fleet.handled() {
        if from == SQL {
            *handled.entry(seq).or_default() += 1;
        }
    }
    let mut fate = Fate::default();
    for s in sent.iter().filter(|s| (from_us..to_us).contains(&s.t_us)) {
        fate.sent += 1;
        match handled.get(&s.seq).copied().unwrap_or(0) {
            0 => fate.lost.push(s.seq),
            1 => {}
            _ => fate.doubled.push(s.seq),
        }
    }
    fate
}

/// Where a message handled twice came from and went, relative to `origin_us`
/// (e.g. the fault), for the report.
pub fn explain(fleet: &Fleet, sent: &[SentAt], seq: u64, origin_us: u64) -> String {
    let rel = |t: u64| (t as f64 - origin_us as f64) / 1e3;
    let mut text = match sent.iter().find(|s| s.seq == seq) {
        Some(s) => format!("sql #{seq} sent at {:+.1} ms", rel(s.t_us)),
        None => format!("sql #{seq}"),
    };
    for (who, from, s, t) in fleet.handled() {
        if from == SQL && s == seq {
            text += &format!(
                ", handled by {} at {:+.1} ms",
                fleet.procs[who].name,
                rel(t)
            );
        }
    }
    for e in &fleet.log {
        if e.ev == Ev::Leading && e.t_us + 1_000_000 > origin_us {
            text += &format!(
                ", {} led at {:+.1} ms",
                fleet.procs[e.who].name,
                rel(e.t_us)
            );
        }
    }
    text
}
