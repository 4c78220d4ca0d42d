//! The schema installer against a real server: lazy and explicit
//! migration, the printable script, and the rolling-deploy rule (a database
//! migrated by a newer build, simulated by recording its migration).

mod common;

use common::*;
use pg_pubsub::schema::{SchemaName, SchemaState, SCHEMA_VERSION};
use pg_pubsub::ErrorKind;

/// A schema name no other test uses.
fn fresh_schema() -> SchemaName {
    SchemaName::new(&channel("sch")).expect("valid schema name")
}

/// Records, as a newer build would, migration `version` with
/// `compatible_with`, and changes `publish`'s body the way that build's
/// functions script would.
async fn migrate_as_newer_build(schema: &SchemaName, version: i32, compatible_with: i32) {
    let client = raw_client().await;
    let s = schema.as_str();
    client
        .batch_execute(&format!(
            "ALTER TABLE {s}.messages ADD COLUMN IF NOT EXISTS headers jsonb;
             INSERT INTO {s}.schema_migrations (version, name, checksum, compatible_with)
                 VALUES ({version}, 'future', 'ffff', {compatible_with});
             COMMENT ON FUNCTION {s}.publish(text, text) IS 'from the newer build';"
        ))
        .await
        .expect("newer build's migration");
}

/// The newer build's `publish` was not overwritten by this one.
async fn assert_newer_functions_kept(schema: &SchemaName) {
    let comment: Option<String> = raw_client()
        .await
        .query_one(
            &format!(
                "SELECT obj_description('{}.publish(text, text)'::regprocedure)",
                schema.as_str()
            ),
            &[],
        )
        .await
        .expect("comment")
        .get(0);
    assert_eq!(comment.as_deref(), Some("from the newer build"));
}

#[tokio::test]
async fn migrate_status_up_and_status_again() {
    let ps = pubsub().await;
    let schema = fresh_schema();
    let migrator = ps.migrator(schema.clone());
    let before = migrator.status().await.expect("status");
    assert_eq!(before.state, SchemaState::NotInstalled);
    assert_eq!(before.database_version, 0);
    assert_eq!(before.pending_migrations.len(), SCHEMA_VERSION as usize);
    assert_eq!(
        before.pending_scripts,
        ["durable", "queue", "changes", "limits"]
    );
    let after = migrator.up().await.expect("up");
    assert_eq!(after.state, SchemaState::Current);
    assert_eq!(after.database_version, SCHEMA_VERSION);
    assert!(after.pending_migrations.is_empty() && after.pending_scripts.is_empty());
    // Idempotent, and from many sessions at once.
    let ups = (0..4).map(|_| {
        let m = migrator.clone();
        async move { m.up().await }
    });
    for r in futures::future::join_all(ups).await {
        assert_eq!(r.expect("up again").state, SchemaState::Current);
    }
    ps.shutdown().await;
}

#[tokio::test]
async fn without_auto_migrate_a_handle_names_what_is_pending() {
    let ps = builder()
        .auto_migrate(false)
        .connect()
        .await
        .expect("connect");
    let schema = fresh_schema();
    let durable = ps.durable().with_schema(schema.as_str()).expect("durable");
    let err = durable.publish("c", &1).await.expect_err("not migrated");
    assert_eq!(err.kind(), ErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("pg-pubsub migrate up"), "{err}");
    ps.migrator(schema.clone()).up().await.expect("up");
    // A new handle (the old one remembers nothing failed) now works.
    let durable = ps.durable().with_schema(schema.as_str()).expect("durable");
    durable
        .publish("c", &1)
        .await
        .expect("publish after migrate");
    ps.shutdown().await;
}

#[tokio::test]
async fn the_printed_script_installs_and_reruns_and_the_installer_agrees() {
    let ps = pubsub().await;
    let schema = fresh_schema();
    let script = ps.migrator(schema.clone()).script();
    let client = raw_client().await;
    client.batch_execute(&script).await.expect("first run");
    client.batch_execute(&script).await.expect("second run");
    let status = ps.migrator(schema.clone()).status().await.expect("status");
    assert_eq!(status.state, SchemaState::Current, "{status:?}");
    ps.shutdown().await;
}

