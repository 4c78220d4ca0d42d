//! The WAL change feed against a real server (`wal_level=logical`).
#![cfg(feature = "wal")]

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use pg_pubsub::changes::wal::{emit_tx, WalEvent, WalFeed, WalItem};
use pg_pubsub::changes::{Lsn, Op};
use pg_pubsub::tokio_postgres::error::SqlState;
use pg_pubsub::Text;
use pg_pubsub::{ErrorKind, PgPubSub};
use serde::Deserialize;
use serde_json::{json, Value};

/// A fresh slot name and tables `{slot}_a`, `{slot}_b`, `{slot}_c` (id
/// bigint primary key, v text).
async fn setup(tables: usize) -> (PgPubSub, String, Vec<String>) {
    let slot = channel("wal");
    let client = raw_client().await;
    let names: Vec<String> = (0..tables)
        .map(|i| format!("{slot}_{}", (b'a' + i as u8) as char))
        .collect();
    for t in &names {
        client
            .batch_execute(&format!("CREATE TABLE {t} (id bigint PRIMARY KEY, v text)"))
            .await
            .expect("create table");
    }
    (pubsub().await, slot, names)
}

async fn start(ps: &PgPubSub, slot: &str, tables: &[String]) -> WalFeed {
    let refs: Vec<&str> = tables.iter().map(String::as_str).collect();
    ps.wal_feed(slot)
        .tables(&refs)
        .messages(&format!("{slot}."))
        .start()
        .await
        .expect("start feed")
}

/// The next item that is not a Begin (commits and changes and messages).
async fn next_change(feed: &mut WalFeed) -> (Lsn, pg_pubsub::changes::ChangeEvent) {
    loop {
        match next(feed).await {
            WalItem::Change { lsn, event } => return (lsn, event),
            WalItem::Begin { .. } | WalItem::Commit { .. } => {}
            other => panic!("expected a change, got {other:?}"),
        }
    }
}

