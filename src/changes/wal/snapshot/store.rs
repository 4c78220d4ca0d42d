//! The statements of snapshots and backfills: the table's shape, requests,
//! chunks, progress. Who runs them, and when, is `driver.rs`'s business.

use tokio_postgres::types::ToSql;

use super::super::slot::{quote_ident, setup_error};
use super::{request_payload, SNAPSHOT_PREFIX};
use crate::error::{Error, Origin, Result};
use crate::exec::Exec;
use crate::schema::SchemaName;

/// A table as a snapshot reads it: what the publication sends of it.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    /// As `regclass` prints it (quoted where needed).
    pub(crate) regclass: String,
    pub(crate) schema: String,
    pub(crate) name: String,
    /// The primary key's columns, in index order.
    pub(crate) key_columns: Vec<String>,
    key_types: Vec<String>,
    /// The published columns and their type OIDs, in table order.
    pub(crate) columns: Vec<(String, u32)>,
    /// The publication's row filter (PostgreSQL 15+), if any.
    row_filter: Option<String>,
}

impl Table {
    /// `(schema, table)` as the stream's events name it.
    pub(crate) fn stream_name(&self) -> (String, String) {
        (self.schema.clone(), self.name.clone())
    }

    /// The chunk query: each row's published columns as PostgreSQL's
    /// `to_json` has them (the feeds' row shape), then its key columns as
    /// text, of up to `limit` rows up to the end key `$1..$k`, after the
    /// key `$k+1..$2k` (or from the first row, `first`), in key order.
    pub(crate) fn chunk_sql(&self, filter: Option<&str>, first: bool, limit: usize) -> String {
        let k = self.key_columns.len();
        let mut conditions = vec![format!("({}) <= ({})", self.keys(), self.params(0))];
        if !first {
            conditions.push(format!("({}) > ({})", self.keys(), self.params(k)));
        }
        let columns: Vec<String> = self.columns.iter().map(|(c, _)| quote_ident(c)).collect();
        let inner = self.select(&columns.join(", "), &conditions, filter, "", limit);
        let keys: Vec<String> = self
            .key_columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("r.{}::text AS pgpubsub_{i}", quote_ident(c)))
            .collect();
        let order: Vec<String> = self
            .key_columns
            .iter()
            .map(|c| format!("r.{}", quote_ident(c)))
            .collect();
        format!(
            "SELECT to_json(r)::text AS pgpubsub_row, {} FROM ({inner}) AS r ORDER BY {}",
            keys.join(", "),
            order.join(", ")
        )
    }

    /// The end-key query: the key columns, as text, of the last row.
    pub(crate) fn end_sql(&self, filter: Option<&str>) -> String {
        let keys: Vec<String> = self
            .key_columns
            .iter()
            .enumerate()
            .map(|(i, c)| text(c, i))
            .collect();
        self.select(&keys.join(", "), &[], filter, " DESC", 1)
    }

    fn keys(&self) -> String {
        let keys: Vec<String> = self.key_columns.iter().map(|c| quote_ident(c)).collect();
        keys.join(", ")
    }

    /// `$n+1::text::type1, ...` for the key columns.
    fn params(&self, n: usize) -> String {
        let params: Vec<String> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", n + i + 1))
            .collect();
        params.join(", ")
    }

    /// `SELECT columns FROM table WHERE ... ORDER BY key [DESC] LIMIT n`.
    fn select(
        &self,
        columns: &str,
        conditions: &[String],
        filter: Option<&str>,
        order: &str,
        limit: usize,
    ) -> String {
        let mut conditions = conditions.to_vec();
        if let Some(f) = &self.row_filter {
            conditions.push(format!("({f})"));
        }
        if let Some(f) = filter {
            conditions.push(format!("({f})"));
        }
        let r#where = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let order: Vec<String> = self
            .key_columns
            .iter()
            .map(|c| format!("{}{order}", quote_ident(c)))
            .collect();
        format!(
            "SELECT {columns} FROM {}{where} ORDER BY {} LIMIT {limit}",
            self.regclass,
            order.join(", ")
        )
    }
}

/// A column as text, under a name of its own: `ORDER BY id` must sort by
/// the column, not by an output column `id` of type text.
fn text(column: &str, i: usize) -> String {
    format!("{}::text AS pgpubsub_{i}", quote_ident(column))
}

