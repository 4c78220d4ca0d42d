//! Reading what a database records, applying migrations and scripts, and the
//! printable script.

use tokio::sync::OnceCell;
use tokio_postgres::GenericClient;

use super::plan::{
    self, checksum, Catalog, Problem, Recorded, RecordedMigration, RecordedScript, Verdict,
};
use super::{SchemaName, CATALOG, INSTALL_LOCK_KEY};
use crate::client::PgPubSub;
use crate::error::{Error, Origin, Result};

/// The bookkeeping tables. Their shape is frozen: every build, older or
/// newer, reads them.
const BOOKKEEPING: &str = "
CREATE SCHEMA IF NOT EXISTS @S@;
CREATE TABLE IF NOT EXISTS @S@.schema_migrations (
    version         int         PRIMARY KEY,
    name            text        NOT NULL,
    checksum        text        NOT NULL,
    compatible_with int         NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS @S@.schema_scripts (
    name       text        PRIMARY KEY,
    checksum   text        NOT NULL,
    level      int         NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
";

/// Where a database stands against this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchemaState {
    /// Nothing is installed in the schema.
    NotInstalled,
    /// Migrations or function scripts of this build are not applied yet.
    Pending,
    /// Everything this build carries is applied.
    Current,
    /// A newer build migrated the schema, and every newer migration says it
    /// stays compatible with this build: it runs, and applies nothing.
    AheadCompatible,
}

/// A migration, as listed by [`MigrationStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    /// Its number.
    pub version: i32,
    /// Its name (the file name without number and extension).
    pub name: String,
}

/// What [`Migrator::status`] found (and what [`Migrator::up`] left).
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    /// The schema.
    pub schema: SchemaName,
    /// Where it stands.
    pub state: SchemaState,
    /// The highest migration the database records (0: none).
    pub database_version: i32,
    /// The highest migration this build carries.
    pub build_version: i32,
    /// Migrations of this build the database lacks, in order.
    pub pending_migrations: Vec<MigrationInfo>,
    /// Function scripts (`durable`, `queue`, `changes`) to (re-)apply.
    pub pending_scripts: Vec<String>,
}

/// Migrates one schema: status, apply, print. Made by
/// [`PgPubSub::migrator`]; [`PgPubSub::migrate`] is `migrator(default).up()`.
#[derive(Debug, Clone)]
pub struct Migrator {
    pubsub: PgPubSub,
    schema: SchemaName,
}

impl PgPubSub {
    /// Applies every migration and function script this build carries to
    /// the default schema (`pgpubsub`) that the database lacks, and returns
    /// where it stands. Safe from several processes at once. For teams that
    /// forbid DDL at run time: call this (or `pg-pubsub migrate up`) from a
    /// deploy step and turn lazy installs off with
    /// [`Builder::auto_migrate`](crate::Builder::auto_migrate).
    pub async fn migrate(&self) -> Result<MigrationStatus> {
        self.migrator(SchemaName::default()).up().await
    }

    /// A [`Migrator`] for `schema`.
    pub fn migrator(&self, schema: SchemaName) -> Migrator {
        Migrator {
            pubsub: self.clone(),
            schema,
        }
    }
}

impl Migrator {
    /// The schema.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Reads where the schema stands; changes nothing. An edited, unknown
    /// or incompatible newer migration is an [`ErrorKind::Schema`](crate::ErrorKind::Schema) error.
    pub async fn status(&self) -> Result<MigrationStatus> {
        let schema = self.schema.clone();
        self.pubsub
            .exec()
            .run_with("reading the schema's migrations", |client| async move {
                let recorded = read_recorded(&***client, &schema).await?;
                status_of(&schema, &recorded)
            })
            .await
    }

