//! `pg-pubsub serve`: the dashboard and admin API (`pg_pubsub::ui`) over
//! HTTP, until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use pg_pubsub::ui::{router, UiOptions};

use crate::common::{connect, note, ConnOpts, Failure, Result, Stop, Tuning};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on. Loopback by default: there is no TLS, so put a
    /// TLS proxy in front before listening on another address.
    #[arg(long, default_value = "127.0.0.1:9187")]
    listen: SocketAddr,
    /// Allow retrying and deleting dead jobs to whoever shows this token
    /// (API: `Authorization: Bearer`; pages: the login form). Without it
    /// the dashboard is read-only. Prefer the environment variable: a
    /// command line is visible to other users.
    #[arg(long, env = "PGPUBSUB_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Show no payload in pages or API answers.
    #[arg(long)]
    hide_payloads: bool,
    /// Schema holding the tables.
    #[arg(long, default_value = pg_pubsub::schema::DEFAULT_SCHEMA)]
    schema: String,
    /// Seconds between the samples of the charts.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    sample_every: f64,
    /// An elected channel whose leader to show (repeatable).
    #[arg(long = "elected", value_name = "CHANNEL")]
    elected: Vec<String>,
}

pub(crate) async fn run(conn: &ConnOpts, args: ServeArgs) -> Result<()> {
    pg_pubsub::schema::SchemaName::new(&args.schema)?;
    let every = Duration::try_from_secs_f64(args.sample_every)
        .map_err(|e| Failure(format!("--sample-every: {e}")))?;
    // The mutations the dashboard logs (target pg_pubsub::ui) go to stderr.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    // Before connecting: metric handles made earlier would record nothing.
    let prometheus = pg_pubsub::metrics::install_prometheus()?;
    let mut stop = Stop::new()?;
    let ps = match stop.or(connect(conn, Tuning::default())).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    let mut opts = UiOptions::new()
        .hide_payloads(args.hide_payloads)
        .sample_every(every)
        .schema(&args.schema)
        .elected_channels(args.elected)
        .prometheus(prometheus);
    let read_only = args.admin_token.as_deref().is_none_or(str::is_empty);
    if let Some(token) = args.admin_token {
        opts = opts.admin_token(token);
    }
    let result = serve(&ps, opts, args.listen, read_only, stop).await;
    ps.shutdown().await;
    result
}

async fn serve(
    ps: &pg_pubsub::PgPubSub,
    opts: UiOptions,
    addr: SocketAddr,
    read_only: bool,
    mut stop: Stop,
) -> Result<()> {
    let app = router(ps, opts)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure(format!("cannot listen on {addr}: {e}")))?;
    if !bound.ip().is_loopback() {
        note(&format!(
            "warning: listening on {bound}, not loopback: the dashboard has no TLS; \
             put a TLS proxy in front"
        ));
    }
    let mode = if read_only {
        "read-only (no admin token)"
    } else {
        "admin token set"
    };
    note(&format!(
        "serving the dashboard on http://{bound}/ ({mode})"
    ));
    pg_pubsub::ui::axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.recv().await })
        .await
        .map_err(|e| Failure(format!("serving: {e}")))
}
