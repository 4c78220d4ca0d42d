//! Slot and publication setup, lag, heartbeats and messages: plain SQL on the
//! pool (only the stream itself needs a replication connection).

use tokio_postgres::error::SqlState;

use crate::changes::Lsn;
use crate::error::{Error, Origin, Result};
use crate::exec::Exec;
use crate::schema::SchemaName;
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

/// What the server and the feed's record say about a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// The slot exists and can stream; `recorded`: the feed's row exists.
    Usable { recorded: bool },
    /// No such slot, and no record that a feed created it: a new feed.
    New,
    /// No such slot, but a feed recorded it (when, as text).
    Missing { recorded_at: String },
    /// The server invalidated it (`wal_status`, PostgreSQL 17+'s
    /// `invalidation_reason`).
    Invalidated { reason: String },
}

impl SlotState {
    /// The loud error for a slot that cannot resume, if it cannot.
    pub(crate) fn lost_error(&self, slot: &str, schema: &SchemaName) -> Option<Error> {
        let text = match self {
            SlotState::Usable { .. } | SlotState::New => return None,
            SlotState::Missing { recorded_at } => format!(
                "WAL feed: replication slot {slot:?} does not exist on this server, but a feed \
                 created it ({schema}.wal_slots, {recorded_at}): this is not the server it was \
                 on (a failover to a standby without it; slots are replicated only from \
                 PostgreSQL 17, as failover slots with sync_replication_slots on the standby) \
                 or it was dropped"
            ),
            SlotState::Invalidated { reason } => format!(
                "WAL feed: replication slot {slot:?} was invalidated by the server ({reason}; \
                 e.g. it held more WAL than max_slot_wal_keep_size)"
            ),
        };
        Some(Error::new(
            Origin::SlotLost,
            format!(
                "{text}. Changes since the feed's last ack cannot be replayed; nothing was \
                 started from \"now\" in their place. To accept the loss and start over \
                 with a new slot, use WalFeedBuilder::recreate_lost_slot(true)"
            ),
        ))
    }
}

/// Reads the slot's state and the feed's record of it. `to_jsonb` reads
/// `invalidation_reason` where it exists (PostgreSQL 17+) and yields NULL
/// before.
pub(crate) async fn slot_state(exec: &Exec, schema: &SchemaName, slot: &str) -> Result<SlotState> {
    const STAGE: &str = "WAL feed: check slot";
    let sql = format!(
        "SELECT s.slot_name IS NOT NULL, s.wal_status, \
                to_jsonb(s) ->> 'invalidation_reason', \
                (SELECT created_at::text FROM {schema}.wal_slots WHERE slot_name = $1) \
         FROM (SELECT 1) AS one \
         LEFT JOIN pg_replication_slots AS s ON s.slot_name = $1"
    );
    let row = exec
        .run_with(STAGE, |client| async move {
            client
                .query_one(&sql, &[&slot])
                .await
                .map_err(|e| setup_error(STAGE, e))
        })
        .await?;
    let exists: bool = row.get(0);
    let wal_status: Option<String> = row.get(1);
    let reason: Option<String> = row.get(2);
    let recorded_at: Option<String> = row.get(3);
    Ok(match (exists, recorded_at) {
        (true, recorded) => match (wal_status.as_deref(), reason) {
            (_, Some(reason)) => SlotState::Invalidated {
                reason: format!("invalidation_reason = {reason}"),
            },
            (Some("lost"), None) => SlotState::Invalidated {
                reason: "wal_status = lost".to_owned(),
            },
            _ => SlotState::Usable {
                recorded: recorded.is_some(),
            },
        },
        (false, None) => SlotState::New,
        (false, Some(recorded_at)) => SlotState::Missing { recorded_at },
    })
}

/// Makes the slot ready to stream: creates it (pgoutput; on PostgreSQL
/// 17+ as a failover slot) when the feed is new, records it in
/// `schema.wal_slots`, and refuses with [`ErrorKind::SlotLost`](crate::ErrorKind::SlotLost)
/// a slot the feed recorded that is missing or invalidated, unless
/// `recreate_lost` (then it is dropped if invalid and created anew).
/// Whether the slot was created.
pub(crate) async fn prepare_slot(
    exec: &Exec,
    schema: &SchemaName,
    slot: &str,
    publication: &str,
    recreate_lost: bool,
) -> Result<bool> {
    let state = slot_state(exec, schema, slot).await?;
    if let Some(err) = state.lost_error(slot, schema) {
        if !recreate_lost {
            return Err(err);
        }
        tracing::warn!(%err, "pg-pubsub: recreating a lost WAL slot, as configured: changes since the last ack are skipped");
        if matches!(state, SlotState::Invalidated { .. }) {
            drop_slot(exec, slot).await?;
        }
    }
    let create = !matches!(state, SlotState::Usable { .. });
    let failover = if create {
        create_slot(exec, slot).await?
    } else {
        false
    };
    record_slot(exec, schema, slot, publication, failover, create).await?;
    Ok(create)
}

