//! Change feeds, same run, ratios.
//!
//! Trigger feed phase `trigger`: what a feed costs the writer (see
//! `changes/trigger.rs` for its cases and sizes).
//!
//! WAL feed phases:
//! * `wal_throughput`: `BENCH_WAL_ROWS` inserts (default 200 000, a
//!   thousand per transaction) already in the WAL, streamed by the WAL feed
//!   (decoded into JSON rows) against `pg_recvlogical` with `test_decoding`
//!   (`BENCH_RECVLOGICAL`, default the PostgreSQL 15 binary) writing to a
//!   pipe this bench counts lines from, each from its own slot: changes/s, ratio ours/`pg_recvlogical`.
//! * `wal_small`: `BENCH_WAL_TXS` (default 40 000) of pgbench's TPC-B-like
//!   transactions (`BENCH_PGBENCH`, default the PostgreSQL 15 binary; scale
//!   1, 4 clients), three updates and an insert each, already in the WAL,
//!   streamed by both as above: the per-transaction cost, in
//!   `BENCH_WAL_ROUNDS` rounds (default 3; fresh slots each, the order
//!   alternating) and their median ratio. Then **live**: the same number
//!   of transactions written (with `synchronous_commit = on`) while both
//!   read, each its own slot: changes/s from the writer's start to each
//!   reader's last change, commit → received per transaction (p50/p99;
//!   `pg_recvlogical` with `include-timestamp`), client CPU per change
//!   (`pg_recvlogical`'s pipe is read on a thread whose CPU is counted as
//!   its).
//! * `wal_lag`: one-row transactions at `BENCH_WAL_RATE` per second
//!   (default 1000) for `BENCH_LAG_SECS` (default 5): commit (server
//!   clock) → Commit item received, p50/p99 (the writer with
//!   `synchronous_commit = on`).
//! * `wal_snapshot`: the initial snapshot of a table of
//!   `BENCH_SNAPSHOT_ROWS` rows (default 200 000; id, text, int), chunks
//!   of `BENCH_SNAPSHOT_CHUNK` (default 4096), until every read arrived,
//!   against a bare `COPY (SELECT ...) TO STDOUT` and a bare keyset
//!   `SELECT` of the columns as text in chunks of the same size, rotated
//!   over `BENCH_ROUNDS` rounds (default 3), medians: rows/s.
//!
//! `BENCH_PHASES`: comma-separated subset of the phases (default all).
//! `DATABASE_URL`, else a throwaway cluster.

#[path = "common/mod.rs"]
mod common;
#[path = "changes/trigger.rs"]
mod trigger;

use std::time::{Duration, Instant, SystemTime};

use common::{children_cpu_time, cpu_time, env_u64, line, median, rate, run_main, Res};
use futures::StreamExt;
use pg_pubsub::changes::wal::{WalFeed, WalItem};
use pg_pubsub::PgPubSub;

fn main() -> Res<()> {
    run_main(|url| async move {
        let phases = std::env::var("BENCH_PHASES")
            .unwrap_or_else(|_| "trigger,wal_throughput,wal_small,wal_lag,wal_snapshot".to_owned());
        let phase = |name: &str| phases.split(',').any(|p| p.trim() == name);
        let ps = PgPubSub::builder(url.as_str())?
            .pool_size(trigger::TASKS + 2)
            .connect()
            .await?;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        println!(
            "PostgreSQL {version}, {} CPUs",
            std::thread::available_parallelism()?.get()
        );
        if phase("trigger") {
            trigger::run(&ps).await?;
        }
        if phase("wal_throughput") {
            let rows = env_u64("BENCH_WAL_ROWS", 200_000)?;
            wal_throughput(&ps, &client, &url, rows).await?;
        }
        if phase("wal_small") {
            let txs = env_u64("BENCH_WAL_TXS", 40_000)?;
            wal_small(&client, &ps, &url, txs).await?;
        }
        if phase("wal_lag") {
            let per_sec = env_u64("BENCH_WAL_RATE", 1000)?;
            let secs = env_u64("BENCH_LAG_SECS", 5)?;
            wal_lag(&ps, &client, &url, per_sec, secs).await?;
        }
        if phase("wal_snapshot") {
            let rows = env_u64("BENCH_SNAPSHOT_ROWS", 200_000)?;
            let chunk = env_u64("BENCH_SNAPSHOT_CHUNK", 4096)?;
            let rounds = env_u64("BENCH_ROUNDS", 3)?;
            wal_snapshot(&ps, &client, rows, chunk, rounds).await?;
        }
        ps.shutdown().await;
        Ok(())
    })
}

