//! The trigger feed's cost to writers: INSERT (and UPDATE) throughput of a
//! table with a feed (statement-level, row-level) against the same table
//! without one.
//!
//! Env: `BENCH_CHANGES_SINGLE` (rows inserted one per transaction by
//! [`TASKS`] tasks, default 20 000), `BENCH_CHANGES_BATCHED` (rows
//! inserted and then updated a thousand per transaction, default 200 000).

use pg_pubsub::changes::{FeedOptions, TriggerLevel};
use pg_pubsub::PgPubSub;

use super::common::{env_u64, line, rate, timed_tasks, Res};

/// Concurrent writers in the one-row-per-transaction case.
pub const TASKS: usize = 8;

const TABLE: &str = "bench_changes";

/// The table: a key, a few typical columns.
const CREATE: &str = "
    DROP TABLE IF EXISTS bench_changes;
    CREATE TABLE bench_changes (
        id bigserial PRIMARY KEY,
        account int NOT NULL,
        amount numeric(12, 2) NOT NULL,
        note text,
        created_at timestamptz NOT NULL DEFAULT now());";

/// What is measured: no feed, or a feed at one level (on a notifying or
/// a quiet durable channel).
#[derive(Clone, Copy)]
enum Setup {
    None,
    Feed(TriggerLevel, bool),
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::None => "none".to_owned(),
            Setup::Feed(level, false) => format!("{level}"),
            Setup::Feed(level, true) => format!("{level}, quiet"),
        }
    }
}

/// Recreates the table, installs the feed of `setup`, empties its channel.
async fn prepare(ps: &PgPubSub, setup: Setup) -> Res<()> {
    let changes = ps.changes();
    changes.durable().install().await?;
    let client = ps.pool().get().await?;
    client.batch_execute(CREATE).await?;
    let channel = format!("changes.public.{TABLE}");
    client
        .execute(
            "DELETE FROM pgpubsub.messages WHERE channel = $1",
            &[&channel],
        )
        .await?;
    client
        .batch_execute("VACUUM ANALYZE pgpubsub.messages")
        .await?;
    if let Setup::Feed(level, quiet) = setup {
        changes
            .install_change_feed(TABLE, &FeedOptions::new().level(level))
            .await?;
        changes.durable().set_quiet(&channel, quiet).await?;
    }
    Ok(())
}

pub async fn run(ps: &PgPubSub) -> Res<()> {
    let single = env_u64("BENCH_CHANGES_SINGLE", 20_000)?;
    let batched = env_u64("BENCH_CHANGES_BATCHED", 200_000)?;
    let setups = [
        Setup::None,
        Setup::Feed(TriggerLevel::Statement, false),
        Setup::Feed(TriggerLevel::Row, false),
        Setup::Feed(TriggerLevel::Statement, true),
    ];

    let mut base = None;
    for setup in setups {
        prepare(ps, setup).await?;
        let d = timed_tasks(TASKS, single, |n| {
            let ps = ps.clone();
            async move {
                let c = ps.pool().get().await?;
                let stmt = c
                    .prepare_cached(
                        "INSERT INTO bench_changes (account, amount, note) \
                         VALUES ($1, 42.50, 'order 0123456789abcdef')",
                    )
                    .await?;
                for i in 0..n {
                    c.execute(&stmt, &[&((i % 1000) as i32)]).await?;
                }
                Ok(())
            }
        })
        .await?;
        let r = rate(single, d);
        let bare = *base.get_or_insert(r);
        line(
            &format!("insert 1 row/tx, {TASKS} tasks: {}", setup.label()),
            "feed",
            r,
            bare,
            "rows/s",
        );
    }

    let mut base_ins = None;
    let mut base_upd = None;
    for setup in setups {
        prepare(ps, setup).await?;
        let client = ps.pool().get().await?;
        let t = std::time::Instant::now();
        for _ in 0..batched / 1000 {
            client
                .batch_execute(
                    "INSERT INTO bench_changes (account, amount, note) \
                     SELECT g, 42.50, 'order 0123456789abcdef' FROM generate_series(1, 1000) g",
                )
                .await?;
        }
        let r = rate(batched, t.elapsed());
        let bare = *base_ins.get_or_insert(r);
        line(
            &format!("insert 1000 rows/tx: {}", setup.label()),
            "feed",
            r,
            bare,
            "rows/s",
        );
        let t = std::time::Instant::now();
        for k in 0..batched / 1000 {
            let lo = (k * 1000) as i64;
            client
                .execute(
                    "UPDATE bench_changes SET amount = amount + 1 WHERE id > $1 AND id <= $1 + 1000",
                    &[&lo],
                )
                .await?;
        }
        let r = rate(batched, t.elapsed());
        let bare = *base_upd.get_or_insert(r);
        line(
            &format!("update 1000 rows/tx: {}", setup.label()),
            "feed",
            r,
            bare,
            "rows/s",
        );
    }
    prepare(ps, Setup::None).await?;
    Ok(())
}