#[tokio::test]
async fn an_older_build_runs_on_a_compatible_newer_schema_and_writes_nothing() {
    let ps = pubsub().await;
    let schema = fresh_schema();
    ps.migrator(schema.clone()).up().await.expect("up");
    migrate_as_newer_build(&schema, SCHEMA_VERSION + 1, SCHEMA_VERSION).await;

    let status = ps.migrator(schema.clone()).status().await.expect("status");
    assert_eq!(status.state, SchemaState::AheadCompatible);
    assert_eq!(status.database_version, SCHEMA_VERSION + 1);
    // Restarting (a new handle) and working: publish, consume, enqueue.
    let restarted = pubsub().await;
    let durable = restarted
        .durable()
        .with_schema(schema.as_str())
        .expect("durable");
    durable.publish("c", &"hello").await.expect("publish");
    restarted
        .queue()
        .with_schema(schema.as_str())
        .expect("queue")
        .enqueue("q", &1)
        .await
        .expect("enqueue");
    restarted
        .migrator(schema.clone())
        .up()
        .await
        .expect("up is a no-op");
    // Nothing of the newer build's was overwritten.
    assert_newer_functions_kept(&schema).await;
    restarted.shutdown().await;
    ps.shutdown().await;
}

#[tokio::test]
async fn an_incompatible_newer_schema_is_a_schema_error_naming_the_version() {
    let ps = pubsub().await;
    let schema = fresh_schema();
    ps.migrator(schema.clone()).up().await.expect("up");
    let newer = SCHEMA_VERSION + 1;
    migrate_as_newer_build(&schema, newer, newer).await;

    let restarted = pubsub().await;
    let err = restarted
        .durable()
        .with_schema(schema.as_str())
        .expect("durable")
        .publish("c", &1)
        .await
        .expect_err("incompatible");
    assert_eq!(err.kind(), ErrorKind::Schema, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("migration {newer} (future)")),
        "{err}"
    );
    let err = restarted
        .migrator(schema.clone())
        .up()
        .await
        .expect_err("up refuses");
    assert_eq!(err.kind(), ErrorKind::Schema);
    assert_newer_functions_kept(&schema).await;
    restarted.shutdown().await;
    ps.shutdown().await;
}

#[tokio::test]
async fn an_edited_migration_and_a_0_2_schema_are_refused() {
    let ps = pubsub().await;
    let schema = fresh_schema();
    ps.migrator(schema.clone()).up().await.expect("up");
    let client = raw_client().await;
    client
        .batch_execute(&format!(
            "UPDATE {}.schema_migrations SET checksum = '0000000000000000' WHERE version = 1",
            schema.as_str()
        ))
        .await
        .expect("edit");
    let err = ps
        .migrator(schema.clone())
        .status()
        .await
        .expect_err("edited");
    assert_eq!(err.kind(), ErrorKind::Schema);
    assert!(err.to_string().contains("migration 1 (baseline)"), "{err}");

    let legacy = fresh_schema();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {0}; CREATE TABLE {0}.schema_version (version int PRIMARY KEY);",
            legacy.as_str()
        ))
        .await
        .expect("0.2 schema");
    let err = ps
        .durable()
        .with_schema(legacy.as_str())
        .expect("durable")
        .install()
        .await
        .expect_err("0.2");
    assert_eq!(err.kind(), ErrorKind::Schema);
    assert!(err.to_string().contains("pg-pubsub 0.2"), "{err}");
    ps.shutdown().await;
}

/// `pg-pubsub migrate print|status|up`.
#[cfg(feature = "cli")]
mod cli {
    use super::*;

    fn run(args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_pg-pubsub"))
            .args(args)
            .env("DATABASE_URL", server().url())
            .output()
            .expect("run pg-pubsub")
    }

    #[test]
    fn print_status_up() {
        let schema = fresh_schema();
        let out = run(&["migrate", "print", "--schema", "other"]);
        assert!(out.status.success());
        let script = String::from_utf8(out.stdout).expect("utf-8");
        assert!(script.contains("CREATE TABLE IF NOT EXISTS other.messages"));

        let out = run(&["migrate", "status", "--schema", schema.as_str()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.contains("not installed"), "{text}");
        assert!(text.contains("pending migration 1 (baseline)"), "{text}");

        let out = run(&["migrate", "up", "--schema", schema.as_str()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.contains(", current"), "{text}");
    }
}
