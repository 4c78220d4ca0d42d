//! The crate's schema: its name, its migrations and function scripts, the
//! installer and the printable script. Every capability (durable channels,
//! the work queue, change feeds) keeps its tables and functions here.
//!
//! # Layout
//!
//! * `migrations/NNNN_name.sql`: tables, indexes and data. Applied once each,
//!   in order, and recorded in `<schema>.schema_migrations` with a checksum.
//! * `functions/{durable,queue,changes}.sql`: every function, as
//!   `CREATE OR REPLACE`. Re-applied when a build carries a newer level of
//!   the script, recorded in `<schema>.schema_scripts`.
//!
//! Installing is lazy by default: the first use of a capability handle
//! applies what is pending (one transaction, under the advisory lock
//! [`INSTALL_LOCK_KEY`], safe from many processes at once). Teams that
//! forbid DDL at run time turn that off with
//! [`Builder::auto_migrate(false)`](crate::Builder::auto_migrate) and run
//! [`PgPubSub::migrate`](crate::PgPubSub::migrate) or `pg-pubsub migrate up` from a deploy step; a
//! handle then only checks the schema and fails with
//! [`ErrorKind::Schema`](crate::ErrorKind::Schema) naming what is pending.
//!
//! # The rule for rolling deploys
//!
//! An old build keeps running, and restarting, against a schema a newer
//! build migrated, as long as every newer migration says it stays
//! compatible with the older build's level:
//!
//! 1. A migration is never edited once released; its checksum is recorded,
//!    and an edited, unknown or renumbered one is an [`ErrorKind::Schema`](crate::ErrorKind::Schema)
//!    error naming its version.
//! 2. Each migration records `compatible_with`: the lowest schema level a
//!    build may have to keep working once it is applied. Adding a table, a
//!    column with a default or an index keeps older builds working (keep
//!    the older level); removing or renaming something they use does not
//!    (use the migration's own version).
//! 3. A change to a functions script ships with a new migration (possibly
//!    one that changes no table), and the script's `since` becomes that
//!    migration's version. Functions older builds call keep their
//!    signatures while the migration says it is compatible with them.
//! 4. A build never applies or re-applies anything to a database that
//!    records a migration newer than its own: it runs against it if that
//!    migration is compatible, and refuses with [`ErrorKind::Schema`](crate::ErrorKind::Schema)
//!    otherwise. So two versions never overwrite each other's functions.
//!
//! Unit tests pin each file's checksum, so an edit cannot slip through
//! without a conscious change of the level.

mod install;
mod plan;

pub use install::{schema_sql, MigrationInfo, MigrationStatus, Migrator, SchemaState};

pub(crate) use install::ensure;
use plan::{Catalog, Migration, Script};

use crate::error::{Error, Origin, Result};

/// The schema level of this build: the number of its last migration.
pub const SCHEMA_VERSION: i32 = 10;

/// The default schema name.
pub const DEFAULT_SCHEMA: &str = "pgpubsub";

/// Key of the transaction advisory lock (one-`bigint` form) that serialises
/// installers: `0x7067707364757261` (`"pgpsdura"`).
pub const INSTALL_LOCK_KEY: i64 = 0x7067_7073_6475_7261;

/// The longest schema name accepted, so derived names stay under 63 bytes.
const MAX_SCHEMA_BYTES: usize = 40;

