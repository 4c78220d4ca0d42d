//! `pg-pubsub dev`: a throwaway PostgreSQL for trying things out.

use std::io::Write as _;

use clap::Args;
use pg_pubsub::testing::TestServer;

use crate::common::{note, Failure, Result, Stop};

#[derive(Args)]
pub(crate) struct DevArgs {}

/// Starts a cluster in a temporary directory (`wal_level=logical`, the
/// superuser `postgres` without a password, a free loopback port), prints
/// `export DATABASE_URL=...` on stdout, and removes it all on SIGINT or
/// SIGTERM.
pub(crate) async fn run(_args: DevArgs) -> Result<()> {
    let mut stop = Stop::new()?;
    note("starting a throwaway PostgreSQL (its data is deleted on exit)");
    let server = tokio::task::spawn_blocking(TestServer::start)
        .await
        .map_err(|e| Failure(format!("starting the server: {e}")))?
        .map_err(|e| Failure(format!("starting the server: {e}")))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "export DATABASE_URL={}", server.url())
        .and_then(|()| out.flush())
        .map_err(|e| Failure(format!("writing to stdout: {e}")))?;
    drop(out);
    note("ready: paste the line above in other terminals; Ctrl-C stops it");
    stop.recv().await;
    note("stopping: removing the server and its data");
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .map_err(|e| Failure(format!("stopping the server: {e}")))?;
    Ok(())
}
