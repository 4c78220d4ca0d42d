//! The crate's schema: its name, its versioned SQL scripts (v1 durable
//! channels, v2 the work queue, v3 trigger change feeds, v4 the jobs table
//! without CHECK constraints and a stable claim plan, v5 `read` starting its
//! scan at the batch), installing them, and the names derived from it
//! (wake-up channels, election names).

use tokio::sync::OnceCell;

use crate::client::PgPubSub;
use crate::error::{Error, ErrorKind, Result};

/// The schema version this crate writes and reads: the last migration.
pub const SCHEMA_VERSION: i32 = 5;

/// The default schema name.
pub const DEFAULT_SCHEMA: &str = "pgpubsub";

/// Key of the transaction advisory lock (one-`bigint` form) that serialises
/// installers: `0x7067707364757261` (`"pgpsdura"`).
pub const INSTALL_LOCK_KEY: i64 = 0x7067_7073_6475_7261;

/// The longest schema name accepted, so derived names stay under 63 bytes.
const MAX_SCHEMA_BYTES: usize = 40;

/// The migrations, in order: `(version, script)`. Each script is one
/// transaction that takes [`INSTALL_LOCK_KEY`], is idempotent, and records
/// its version in `schema_version`. Append new ones; never edit old ones.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("schema.sql")),
    (2, include_str!("../queue/schema.sql")),
    (3, include_str!("../changes/schema.sql")),
    (4, include_str!("../queue/schema_v4.sql")),
    (5, include_str!("schema_v5.sql")),
];

