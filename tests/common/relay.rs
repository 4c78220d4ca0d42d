//! The relay fault scenario every broker's test runs: publishers
//! committing concurrently, `pg-pubsub relay durable` processes SIGKILLed
//! and replaced, the broker restarted once, PostgreSQL restarted once;
//! then every committed message must be in the broker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_pubsub::testing::TestOptions;

use super::fleet::Fleet;
use super::{own_cluster, WAIT};

/// The durable channel the scenario publishes on.
pub const CHANNEL: &str = "orders";
/// The `{key}` values (payload field `k`): four subjects.
pub const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

/// The table a WAL scenario writes (and its relay streams).
pub const TABLE: &str = "relay_orders";

/// Where the scenario's messages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// `pgpubsub.publish` on [`CHANNEL`], relayed by `relay durable`.
    Durable,
    /// Rows inserted into [`TABLE`] and logical messages under `outbox.`,
    /// taking turns, relayed by `relay wal`.
    Wal,
}

/// The scenario's id of a relayed payload: a durable message's or
/// outbox message's `id`, a change's `new.id`.
pub fn payload_id(payload: &serde_json::Value) -> Option<&str> {
    payload["id"].as_str().or(payload["new"]["id"].as_str())
}

/// The scenario's `{key}` of a relayed payload.
pub fn payload_key(payload: &serde_json::Value) -> Option<&str> {
    payload["k"].as_str().or(payload["new"]["k"].as_str())
}

/// What a broker test gives the scenario.
#[allow(async_fn_in_trait)]
pub trait Broker {
    fn url(&self) -> String;
    /// Stops the server (cleanly); blocking.
    fn stop(&mut self);
    /// Starts it again on the same port and data; blocking.
    fn start_again(&mut self);
    /// How many messages the broker holds (duplicates included).
    async fn count(&mut self) -> usize;
    /// The `id` of every message the broker received so far, duplicates
    /// included (a destructive read keeps what it read).
    async fn ids(&mut self) -> Vec<String>;
}

/// What the scenario saw.
#[derive(Debug)]
pub struct Report {
    /// Messages whose transaction surely committed.
    pub committed: usize,
    /// Messages whose commit was cut short (they may or may not exist).
    pub uncertain: usize,
    /// Messages in the broker, duplicates included.
    pub stored: usize,
    /// Messages stored more than once, and how many copies too many.
    pub duplicates: usize,
    /// Relays SIGKILLed.
    pub kills: usize,
    pub elapsed: Duration,
}