    /// Applies what [`status`](Self::status) lists as pending, in one
    /// transaction under the install lock, and returns the new status.
    pub async fn up(&self) -> Result<MigrationStatus> {
        let schema = self.schema.clone();
        self.pubsub
            .exec()
            .run_with("migrating the schema", |mut client| async move {
                apply(&mut client, &schema, &CATALOG).await?;
                let recorded = read_recorded(&***client, &schema).await?;
                status_of(&schema, &recorded)
            })
            .await
    }

    /// The whole installation script for a fresh database, for DBAs to read
    /// or run with `psql -f` (what `pg-pubsub migrate print` prints). It
    /// refuses to run on a schema a newer build migrated.
    pub fn script(&self) -> String {
        script(&self.schema, &CATALOG)
    }
}

fn status_of(schema: &SchemaName, recorded: &Recorded) -> Result<MigrationStatus> {
    let verdict = plan::plan(&CATALOG, recorded).map_err(|p| problem(schema, p))?;
    let (state, migrations, scripts) = match verdict {
        Verdict::Current => (SchemaState::Current, vec![], vec![]),
        Verdict::Ahead { .. } => (SchemaState::AheadCompatible, vec![], vec![]),
        Verdict::Pending {
            migrations,
            scripts,
        } => {
            let state = if recorded.migrations.is_empty() {
                SchemaState::NotInstalled
            } else {
                SchemaState::Pending
            };
            (state, migrations, scripts)
        }
    };
    Ok(MigrationStatus {
        schema: schema.clone(),
        state,
        database_version: recorded.version(),
        build_version: CATALOG.level(),
        pending_migrations: migrations
            .iter()
            .map(|&i| MigrationInfo {
                version: CATALOG.migrations[i].version,
                name: CATALOG.migrations[i].name.to_owned(),
            })
            .collect(),
        pending_scripts: scripts
            .iter()
            .map(|&i| CATALOG.scripts[i].name.to_owned())
            .collect(),
    })
}

fn problem(schema: &SchemaName, p: Problem) -> Error {
    Error::new(
        Origin::Schema,
        format!("schema {} cannot be used: {p}", schema.as_str()),
    )
}

/// Fills in the placeholders of a script.
pub(crate) fn render(script: &str, schema: &SchemaName) -> String {
    script
        .replace("@LOCK@", &INSTALL_LOCK_KEY.to_string())
        .replace("@WAKE@", &schema.wake_channel())
        .replace("@JOBS@", &schema.jobs_channel())
        .replace("@S@", schema.as_str())
}

/// What the database records; empty when nothing is installed.
async fn read_recorded<C: GenericClient + Sync>(
    client: &C,
    schema: &SchemaName,
) -> Result<Recorded> {
    let s = schema.as_str();
    let err = |e| Error::pg(Origin::Schema, "reading the schema's migrations", e);
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL",
            &[
                &format!("{s}.schema_migrations"),
                &format!("{s}.schema_version"),
            ],
        )
        .await
        .map_err(err)?;
    let (has_migrations, has_legacy): (bool, bool) = (row.get(0), row.get(1));
    if !has_migrations {
        return Ok(Recorded {
            legacy: has_legacy,
            ..Recorded::default()
        });
    }
    let migrations = client
        .query(
            &format!(
                "SELECT version, name, checksum, compatible_with FROM {s}.schema_migrations \
                 ORDER BY version"
            ),
            &[],
        )
        .await
        .map_err(err)?
        .iter()
        .map(|r| RecordedMigration {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
            compatible_with: r.get(3),
        })
        .collect();
    let scripts = client
        .query(
            &format!("SELECT name, checksum, level FROM {s}.schema_scripts ORDER BY name"),
            &[],
        )
        .await
        .map_err(err)?
        .iter()
        .map(|r| RecordedScript {
            name: r.get(0),
            checksum: r.get(1),
            level: r.get(2),
        })
        .collect();
    Ok(Recorded {
        legacy: false,
        migrations,
        scripts,
    })
}