/// The initial snapshot of `rows` rows against bare `COPY` and a bare
/// keyset read, rotated, medians.
async fn wal_snapshot(
    ps: &PgPubSub,
    client: &tokio_postgres::Client,
    rows: u64,
    chunk: u64,
    rounds: u64,
) -> Res<()> {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_snap;
             CREATE TABLE bench_snap (id bigint PRIMARY KEY, v text, n int);
             INSERT INTO bench_snap SELECT g, 'payload ' || g, g % 100
               FROM generate_series(1, {rows}) g;
             DROP PUBLICATION IF EXISTS bench_snap;
             CREATE PUBLICATION bench_snap FOR TABLE bench_snap;"
        ))
        .await?;
    // Alone: VACUUM cannot run in the implicit transaction of a batch.
    client.batch_execute("VACUUM ANALYZE bench_snap").await?;
    let (mut ours, mut copy, mut keyset) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Rotate the order: a busy machine slows whoever runs when it is busy.
        for i in 0..3 {
            match (round + i) % 3 {
                0 => ours.push(snapshot_ours(ps, client, rows, chunk).await?),
                1 => copy.push(snapshot_copy(client, rows).await?),
                _ => keyset.push(snapshot_keyset(client, rows, chunk).await?),
            }
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (ours, copy, keyset) = (median(&mut ours), median(&mut copy), median(&mut keyset));
    let what = format!("WAL snapshot rows/s ({rows} rows, chunks of {chunk})");
    line(&what, "ours", rate(rows, ours), rate(rows, copy), "rows/s");
    println!("  (bare = COPY (SELECT * FROM t) TO STDOUT, one statement)");
    line(
        &what,
        "ours",
        rate(rows, ours),
        rate(rows, keyset),
        "rows/s",
    );
    println!("  (bare = keyset SELECT of the columns as text, same chunks)");
    client.batch_execute("DROP PUBLICATION bench_snap").await?;
    Ok(())
}

/// A new feed with `snapshot(true)` until `rows` reads arrived.
async fn snapshot_ours(
    ps: &PgPubSub,
    client: &tokio_postgres::Client,
    rows: u64,
    chunk: u64,
) -> Res<Duration> {
    let slot = "bench_snap_ours";
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    ps.drop_slot(slot).await?;
    let began = Instant::now();
    let mut feed: WalFeed = ps
        .wal_feed(slot)
        .publication("bench_snap")
        .heartbeat(None)
        .snapshot(true)
        .snapshot_chunk_rows(chunk as usize)
        .start()
        .await?;
    let mut got = 0u64;
    while got < rows {
        match feed.next().await {
            Some(WalItem::Change { .. }) => got += 1,
            Some(WalItem::Commit { end_lsn, .. }) => feed.ack(end_lsn),
            Some(_) => {}
            None => return Err("feed ended".into()),
        }
    }
    let took = began.elapsed();
    feed.close().await?;
    ps.drop_slot(slot).await?;
    Ok(took)
}

/// `COPY (SELECT * FROM bench_snap) TO STDOUT`, counting its lines.
async fn snapshot_copy(client: &tokio_postgres::Client, rows: u64) -> Res<Duration> {
    let began = Instant::now();
    let stream = client
        .copy_out("COPY (SELECT * FROM bench_snap) TO STDOUT")
        .await?;
    futures::pin_mut!(stream);
    let mut lines = 0u64;
    while let Some(data) = stream.next().await {
        lines += data?.iter().filter(|b| **b == b'\n').count() as u64;
    }
    if lines != rows {
        return Err(format!("COPY gave {lines} rows, not {rows}").into());
    }
    Ok(began.elapsed())
}

