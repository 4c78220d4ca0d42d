//! Slot and publication setup, lag, heartbeats and messages: plain SQL on the
//! pool (only the stream itself needs a replication connection).

use tokio_postgres::error::SqlState;

use crate::changes::Lsn;
use crate::error::{Error, Origin, Result};
use crate::exec::Exec;
use crate::PgPubSub;

/// The prefix of the feed's own heartbeat messages; never delivered.
pub(crate) const HEARTBEAT_PREFIX: &str = "pg-pubsub.heartbeat";

/// `"name"` with embedded quotes doubled: any identifier, any case.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Maps a setup statement's failure, naming the fix for the two
/// configuration problems users hit first.
pub(crate) fn setup_error(what: &str, err: tokio_postgres::Error) -> Error {
    let hint = match err.code() {
        Some(c) if *c == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE => Some(
            "logical decoding needs wal_level = logical: run ALTER SYSTEM SET wal_level = logical \
             and restart the server",
        ),
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => Some(
            "the role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION) and, for a \
             publication, ownership of the tables or CREATE on the database",
        ),
        _ => None,
    };
    let err = Error::pg(Origin::Wal, what, err);
    match hint {
        Some(h) => err.context(h),
        None => err,
    }
}

/// The same hints for an error text from the replication connection, which
/// carries the SQLSTATE in its text (`... SQLSTATE 42501`).
pub(crate) fn stream_hint(text: &str) -> Option<&'static str> {
    if text.contains("42501") || text.contains("must be superuser or replication role") {
        Some("the role needs the REPLICATION attribute: ALTER ROLE ... REPLICATION")
    } else if text.contains("55000") {
        Some("logical decoding needs wal_level = logical (and a server restart)")
    } else {
        None
    }
}

/// Creates the publication if missing: `FOR TABLE` the given tables,
/// without tables for an empty list, or `FOR ALL TABLES` for `None`. An
/// existing publication is used as it is.
pub(crate) async fn ensure_publication(
    exec: &Exec,
    name: &str,
    tables: Option<&[String]>,
) -> Result<()> {
    const STAGE: &str = "WAL feed: create publication";
    exec.run_with(STAGE, |client| async move {
        let exists = client
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
            .await
            .map_err(|e| setup_error(STAGE, e))?;
        if exists.is_some() {
            return Ok(());
        }
        let target = match tables {
            None => " FOR ALL TABLES".to_owned(),
            Some([]) => String::new(),
            // The server resolves and quotes the names (any name
            // `regclass` accepts); nothing of them reaches the SQL text.
            Some(tables) => {
                let row = client
                    .query_one(
                        "SELECT string_agg(t::regclass::text, ', ') FROM unnest($1::text[]) AS t",
                        &[&tables],
                    )
                    .await
                    .map_err(|e| setup_error(STAGE, e))?;
                format!(" FOR TABLE {}", row.get::<_, String>(0))
            }
        };
        let sql = format!("CREATE PUBLICATION {}{target}", quote_ident(name));
        create_publication(&client, &sql).await
    })
    .await
}

/// Runs `CREATE PUBLICATION`; another feed creating it first is success.
async fn create_publication(client: &tokio_postgres::Client, sql: &str) -> Result<()> {
    match client.batch_execute(sql).await {
        Ok(()) => Ok(()),
        // Two feeds creating the same publication at once: the other won.
        Err(e)
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                || e.code() == Some(&SqlState::DUPLICATE_OBJECT) =>
        {
            Ok(())
        }
        Err(e) => Err(setup_error("WAL feed: create publication", e)),
    }
}

/// Creates the logical slot (pgoutput) if missing.
pub(crate) async fn ensure_slot(exec: &Exec, slot: &str) -> Result<()> {
    const STAGE: &str = "WAL feed: create slot";
    let res = exec
            .run_with(STAGE, |client| async move {
                Ok(client
                    .execute(
                        "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
                         WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                        &[&slot],
                    )
                    .await)
            })
            .await?;
    match res {
        Ok(_) => Ok(()),
        // Two feeds creating the same slot at once: the other one won.
        Err(e)
            if e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(e) => Err(setup_error("WAL feed: create slot", e)),
    }
}

/// Moves the slot's confirmed position to `lsn` while no stream uses it
/// (used on close, so acks the stream had not reported yet count).
pub(crate) async fn advance_slot(exec: &Exec, slot: &str, lsn: Lsn) -> Result<()> {
    const STAGE: &str = "WAL feed: advance slot";
    exec.run_with(STAGE, |client| async move {
        client
            .execute(
                "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) \
                         FROM pg_replication_slots \
                         WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                &[&slot, &lsn.to_string()],
            )
            .await
            .map_err(|e| setup_error(STAGE, e))
    })
    .await?;
    Ok(())
}

/// The slot's confirmed position and the bytes of WAL it holds.
pub(crate) async fn slot_position(exec: &Exec, slot: &str) -> Result<Option<(Lsn, u64)>> {
    const STAGE: &str = "WAL feed: slot lag";
    let row = exec
        .run_with(STAGE, |client| async move {
            client
                .query_opt(
                    "SELECT confirmed_flush_lsn::text, \
                                (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
                         FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(|e| setup_error(STAGE, e))
        })
        .await?;
    let Some(row) = row else { return Ok(None) };
    let confirmed: Option<String> = row.get(0);
    let lag: Option<i64> = row.get(1);
    let confirmed = match confirmed {
        Some(text) => text.parse()?,
        None => Lsn(0),
    };
    Ok(Some((confirmed, lag.unwrap_or(0).max(0) as u64)))
}

/// A non-transactional message under [`HEARTBEAT_PREFIX`]: it reaches
/// every slot at once, so an idle or filtered feed can confirm past it.
pub(crate) async fn emit_heartbeat(exec: &Exec) -> Result<()> {
    const STAGE: &str = "WAL feed: heartbeat";
    exec.run_with(STAGE, |client| async move {
        client
            .execute(
                "SELECT pg_logical_emit_message(false, $1, ''::bytea)",
                &[&HEARTBEAT_PREFIX],
            )
            .await
            .map_err(|e| setup_error(STAGE, e))
    })
    .await?;
    Ok(())
}

impl PgPubSub {
    /// Drops the replication slot `slot` (and with it the WAL it holds).
    /// Fails while a feed streams from it. `Ok(false)` if there was none.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
    /// pubsub.drop_slot("orders_feed").await?;
    /// # Ok(()) }
    /// ```
    pub async fn drop_slot(&self, slot: &str) -> Result<bool> {
        let exec = self.exec();
        const STAGE: &str = "WAL feed: drop slot";
        let n = exec
            .run_with(STAGE, |client| async move {
                client
                    .execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .map_err(|e| setup_error(STAGE, e))
            })
            .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_quoted() {
        assert_eq!(quote_ident(r#"x"y"#), r#""x""y""#);
    }

    #[test]
    fn replication_errors_name_the_fix() {
        assert!(stream_hint("ERROR: permission denied (SQLSTATE 42501)")
            .is_some_and(|h| h.contains("REPLICATION")));
        assert!(
            stream_hint("logical decoding requires wal_level >= logical (SQLSTATE 55000)")
                .is_some_and(|h| h.contains("wal_level"))
        );
        assert!(stream_hint("connection reset").is_none());
    }
}