/// [`read_recorded`] in a transaction of its own: behind a pooler in
/// transaction mode, the statements it prepares and runs must stay on one
/// server connection.
async fn read_alone(client: &mut tokio_postgres::Client, schema: &SchemaName) -> Result<Recorded> {
    let err = |e| Error::pg(Origin::Schema, "reading the schema's migrations", e);
    let tx = client.transaction().await.map_err(err)?;
    let recorded = read_recorded(&tx, schema).await?;
    tx.commit().await.map_err(err)?;
    Ok(recorded)
}

/// Applies, in one transaction under the install lock, what `catalog` may.
/// Returns whether anything was applied.
async fn apply(
    client: &mut tokio_postgres::Client,
    schema: &SchemaName,
    catalog: &Catalog,
) -> Result<bool> {
    let err =
        |what: String| move |e| Error::pg(Origin::Schema, &format!("{what} in schema {schema}"), e);
    // Without DDL rights a current schema must still be usable: look first,
    // outside the lock.
    let before = read_alone(client, schema).await?;
    if !matches!(
        plan::plan(catalog, &before).map_err(|p| problem(schema, p))?,
        Verdict::Pending { .. }
    ) {
        return Ok(false);
    }
    let tx = client
        .transaction()
        .await
        .map_err(err("starting the migration".into()))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSTALL_LOCK_KEY])
        .await
        .map_err(err("taking the install lock".into()))?;
    tx.batch_execute(&render(BOOKKEEPING, schema))
        .await
        .map_err(err("creating the migration tables".into()))?;
    // Another process may have migrated while we waited for the lock.
    let recorded = read_recorded(&tx, schema).await?;
    let Verdict::Pending {
        migrations,
        scripts,
    } = plan::plan(catalog, &recorded).map_err(|p| problem(schema, p))?
    else {
        return Ok(false);
    };
    let record_migration = format!(
        "INSERT INTO {}.schema_migrations (version, name, checksum, compatible_with) \
         VALUES ($1, $2, $3, $4)",
        schema.as_str()
    );
    for m in migrations.iter().map(|&i| &catalog.migrations[i]) {
        let what = format!("applying migration {} ({})", m.version, m.name);
        tx.batch_execute(&render(m.sql, schema))
            .await
            .map_err(err(what.clone()))?;
        tx.execute(
            &record_migration,
            &[&m.version, &m.name, &checksum(m.sql), &m.compatible_with],
        )
        .await
        .map_err(err(what))?;
    }
    let record_script = format!(
        "INSERT INTO {}.schema_scripts AS s (name, checksum, level) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, \
         level = excluded.level, applied_at = now()",
        schema.as_str()
    );
    for s in scripts.iter().map(|&i| &catalog.scripts[i]) {
        let what = format!("applying the {} functions", s.name);
        tx.batch_execute(&render(s.sql, schema))
            .await
            .map_err(err(what.clone()))?;
        tx.execute(&record_script, &[&s.name, &checksum(s.sql), &s.since])
            .await
            .map_err(err(what))?;
    }
    tx.commit()
        .await
        .map_err(err("committing the migration".into()))?;
    tracing::info!(
        schema = schema.as_str(),
        migrations = migrations.len(),
        scripts = scripts.len(),
        "pg-pubsub: schema migrated"
    );
    Ok(true)
}