/// Items up to and including the next commit; returns (changes, commit end).
async fn next_tx(feed: &mut WalFeed) -> (Vec<pg_pubsub::changes::ChangeEvent>, Lsn) {
    match next(feed).await {
        WalItem::Begin { .. } => {}
        other => panic!("expected a begin, got {other:?}"),
    }
    let mut changes = Vec::new();
    loop {
        match next(feed).await {
            WalItem::Change { event, .. } => changes.push(event),
            WalItem::Commit { end_lsn, .. } => return (changes, end_lsn),
            other => panic!("expected a change or commit, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn changes_on_three_tables_arrive_once_in_commit_order() {
    let (ps, slot, t) = setup(3).await;
    let mut feed = start(&ps, &slot, &t).await;
    let client = raw_client().await;
    let (a, b, c) = (&t[0], &t[1], &t[2]);
    for sql in [
        format!("BEGIN; INSERT INTO {a} VALUES (1, 'x'); INSERT INTO {b} VALUES (1, 'y'); COMMIT"),
        format!("UPDATE {a} SET v = 'x2' WHERE id = 1"),
        format!("BEGIN; DELETE FROM {b} WHERE id = 1; INSERT INTO {c} VALUES (7, NULL); COMMIT"),
        format!("TRUNCATE {a}, {c}"),
    ] {
        client.batch_execute(&sql).await.expect("workload");
    }

    let (tx1, end1) = next_tx(&mut feed).await;
    assert_eq!(tx1.len(), 2);
    assert_eq!(
        (tx1[0].op, tx1[0].table.as_str()),
        (Op::Insert, t[0].as_str())
    );
    assert_eq!(tx1[0].new, Some(json!({"id": 1, "v": "x"})));
    assert_eq!(tx1[1].table, t[1]);
    assert!(tx1[0].xid.is_some() && tx1[0].committed_at.is_some());

    let (tx2, end2) = next_tx(&mut feed).await;
    assert!(end2 > end1);
    assert_eq!(tx2[0].op, Op::Update);
    assert_eq!(tx2[0].new, Some(json!({"id": 1, "v": "x2"})));
    assert_eq!(tx2[0].old, None, "REPLICA IDENTITY DEFAULT, key unchanged");

    let (tx3, _) = next_tx(&mut feed).await;
    assert_eq!(tx3[0].op, Op::Delete);
    assert_eq!(tx3[0].old, Some(json!({"id": 1})), "key columns only");
    assert_eq!(tx3[1].new, Some(json!({"id": 7, "v": null})));

    let (tx4, end4) = next_tx(&mut feed).await;
    let truncated: HashSet<_> = tx4.iter().map(|e| (e.op, e.table.clone())).collect();
    assert_eq!(
        truncated,
        HashSet::from([(Op::Truncate, t[0].clone()), (Op::Truncate, t[2].clone())])
    );
    feed.ack(end4);
    feed.close().await.expect("close");

    // Everything was acked: a new feed on the slot has nothing old.
    let mut feed = start(&ps, &slot, &t).await;
    client
        .execute(&format!("INSERT INTO {} VALUES (99, 'late')", t[1]), &[])
        .await
        .expect("insert");
    let (_, ev) = next_change(&mut feed).await;
    assert_eq!(ev.new, Some(json!({"id": 99, "v": "late"})));
    drop(feed);
    drop_slot_when_free(&ps, &slot).await;
}

#[tokio::test]
async fn interleaved_transactions_arrive_in_commit_order() {
    let (ps, slot, t) = setup(1).await;
    let mut feed = start(&ps, &slot, &t).await;
    let first = raw_client().await;
    let second = raw_client().await;
    first.batch_execute("BEGIN").await.expect("begin");
    first
        .execute(
            &format!("INSERT INTO {} VALUES (1, 'started first')", t[0]),
            &[],
        )
        .await
        .expect("insert");
    second
        .execute(
            &format!("INSERT INTO {} VALUES (2, 'committed first')", t[0]),
            &[],
        )
        .await
        .expect("insert");
    first.batch_execute("COMMIT").await.expect("commit");

    let (a, _) = next_tx(&mut feed).await;
    let (b, _) = next_tx(&mut feed).await;
    assert_eq!(a[0].new.as_ref().map(|r| r["id"].clone()), Some(json!(2)));
    assert_eq!(b[0].new.as_ref().map(|r| r["id"].clone()), Some(json!(1)));
    drop(feed);
    drop_slot_when_free(&ps, &slot).await;
}

#[tokio::test]
async fn a_100k_row_transaction_arrives_whole() {
    let (ps, slot, t) = setup(1).await;
    let mut feed = start(&ps, &slot, &t).await;
    raw_client()
        .await
        .execute(
            &format!(
                "INSERT INTO {} SELECT g, 'row ' || g FROM generate_series(1, 100000) g",
                t[0]
            ),
            &[],
        )
        .await
        .expect("insert");
    let (rows, end) = next_tx(&mut feed).await;
    assert_eq!(rows.len(), 100_000);
    let ids: Vec<i64> = rows
        .iter()
        .map(|e| e.new.as_ref().and_then(|r| r["id"].as_i64()).expect("id"))
        .collect();
    assert_eq!(ids, (1..=100_000).collect::<Vec<_>>());
    feed.ack(end);
    feed.close().await.expect("close");
    drop_slot_when_free(&ps, &slot).await;
}

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Typed {
    id: i64,
    n: Option<f64>,
    at: Option<String>,
    j: Option<Value>,
    jb: Option<Value>,
    ints: Option<Vec<Option<i32>>>,
    texts: Option<Vec<String>>,
    b: Option<String>,
    f: Option<f64>,
    ok: Option<bool>,
    #[serde(default)]
    big: Option<String>,
}

#[tokio::test]
async fn type_matrix_decodes_into_serde_types() {
    let slot = channel("wal_types");
    let table = format!("{slot}_t");
    let client = raw_client().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, n numeric, at timestamptz, j json,
               jb jsonb, ints int[], texts text[], b bytea, f float8, ok boolean, big text);
             ALTER TABLE {table} ALTER big SET STORAGE EXTERNAL;"
        ))
        .await
        .expect("create");
    let ps = pubsub().await;
    let mut feed: WalFeed<Typed> = ps
        .wal_feed(&slot)
        .tables(&[&table])
        .start()
        .await
        .expect("start");
    let big = "x".repeat(100_000);
    client
        .execute(
            &format!(
                "INSERT INTO {table} VALUES (1, 12.30, '2026-11-22 03:48:36.5+00', '{{\"a\": 1}}',
                   '[1, \"two\"]', '{{1,NULL,3}}', '{{\"a b\",c}}', '\\x00ff', 1.5, true, $1)"
            ),
            &[&big],
        )
        .await
        .expect("insert");
    client
        .execute(&format!("UPDATE {table} SET n = 1 WHERE id = 1"), &[])
        .await
        .expect("update");

    let (row, columns) = loop {
        if let WalItem::Change { event, .. } = next(&mut feed).await {
            break (event.new.expect("new"), event.columns.expect("columns"));
        }
    };
    let at: String = client
        .query_one(
            "SELECT to_json('2026-11-22 03:48:36.5+00'::timestamptz)::text",
            &[],
        )
        .await
        .expect("to_json")
        .get(0);
    assert_eq!(
        row,
        Typed {
            id: 1,
            n: Some(12.3),
            at: Some(at.trim_matches('"').to_owned()),
            j: Some(json!({"a": 1})),
            jb: Some(json!([1, "two"])),
            ints: Some(vec![Some(1), None, Some(3)]),
            texts: Some(vec!["a b".into(), "c".into()]),
            b: Some("\\x00ff".into()),
            f: Some(1.5),
            ok: Some(true),
            big: Some(big.clone()),
        }
    );
    let types: Vec<(&str, &str, bool)> = columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_name.as_str(), c.key))
        .collect();
    assert_eq!(types[0], ("id", "bigint", true));
    assert_eq!(types[1], ("n", "numeric", false));
    assert_eq!(types[2], ("at", "timestamp with time zone", false));
    assert_eq!(types[5], ("ints", "integer[]", false));
    // The update did not touch the TOASTed column: it is left out of `new`.
    let updated = loop {
        if let WalItem::Change { event, .. } = next(&mut feed).await {
            break event.new.expect("new");
        }
    };
    assert_eq!(updated.n, Some(1.0));
    assert_eq!(updated.big, None, "unchanged TOAST column omitted");
    drop(feed);
    drop_slot_when_free(&ps, &slot).await;
}