/// Keyset pages of `chunk` rows, the columns as text (what the snapshot
/// reads), each in its own `REPEATABLE READ` transaction.
async fn snapshot_keyset(client: &tokio_postgres::Client, rows: u64, chunk: u64) -> Res<Duration> {
    let began = Instant::now();
    let sql = format!(
        "SELECT id::text AS t0, v::text AS t1, n::text AS t2, id FROM bench_snap WHERE id > $1 \
         ORDER BY id LIMIT {chunk}"
    );
    let (mut after, mut got) = (0i64, 0u64);
    loop {
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await?;
        let page = client.query(&sql, &[&after]).await?;
        client.batch_execute("COMMIT").await?;
        let Some(last) = page.last() else { break };
        after = last.get(3);
        got += page.len() as u64;
    }
    if got != rows {
        return Err(format!("keyset read {got} rows, not {rows}").into());
    }
    Ok(began.elapsed())
}

async fn wal_throughput(
    ps: &PgPubSub,
    client: &tokio_postgres::Client,
    url: &str,
    rows: u64,
) -> Res<()> {
    client
        .batch_execute(
            "DROP TABLE IF EXISTS bench_wal;
             CREATE TABLE bench_wal (id bigint PRIMARY KEY, v text, n int);
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
               WHERE slot_name IN ('bench_ours', 'bench_recv');
             DROP PUBLICATION IF EXISTS bench_ours;
             CREATE PUBLICATION bench_ours FOR TABLE bench_wal;",
        )
        .await?;
    client
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('bench_ours', 'pgoutput');
             SELECT pg_create_logical_replication_slot('bench_recv', 'test_decoding');",
        )
        .await?;
    for start in (0..rows).step_by(1000) {
        let end = (start + 1000).min(rows);
        client
            .execute(
                "INSERT INTO bench_wal SELECT g, 'payload ' || g, g % 100
                 FROM generate_series($1::bigint, $2::bigint) g",
                &[&(start as i64), &(end as i64 - 1)],
            )
            .await?;
    }

    let (ours, ours_cpu) = stream_ours(ps, "bench_ours", "bench_ours", rows).await?;
    let ours_server = take_walsender();
    let (bare, bare_cpu) = stream_recvlogical(ps, url, "bench_recv", rows).await?;
    let bare_server = take_walsender();
    line(
        &format!("WAL feed changes/s ({rows} inserts)"),
        "ours",
        rate(rows, ours),
        rate(rows, bare),
        "ch/s",
    );
    cpu_line(rows, ours_cpu, bare_cpu);
    server_lines(rows, ours_cpu, ours_server, bare_cpu, bare_server);
    println!("  (bare = pg_recvlogical + test_decoding, lines read from its stdout)");
    drop_slot_when_free(client, "bench_ours").await?;
    drop_slot_when_free(client, "bench_recv").await?;
    Ok(())
}

/// Streams `slot` with the WAL feed (publication `publication`), acking
/// every commit, until `changes` changes arrived: how long that took, and
/// the CPU time this process spent on it.
async fn stream_ours(
    ps: &PgPubSub,
    slot: &str,
    publication: &str,
    changes: u64,
) -> Res<(Duration, Duration)> {
    let (began, cpu) = (Instant::now(), cpu_time());
    let mut feed = start_ours(ps, slot, publication).await?;
    drain_ours(&mut feed, changes).await?;
    let (took, cpu) = (began.elapsed(), cpu_time() - cpu);
    record_walsender(ps, slot).await;
    feed.close().await?;
    Ok((took, cpu))
}

/// CPU time of the walsender streaming `slot` (from /proc: a throwaway
/// cluster on this machine), kept for [`take_walsender`]: what the server
/// spent on the stream, steady however busy the machine is.
async fn record_walsender(ps: &PgPubSub, slot: &str) {
    let cpu = async {
        let client = ps.pool().get().await.ok()?;
        let pid: i32 = client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()?
            .get::<_, Option<i32>>(0)?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the `(comm)`: utime and stime are the 12th and 13th.
        let rest = stat.rsplit(')').next()?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_micros(ticks * 1_000_000 / hz))
    }
    .await;
    *WALSENDER.lock().unwrap() = cpu;
}

