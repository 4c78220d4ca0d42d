//! What an installer may do to a database, decided from what the database
//! records and what this build carries. Pure: no server needed to test it.
//!
//! The rule (also in the module docs of [`crate::schema`]):
//! * migrations are append-only and never edited (their checksum is
//!   recorded); each says from which schema level on a build still works
//!   against a database it was applied to (`compatible_with`);
//! * function scripts carry the level their content was introduced at
//!   (`since`); a build re-applies a script only when the database holds an
//!   older level of it;
//! * a build never writes to a database that is ahead of it (a newer
//!   migration is recorded): it runs against it when every newer migration
//!   says it stays compatible with this build's level, and refuses otherwise.

use std::fmt;

/// A numbered migration: tables, indexes and data, applied once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
    /// The lowest schema level of a build that still works once this
    /// migration is applied (its own version when it breaks older builds).
    pub compatible_with: i32,
}

/// A script of functions, re-applied when a newer build changes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Script {
    pub name: &'static str,
    pub sql: &'static str,
    /// The migration level at which this content was introduced.
    pub since: i32,
}

/// What a build carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Catalog {
    pub migrations: &'static [Migration],
    pub scripts: &'static [Script],
}

impl Catalog {
    /// This build's schema level: its last migration.
    pub fn level(&self) -> i32 {
        self.migrations.last().map_or(0, |m| m.version)
    }
}

/// The checksum recorded for a migration or script: FNV-1a 64 of its text
/// before the schema name is filled in, as 16 hex digits.
pub(crate) fn checksum(sql: &str) -> String {
    format!("{:016x}", super::fnv1a64(sql.as_bytes()))
}

/// A migration as the database records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordedMigration {
    pub version: i32,
    pub name: String,
    pub checksum: String,
    pub compatible_with: i32,
}

/// A script as the database records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordedScript {
    pub name: String,
    pub checksum: String,
    pub level: i32,
}

/// What the database records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// The schema holds a 0.2 `schema_version` table and no migration table.
    pub legacy: bool,
    pub migrations: Vec<RecordedMigration>,
    pub scripts: Vec<RecordedScript>,
}

impl Recorded {
    /// The highest migration applied (0: none).
    pub fn version(&self) -> i32 {
        self.migrations.iter().map(|m| m.version).max().unwrap_or(0)
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to apply.
    Current,
    /// Migrations (indexes into the catalog) and scripts to apply, in order.
    Pending {
        migrations: Vec<usize>,
        scripts: Vec<usize>,
    },
    /// The database is at a newer level that says it works with this build:
    /// use it, write nothing.
    Ahead { version: i32 },
}

/// Why a build must not use the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// A 0.2 schema (`schema_version`), from before the migration history.
    Legacy,
    /// A migration this build knows was recorded with other contents.
    EditedMigration { version: i32, name: String },
    /// A migration at or below this build's level that this build does not know.
    UnknownMigration { version: i32, name: String },
    /// A newer migration that needs a newer build.
    Incompatible {
        version: i32,
        name: String,
        needs: i32,
        ours: i32,
    },
    /// A script recorded at this build's level with other contents.
    EditedScript { name: String, level: i32 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Legacy => write!(
                f,
                "it was installed by pg-pubsub 0.2 (a schema_version table), before the 0.3 \
                 migration history; drain it and drop it (DROP SCHEMA .. CASCADE), or use \
                 another schema"
            ),
            Problem::EditedMigration { version, name } => write!(
                f,
                "migration {version} ({name}) was recorded with a different checksum than this \
                 build's: one of them was edited after it was applied"
            ),
            Problem::UnknownMigration { version, name } => write!(
                f,
                "migration {version} ({name}) is recorded but unknown to this build"
            ),
            Problem::Incompatible {
                version,
                name,
                needs,
                ours,
            } => write!(
                f,
                "migration {version} ({name}) needs a pg-pubsub with schema level {needs} or \
                 newer; this build is at level {ours}"
            ),
            Problem::EditedScript { name, level } => write!(
                f,
                "functions script {name} was recorded at level {level} with a different checksum \
                 than this build's: a script changed without a new migration"
            ),
        }
    }
}

