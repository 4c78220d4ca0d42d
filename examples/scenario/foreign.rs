//! A plain SQL client, as psql or a trigger would be: publishes with
//! `pg_notify`, finds the election lock holder, terminates backends.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_postgres::{Client, NoTls};

use super::{now_us, Ping, Result};

/// Name the foreign publisher's messages carry in `from`.
pub const SQL: &str = "sql";

pub async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("sql client connection ended: {e}");
        }
    });
    Ok(client)
}

/// One message the foreign publisher sent, and when (µs since the epoch).
#[derive(Debug, Clone, Copy)]
pub struct SentAt {
    pub seq: u64,
    pub t_us: u64,
}

/// Publishes `{"from": "sql", "seq": n}` every `every` until stopped.
pub struct Publisher {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Vec<SentAt>>>,
}

impl Publisher {
    pub async fn start(url: &str, channel: &str, every: Duration) -> Result<Publisher> {
        let client = connect(url).await?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(publish_until(client, channel.to_owned(), every, stopped));
        Ok(Publisher { stop, task })
    }

    /// Stops and returns what was sent.
    pub async fn finish(self) -> Result<Vec<SentAt>> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

async fn publish_until(
    client: Client,
    channel: String,
    every: Duration,
    mut stopped: oneshot::Receiver<()>,
) -> Result<Vec<SentAt>> {
    let stmt = client.prepare("SELECT pg_notify($1, $2)").await?;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => return Ok(sent),
            _ = ticker.tick() => {}
        }
        let seq = sent.len() as u64 + 1;
        let payload = serde_json::to_string(&Ping {
            from: SQL.to_owned(),
            seq,
        })?;
        let t_us = now_us();
        client.execute(&stmt, &[&channel, &payload]).await?;
        sent.push(SentAt { seq, t_us });
    }
}

/// Backend PID holding the election lock of `channel` (see `pg_pubsub::election`).
pub async fn lock_holder(client: &Client, channel: &str) -> Result<Option<i32>> {
    let row = client
        .query_opt(pg_pubsub::election::LEADER_PID_SQL, &[&channel])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// `pg_terminate_backend(pid)`: the server ends that session, as a failover
/// or an administrator would.
pub async fn terminate_backend(client: &Client, pid: i32) -> Result<bool> {
    let row = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await?;
    Ok(row.get(0))
}

/// `PostgreSQL 16.2` from `version()`.
pub async fn server_version(client: &Client) -> Result<String> {
    let row = client.query_one("SHOW server_version", &[]).await?;
    let version: String = row.get(0);
    Ok(format!(
        "PostgreSQL {}",
        version.split_whitespace().next().unwrap_or("?")
    ))
}