fn config(text: String) -> Error {
    Error::new(Origin::Config, text)
}

/// Reads the shape of `table` as `publication` sends it, refusing what a
/// snapshot cannot merge: no primary key, a replica identity that does not
/// carry it in deletes, a table the publication does not send, a key
/// column it leaves out.
pub(crate) async fn resolve(exec: &Exec, table: &str, publication: &str) -> Result<Table> {
    const STAGE: &str = "WAL snapshot: read the table";
    let sql = "SELECT c.oid::int8, c.oid::regclass::text, n.nspname::text, c.relname::text, \
                      c.relreplident::text, \
                      (SELECT array_agg(a.attname::text ORDER BY k.i) \
                         FROM unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, i) \
                         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum), \
                      (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.i) \
                         FROM unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, i) \
                         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum), \
                      pt.attnames::text[], pt.rowfilter, pt.pubname IS NOT NULL \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               LEFT JOIN pg_index ix ON ix.indrelid = c.oid AND ix.indisprimary \
               LEFT JOIN pg_publication_tables pt ON pt.pubname = $2 \
                    AND pt.schemaname = n.nspname AND pt.tablename = c.relname \
               WHERE c.oid = to_regclass($1)";
    let row = exec
        .run_with(STAGE, |client| async move {
            client
                .query_opt(sql, &[&table, &publication])
                .await
                .map_err(|e| setup_error(STAGE, e))
        })
        .await?
        .ok_or_else(|| config(format!("WAL snapshot: no table {table:?}")))?;
    let oid: i64 = row.get(0);
    let regclass: String = row.get(1);
    let keys: Option<Vec<String>> = row.get(5);
    let key_types: Option<Vec<String>> = row.get(6);
    let (Some(key_columns), Some(key_types)) = (keys, key_types) else {
        return Err(config(format!(
            "WAL snapshot: table {regclass} has no primary key: its chunks are read in key \
             order and merged with the stream by key (add a primary key)"
        )));
    };
    match row.get::<_, String>(4).as_str() {
        "d" | "f" => {}
        other => {
            return Err(config(format!(
                "WAL snapshot: table {regclass} has REPLICA IDENTITY {} : its deletes do not carry \
                 the primary key the merge needs (use DEFAULT or FULL)",
                if other == "n" { "NOTHING" } else { "USING INDEX" }
            )))
        }
    }
    if !row.get::<_, bool>(9) {
        return Err(config(format!(
            "WAL snapshot: table {regclass} is not in publication {publication:?}: the feed does \
             not stream it"
        )));
    }
    let published: Vec<String> = row.get::<_, Option<Vec<String>>>(7).unwrap_or_default();
    if let Some(k) = key_columns.iter().find(|k| !published.contains(k)) {
        return Err(config(format!(
            "WAL snapshot: publication {publication:?} leaves out key column {k:?} of {regclass}"
        )));
    }
    let columns = exec
        .run_with(STAGE, |client| async move {
            client
                .query(
                    "SELECT attname::text, atttypid::int8 FROM pg_attribute \
                     WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped \
                       AND attname::text = ANY($2::text[]) ORDER BY attnum",
                    &[&oid, &published],
                )
                .await
                .map_err(|e| setup_error(STAGE, e))
        })
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32))
        .collect();
    Ok(Table {
        regclass,
        schema: row.get(2),
        name: row.get(3),
        key_columns,
        key_types,
        columns,
        row_filter: row.get(8),
    })
}

/// A request of a slot, unfinished.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) id: i64,
    pub(crate) table: String,
    pub(crate) filter: Option<String>,
    /// The highest key to read, once the request was first served.
    pub(crate) end_key: Option<Vec<String>>,
}

/// The statements of one schema.
pub(crate) struct Sql {
    pub(crate) next: String,
    pub(crate) progress: String,
    pub(crate) done: String,
    pub(crate) emit: String,
    pub(crate) finish: String,
    pub(crate) fail: String,
    pub(crate) set_end: String,
    pub(crate) list: String,
}