/// Decides what `catalog` may do to a database that records `recorded`.
pub(crate) fn plan(catalog: &Catalog, recorded: &Recorded) -> Result<Verdict, Problem> {
    if recorded.legacy {
        return Err(Problem::Legacy);
    }
    let ours = catalog.level();
    for r in &recorded.migrations {
        match catalog.migrations.iter().find(|m| m.version == r.version) {
            Some(m) if checksum(m.sql) != r.checksum => {
                return Err(Problem::EditedMigration {
                    version: r.version,
                    name: r.name.clone(),
                })
            }
            Some(_) => {}
            None if r.version <= ours => {
                return Err(Problem::UnknownMigration {
                    version: r.version,
                    name: r.name.clone(),
                })
            }
            None if r.compatible_with > ours => {
                return Err(Problem::Incompatible {
                    version: r.version,
                    name: r.name.clone(),
                    needs: r.compatible_with,
                    ours,
                })
            }
            None => {}
        }
    }
    let theirs = recorded.version();
    if theirs > ours {
        return Ok(Verdict::Ahead { version: theirs });
    }
    let migrations: Vec<usize> = catalog
        .migrations
        .iter()
        .enumerate()
        .filter(|(_, m)| !recorded.migrations.iter().any(|r| r.version == m.version))
        .map(|(i, _)| i)
        .collect();
    let mut scripts = Vec::new();
    for (i, s) in catalog.scripts.iter().enumerate() {
        match recorded.scripts.iter().find(|r| r.name == s.name) {
            None => scripts.push(i),
            Some(r) if r.level < s.since => scripts.push(i),
            Some(r) if r.level == s.since && r.checksum != checksum(s.sql) => {
                return Err(Problem::EditedScript {
                    name: r.name.clone(),
                    level: r.level,
                })
            }
            // Same content, or recorded by a newer build's content: leave it.
            Some(_) => {}
        }
    }
    if migrations.is_empty() && scripts.is_empty() {
        Ok(Verdict::Current)
    } else {
        Ok(Verdict::Pending {
            migrations,
            scripts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M1: Migration = Migration {
        version: 1,
        name: "baseline",
        sql: "create table a();",
        compatible_with: 1,
    };
    /// Adds a column older builds ignore.
    const M2: Migration = Migration {
        version: 2,
        name: "add_column",
        sql: "alter table a add column b int;",
        compatible_with: 1,
    };
    /// Breaks builds below level 3.
    const M3: Migration = Migration {
        version: 3,
        name: "rename",
        sql: "alter table a rename b to c;",
        compatible_with: 3,
    };
    const F1: Script = Script {
        name: "durable",
        sql: "create function f() v1",
        since: 1,
    };
    const F2: Script = Script {
        name: "durable",
        sql: "create function f() v2",
        since: 2,
    };

    const OLD: Catalog = Catalog {
        migrations: &[M1],
        scripts: &[F1],
    };
    const NEW: Catalog = Catalog {
        migrations: &[M1, M2],
        scripts: &[F2],
    };
    const NEWER: Catalog = Catalog {
        migrations: &[M1, M2, M3],
        scripts: &[F2],
    };

    /// What a database records after `catalog` installed everything.
    fn installed_by(catalog: &Catalog) -> Recorded {
        Recorded {
            legacy: false,
            migrations: catalog
                .migrations
                .iter()
                .map(|m| RecordedMigration {
                    version: m.version,
                    name: m.name.into(),
                    checksum: checksum(m.sql),
                    compatible_with: m.compatible_with,
                })
                .collect(),
            scripts: catalog
                .scripts
                .iter()
                .map(|s| RecordedScript {
                    name: s.name.into(),
                    checksum: checksum(s.sql),
                    level: s.since,
                })
                .collect(),
        }
    }

    #[test]
    fn an_empty_database_gets_everything() {
        let verdict = plan(&NEW, &Recorded::default()).unwrap();
        assert_eq!(
            verdict,
            Verdict::Pending {
                migrations: vec![0, 1],
                scripts: vec![0]
            }
        );
        assert_eq!(plan(&NEW, &installed_by(&NEW)).unwrap(), Verdict::Current);
    }

    #[test]
    fn an_upgrade_applies_only_what_is_missing() {
        let verdict = plan(&NEW, &installed_by(&OLD)).unwrap();
        assert_eq!(
            verdict,
            Verdict::Pending {
                migrations: vec![1],
                scripts: vec![0]
            }
        );
    }

    #[test]
    fn an_older_build_runs_on_a_compatible_newer_schema_and_writes_nothing() {
        assert_eq!(
            plan(&OLD, &installed_by(&NEW)).unwrap(),
            Verdict::Ahead { version: 2 }
        );
    }

    #[test]
    fn an_older_build_refuses_an_incompatible_newer_schema() {
        let err = plan(&NEW, &installed_by(&NEWER)).unwrap_err();
        assert_eq!(
            err,
            Problem::Incompatible {
                version: 3,
                name: "rename".into(),
                needs: 3,
                ours: 2
            }
        );
        assert!(err.to_string().contains("level 3"), "{err}");
        assert!(matches!(
            plan(&OLD, &installed_by(&NEWER)),
            Err(Problem::Incompatible { .. })
        ));
    }

    #[test]
    fn edited_or_unknown_history_is_refused() {
        let mut edited = installed_by(&NEW);
        edited.migrations[1].checksum = "0".repeat(16);
        assert!(matches!(
            plan(&NEW, &edited),
            Err(Problem::EditedMigration { version: 2, .. })
        ));
        let mut unknown = installed_by(&OLD);
        unknown.migrations.push(RecordedMigration {
            version: 2,
            name: "someone_elses".into(),
            checksum: "x".into(),
            compatible_with: 1,
        });
        assert!(matches!(
            plan(&NEW, &unknown),
            Err(Problem::EditedMigration { version: 2, .. })
        ));
        let mut gap = installed_by(&OLD);
        gap.migrations[0].version = 0;
        assert!(matches!(
            plan(&OLD, &gap),
            Err(Problem::UnknownMigration { version: 0, .. })
        ));
        let mut script = installed_by(&NEW);
        script.scripts[0].checksum = "edited".into();
        assert!(matches!(
            plan(&NEW, &script),
            Err(Problem::EditedScript { level: 2, .. })
        ));
        let legacy = Recorded {
            legacy: true,
            ..Recorded::default()
        };
        assert_eq!(plan(&NEW, &legacy), Err(Problem::Legacy));
    }

    #[test]
    fn a_script_from_a_newer_build_is_left_alone() {
        // Same level as ours, but the newer build recorded a newer script
        // level: we are at level 2 (NEW), the database's script says 3.
        let mut db = installed_by(&NEW);
        db.scripts[0].level = 3;
        db.scripts[0].checksum = "newer".into();
        assert_eq!(plan(&NEW, &db).unwrap(), Verdict::Current);
    }
}