/// What this build carries. Append migrations; never edit released ones.
const CATALOG: Catalog = Catalog {
    migrations: &[
        Migration {
            version: 1,
            name: "baseline",
            sql: include_str!("migrations/0001_baseline.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 2,
            name: "queue_control",
            sql: include_str!("migrations/0002_queue_control.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 3,
            name: "schedules",
            sql: include_str!("migrations/0003_schedules.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 4,
            name: "limits",
            sql: include_str!("migrations/0004_limits.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 5,
            name: "wal_slots",
            sql: include_str!("migrations/0005_wal_slots.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 6,
            name: "limited_claim",
            sql: include_str!("migrations/0006_limited_claim.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 7,
            name: "leases",
            sql: include_str!("migrations/0007_leases.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 8,
            name: "trigger_feed_names",
            sql: include_str!("migrations/0008_trigger_feed_names.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 9,
            name: "wal_snapshots",
            sql: include_str!("migrations/0009_wal_snapshots.sql"),
            compatible_with: 1,
        },
        Migration {
            version: 10,
            name: "durable_reads",
            sql: include_str!("migrations/0010_durable_reads.sql"),
            compatible_with: 1,
        },
    ],
    scripts: &[
        Script {
            name: "durable",
            sql: include_str!("functions/durable.sql"),
            since: 10,
        },
        Script {
            name: "queue",
            sql: include_str!("functions/queue.sql"),
            since: 2,
        },
        Script {
            name: "changes",
            sql: include_str!("functions/changes.sql"),
            since: 8,
        },
        Script {
            name: "limits",
            sql: include_str!("functions/limits.sql"),
            since: 6,
        },
    ],
};

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
                Origin::InvalidName,
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

    /// The channel on which queue control is announced (payloads
    /// `cancel <job id>`, `pause <queue>`, `resume <queue>`):
    /// `<schema>_queue_ctl`.
    pub fn queue_control_channel(&self) -> String {
        format!("{}_queue_ctl", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        SchemaName(DEFAULT_SCHEMA.to_owned())
    }
}

impl std::fmt::Display for SchemaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
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
    }

    #[test]
    fn the_script_fills_every_placeholder() {
        let sql = schema_sql(&SchemaName::default());
        assert!(!sql.contains('@'), "every placeholder replaced");
        assert!(sql.contains("pg_notify('pgpubsub_wake', p_channel)"));
        assert!(sql.contains("pg_notify('pgpubsub_jobs', p_queue)"));
    }

    #[test]
    fn the_catalog_is_numbered_without_holes() {
        let versions: Vec<i32> = CATALOG.migrations.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        for m in CATALOG.migrations {
            assert!(m.compatible_with <= m.version, "{}", m.name);
        }
        for s in CATALOG.scripts {
            assert!(s.since >= 1 && s.since <= SCHEMA_VERSION, "{}", s.name);
        }
    }

    /// If this fails, a migration or a functions script changed. A released
    /// migration must not change: add a new one. A script may change only
    /// with a new migration; set its `since` to that migration's version,
    /// then update the pin here.
    #[test]
    fn every_file_is_pinned() {
        let pins: Vec<(String, i32, String)> = CATALOG
            .migrations
            .iter()
            .map(|m| (m.name.to_owned(), m.version, plan::checksum(m.sql)))
            .chain(
                CATALOG
                    .scripts
                    .iter()
                    .map(|s| (s.name.to_owned(), s.since, plan::checksum(s.sql))),
            )
            .collect();
        let expected: Vec<(String, i32, String)> = PINS
            .iter()
            .map(|(n, v, c)| ((*n).to_owned(), *v, (*c).to_owned()))
            .collect();
        assert_eq!(pins, expected);
    }

    const PINS: &[(&str, i32, &str)] = &[
        ("baseline", 1, "fd04bb8e630fc4e1"),
        ("queue_control", 2, "1e8f462e87afda1f"),
        ("schedules", 3, "0f9e2f51dad6104d"),
        ("limits", 4, "741d36155d7f8cb1"),
        ("wal_slots", 5, "5637b22ed13b57b7"),
        ("limited_claim", 6, "966bffad689177e8"),
        ("leases", 7, "a026b8ec79bb7ea4"),
        ("trigger_feed_names", 8, "32df161ee6d97a3d"),
        ("wal_snapshots", 9, "f8e6f4522fe080fc"),
        ("durable_reads", 10, "7f883446091b8ab4"),
        ("durable", 10, "ec2932751f91b3ba"),
        ("queue", 2, "882b1b8a4a6c6a3f"),
        ("changes", 8, "fd9ad54b627d3d1a"),
        ("limits", 6, "4ebfd6336af563b4"),
    ];
}