static WALSENDER: std::sync::Mutex<Option<Duration>> = std::sync::Mutex::new(None);

fn take_walsender() -> Option<Duration> {
    WALSENDER.lock().unwrap().take()
}

async fn start_ours(ps: &PgPubSub, slot: &str, publication: &str) -> Res<WalFeed> {
    Ok(ps
        .wal_feed(slot)
        .publication(publication)
        .heartbeat(None)
        .start()
        .await?)
}

/// Reads until `changes` changes arrived, acking every commit.
async fn drain_ours(feed: &mut WalFeed, changes: u64) -> Res<()> {
    let mut got = 0u64;
    while got < changes {
        match feed.next().await {
            Some(WalItem::Change { .. }) => got += 1,
            Some(WalItem::Commit { end_lsn, .. }) => feed.ack(end_lsn),
            Some(_) => {}
            None => return Err("feed ended".into()),
        }
    }
    Ok(())
}

/// `pg_recvlogical` with `test_decoding` on `slot`, writing to a pipe this
/// reads until `changes` change lines arrived: how long that took, and the
/// CPU time it spent (its own, read once it was reaped, plus this
/// process's reading of its lines).
async fn stream_recvlogical(
    ps: &PgPubSub,
    url: &str,
    slot: &str,
    changes: u64,
) -> Res<(Duration, Duration)> {
    let (began, cpu) = (Instant::now(), cpu_time() + children_cpu_time());
    let mut child = spawn_recvlogical(url, slot)?;
    count_recvlogical(&mut child, changes).await?;
    let took = began.elapsed();
    record_walsender(ps, slot).await;
    child.kill().await?;
    Ok((took, cpu_time() + children_cpu_time() - cpu))
}

