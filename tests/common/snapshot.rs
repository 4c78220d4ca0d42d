//! For snapshot tests: a writer of random single-row changes, and a
//! replica that applies a feed's changes and reads as a consumer would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pg_pubsub::changes::Op;
use serde_json::Value;

use super::raw_client;

/// Inserts the row (id 0, `v` = "sentinel") whose change marks the end of
/// a test's writes: every change before it has been streamed once it is.
pub async fn insert_sentinel(table: &str) {
    raw_client()
        .await
        .batch_execute(&format!("INSERT INTO {table} VALUES (0, 'sentinel')"))
        .await
        .expect("sentinel");
}

/// Random single-row writes to `table` (`id` key, `v` text) until stopped:
/// updates and deletes of ids `1..=max`, inserts of new ids above it.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<HashSet<i64>>,
}

impl Writer {
    pub fn start(table: &str, max: i64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let table = table.to_owned();
        let task = tokio::spawn(async move {
            let client = raw_client().await;
            let mut touched = HashSet::new();
            let mut next_new = max;
            while !stopped.load(Ordering::Acquire) {
                let sql = match fastrand::u8(0..3) {
                    0 => {
                        let id = fastrand::i64(1..=max);
                        touched.insert(id);
                        format!("UPDATE {table} SET v = 'u' || v WHERE id = {id}")
                    }
                    1 => {
                        let id = fastrand::i64(1..=max);
                        touched.insert(id);
                        format!("DELETE FROM {table} WHERE id = {id}")
                    }
                    _ => {
                        next_new += 1;
                        touched.insert(next_new);
                        format!("INSERT INTO {table} VALUES ({next_new}, 'new')")
                    }
                };
                client.batch_execute(&sql).await.expect("write");
                // A steady trickle, not a flood: the point is interleaving.
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            touched
        });
        Writer { stop, task }
    }

    /// Stops; the ids it changed (or tried to).
    pub async fn stop(self) -> HashSet<i64> {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("the writer failed")
    }
}

/// A consumer's copy of a table (`id` key, `v` text), built from changes
/// and reads, counting the reads of each id.
#[derive(Default)]
pub struct Replica {
    pub rows: HashMap<i64, Value>,
    pub reads: HashMap<i64, usize>,
}

impl Replica {
    /// Applies a change: inserts, updates and reads as upserts.
    pub fn apply(&mut self, op: Op, old: Option<&Value>, new: Option<&Value>) {
        let id = |r: &Value| r["id"].as_i64().expect("an id");
        match op {
            Op::Insert | Op::Update | Op::Read => {
                let new = new.expect("a row");
                if let Some(old) = old {
                    self.rows.remove(&id(old));
                }
                if op == Op::Read {
                    *self.reads.entry(id(new)).or_default() += 1;
                }
                self.rows.insert(id(new), new["v"].clone());
            }
            Op::Delete => {
                self.rows.remove(&id(old.expect("a key")));
            }
            other => panic!("unexpected {other}"),
        }
    }

    /// Applies a change printed by `changes tail` (its JSON line).
    pub fn apply_json(&mut self, line: &Value) {
        let op: Op = line["op"].as_str().expect("op").parse().expect("an op");
        let row = |k: &str| Some(&line[k]).filter(|v| !v.is_null());
        self.apply(op, row("old"), row("new"));
    }

    /// Asserts that the rows of `table` whose id `keep`s are the replica's.
    pub async fn assert_is(&self, table: &str, keep: impl Fn(i64) -> bool) {
        let rows = raw_client()
            .await
            .query(&format!("SELECT id::int8, v FROM {table}"), &[])
            .await
            .expect("read the table");
        let actual: HashMap<i64, Value> = rows
            .iter()
            .map(|r| (r.get::<_, i64>(0), Value::from(r.get::<_, String>(1))))
            .filter(|(id, _)| keep(*id))
            .collect();
        let missing: Vec<_> = actual
            .keys()
            .filter(|k| !self.rows.contains_key(k))
            .collect();
        let extra: Vec<_> = self
            .rows
            .keys()
            .filter(|k| !actual.contains_key(k))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "rows missing from the replica: {missing:?}; rows it has that the table lacks: {extra:?}"
        );
        for (id, v) in &actual {
            assert_eq!(self.rows.get(id), Some(v), "row {id}");
        }
    }
}
