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
//!   streamed by both as above: the per-transaction cost.
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

use common::{children_cpu_time, cpu_time, env_u64, line, rate, run_main, Res};
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
    let (bare, bare_cpu) = stream_recvlogical(url, "bench_recv", rows).await?;
    line(
        &format!("WAL feed changes/s ({rows} inserts)"),
        "ours",
        rate(rows, ours),
        rate(rows, bare),
        "ch/s",
    );
    cpu_line(rows, ours_cpu, bare_cpu);
    println!("  (bare = pg_recvlogical + test_decoding, lines read from its stdout)");
    client
        .batch_execute(
            "SELECT pg_drop_replication_slot('bench_ours');
             SELECT pg_drop_replication_slot('bench_recv');",
        )
        .await?;
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
    let mut feed: WalFeed = ps
        .wal_feed(slot)
        .publication(publication)
        .heartbeat(None)
        .start()
        .await?;
    let mut got = 0u64;
    while got < changes {
        match feed.next().await {
            Some(WalItem::Change { .. }) => got += 1,
            Some(WalItem::Commit { end_lsn, .. }) => feed.ack(end_lsn),
            Some(_) => {}
            None => return Err("feed ended".into()),
        }
    }
    let (took, cpu) = (began.elapsed(), cpu_time() - cpu);
    feed.close().await?;
    Ok((took, cpu))
}

/// `pg_recvlogical` with `test_decoding` on `slot`, writing to a pipe this
/// reads until `changes` change lines arrived: how long that took, and the
/// CPU time it spent (its own, read once it was reaped, plus this
/// process's reading of its lines).
async fn stream_recvlogical(url: &str, slot: &str, changes: u64) -> Res<(Duration, Duration)> {
    let bin = std::env::var("BENCH_RECVLOGICAL")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_recvlogical".to_owned());
    let (began, cpu) = (Instant::now(), cpu_time() + children_cpu_time());
    let mut child = tokio::process::Command::new(&bin)
        .args(["-d", url, "--slot", slot, "--start", "--no-loop", "-f", "-"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut got = 0u64;
    while got < changes {
        match lines.next_line().await? {
            Some(l) if l.starts_with("table ") => got += 1,
            Some(_) => {}
            None => return Err(format!("{bin} ended after {got} changes").into()),
        }
    }
    let took = began.elapsed();
    child.kill().await?;
    Ok((took, cpu_time() + children_cpu_time() - cpu))
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
/// from 4 clients, already in the WAL, streamed by both: the per-transaction
/// cost.
async fn wal_small(client: &tokio_postgres::Client, ps: &PgPubSub, url: &str, txs: u64) -> Res<()> {
    let bin = std::env::var("BENCH_PGBENCH")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pgbench".to_owned());
    let pgbench = |args: Vec<String>| {
        let bin = bin.clone();
        async move {
            let out = tokio::process::Command::new(&bin)
                .args(&args)
                .output()
                .await?;
            if !out.status.success() {
                return Err(
                    format!("{bin} failed: {}", String::from_utf8_lossy(&out.stderr)).into(),
                );
            }
            Res::Ok(())
        }
    };
    pgbench(vec![
        "-i".into(),
        "-q".into(),
        "-s".into(),
        "1".into(),
        url.into(),
    ])
    .await?;
    client
        .batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
               WHERE slot_name IN ('bench_small_ours', 'bench_small_recv');
             DROP PUBLICATION IF EXISTS bench_small;
             CREATE PUBLICATION bench_small FOR TABLE pgbench_accounts, pgbench_tellers,
               pgbench_branches, pgbench_history;",
        )
        .await?;
    // Each in a transaction of its own (a slot is not made in one that wrote).
    for (slot, plugin) in [
        ("bench_small_ours", "pgoutput"),
        ("bench_small_recv", "test_decoding"),
    ] {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, $2)",
                &[&slot, &plugin],
            )
            .await?;
    }
    let per_client = txs / 4;
    pgbench(vec![
        "-n".into(),
        "-c".into(),
        "4".into(),
        "-j".into(),
        "2".into(),
        "-M".into(),
        "prepared".into(),
        "-t".into(),
        per_client.to_string(),
        url.into(),
    ])
    .await?;
    let changes = per_client * 4 * 4;
    let (ours, ours_cpu) = stream_ours(ps, "bench_small_ours", "bench_small", changes).await?;
    let (bare, bare_cpu) = stream_recvlogical(url, "bench_small_recv", changes).await?;
    line(
        &format!("WAL feed changes/s ({} pgbench txs)", per_client * 4),
        "ours",
        rate(changes, ours),
        rate(changes, bare),
        "ch/s",
    );
    cpu_line(changes, ours_cpu, bare_cpu);
    println!("  (4 changes per transaction; bare = pg_recvlogical + test_decoding)");
    client
        .batch_execute(
            "SELECT pg_drop_replication_slot('bench_small_ours');
             SELECT pg_drop_replication_slot('bench_small_recv');
             DROP PUBLICATION bench_small;",
        )
        .await?;
    Ok(())
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
