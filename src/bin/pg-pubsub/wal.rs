//! `pg-pubsub changes tail --wal --slot S`: the WAL change feed from the
//! shell. The `changes` command (its arguments, the trigger feed) lives in
//! `changes.rs`, which calls [`tail`] for `--wal`.

use futures::StreamExt;
use pg_pubsub::changes::wal::{WalFeed, WalItem};
use pg_pubsub::changes::{ChangeEvent, Lsn};

use crate::common::{connect, note, write_json_line, ConnOpts, Failure, Result, Stop, Tuning};

/// One printed line: the change plus its position.
#[derive(serde::Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    event: &'a ChangeEvent,
    lsn: Lsn,
}

/// Streams the changes of `tables` (all tables when empty) from slot `slot`
/// (created with its publication, named like the slot, if missing), one
/// JSON line per change with `lsn`; acks each transaction once its lines
/// are written, and makes the acks durable on SIGINT/SIGTERM (exit 0).
pub(crate) async fn tail(conn: &ConnOpts, tables: &[String], slot: &str) -> Result<()> {
    let mut stop = Stop::new()?;
    let ps = match stop.or(connect(conn, Tuning::default())).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    let mut builder = ps.wal_feed(slot);
    if !tables.is_empty() {
        let refs: Vec<&str> = tables.iter().map(String::as_str).collect();
        builder = builder.tables(&refs);
    }
    let mut feed: WalFeed = match stop.or(builder.start()).await {
        Some(feed) => feed?,
        None => {
            ps.shutdown().await;
            return Ok(());
        }
    };
    // An existing publication may hold other tables: print only ours.
    let wanted = match resolve(&ps, tables).await {
        Ok(wanted) => wanted,
        Err(e) => {
            let _ = feed.close().await;
            ps.shutdown().await;
            return Err(e);
        }
    };
    note(&format!("tailing the WAL from slot {slot}"));
    let mut out = tokio::io::stdout();
    let result = loop {
        tokio::select! {
            biased;
            _ = stop.recv() => break Ok(()),
            item = feed.next() => match item {
                Some(WalItem::Change { event, .. })
                    if !wanted.is_empty() && !wanted.contains(&(event.schema.clone(), event.table.clone())) => {}
                Some(WalItem::Change { lsn, event }) => {
                    if !write_json_line(&mut out, &Line { event: &event, lsn }).await? {
                        break Ok(());
                    }
                }
                Some(WalItem::Commit { end_lsn, .. }) => feed.ack(end_lsn),
                Some(WalItem::Undecodable { lsn, error, .. }) => {
                    note(&format!("skipping an undecodable change at {lsn}: {error}"));
                }
                Some(WalItem::Error(e)) => note(&format!("WAL stream lost: {e}; reconnecting")),
                Some(_) => {}
                None => break Ok(()),
            }
        }
    };
    let closed = feed.close().await;
    ps.shutdown().await;
    result.and(Ok(closed?))
}

/// `(schema, table)` of each of `tables` (any name `regclass` accepts).
async fn resolve(
    ps: &pg_pubsub::PgPubSub,
    tables: &[String],
) -> Result<std::collections::HashSet<(String, String)>> {
    if tables.is_empty() {
        return Ok(Default::default());
    }
    let failed = |e: &dyn std::fmt::Display| Failure(format!("looking up {tables:?}: {e}"));
    let client = ps.pool().get().await.map_err(|e| failed(&e))?;
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM unnest($1::text[]) AS t \
             JOIN pg_class c ON c.oid = t::regclass JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[&tables],
        )
        .await
        .map_err(|e| failed(&e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