/// Creates the logical slot (pgoutput) if missing, with `failover` on
/// PostgreSQL 17+ (kept on standbys that sync slots, so it survives a
/// promotion). Whether it asked for `failover`.
async fn create_slot(exec: &Exec, slot: &str) -> Result<bool> {
    const STAGE: &str = "WAL feed: create slot";
    let res = exec
        .run_with(STAGE, |client| async move {
            let version: i32 = client
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await
                .map_err(|e| setup_error(STAGE, e))?
                .get(0);
            let failover = version >= 170_000;
            let create = if failover {
                "pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
            } else {
                "pg_create_logical_replication_slot($1, 'pgoutput')"
            };
            let sql = format!(
                "SELECT {create} WHERE NOT EXISTS \
                 (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)"
            );
            Ok(client.execute(&sql, &[&slot]).await.map(|_| failover))
        })
        .await?;
    match res {
        Ok(failover) => Ok(failover),
        // Two feeds creating the same slot at once: the other one won.
        Err(e)
            if e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(false)
        }
        Err(e) => Err(setup_error(STAGE, e)),
    }
}

/// Drops an invalidated slot (before recreating it, when told to).
async fn drop_slot(exec: &Exec, slot: &str) -> Result<()> {
    const STAGE: &str = "WAL feed: drop invalidated slot";
    exec.run_with(STAGE, |client| async move {
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| setup_error(STAGE, e))
    })
    .await
    .map(drop)
}

/// Records that a feed uses `slot` (a new slot: anew, its time reset).
async fn record_slot(
    exec: &Exec,
    schema: &SchemaName,
    slot: &str,
    publication: &str,
    failover: bool,
    created: bool,
) -> Result<()> {
    const STAGE: &str = "WAL feed: record slot";
    let sql = format!(
        "INSERT INTO {schema}.wal_slots (slot_name, publication, failover) VALUES ($1, $2, $3) \
         ON CONFLICT (slot_name) DO UPDATE SET publication = EXCLUDED.publication, \
         failover = EXCLUDED.failover, created_at = now() WHERE $4"
    );
    exec.run_with(STAGE, |client| async move {
        client
            .execute(&sql, &[&slot, &publication, &failover, &created])
            .await
            .map_err(|e| Error::pg(Origin::Wal, STAGE, e))
    })
    .await
    .map(drop)
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
    /// Drops the replication slot `slot` (and with it the WAL it holds),
    /// and forgets it in the default schema's `wal_slots` (so a new feed of
    /// that name starts afresh instead of failing with
    /// [`ErrorKind::SlotLost`](crate::ErrorKind::SlotLost); for a feed in
    /// another schema, delete its row from `<schema>.wal_slots`). Fails
    /// while a feed streams from it. `Ok(false)` if there was none.
    ///
    /// ```no_run
    /// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
    /// pubsub.drop_slot("orders_feed").await?;
    /// # Ok(()) }
    /// ```
    pub async fn drop_slot(&self, slot: &str) -> Result<bool> {
        let exec = self.exec();
        const STAGE: &str = "WAL feed: drop slot";
        let records = format!("{}.wal_slots", SchemaName::default());
        let snapshots = format!("{}.wal_snapshots", SchemaName::default());
        let n = exec
            .run_with(STAGE, |client| async move {
                let n = client
                    .execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .map_err(|e| setup_error(STAGE, e))?;
                // Its record, and its snapshots and backfills: a new slot
                // of the same name starts afresh.
                for table in [&records, &snapshots] {
                    let exists: bool = client
                        .query_one("SELECT to_regclass($1) IS NOT NULL", &[table])
                        .await
                        .map_err(|e| setup_error(STAGE, e))?
                        .get(0);
                    if exists {
                        client
                            .execute(
                                &format!("DELETE FROM {table} WHERE slot_name = $1"),
                                &[&slot],
                            )
                            .await
                            .map_err(|e| setup_error(STAGE, e))?;
                    }
                }
                Ok(n)
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

    #[test]
    fn only_a_recorded_missing_or_an_invalidated_slot_is_lost() {
        let schema = SchemaName::default();
        for usable in [
            SlotState::New,
            SlotState::Usable { recorded: true },
            SlotState::Usable { recorded: false },
        ] {
            assert!(usable.lost_error("s", &schema).is_none(), "{usable:?}");
        }
        let missing = SlotState::Missing {
            recorded_at: "2026-01-01".to_owned(),
        }
        .lost_error("s", &schema)
        .unwrap();
        assert_eq!(missing.kind(), crate::ErrorKind::SlotLost);
        assert_eq!(missing.stage(), Some(crate::Stage::Wal));
        assert!(!missing.is_connection());
        let text = missing.to_string();
        assert!(
            text.contains("does not exist") && text.contains("pgpubsub.wal_slots"),
            "{text}"
        );
        assert!(text.contains("recreate_lost_slot"), "{text}");
        let invalid = SlotState::Invalidated {
            reason: "wal_status = lost".to_owned(),
        }
        .lost_error("s", &schema)
        .unwrap();
        assert!(
            invalid.to_string().contains("wal_status = lost"),
            "{invalid}"
        );
    }
}