/// A validated schema name: a lowercase SQL identifier (`[a-z_][a-z0-9_]*`,
/// at most 40 bytes), so it never needs quoting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self> {
        let mut chars = name.chars();
        let ok_first = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_first || !ok_rest || name.len() > MAX_SCHEMA_BYTES {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "schema name {name:?} must be a lowercase identifier \
                     ([a-z_][a-z0-9_]*) of at most {MAX_SCHEMA_BYTES} bytes"
                ),
            ));
        }
        Ok(SchemaName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The channel on which `publish` sends wake-ups (payload: the durable
    /// channel's name): `<schema>_wake`.
    pub fn wake_channel(&self) -> String {
        format!("{}_wake", self.0)
    }

    /// The channel on which `enqueue` sends wake-ups (payload: the queue's
    /// name): `<schema>_jobs`.
    pub fn jobs_channel(&self) -> String {
        format!("{}_jobs", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        SchemaName(DEFAULT_SCHEMA.to_owned())
    }
}

/// The installation script for `schema`, every migration in order, for DBAs
/// to read or run (`psql -f`). It is what
/// [`Durable::install`](super::Durable::install) and
/// [`Queue::install`](crate::queue::Queue::install) run (only the
/// migrations a database lacks).
///
/// Grants an application role needs (replace `app`):
///
/// ```sql
/// GRANT USAGE ON SCHEMA pgpubsub TO app;
/// GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA pgpubsub TO app;
/// GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgpubsub TO app;
/// GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgpubsub TO app;
/// ```
///
/// (`TRUNCATE` is for durable retention, which empties the partitions of
/// `messages`.) A publish-only role needs `USAGE` on the schema and the
/// sequence, `INSERT` on `messages`, `SELECT` on `channels` and
/// `rotation`, and `EXECUTE` on `publish`, `publish_many`, `wake` and
/// `current_part`.
pub fn schema_sql(schema: &SchemaName) -> String {
    MIGRATIONS
        .iter()
        .map(|(_, script)| render(script, schema))
        .collect::<Vec<_>>()
        .join("\n")
}

fn render(script: &str, schema: &SchemaName) -> String {
    script
        .replace("@LOCK@", &INSTALL_LOCK_KEY.to_string())
        .replace("@WAKE@", &schema.wake_channel())
        .replace("@JOBS@", &schema.jobs_channel())
        .replace("@S@", schema.as_str())
}

/// 64-bit FNV-1a: tiny, stable across versions and platforms, and easy to
/// reimplement in any language (offset basis `0xcbf29ce484222325`, prime
/// `0x100000001b3`, over the bytes).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The elected channel whose leader is a group's active consumer:
/// `pgps_g_` followed by the 16 hex digits of FNV-1a 64 of
/// `schema NUL channel NUL group`. Nothing is ever published on it.
pub fn election_channel(schema: &SchemaName, channel: &str, group: &str) -> String {
    let mut key = Vec::with_capacity(schema.0.len() + channel.len() + group.len() + 2);
    key.extend_from_slice(schema.0.as_bytes());
    key.push(0);
    key.extend_from_slice(channel.as_bytes());
    key.push(0);
    key.extend_from_slice(group.as_bytes());
    format!("pgps_g_{:016x}", fnv1a64(&key))
}

/// Installs `schema` through `pubsub`'s pool once per `done` (every clone
/// of a `Durable` or `Queue` handle shares one).
pub(crate) async fn ensure(
    pubsub: &PgPubSub,
    schema: &SchemaName,
    done: &OnceCell<()>,
) -> Result<()> {
    done.get_or_try_init(|| async {
        pubsub
            .exec()
            .run_with("installing the schema", |client| async move {
                install(&client, schema).await
            })
            .await
    })
    .await
    .map(drop)
}

/// Installs (or checks) the schema on `client`: applies, in order, the
/// migrations the database lacks. Idempotent and safe to run from several
/// sessions at once (each script takes the install lock and re-checks
/// nothing it does not have to: every object is `IF NOT EXISTS` or
/// `CREATE OR REPLACE`).
pub(crate) async fn install(client: &tokio_postgres::Client, schema: &SchemaName) -> Result<()> {
    let current = installed_version(client, schema).await?.unwrap_or(0);
    for (version, script) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        client
            .batch_execute(&render(script, schema))
            .await
            .map_err(|e| {
                Error::pg(
                    ErrorKind::Schema,
                    &format!("installing schema version {version}"),
                    e,
                )
            })?;
    }
    match installed_version(client, schema).await? {
        Some(SCHEMA_VERSION) => Ok(()),
        other => Err(Error::new(
            ErrorKind::Config,
            format!(
                "schema {} has version {other:?}; this pg-pubsub uses version {SCHEMA_VERSION}",
                schema.as_str()
            ),
        )),
    }
}

/// The newest version recorded in the schema; `None` when it is not installed.
async fn installed_version(
    client: &tokio_postgres::Client,
    schema: &SchemaName,
) -> Result<Option<i32>> {
    let sql = format!(
        "SELECT max(version) FROM {}.schema_version",
        schema.as_str()
    );
    match client.query_one(&sql, &[]).await {
        Ok(row) => {
            let version: Option<i32> = row.get(0);
            if let Some(v) = version.filter(|v| *v > SCHEMA_VERSION) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "schema {} has version {v}, newer than this pg-pubsub's {SCHEMA_VERSION}",
                        schema.as_str()
                    ),
                ));
            }
            Ok(version)
        }
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::pg(
            ErrorKind::Schema,
            "reading the durable schema version",
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(SchemaName::new("pgpubsub").is_ok());
        for bad in ["", "Pg", "1a", "a-b", "a\"b", &"a".repeat(41)] {
            assert!(SchemaName::new(bad).is_err(), "{bad}");
        }
        // Known FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        let s = SchemaName::default();
        let name = election_channel(&s, &"c".repeat(63), &"g".repeat(500));
        assert_eq!(name.len(), 23);
        assert_ne!(name, election_channel(&s, "c", "g2"));
        let sql = schema_sql(&s);
        assert!(!sql.contains('@'), "every placeholder replaced");
        assert!(sql.contains("pg_notify('pgpubsub_wake', p_channel)"));
        assert!(sql.contains("pg_notify('pgpubsub_jobs', p_queue)"));
        let versions: Vec<i32> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    }
}