impl Sql {
    pub(crate) fn new(s: &SchemaName) -> Sql {
        Sql {
            next: format!(
                "SELECT id, tbl, filter, end_key FROM {s}.wal_snapshots \
                 WHERE slot_name = $1 AND finished_at IS NULL AND error IS NULL \
                 ORDER BY id LIMIT 1"
            ),
            progress: format!(
                "SELECT done_key FROM {s}.wal_snapshots WHERE id = $1 AND finished_at IS NULL"
            ),
            done: format!(
                "UPDATE {s}.wal_snapshots SET done_key = $2, pending_key = NULL, \
                    pending_lsn = NULL \
                 WHERE id = $1 AND finished_at IS NULL"
            ),
            emit: format!(
                "UPDATE {s}.wal_snapshots SET pending_key = $2, \
                    rows_read = rows_read + $3, started_at = coalesce(started_at, now()), \
                    pending_lsn = pg_logical_emit_message(false, '{SNAPSHOT_PREFIX}', $4::text) \
                 WHERE id = $1 AND finished_at IS NULL RETURNING rows_read"
            ),
            finish: format!(
                "UPDATE {s}.wal_snapshots SET done_key = $2, pending_key = NULL, \
                    pending_lsn = NULL, started_at = coalesce(started_at, now()), \
                    finished_at = now() \
                 WHERE id = $1 AND finished_at IS NULL RETURNING rows_read"
            ),
            fail: format!("UPDATE {s}.wal_snapshots SET error = $2 WHERE id = $1"),
            set_end: format!(
                "UPDATE {s}.wal_snapshots SET end_key = $2::text[], started_at = now(), \
                    finished_at = CASE WHEN $2::text[] IS NULL THEN now() END \
                 WHERE id = $1 AND finished_at IS NULL"
            ),
            list: format!(
                "SELECT id, tbl, filter, initial, rows_read, finished_at IS NOT NULL, error \
                 FROM {s}.wal_snapshots WHERE slot_name = $1 ORDER BY id"
            ),
        }
    }
}

/// The next unfinished request of `slot`.
pub(crate) async fn next_request(exec: &Exec, sql: &Sql, slot: &str) -> Result<Option<Request>> {
    const STAGE: &str = "WAL snapshot: next request";
    let row = exec
        .run_with(STAGE, |client| async move {
            client
                .query_opt(&sql.next, &[&slot])
                .await
                .map_err(|e| setup_error(STAGE, e))
        })
        .await?;
    Ok(row.map(|r| Request {
        id: r.get(0),
        table: r.get(1),
        filter: r.get(2),
        end_key: r.get(3),
    }))
}

/// Records a request (its row and, in the same transaction, a message
/// that wakes the feed streaming `slot`); checks the table and `filter`
/// first. Its id.
pub(crate) async fn request_backfill(
    exec: &Exec,
    schema: &SchemaName,
    slot: &str,
    table: &str,
    filter: Option<&str>,
    publication: &str,
) -> Result<i64> {
    let shape = resolve(exec, table, publication).await?;
    const STAGE: &str = "WAL snapshot: request";
    let insert = format!(
        "INSERT INTO {schema}.wal_snapshots (slot_name, tbl, filter) VALUES ($1, $2, $3) \
         RETURNING id"
    );
    let regclass = shape.regclass.clone();
    exec.run_with(STAGE, |mut client| async move {
        let err = |e| setup_error(STAGE, e);
        let tx = client.transaction().await.map_err(err)?;
        if let Some(f) = filter {
            // A bad condition fails here, not in the feed.
            let check = format!("SELECT 1 FROM {regclass} WHERE ({f}) LIMIT 0");
            tx.execute(&check, &[])
                .await
                .map_err(|e| Error::pg(Origin::Config, "WAL backfill: check the condition", e))?;
        }
        let id: i64 = tx
            .query_one(&insert, &[&slot, &regclass, &filter])
            .await
            .map_err(err)?
            .get(0);
        tx.execute(
            "SELECT pg_logical_emit_message(true, $1, $2::text)",
            &[&SNAPSHOT_PREFIX, &request_payload(slot, id)],
        )
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(id)
    })
    .await
}

/// Forgets the requests of `slot` (a new slot of that name).
pub(crate) async fn forget(exec: &Exec, schema: &SchemaName, slot: &str) -> Result<()> {
    const STAGE: &str = "WAL snapshot: forget an old slot's requests";
    let sql = format!("DELETE FROM {schema}.wal_snapshots WHERE slot_name = $1");
    exec.run_with(STAGE, |client| async move {
        client
            .execute(&sql, &[&slot])
            .await
            .map_err(|e| setup_error(STAGE, e))
    })
    .await
    .map(drop)
}