#[derive(Debug, PartialEq, serde::Deserialize)]
struct Address {
    street: String,
    no: i32,
    tags: Vec<String>,
}

/// One type for rows of both feeds: PostgreSQL's `to_json` shape.
#[derive(Debug, PartialEq, serde::Deserialize)]
struct Shaped {
    id: i64,
    n: f64,
    small: i16,
    flt: f32,
    ok: bool,
    at: String,
    stamp: String,
    d: String,
    t: String,
    iv: String,
    j: Value,
    js: Value,
    ints: Vec<Option<i32>>,
    grid: Vec<Vec<i32>>,
    texts: Vec<String>,
    b: String,
    u: String,
    mood: String,
    price: f64,
    span: String,
    addr: Address,
    addrs: Vec<Address>,
    moods: Vec<String>,
    nan: Value,
    nothing: Option<String>,
}

#[tokio::test]
async fn trigger_and_wal_feeds_give_one_row_shape() {
    let slot = channel("wal_shape");
    let table = format!("{slot}_t");
    let client = raw_client().await;
    client
        .batch_execute(&format!(
            "CREATE TYPE {slot}_mood AS ENUM ('calm', 'odd one');
             CREATE DOMAIN {slot}_price AS numeric(10,2) CHECK (VALUE >= 0);
             CREATE TYPE {slot}_addr AS (street text, no int, tags text[]);
             CREATE TABLE {table} (id bigint PRIMARY KEY, n numeric, small int2, flt real,
               ok bool, at timestamptz, stamp timestamp, d date, t time, iv interval,
               j jsonb, js json, ints int[], grid int[][], texts text[], b bytea, u uuid,
               mood {slot}_mood, price {slot}_price, span int4range, addr {slot}_addr,
               addrs {slot}_addr[], moods {slot}_mood[], nan numeric, nothing text);
             ALTER TABLE {table} REPLICA IDENTITY FULL;"
        ))
        .await
        .expect("create");
    let ps = pubsub().await;
    let changes = ps.changes();
    changes
        .install_change_feed(&table, &pg_pubsub::changes::FeedOptions::new())
        .await
        .expect("trigger feed");
    let mut triggered = changes
        .subscribe::<Value>(&table, "g")
        .await
        .expect("subscribe");
    let mut wal: WalFeed = ps
        .wal_feed(&slot)
        .tables(&[&table])
        .start()
        .await
        .expect("WAL feed");
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 12345678.901, -3, 0.1, true,
               '2026-11-22 03:48:36.5+05:30', '1999-12-31 23:59:59', '2026-02-28', '12:30:00',
               '1 day 02:00:00', '{{\"b\": [1, 2.50], \"a\": null}}', '{{\"x\": \"y\"}}',
               '{{1,NULL,3}}', '{{{{1,2}},{{3,4}}}}', '{{\"a b\",\"c,d\",\"e\\\\f\"}}', '\\x00ff',
               '7f1c3a58-6a4e-4c4b-9d6c-9a7e8f0b1c2d', 'odd one', 19.90, '[1,10)',
               ROW('Main \"St\", 1', 5, '{{a,\"b c\"}}'),
               ARRAY[ROW('x', 1, '{{}}')::{slot}_addr], '{{calm,\"odd one\"}}', 'NaN', NULL);
             UPDATE {table} SET n = 0.5, mood = 'calm' WHERE id = 1;
             DELETE FROM {table} WHERE id = 1;"
        ))
        .await
        .expect("write");

    let mut from_wal = Vec::new();
    while from_wal.len() < 3 {
        if let WalItem::Change { event, .. } = next(&mut wal).await {
            from_wal.push(event);
        }
    }
    let mut from_triggers = Vec::new();
    while from_triggers.len() < 3 {
        let m = next_durable(&mut triggered).await;
        m.ack();
        from_triggers.push(m.payload().clone());
    }
    for (w, t) in from_wal.iter().zip(&from_triggers) {
        assert_eq!(w.op, t.op);
        assert_eq!(w.new, t.new, "{} new: WAL then trigger", w.op);
        assert_eq!(w.old, t.old, "{} old: WAL then trigger", w.op);
        for row in [&w.new, &w.old, &t.new, &t.old].into_iter().flatten() {
            Shaped::deserialize(row).unwrap_or_else(|e| panic!("{e}: {row}"));
        }
    }
    let row = Shaped::deserialize(from_wal[0].new.as_ref().expect("new")).expect("typed");
    assert_eq!(row.n, 12345678.901);
    assert_eq!(row.grid, vec![vec![1, 2], vec![3, 4]]);
    assert_eq!(row.texts, vec!["a b", "c,d", "e\\f"]);
    assert_eq!(row.mood, "odd one");
    assert_eq!(row.price, 19.9);
    assert_eq!(row.span, "[1,10)");
    assert_eq!(
        row.addr,
        Address {
            street: "Main \"St\", 1".into(),
            no: 5,
            tags: vec!["a".into(), "b c".into()]
        }
    );
    assert_eq!(row.nan, json!("NaN"));
    assert!(
        row.at.starts_with("2026-11-2") && row.at.contains('T'),
        "{}",
        row.at
    );

    // Column types: in WAL events, and from `Changes::columns` for triggers.
    let columns = from_wal[0].columns.as_deref().expect("columns");
    let typed = |c: &pg_pubsub::changes::Column| (c.name.clone(), c.type_name.clone(), c.type_oid);
    assert_eq!(
        columns.iter().map(typed).collect::<Vec<_>>(),
        changes
            .columns(&table)
            .await
            .expect("columns")
            .iter()
            .map(typed)
            .collect::<Vec<_>>()
    );
    // `key`: the replica identity (FULL: every column) / the primary key.
    assert!(columns.iter().all(|c| c.key));
    let named: HashMap<&str, &str> = columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_name.as_str()))
        .collect();
    assert_eq!(named["mood"], format!("{slot}_mood"));
    assert_eq!(named["price"], format!("{slot}_price"));
    assert_eq!(named["addrs"], format!("{slot}_addr[]"));
    assert_eq!(named["span"], "int4range");
    drop(wal);
    drop_slot_when_free(&ps, &slot).await;
}

