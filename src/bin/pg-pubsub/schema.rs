//! `pg-pubsub schema`: prints the SQL script that installs the schema.

use std::io::Write as _;

use clap::Args;
use pg_pubsub::durable::{schema_sql, SchemaName};

use crate::common::{Failure, Result};

#[derive(Args)]
pub(crate) struct SchemaArgs {
    /// Schema name.
    #[arg(long, default_value = pg_pubsub::durable::DEFAULT_SCHEMA)]
    schema: String,
}

/// `pg-pubsub schema`: prints the installation script.
pub(crate) fn run(args: SchemaArgs) -> Result<()> {
    let name = SchemaName::new(&args.schema)?;
    std::io::stdout()
        .write_all(schema_sql(&name).as_bytes())
        .map_err(|e| Failure(format!("writing to stdout: {e}")))
}