/// The tables `publication` sends, as `regclass` prints them, each
/// checked as a snapshot needs (before a slot is created for nothing).
pub(crate) async fn initial_tables(exec: &Exec, publication: &str) -> Result<Vec<String>> {
    const STAGE: &str = "WAL snapshot: the publication's tables";
    let tables: Vec<String> = exec
        .run_with(STAGE, |client| async move {
            client
                .query(
                    "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables \
                     WHERE pubname = $1 ORDER BY 1",
                    &[&publication],
                )
                .await
                .map_err(|e| setup_error(STAGE, e))
        })
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut names = Vec::with_capacity(tables.len());
    for t in &tables {
        names.push(resolve(exec, t, publication).await?.regclass);
    }
    Ok(names)
}

/// Requests the initial snapshot of `tables`, unless `slot` had one: once
/// per slot.
pub(crate) async fn request_initial(
    exec: &Exec,
    schema: &SchemaName,
    slot: &str,
    tables: &[String],
) -> Result<()> {
    const STAGE: &str = "WAL snapshot: initial request";
    let insert = format!(
        "INSERT INTO {schema}.wal_snapshots (slot_name, tbl, initial) \
         SELECT $1, t, true FROM unnest($2::text[]) WITH ORDINALITY AS x(t, i) \
         WHERE NOT EXISTS (SELECT 1 FROM {schema}.wal_snapshots \
                           WHERE slot_name = $1 AND initial) \
         ORDER BY i"
    );
    exec.run_with(STAGE, |client| async move {
        client
            .execute(&insert, &[&slot, &tables])
            .await
            .map_err(|e| setup_error(STAGE, e))
    })
    .await
    .map(drop)
}

/// Reads and records the end key of request `id` (`None`: no row, and
/// the request is finished).
pub(crate) async fn end_key(
    exec: &Exec,
    sql: &Sql,
    table: &Table,
    id: i64,
    filter: Option<&str>,
) -> Result<Option<Vec<String>>> {
    const STAGE: &str = "WAL snapshot: find the last key";
    let select = table.end_sql(filter);
    exec.run_with(STAGE, |client| async move {
        let end: Option<Vec<String>> = client
            .query_opt(&select, &[])
            .await
            .map_err(|e| Error::pg(Origin::Wal, STAGE, e))?
            .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect());
        client
            .execute(&sql.set_end, &[&id, &end])
            .await
            .map_err(|e| setup_error(STAGE, e))?;
        Ok(end)
    })
    .await
}

/// Waits until every transaction running now has ended (polling with
/// growing pauses), so that every commit the stream delivered before now
/// is visible to the snapshots taken after.
pub(crate) async fn settle(exec: &Exec) -> Result<()> {
    const STAGE: &str = "WAL snapshot: wait for running transactions";
    let snapshot: String = exec
        .run_with(STAGE, |client| async move {
            client
                .query_one("SELECT pg_current_snapshot()::text", &[])
                .await
                .map_err(|e| setup_error(STAGE, e))
        })
        .await?
        .get(0);
    let mut pause = std::time::Duration::from_millis(5);
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        let snapshot = &snapshot;
        let running: i64 = exec
            .run_with(STAGE, |client| async move {
                client
                    .query_one(
                        "SELECT count(*) FROM pg_snapshot_xip($1::text::pg_snapshot) AS x \
                         WHERE pg_xact_status(x) = 'in progress'",
                        &[snapshot],
                    )
                    .await
                    .map_err(|e| setup_error(STAGE, e))
            })
            .await?
            .get(0);
        if running == 0 {
            return Ok(());
        }
        if !said && started.elapsed() > std::time::Duration::from_secs(5) {
            said = true;
            tracing::info!(
                running,
                "pg-pubsub: WAL snapshot waits for transactions that were running when it started"
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(500));
    }
}

/// What a chunk's transaction read.
pub(crate) struct Read {
    pub(crate) snapshot: String,
    /// Each row: its JSON text, then the key columns' text.
    pub(crate) rows: Vec<Vec<Option<String>>>,
}