/// Publishers: `n` tasks, each on its own connection, committing one to
/// three messages per transaction until stopped; they reconnect after a
/// lost connection (a PostgreSQL restart).
struct Publishers {
    stop: Arc<AtomicBool>,
    committed: Arc<Mutex<Vec<String>>>,
    uncertain: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publishers {
    fn start(url: &str, n: usize, feed: Feed) -> Publishers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(Mutex::new(Vec::new()));
        let uncertain = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..n)
            .map(|p| {
                let (stop, committed, uncertain) =
                    (stop.clone(), committed.clone(), uncertain.clone());
                let url = url.to_owned();
                tokio::spawn(async move {
                    let mut seq = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((mut client, conn)) =
                            tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                        else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        tokio::spawn(conn);
                        while !stop.load(Ordering::Relaxed) {
                            let n = 1 + seq % 3;
                            let ids: Vec<String> =
                                (0..n).map(|i| format!("p{p}-{}", seq + i)).collect();
                            seq += n;
                            match publish(&mut client, &ids, feed).await {
                                Ok(()) => committed.lock().unwrap().extend(ids),
                                Err(at_commit) => {
                                    if at_commit {
                                        uncertain.lock().unwrap().extend(ids);
                                    }
                                    break;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        Publishers {
            stop,
            committed,
            uncertain,
            tasks,
        }
    }

    async fn stop(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("publisher");
        }
        let committed = self.committed.lock().unwrap().clone();
        let uncertain = self.uncertain.lock().unwrap().clone();
        (committed, uncertain)
    }
}

/// One transaction publishing `ids`; `Err(true)` when the commit itself
/// failed (its outcome unknown), `Err(false)` before it.
async fn publish(
    client: &mut tokio_postgres::Client,
    ids: &[String],
    feed: Feed,
) -> Result<(), bool> {
    let tx = client.transaction().await.map_err(|_| false)?;
    for id in ids {
        let n: usize = id
            .rsplit('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let k = KEYS[n % KEYS.len()];
        let payload = serde_json::json!({"id": id, "k": k}).to_string();
        let done = match (feed, n % 2) {
            (Feed::Durable, _) => {
                tx.execute("SELECT pgpubsub.publish($1, $2)", &[&CHANNEL, &payload])
                    .await
            }
            (Feed::Wal, 0) => {
                let sql = format!("INSERT INTO {TABLE} (id, k) VALUES ($1, $2)");
                tx.execute(&sql, &[id, &k]).await
            }
            (Feed::Wal, _) => {
                tx.execute(
                    "SELECT pg_logical_emit_message(true, 'outbox.orders', $1::text)",
                    &[&payload],
                )
                .await
            }
        };
        done.map_err(|_| false)?;
    }
    tx.commit().await.map_err(|_| true)
}

/// The relay processes and which one is active.
struct Relays {
    fleet: Fleet,
    args: Vec<String>,
    alive: HashSet<usize>,
    kills: usize,
}

impl Relays {
    /// Starts one more `pg-pubsub relay durable` and waits until it runs.
    async fn spawn(&mut self) -> usize {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let i = self
            .fleet
            .spawn_cmd(&args, |l| {
                l.contains("relaying") || l.contains("waiting for slot")
            })
            .await;
        self.alive.insert(i);
        i
    }

    /// The process that said last it is active (among the living ones).
    fn active(&self) -> Option<usize> {
        let mut active = None;
        for (i, line) in &self.fleet.stderr {
            if !self.alive.contains(i) {
                continue;
            }
            if is_active_line(line) {
                active = Some(*i);
            } else if line.contains("standing by") && active == Some(*i) {
                active = None;
            }
        }
        active
    }

    async fn wait_active(&mut self) -> usize {
        if let Some(i) = self.active() {
            return i;
        }
        let alive = self.alive.clone();
        self.fleet
            .wait_err(|i, l| alive.contains(&i) && is_active_line(l))
            .await
    }

    /// SIGKILLs the active relay and waits until another one took over.
    async fn kill_active(&mut self) {
        let victim = self.wait_active().await;
        self.fleet.signal(victim, "-KILL").await;
        self.alive.remove(&victim);
        self.kills += 1;
        let alive = self.alive.clone();
        self.fleet
            .wait_err(|i, l| alive.contains(&i) && is_active_line(l))
            .await;
    }
}

/// A relay saying it is (now) the active one: a durable group's new
/// leader, or a WAL relay that got the slot.
fn is_active_line(l: &str) -> bool {
    l.contains("now active") || l.contains("(active)")
}

/// Waits until the broker holds `n` messages more than `from`.
async fn grows<B: Broker>(broker: &mut B, from: usize, n: usize) -> usize {
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        let count = broker.count().await;
        if count >= from + n {
            return count;
        }
        assert!(
            Instant::now() < deadline,
            "the broker holds {count} messages, not {} after {:?}",
            from + n,
            3 * WAIT
        );
        // The broker has no event to wait on: poll.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the scenario against `broker`; `extra` are the relay's options
/// after `--to URL` (subject, exchange, ...).
pub async fn faults<B: Broker>(broker: &mut B, feed: Feed, extra: &[&str]) -> Report {
    let started = Instant::now();
    let server = own_cluster(TestOptions::default()).await;
    let ps = pg_pubsub::PgPubSub::connect(server.url())
        .await
        .expect("connect");
    // The dead-letter channel is a durable one, whatever the source.
    ps.durable().install().await.expect("install");
    if feed == Feed::Wal {
        let sql = format!("CREATE TABLE {TABLE} (id text PRIMARY KEY, k text NOT NULL)");
        ps.pool()
            .get()
            .await
            .expect("client")
            .batch_execute(&sql)
            .await
            .expect("table");
    }
    ps.shutdown().await;

    let mut fleet = Fleet::new();
    fleet.database_url = Some(server.url().to_owned());
    let url = broker.url();
    let source: &[&str] = match feed {
        Feed::Durable => &["relay", "durable", CHANNEL, "--group", "relay"],
        Feed::Wal => &[
            "relay",
            "wal",
            "--slot",
            "relay",
            "--table",
            TABLE,
            "--messages",
            "outbox.",
        ],
    };
    let mut args: Vec<String> = source
        .iter()
        .chain(&["--to", url.as_str()])
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut relays = Relays {
        fleet,
        args,
        alive: HashSet::new(),
        kills: 0,
    };
    relays.spawn().await;
    relays.wait_active().await;
    relays.spawn().await;

    let publishers = Publishers::start(server.url(), 4, feed);
    let mut seen = grows(broker, 0, 100).await;

    // 1. The active relay dies; the standby takes over.
    relays.kill_active().await;
    relays.spawn().await;
    seen = grows(broker, seen, 100).await;

    // 2. The broker goes away: the relay retries until it is back.
    tokio::task::block_in_place(|| broker.stop());
    let active = relays.wait_active().await;
    relays
        .fleet
        .wait_err(|i, l| i == active && l.contains("did not confirm"))
        .await;
    tokio::task::block_in_place(|| broker.start_again());
    seen = grows(broker, seen, 100).await;

    // 3. Another kill.
    relays.kill_active().await;
    relays.spawn().await;
    seen = grows(broker, seen, 100).await;

    // 4. PostgreSQL restarts under everyone.
    tokio::task::block_in_place(|| server.restart().expect("restart PostgreSQL"));
    seen = grows(broker, seen, 100).await;

    // 5. A last kill, then the publishers stop.
    relays.kill_active().await;
    relays.spawn().await;
    grows(broker, seen, 100).await;
    let (committed, uncertain) = publishers.stop().await;

    // Everything committed arrives.
    let deadline = Instant::now() + 3 * WAIT;
    let ids = loop {
        let ids = broker.ids().await;
        let have: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let missing: Vec<&String> = committed
            .iter()
            .filter(|c| !have.contains(c.as_str()))
            .collect();
        if missing.is_empty() {
            break ids;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} committed messages never arrived, e.g. {:?}",
            missing.len(),
            committed.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Nothing that was not published.
    let known: HashSet<&str> = committed
        .iter()
        .chain(uncertain.iter())
        .map(String::as_str)
        .collect();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        assert!(
            known.contains(id.as_str()),
            "{id} arrived but was never published"
        );
        *copies.entry(id).or_default() += 1;
    }
    let duplicates = copies.values().map(|n| n - 1).sum();
    let kills = relays.kills;
    drop(relays);
    tokio::task::block_in_place(|| drop(server));
    Report {
        committed: committed.len(),
        uncertain: uncertain.len(),
        stored: ids.len(),
        duplicates,
        kills,
        elapsed: started.elapsed(),
    }
}
