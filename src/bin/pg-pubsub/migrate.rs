//! `pg-pubsub migrate status|up|print`: the schema's migrations from the shell.

use std::io::Write as _;

use clap::{Args, Subcommand};
use pg_pubsub::schema::{MigrationStatus, SchemaName, SchemaState};

use crate::common::{connect, ConnOpts, Failure, Result, Tuning};

#[derive(Args)]
pub(crate) struct MigrateArgs {
    /// Schema to migrate.
    #[arg(long, default_value = pg_pubsub::schema::DEFAULT_SCHEMA, global = true)]
    schema: String,
    #[command(subcommand)]
    command: MigrateCommand,
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Print where the schema stands and what is pending; changes nothing.
    Status,
    /// Apply every pending migration and functions script (one transaction).
    Up,
    /// Print the whole installation script (for psql -f); connects to nothing.
    Print,
}

pub(crate) async fn run(conn: &ConnOpts, args: MigrateArgs) -> Result<()> {
    let schema = SchemaName::new(&args.schema)?;
    if let MigrateCommand::Print = args.command {
        let ps_free_script = pg_pubsub::schema::schema_sql(&schema);
        return std::io::stdout()
            .write_all(ps_free_script.as_bytes())
            .map_err(|e| Failure(format!("writing to stdout: {e}")));
    }
    let ps = connect(conn, Tuning::default()).await?;
    let migrator = ps.migrator(schema);
    let result = match args.command {
        MigrateCommand::Status => migrator.status().await,
        _ => migrator.up().await,
    };
    ps.shutdown().await;
    print_status(&result?);
    Ok(())
}

fn print_status(status: &MigrationStatus) {
    let state = match status.state {
        SchemaState::NotInstalled => "not installed",
        SchemaState::Pending => "migrations pending",
        SchemaState::Current => "current",
        SchemaState::AheadCompatible => "migrated by a newer pg-pubsub, compatible with this one",
        _ => "unknown",
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "schema {}: level {} (this pg-pubsub: {}), {state}",
        status.schema, status.database_version, status.build_version
    );
    for m in &status.pending_migrations {
        let _ = writeln!(out, "pending migration {} ({})", m.version, m.name);
    }
    for s in &status.pending_scripts {
        let _ = writeln!(out, "pending functions: {s}");
    }
}