/// Reads a chunk in a `REPEATABLE READ` transaction and, when it has
/// rows, writes its watermark and the progress in the same transaction
/// (`emit` runs between: it registers the chunk and gives the watermark's
/// content). `Ok(None)` when the request is gone (deleted, finished).
pub(crate) struct ChunkStatements<'a> {
    pub(crate) select: String,
    pub(crate) end: &'a [String],
    pub(crate) after: Option<&'a [String]>,
    pub(crate) id: i64,
    pub(crate) sql: &'a Sql,
}

/// The outcome of [`read_chunk`].
pub(crate) enum Outcome {
    /// No row left: the request is finished; its rows read in all.
    Finished(i64),
    /// The chunk's watermark is written; rows read so far.
    Emitted(i64),
    /// The request is gone.
    Gone,
}

pub(crate) async fn read_chunk<F, T>(
    exec: &Exec,
    st: ChunkStatements<'_>,
    on_rows: F,
) -> Result<(Outcome, Option<T>)>
where
    F: FnOnce(&Read) -> (Vec<String>, String, T),
{
    const STAGE: &str = "WAL snapshot: read a chunk";
    exec.run_with(STAGE, |mut client| async move {
        let err = |e| setup_error(STAGE, e);
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(err)?;
        // The first statement takes the transaction's snapshot. The commit
        // flushes the WAL up to the watermark (a non-transactional message
        // is not flushed by itself), so the stream reaches it at once.
        let snapshot: String = tx
            .query_one(
                "SELECT pg_current_snapshot()::text, \
                        set_config('synchronous_commit', 'local', true)",
                &[],
            )
            .await
            .map_err(err)?
            .get(0);
        let params: Vec<&(dyn ToSql + Sync)> = st
            .end
            .iter()
            .chain(st.after.unwrap_or_default())
            .map(|k| k as &(dyn ToSql + Sync))
            .collect();
        let rows: Vec<Vec<Option<String>>> = tx
            .query(&st.select, &params)
            .await
            .map_err(|e| Error::pg(Origin::Wal, STAGE, e))?
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
            .collect();
        let done = st.after.map(<[String]>::to_vec);
        if rows.is_empty() {
            let row = tx
                .query_opt(&st.sql.finish, &[&st.id, &done])
                .await
                .map_err(err)?;
            tx.commit().await.map_err(err)?;
            return Ok(match row {
                Some(r) => (Outcome::Finished(r.get(0)), None),
                None => (Outcome::Gone, None),
            });
        }
        let n = rows.len() as i64;
        let (last, watermark, token) = on_rows(&Read { snapshot, rows });
        let row = tx
            .query_opt(&st.sql.emit, &[&st.id, &last, &n, &watermark])
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(match row {
            Some(r) => (Outcome::Emitted(r.get(0)), Some(token)),
            None => (Outcome::Gone, None),
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            regclass: "shop.\"Order\"".to_owned(),
            schema: "shop".to_owned(),
            name: "Order".to_owned(),
            key_columns: vec!["id".to_owned(), "line".to_owned()],
            key_types: vec!["bigint".to_owned(), "integer".to_owned()],
            columns: vec![
                ("id".to_owned(), 20),
                ("line".to_owned(), 23),
                ("v".to_owned(), 25),
            ],
            row_filter: Some("v <> ''".to_owned()),
        }
    }

    #[test]
    fn chunks_are_keyset_pages_up_to_the_end_key_sorted_by_the_columns() {
        let t = table();
        assert_eq!(
            t.chunk_sql(Some("id > 5"), false, 100),
            "SELECT to_json(r)::text AS pgpubsub_row, r.\"id\"::text AS pgpubsub_0, \
             r.\"line\"::text AS pgpubsub_1 FROM (SELECT \"id\", \"line\", \"v\" \
             FROM shop.\"Order\" WHERE (\"id\", \"line\") <= ($1::text::bigint, $2::text::integer) \
             AND (\"id\", \"line\") > ($3::text::bigint, $4::text::integer) AND (v <> '') \
             AND (id > 5) ORDER BY \"id\", \"line\" LIMIT 100) AS r ORDER BY r.\"id\", r.\"line\""
        );
        assert!(!t.chunk_sql(None, true, 10).contains("$3"));
        assert_eq!(
            t.end_sql(None),
            "SELECT \"id\"::text AS pgpubsub_0, \"line\"::text AS pgpubsub_1 FROM shop.\"Order\" \
             WHERE (v <> '') ORDER BY \"id\" DESC, \"line\" DESC LIMIT 1"
        );
    }
}