fn spawn_recvlogical(url: &str, slot: &str) -> Res<tokio::process::Child> {
    let bin = std::env::var("BENCH_RECVLOGICAL")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_recvlogical".to_owned());
    Ok(tokio::process::Command::new(&bin)
        .args(["-d", url, "--slot", slot, "--start", "--no-loop", "-f", "-"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

/// Reads `pg_recvlogical`'s lines (one buffer, no allocation per line)
/// until `changes` change lines (`table ...`) arrived.
async fn count_recvlogical(child: &mut tokio::process::Child, changes: u64) -> Res<()> {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut reader = tokio::io::BufReader::with_capacity(128 * 1024, stdout);
    let mut line = Vec::with_capacity(256);
    let mut got = 0u64;
    while got < changes {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Err(format!("pg_recvlogical ended after {got} changes").into());
        }
        if line.starts_with(b"table ") {
            got += 1;
        }
    }
    Ok(())
}

/// The walsenders' CPU per change, and changes per CPU second of client
/// and walsender together (ours over bare: what a saturated machine
/// streams), when the walsenders could be read. Returns that ratio.
fn server_lines(
    changes: u64,
    ours_cpu: Duration,
    ours_server: Option<Duration>,
    bare_cpu: Duration,
    bare_server: Option<Duration>,
) -> Option<f64> {
    let (os, bs) = (ours_server?, bare_server?);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / changes as f64;
    println!(
        "{:<44} ours {:>10.2} µs    bare {:>10.2} µs    ratio {:.2}",
        "  walsender CPU per change",
        per(os),
        per(bs),
        per(os) / per(bs)
    );
    let ratio = per(bare_cpu + bs) / per(ours_cpu + os);
    println!(
        "{:<44} ours {:>10.0} ch/s  bare {:>10.0} ch/s  ratio {ratio:.2}",
        "  changes per CPU second (client + walsender)",
        changes as f64 / (ours_cpu + os).as_secs_f64(),
        changes as f64 / (bare_cpu + bs).as_secs_f64(),
    );
    Some(ratio)
}

/// Client CPU per change, ours against `pg_recvlogical`'s: steadier than
/// wall time on a busy machine.
fn cpu_line(changes: u64, ours: Duration, bare: Duration) {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / changes as f64;
    println!(
        "{:<44} ours {:>10.2} µs    bare {:>10.2} µs    ratio {:.2}",
        "  client CPU per change",
        per(ours),
        per(bare),
        per(ours) / per(bare)
    );
}

/// pgbench's TPC-B-like transactions (three updates and an insert each)
/// from 4 clients: already in the WAL and streamed by both (`rounds`
/// rounds, each reader on a slot of its own, the order alternating), then
/// live.
async fn wal_small(client: &tokio_postgres::Client, ps: &PgPubSub, url: &str, txs: u64) -> Res<()> {
    let rounds = env_u64("BENCH_WAL_ROUNDS", 3)?.max(1) as usize;
    pgbench(url, &["-i", "-q", "-s", "1"], false).await?;
    client
        .batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
               WHERE slot_name LIKE 'bench\\_small\\_%' OR slot_name LIKE 'bench\\_live\\_%';
             DROP PUBLICATION IF EXISTS bench_small;
             CREATE PUBLICATION bench_small FOR TABLE pgbench_accounts, pgbench_tellers,
               pgbench_branches, pgbench_history;",
        )
        .await?;
    // Each in a transaction of its own (a slot is not made in one that wrote).
    for round in 0..rounds {
        for (slot, plugin) in [("ours", "pgoutput"), ("recv", "test_decoding")] {
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, $2)",
                    &[&format!("bench_small_{slot}_{round}"), &plugin],
                )
                .await?;
        }
    }
    let per_client = txs / 4;
    let t = per_client.to_string();
    let workload = [
        "-n",
        "-c",
        "4",
        "-j",
        "2",
        "-M",
        "prepared",
        "-t",
        t.as_str(),
    ];
    pgbench(url, &workload, false).await?;
    let changes = per_client * 4 * 4;
    let (mut ratios, mut cpu_ratios, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let ours_slot = format!("bench_small_ours_{round}");
        let recv_slot = format!("bench_small_recv_{round}");
        let ours_first = round % 2 == 0;
        let (mut o, mut b) = (None, None);
        for ours_now in [ours_first, !ours_first] {
            if ours_now {
                let (took, cpu) = stream_ours(ps, &ours_slot, "bench_small", changes).await?;
                o = Some((took, cpu, take_walsender()));
            } else {
                let (took, cpu) = stream_recvlogical(ps, url, &recv_slot, changes).await?;
                b = Some((took, cpu, take_walsender()));
            }
        }
        let ((ours, ours_cpu, ours_server), (bare, bare_cpu, bare_server)) =
            (o.ok_or("no run")?, b.ok_or("no run")?);
        line(
            &format!("WAL feed changes/s ({} pgbench txs)", per_client * 4),
            "ours",
            rate(changes, ours),
            rate(changes, bare),
            "ch/s",
        );
        cpu_line(changes, ours_cpu, bare_cpu);
        if let Some(total) = server_lines(changes, ours_cpu, ours_server, bare_cpu, bare_server) {
            totals.push(total);
        }
        ratios.push(bare.as_secs_f64() / ours.as_secs_f64());
        cpu_ratios.push(ours_cpu.as_secs_f64() / bare_cpu.as_secs_f64());
        drop_slot_when_free(client, &ours_slot).await?;
        drop_slot_when_free(client, &recv_slot).await?;
    }
    println!(
        "  median of {rounds} rounds: changes/s ratio {:.2}, client CPU ratio {:.2}, \
         changes per CPU second (client + walsender) ratio {}",
        median(ratios),
        median(cpu_ratios),
        if totals.is_empty() {
            "n/a".to_owned()
        } else {
            format!("{:.2}", median(totals))
        }
    );
    println!("  (4 changes per transaction; bare = pg_recvlogical + test_decoding)");
    wal_small_live(client, ps, url, &workload, changes).await?;
    client.batch_execute("DROP PUBLICATION bench_small").await?;
    Ok(())
}