/// The fresh-install script of `catalog`.
fn script(schema: &SchemaName, catalog: &Catalog) -> String {
    let s = schema.as_str();
    let level = catalog.level();
    let mut out = format!(
        "-- pg-pubsub schema {s}, level {level}: every migration and function script.\n\
         -- Generated by `pg-pubsub migrate print`; run with psql -f. Refuses a schema a\n\
         -- newer pg-pubsub migrated.\n\
         BEGIN;\nSELECT pg_advisory_xact_lock({INSTALL_LOCK_KEY});\n"
    );
    out.push_str(&format!(
        "DO $guard$\nBEGIN\n    IF to_regclass('{s}.schema_migrations') IS NOT NULL THEN\n        \
         IF (SELECT max(version) FROM {s}.schema_migrations) > {level} THEN\n            \
         RAISE EXCEPTION 'schema {s} was migrated by a newer pg-pubsub (level > {level})';\n        \
         END IF;\n    ELSIF to_regclass('{s}.schema_version') IS NOT NULL THEN\n        \
         RAISE EXCEPTION 'schema {s} was installed by pg-pubsub 0.2; drop it first';\n    \
         END IF;\nEND $guard$;\n"
    ));
    out.push_str(&render(BOOKKEEPING, schema));
    for m in catalog.migrations {
        out.push_str(&format!(
            "\n-- migration {} ({})\n{}\nINSERT INTO {s}.schema_migrations \
             (version, name, checksum, compatible_with) VALUES ({}, '{}', '{}', {}) \
             ON CONFLICT DO NOTHING;\n",
            m.version,
            m.name,
            render(m.sql, schema),
            m.version,
            m.name,
            checksum(m.sql),
            m.compatible_with
        ));
    }
    for f in catalog.scripts {
        out.push_str(&format!(
            "\n-- functions: {}\n{}\nINSERT INTO {s}.schema_scripts (name, checksum, level) \
             VALUES ('{}', '{}', {}) ON CONFLICT (name) DO UPDATE SET \
             checksum = excluded.checksum, level = excluded.level, applied_at = now();\n",
            f.name,
            render(f.sql, schema),
            f.name,
            checksum(f.sql),
            f.since
        ));
    }
    out.push_str("COMMIT;\n");
    out
}

/// The script [`Migrator::script`] returns for `schema`.
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
/// `messages`.) A publish-only role needs `USAGE` on the schema and
/// `EXECUTE` on `publish(text, text)` and `publish_many(text, text[])`,
/// nothing else: both run as the schema's owner (`SECURITY DEFINER`), so
/// such a role cannot `INSERT` rows with an `xid` or position of its
/// choosing. (The Rust [`Durable::publish`](crate::durable::Durable::publish)
/// inserts directly, for speed: it needs the application grants.)
pub fn schema_sql(schema: &SchemaName) -> String {
    script(schema, &CATALOG)
}

/// Makes `schema` usable through `pubsub` once per `done` (every clone of a
/// capability handle shares one): applies what is pending when the handle
/// may migrate, else checks that nothing is.
pub(crate) async fn ensure(
    pubsub: &PgPubSub,
    schema: &SchemaName,
    done: &OnceCell<()>,
) -> Result<()> {
    let auto = pubsub.auto_migrate();
    done.get_or_try_init(|| async {
        pubsub
            .exec()
            .run_with("installing the schema", |mut client| async move {
                if auto {
                    match apply(&mut client, schema, &CATALOG).await {
                        // Two first installs at once: `CREATE SCHEMA IF NOT
                        // EXISTS` can still collide on the catalog (the
                        // waiter's catalog snapshot predates the other's
                        // commit). The other one has committed now: look again.
                        Err(e)
                            if e.code()
                                == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                        {
                            apply(&mut client, schema, &CATALOG).await.map(drop)
                        }
                        res => res.map(drop),
                    }
                } else {
                    let recorded = read_alone(&mut client, schema).await?;
                    let status = status_of(schema, &recorded)?;
                    match status.state {
                        SchemaState::Current | SchemaState::AheadCompatible => Ok(()),
                        SchemaState::NotInstalled | SchemaState::Pending => Err(Error::new(
                            Origin::Schema,
                            format!(
                                "schema {schema} is at level {} and this build needs level {} \
                                 (migrations pending: {}; scripts: {}); automatic migration is \
                                 off: run `pg-pubsub migrate up` or PgPubSub::migrate()",
                                status.database_version,
                                status.build_version,
                                status.pending_migrations.len(),
                                status.pending_scripts.join(", ")
                            ),
                        )),
                    }
                }
            })
            .await
    })
    .await
    .map(drop)
}
