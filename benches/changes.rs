//! Change feeds: what they cost the writer and how fast they deliver.
//! Run with `cargo bench --bench changes`.
//!
//! Env: `BENCH_PHASES` (comma-separated subset; default all: `trigger`),
//! the phases' own sizes (see each module), `DATABASE_URL` (else a
//! throwaway cluster).

#[path = "common/mod.rs"]
mod common;
#[path = "changes/trigger.rs"]
mod trigger;

use common::{run_main, Res};
use pg_pubsub::PgPubSub;

fn main() -> Res<()> {
    run_main(|url| async move { run(&url).await })
}

async fn run(url: &str) -> Res<()> {
    let ps = PgPubSub::builder(url)?
        .pool_size(trigger::TASKS + 2)
        .connect()
        .await?;
    let client = ps.pool().get().await?;
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    println!(
        "PostgreSQL {version}, {} CPUs",
        std::thread::available_parallelism()?.get()
    );
    drop(client);
    let phases = std::env::var("BENCH_PHASES").unwrap_or_else(|_| "trigger".to_owned());
    let phase = |name: &str| phases.split(',').any(|p| p.trim() == name);
    if phase("trigger") {
        trigger::run(&ps).await?;
    }
    ps.shutdown().await;
    Ok(())
}