/// Runs pgbench (`BENCH_PGBENCH`, default the PostgreSQL 15 binary) with
/// `args` against `url`; `sync`: with `synchronous_commit = on`.
async fn pgbench(url: &str, args: &[&str], sync: bool) -> Res<()> {
    let bin = std::env::var("BENCH_PGBENCH")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pgbench".to_owned());
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(args).arg(url);
    if sync {
        cmd.env("PGOPTIONS", "-c synchronous_commit=on");
    }
    let out = cmd.output().await?;
    if !out.status.success() {
        return Err(format!("{bin} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// The workload written while both read, each its own slot, both streaming
/// before pgbench starts (with `synchronous_commit = on`, so each commit
/// reaches the walsenders at once, as a durable writer's would): changes/s
/// from the writer's start to each reader's last change, commit → received
/// per transaction (p50, p99), and client CPU per change. `pg_recvlogical`'s
/// lines are read on a thread of their own, whose CPU time is counted as
/// its, not ours.
async fn wal_small_live(
    client: &tokio_postgres::Client,
    ps: &PgPubSub,
    url: &str,
    workload: &[&str],
    changes: u64,
) -> Res<()> {
    for (slot, plugin) in [
        ("bench_live_ours", "pgoutput"),
        ("bench_live_recv", "test_decoding"),
    ] {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, $2)",
                &[&slot, &plugin],
            )
            .await?;
    }
    let mut feed = start_ours(ps, "bench_live_ours", "bench_small").await?;
    let bin = std::env::var("BENCH_RECVLOGICAL")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_recvlogical".to_owned());
    let mut recv = std::process::Command::new(&bin)
        .args([
            "-d",
            url,
            "--slot",
            "bench_live_recv",
            "--start",
            "--no-loop",
        ])
        .args(["-o", "include-timestamp=on", "-f", "-"])
        .env("PGTZ", "UTC")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = recv.stdout.take().ok_or("no stdout")?;
    // Both streaming before the writer starts.
    loop {
        let active: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots
                 WHERE slot_name IN ('bench_live_ours', 'bench_live_recv') AND active",
                &[],
            )
            .await?
            .get(0);
        if active == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu0, children0) = (cpu_time(), children_cpu_time());
    let began = Instant::now();
    let ours = tokio::spawn(async move {
        let mut lags = Vec::new();
        let mut got = 0u64;
        while got < changes {
            match feed.next().await {
                Some(WalItem::Change { .. }) => got += 1,
                Some(WalItem::Commit {
                    end_lsn,
                    commit_time,
                    ..
                }) => {
                    lags.push(
                        SystemTime::now()
                            .duration_since(commit_time)
                            .unwrap_or_default(),
                    );
                    feed.ack(end_lsn);
                }
                Some(_) => {}
                None => {
                    return Err::<_, Box<dyn std::error::Error + Send + Sync>>("feed ended".into())
                }
            }
        }
        let done = Instant::now();
        feed.close().await?;
        Ok((done, lags))
    });
    let bare = std::thread::spawn(
        move || -> Result<(Instant, Vec<Duration>, Duration), String> {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::with_capacity(128 * 1024, stdout);
            let mut line = Vec::with_capacity(256);
            let (mut got, mut lags) = (0u64, Vec::new());
            while got < changes {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => {
                        return Err(format!("pg_recvlogical ended after {got} changes"))
                    }
                    Ok(_) => {}
                }
                if line.starts_with(b"table ") {
                    got += 1;
                } else if line.starts_with(b"COMMIT") {
                    // `COMMIT 1234 (at 2026-12-02 11:55:01.123456+00)`, in UTC.
                    let text = String::from_utf8_lossy(&line);
                    if let Some(at) = text.split("(at ").nth(1) {
                        let at = at.trim_end().trim_end_matches(')').trim_end_matches("+00");
                        if let Ok(t) = humantime::parse_rfc3339_weak(at) {
                            lags.push(SystemTime::now().duration_since(t).unwrap_or_default());
                        }
                    }
                }
            }
            Ok((Instant::now(), lags, thread_cpu_time()))
        },
    );
    pgbench(url, workload, true).await?;
    let written = began.elapsed();
    let (ours_done, mut ours_lags) = ours.await?.map_err(|e| e.to_string())?;
    let (bare_done, mut bare_lags, reader_cpu) = bare.join().map_err(|_| "reader panicked")??;
    let ours_cpu = cpu_time() - cpu0 - reader_cpu;
    let pgbench_cpu = children_cpu_time() - children0;
    recv.kill()?;
    recv.wait()?;
    let recv_cpu = children_cpu_time() - children0 - pgbench_cpu + reader_cpu;
    let (ours_took, bare_took) = (ours_done - began, bare_done - began);
    line(
        &format!(
            "WAL feed live changes/s ({} txs, written in {:.1} s)",
            changes / 4,
            written.as_secs_f64()
        ),
        "ours",
        rate(changes, ours_took),
        rate(changes, bare_took),
        "ch/s",
    );
    let pct = |lags: &mut Vec<Duration>, p: f64| {
        lags.sort();
        lags.get(((lags.len() as f64 * p) as usize).min(lags.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{:<44} ours {:>7.2} / {:>7.2} ms  bare {:>7.2} / {:>7.2} ms",
        "  commit -> received p50 / p99",
        pct(&mut ours_lags, 0.5),
        pct(&mut ours_lags, 0.99),
        pct(&mut bare_lags, 0.5),
        pct(&mut bare_lags, 0.99),
    );
    cpu_line(changes, ours_cpu, recv_cpu);
    println!("  (live: pgbench with synchronous_commit=on; bare = pg_recvlogical + its pipe reader thread)");
    drop_slot_when_free(client, "bench_live_ours").await?;
    drop_slot_when_free(client, "bench_live_recv").await?;
    Ok(())
}

/// Drops `slot` once its stream has let go of it (a killed reader's
/// walsender takes a moment to exit).
async fn drop_slot_when_free(client: &tokio_postgres::Client, slot: &str) -> Res<()> {
    for _ in 0..500 {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            res => return res.map(drop).map_err(Into::into),
        }
    }
    Err(format!("slot {slot} stayed in use").into())
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

async fn wal_lag(
    ps: &PgPubSub,
    client: &tokio_postgres::Client,
    url: &str,
    per_sec: u64,
    secs: u64,
) -> Res<()> {
    client
        .batch_execute(
            "DROP TABLE IF EXISTS bench_lag;
             CREATE TABLE bench_lag (id bigserial PRIMARY KEY, v text);
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
               WHERE slot_name = 'bench_lag';
             DROP PUBLICATION IF EXISTS bench_lag;",
        )
        .await?;
    let mut feed: WalFeed = ps
        .wal_feed("bench_lag")
        .tables(&["bench_lag"])
        .heartbeat(None)
        .start()
        .await?;
    let total = per_sec * secs;
    let writer = {
        let url = url.to_owned();
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            // Throwaway clusters run with synchronous_commit=off, where WAL
            // reaches the walsender only at the WAL writer's next flush
            // (200 ms): measure what a durable commit sees.
            client.batch_execute("SET synchronous_commit = on").await?;
            let stmt = client
                .prepare("INSERT INTO bench_lag (v) VALUES ('x')")
                .await?;
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec as u32);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for _ in 0..total {
                tick.tick().await;
                client.execute(&stmt, &[]).await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    };
    let mut lags = Vec::with_capacity(total as usize);
    while (lags.len() as u64) < total {
        match feed.next().await {
            Some(WalItem::Commit {
                end_lsn,
                commit_time,
                ..
            }) => {
                let lag = SystemTime::now()
                    .duration_since(commit_time)
                    .unwrap_or_default();
                lags.push(lag);
                feed.ack(end_lsn);
            }
            Some(_) => {}
            None => return Err("feed ended".into()),
        }
    }
    writer.await??;
    feed.close().await?;
    ps.drop_slot("bench_lag").await?;
    lags.sort();
    let pct = |p: f64| lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)];
    println!(
        "WAL feed lag, commit -> received ({per_sec}/s, {secs} s)   p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        lags[lags.len() - 1]
    );
    Ok(())
}