#[tokio::test]
async fn replica_identity_full_sends_the_old_row() {
    let (ps, slot, t) = setup(1).await;
    let client = raw_client().await;
    client
        .batch_execute(&format!(
            "ALTER TABLE {0} REPLICA IDENTITY FULL; INSERT INTO {0} VALUES (1, 'a');",
            t[0]
        ))
        .await
        .expect("setup");
    let mut feed = start(&ps, &slot, &t).await;
    client
        .execute(&format!("UPDATE {} SET v = 'b'", t[0]), &[])
        .await
        .expect("update");
    let (_, ev) = next_change(&mut feed).await;
    assert_eq!(ev.old, Some(json!({"id": 1, "v": "a"})));
    assert_eq!(ev.new, Some(json!({"id": 1, "v": "b"})));
    drop(feed);
    drop_slot_when_free(&ps, &slot).await;
}

#[tokio::test]
async fn emit_in_is_delivered_after_commit_and_never_after_rollback() {
    let (ps, slot, t) = setup(1).await;
    let mut feed = start(&ps, &slot, &t).await;
    let mut client = raw_client().await;
    let big = vec![7u8; 10 * 1024 * 1024];

    let tx = client.transaction().await.expect("tx");
    emit_tx(&tx, &format!("{slot}.rolled_back"), b"never")
        .await
        .expect("emit");
    tx.rollback().await.expect("rollback");

    let tx = client.transaction().await.expect("tx");
    emit_tx(&tx, &format!("{slot}.big"), &big)
        .await
        .expect("emit");
    emit_tx(&tx, "other.prefix", b"filtered out")
        .await
        .expect("emit");
    tx.commit().await.expect("commit");

    let mut got = Vec::new();
    let end = loop {
        match next(&mut feed).await {
            WalItem::Message(m) => got.push(m),
            WalItem::Commit { end_lsn, .. } => break end_lsn,
            WalItem::Begin { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(got.len(), 1, "only the committed message under the prefix");
    assert_eq!(got[0].prefix, format!("{slot}.big"));
    assert!(got[0].transactional);
    assert_eq!(got[0].payload.len(), big.len());
    assert!(got[0].payload.iter().all(|&b| b == 7));
    feed.ack(end);
    feed.close().await.expect("close");
    drop_slot_when_free(&ps, &slot).await;
}

#[tokio::test]
async fn a_new_feed_resumes_from_the_last_ack() {
    let (ps, slot, t) = setup(1).await;
    let mut feed = start(&ps, &slot, &t).await;
    let client = raw_client().await;
    for i in 1..=4 {
        client
            .execute(&format!("INSERT INTO {} VALUES ({i}, 'v')", t[0]), &[])
            .await
            .expect("insert");
    }
    let mut ends = Vec::new();
    for _ in 0..4 {
        ends.push(next_tx(&mut feed).await.1);
    }
    // Ack the first two only, then stop (like a restart).
    feed.ack(ends[1]);
    feed.close().await.expect("close");

    let mut feed = start(&ps, &slot, &t).await;
    let (again, _) = next_tx(&mut feed).await;
    assert_eq!(
        again[0].new.as_ref().map(|r| r["id"].clone()),
        Some(json!(3))
    );
    let (again, end) = next_tx(&mut feed).await;
    assert_eq!(
        again[0].new.as_ref().map(|r| r["id"].clone()),
        Some(json!(4))
    );
    let stats = feed.stats().await.expect("stats");
    assert!(stats.confirmed_lsn >= ends[1]);
    feed.ack(end);
    drop(feed);
    drop_slot_when_free(&ps, &slot).await;
}

#[tokio::test]
async fn reconnects_after_the_walsender_is_terminated() {
    let (ps, slot, t) = setup(1).await;
    let mut feed = start(&ps, &slot, &t).await;
    let mut events = feed.events();
    let client = raw_client().await;
    client
        .execute(&format!("INSERT INTO {} VALUES (1, 'before')", t[0]), &[])
        .await
        .expect("insert");
    let (_, end) = next_tx(&mut feed).await;
    feed.ack(end);

    let pid: i32 = client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0);
    terminate(pid).await;
    match next(&mut feed).await {
        WalItem::Error(e) => {
            assert!(e.is_connection() || e.stage() == Some(pg_pubsub::Stage::Wal))
        }
        other => panic!("expected the loss, got {other:?}"),
    }
    wait_event(
        &mut events,
        |e| matches!(e, WalEvent::Streaming { slot: s, from } if **s == *slot && *from >= end),
    )
    .await;
    client
        .execute(&format!("INSERT INTO {} VALUES (2, 'after')", t[0]), &[])
        .await
        .expect("insert");
    // The acked transaction does not come again; the new one does.
    let (rows, _) = next_tx(&mut feed).await;
    assert_eq!(
        rows[0].new.as_ref().map(|r| r["id"].clone()),
        Some(json!(2))
    );
    drop(feed);
    drop_slot_when_free(&ps, &slot).await;
}

#[tokio::test]
async fn a_role_without_replication_gets_a_clear_error() {
    let slot = channel("wal_norepl");
    let role = format!("{slot}_role");
    let admin = raw_client().await;
    for sql in [
        format!("CREATE ROLE {role} LOGIN NOREPLICATION"),
        format!("CREATE PUBLICATION {slot} FOR ALL TABLES"),
        format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    ] {
        admin.batch_execute(&sql).await.expect("setup");
    }
    // The feed records its slot in the crate's schema: installed by the
    // admin, usable by the role.
    pubsub().await.migrate().await.expect("migrate");
    for sql in [
        format!("GRANT USAGE ON SCHEMA pgpubsub TO {role}"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA pgpubsub TO {role}"),
        format!("GRANT INSERT, UPDATE ON pgpubsub.wal_slots TO {role}"),
    ] {
        admin.batch_execute(&sql).await.expect("grant");
    }
    let url = server().url().replacen("postgres@", &format!("{role}@"), 1);
    let ps = PgPubSub::connect(url.as_str()).await.expect("connect");
    let err = ps
        .wal_feed(&slot)
        .start::<Value>()
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert_eq!(err.stage(), Some(pg_pubsub::Stage::Wal), "{err}");
    assert!(err.to_string().contains("REPLICATION"), "{err}");
    let admin_ps = pubsub().await;
    assert!(admin_ps.drop_slot(&slot).await.expect("drop"));
}

#[tokio::test]
async fn heartbeats_let_a_filtered_feed_confirm_and_lag_is_reported() {
    let (ps, slot, t) = setup(2).await;
    // The feed publishes only table a; table b's writes hold WAL it never sees.
    let feed: WalFeed = ps
        .wal_feed(&slot)
        .tables(&[&t[0]])
        .heartbeat(Some(std::time::Duration::from_millis(200)))
        .ack_interval(std::time::Duration::from_millis(100))
        .lag_warning(0)
        .start()
        .await
        .expect("start");
    let mut events = feed.events();
    let client = raw_client().await;
    client
        .execute(
            &format!(
                "INSERT INTO {} SELECT g, 'x' FROM generate_series(1, 1000) g",
                t[1]
            ),
            &[],
        )
        .await
        .expect("insert");
    let after: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let after: Lsn = after.parse().expect("lsn");
    wait_event(
        &mut events,
        |e| matches!(e, WalEvent::Lag { slot: s, .. } if **s == *slot),
    )
    .await;
    // The slot's confirmed position moves past the filtered writes on its own.
    let mut events = feed.events();
    loop {
        if feed.stats().await.expect("stats").confirmed_lsn > after {
            break;
        }
        wait_event(&mut events, |e| matches!(e, WalEvent::Lag { .. })).await;
    }
    drop(feed);
    drop_slot_when_free(&ps, &slot).await;
}

/// Drops `slot` once its walsender is gone (dropping a feed ends it
/// asynchronously).
/// `PgPubSub::shutdown` stops its WAL feeds before the pool closes and
/// confirms their last ack on the slot, even one the stream had not
/// reported yet (a long ack interval).
#[tokio::test]
async fn shutdown_confirms_the_last_ack() {
    let (ps, slot, t) = setup(1).await;
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    let mut feed: WalFeed = ps
        .wal_feed(&slot)
        .tables(&refs)
        .ack_interval(std::time::Duration::from_secs(3600))
        .heartbeat(None)
        .start()
        .await
        .expect("start feed");
    let client = raw_client().await;
    for i in 1..=2 {
        client
            .execute(&format!("INSERT INTO {} VALUES ({i}, 'v')", t[0]), &[])
            .await
            .expect("insert");
    }
    let (_, first) = next_tx(&mut feed).await;
    feed.ack(first);
    ps.shutdown().await;
    let confirmed: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0);
    let confirmed: Lsn = confirmed.parse().expect("lsn");
    assert!(confirmed >= first, "confirmed {confirmed} < acked {first}");
    drop(feed);
    drop_slot_when_free(&pubsub().await, &slot).await;
}

/// Drops `slot` once nothing uses it: the stopped feed's walsender, or
/// the pooled session that moves the slot to the feed's last ack as it
/// stops (either shows as the slot's `active_pid`).
#[tokio::test]
async fn a_dropped_slot_is_forgotten_and_a_new_feed_of_its_name_starts_afresh() {
    let (ps, slot, t) = setup(1).await;
    let feed = start(&ps, &slot, &t).await;
    feed.close().await.unwrap();
    let admin = raw_client().await;
    let recorded = |admin: tokio_postgres::Client, slot: String| async move {
        admin
            .query_one(
                "SELECT count(*) FROM pgpubsub.wal_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(recorded(raw_client().await, slot.clone()).await, 1);
    drop_slot_when_free(&ps, &slot).await;
    assert_eq!(recorded(admin, slot.clone()).await, 0);
    // Deliberately dropped: not a lost slot.
    let feed = start(&ps, &slot, &t).await;
    feed.close().await.unwrap();
    drop_slot_when_free(&ps, &slot).await;
}

async fn drop_slot_when_free(ps: &PgPubSub, slot: &str) {
    let dropped = async {
        loop {
            match ps.drop_slot(slot).await {
                Ok(_) => return,
                Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                    // The server has no event for a slot's release: poll.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("drop slot: {e:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, dropped)
        .await
        .expect("the slot stayed in use");
}

#[allow(dead_code)]
#[path = "../examples/outbox_relay.rs"]
mod outbox_relay;

/// Set in a child process of `outbox_relay_two_processes_one_elected`:
/// `URL SLOT PREFIX CHANNEL`, space-separated.
const RELAY_CHILD: &str = "PG_PUBSUB_TEST_RELAY_CHILD";

/// Not a test on its own: the relay process the test below runs (twice),
/// this test binary started again with only this test selected.
#[tokio::test]
async fn outbox_relay_child() {
    let Ok(args) = std::env::var(RELAY_CHILD) else {
        return;
    };
    let a: Vec<&str> = args.split(' ').collect();
    outbox_relay::relay(a[0], a[1], a[2], a[3])
        .await
        .expect("relay");
}

#[tokio::test]
async fn outbox_relay_two_processes_one_elected_no_loss_after_sigkill() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let slot = channel("wal_relay");
    let prefix = format!("{slot}.");
    let durable_channel = channel("outbox");
    let ps = pubsub().await;
    ps.durable().install().await.expect("install");

    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let mut children = Vec::new();
    for i in 0..2 {
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"))
            .args(["outbox_relay_child", "--exact", "--nocapture"])
            .env(
                RELAY_CHILD,
                format!("{} {slot} {prefix} {durable_channel}", server().url()),
            )
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn relay");
        let out = child.stdout.take().expect("stdout");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut out = BufReader::new(out).lines();
            while let Ok(Some(line)) = out.next_line().await {
                let _ = tx.send((i, line));
            }
        });
        children.push(child);
    }
    let leader = wait_line(&mut lines, "relaying").await;

    let mut client = raw_client().await;
    let mut emit = async |range: std::ops::Range<usize>| {
        for i in range {
            let t = client.transaction().await.expect("tx");
            emit_tx(&t, &prefix, format!("m{i}").as_bytes())
                .await
                .expect("emit");
            t.commit().await.expect("commit");
        }
    };
    emit(0..100).await;
    wait_line(&mut lines, "relayed").await;
    // Kill the active relay mid-stream; the other one takes the slot over.
    send_signal(children[leader].id().expect("pid"), "-KILL");
    let next_leader = wait_line(&mut lines, "relaying").await;
    assert_ne!(next_leader, leader);
    emit(100..200).await;

    let mut sub = ps
        .durable()
        .subscribe::<Text>(&durable_channel, "check")
        .await
        .expect("subscribe");
    let mut seen = HashSet::new();
    let mut received = 0;
    while seen.len() < 200 {
        let m = next_durable(&mut sub).await;
        m.ack();
        received += 1;
        seen.insert(m.into_payload().into_string());
    }
    let want: HashSet<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, want, "every message relayed");
    eprintln!("relayed 200 messages as {received} (duplicates only after the kill)");
    for c in &mut children {
        let _ = c.kill().await;
    }
    drop_slot_when_free(&ps, &slot).await;
}

/// The index of the first relay that prints a line starting with `want`.
async fn wait_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, String)>,
    want: &str,
) -> usize {
    tokio::time::timeout(WAIT, async {
        loop {
            let (i, line) = lines.recv().await.expect("relay output");
            if line.starts_with(want) {
                return i;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no relay printed {want:?}"))
}

#[tokio::test]
async fn concurrent_workload_on_three_tables_arrives_once_in_commit_order() {
    let (ps, slot, t) = setup(3).await;
    let mut feed = start(&ps, &slot, &t).await;
    const WRITERS: i64 = 4;
    const TXS: i64 = 100;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let t = t.clone();
        writers.push(tokio::spawn(async move {
            let mut client = raw_client().await;
            for i in 0..TXS {
                let id = w * TXS + i;
                let tx = client.transaction().await.expect("tx");
                // pgbench-like: one row in each table, then an update.
                for table in &t {
                    tx.execute(&format!("INSERT INTO {table} VALUES ($1, 'new')"), &[&id])
                        .await
                        .expect("insert");
                }
                tx.execute(
                    &format!("UPDATE {} SET v = 'upd' WHERE id = $1", t[0]),
                    &[&id],
                )
                .await
                .expect("update");
                tx.commit().await.expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let mut seen = HashSet::new();
    let mut last_commit = Lsn(0);
    for _ in 0..WRITERS * TXS {
        let (changes, end) = next_tx(&mut feed).await;
        assert!(end > last_commit, "commits in order");
        last_commit = end;
        assert_eq!(changes.len(), 4, "a transaction's changes together");
        let id = changes[0].new.as_ref().expect("new")["id"].clone();
        assert!(changes
            .iter()
            .all(|c| c.new.as_ref().expect("new")["id"] == id));
        assert_eq!(changes[3].op, Op::Update);
        assert!(seen.insert(id), "each transaction once");
    }
    feed.ack(last_commit);
    feed.close().await.expect("close");
    drop_slot_when_free(&ps, &slot).await;
}
