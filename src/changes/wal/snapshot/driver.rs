//! The task that serves a slot's snapshot and backfill requests, one
//! chunk at a time, alongside the feed's stream task.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use super::super::Shared;
use super::merge::Visibility;
use super::store::{self, ChunkStatements, Outcome, Request, Sql, Table};
use super::{Chunk, Link};
use crate::changes::Lsn;
use crate::error::{Error, ErrorKind, Origin, Result};
use crate::event::{Bus, WalEvent};
use crate::exec::Exec;
use crate::schema::SchemaName;

/// Where the serving of one request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Tracking of the table begins; then the transactions running then
    /// must end (their commits may be in the stream before others see them).
    Settling,
    /// Read the chunk after this key (`None`: from the first row).
    Reading { after: Option<Vec<String>> },
    /// Chunk `chunk`, up to key `last`, is written; waiting until the
    /// stream hands it over and the consumer acks it.
    Handed { chunk: u64, last: Vec<String> },
    /// Every row was read.
    Finished,
}

/// What happened to a request being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// Tracking began and the running transactions ended; resume after
    /// this key (from the request's recorded progress).
    Settled { after: Option<Vec<String>> },
    /// A chunk was read: `last` is its last key, `None` when it was empty.
    Read {
        chunk: u64,
        last: Option<Vec<String>>,
    },
    /// The consumer acked the handed chunk.
    Acked,
    /// The stream restarted: chunks in flight are void, tracking is lost.
    Restarted,
}

impl Phase {
    pub(crate) fn next(self, input: Input) -> Phase {
        match (self, input) {
            (_, Input::Restarted) => Phase::Settling,
            (Phase::Settling, Input::Settled { after }) => Phase::Reading { after },
            (Phase::Reading { .. }, Input::Read { last: None, .. }) => Phase::Finished,
            (
                Phase::Reading { .. },
                Input::Read {
                    chunk,
                    last: Some(last),
                },
            ) => Phase::Handed { chunk, last },
            (Phase::Handed { last, .. }, Input::Acked) => Phase::Reading { after: Some(last) },
            (phase, _) => phase,
        }
    }
}

/// Why serving a request stopped.
enum Stop {
    /// The feed is stopping.
    Stopped,
    /// The table cannot be read: give the request up.
    Failed(Error),
    /// A passing failure: try again after a pause.
    Retry(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        if e.kind() == ErrorKind::Config {
            Stop::Failed(e)
        } else {
            Stop::Retry(e)
        }
    }
}

/// The snapshot driver of one feed.
pub(crate) struct Driver {
    pub(crate) exec: Exec,
    pub(crate) schema: SchemaName,
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) link: Arc<Link>,
    pub(crate) events: Bus<WalEvent>,
    pub(crate) chunk_rows: usize,
    pub(crate) stop: watch::Receiver<bool>,
}

impl Driver {
    /// Serves requests until the feed stops.
    pub(crate) async fn run(mut self) {
        let sql = Sql::new(&self.schema);
        let backoff = self.exec.backoff();
        let mut attempt = 0;
        loop {
            if *self.stop.borrow() {
                return;
            }
            let failure = match store::next_request(&self.exec, &sql, &self.slot).await {
                Ok(Some(req)) => match self.serve(&sql, &req).await {
                    Ok(()) => None,
                    Err(Stop::Stopped) => return,
                    Err(Stop::Failed(e)) => {
                        self.give_up(&sql, &req, &e).await;
                        None
                    }
                    Err(Stop::Retry(e)) => Some(e),
                },
                Ok(None) => {
                    attempt = 0;
                    let wake = self.link.wake.notified();
                    tokio::select! {
                        _ = wake => {}
                        _ = self.stop.wait_for(|s| *s) => return,
                    }
                    continue;
                }
                Err(e) => Some(e),
            };
            let Some(e) = failure else {
                attempt = 0;
                continue;
            };
            attempt += 1;
            let pause = backoff.delay(attempt + 1);
            tracing::warn!(slot = %self.slot, %e, ?pause, "pg-pubsub: WAL snapshot failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn give_up(&self, sql: &Sql, req: &Request, e: &Error) {
        tracing::error!(slot = %self.slot, id = req.id, table = %req.table, %e,
            "pg-pubsub: WAL snapshot given up");
        let reason = e.to_string();
        let res = self
            .exec
            .run_with("WAL snapshot: record failure", |client| async move {
                client
                    .execute(&sql.fail, &[&req.id, &reason])
                    .await
                    .map_err(|e| Error::pg(Origin::Wal, "WAL snapshot: record failure", e))
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(%e, "pg-pubsub: WAL snapshot failure not recorded");
        }
        self.events.emit(WalEvent::SnapshotFailed {
            slot: Arc::from(self.slot.as_str()),
            id: req.id,
            table: Arc::from(req.table.as_str()),
            reason: Arc::from(e.to_string()),
        });
    }

    async fn serve(&mut self, sql: &Sql, req: &Request) -> Result<(), Stop> {
        tracing::debug!(slot = %self.slot, id = req.id, table = %req.table,
            "pg-pubsub: WAL snapshot serving");
        let table = store::resolve(&self.exec, &req.table, &self.publication).await?;
        // Rows above the highest key at the first start were inserted
        // since: the stream carries them (and a busy table's tail is
        // never chased).
        let end = match &req.end_key {
            Some(end) => end.clone(),
            None => {
                let end =
                    store::end_key(&self.exec, sql, &table, req.id, req.filter.as_deref()).await?;
                match end {
                    Some(end) => end,
                    None => {
                        self.progress_event(req, 0, true);
                        return Ok(());
                    }
                }
            }
        };
        let select_first = table.chunk_sql(req.filter.as_deref(), true, self.chunk_rows);
        let select_next = table.chunk_sql(req.filter.as_deref(), false, self.chunk_rows);
        let mut generation = self.link.generation();
        let mut phase = Phase::Settling;
        let mut rows_so_far = 0;
        // In a block of its own: tracking ends however it ends.
        let result: Result<(), Stop> = async {
            loop {
                if *self.stop.borrow() {
                    break Err(Stop::Stopped);
                }
                if generation.has_changed().unwrap_or(true) {
                    generation.borrow_and_update();
                    phase = phase.next(Input::Restarted);
                }
                tracing::debug!(slot = %self.slot, ?phase, "pg-pubsub: WAL snapshot phase");
                phase = match phase {
                    Phase::Settling => {
                        let g = *generation.borrow();
                        if !self.link.begin(&table, g) {
                            continue;
                        }
                        tokio::select! {
                            settled = store::settle(&self.exec) => settled?,
                            _ = self.stop.wait_for(|s| *s) => break Err(Stop::Stopped),
                        }
                        let after = self.progress(sql, req.id).await?;
                        Phase::Settling.next(Input::Settled { after })
                    }
                    Phase::Reading { after } => {
                        let chunk_no = self.link.next_chunk();
                        let select = if after.is_some() {
                            &select_next
                        } else {
                            &select_first
                        };
                        let st = ChunkStatements {
                            select: select.clone(),
                            end: &end,
                            after: after.as_deref(),
                            id: req.id,
                            sql,
                        };
                        let link = &self.link;
                        let (outcome, token) = store::read_chunk(&self.exec, st, |read| {
                            let (chunk, last) = chunk_of(&table, read);
                            let sender = link.expect(chunk_no);
                            (
                                last.clone(),
                                link.watermark(chunk_no),
                                (sender, chunk, last),
                            )
                        })
                        .await?;
                        match outcome {
                            Outcome::Gone => break Ok(()),
                            Outcome::Finished(rows) => {
                                self.progress_event(req, rows, true);
                                break Ok(());
                            }
                            Outcome::Emitted(rows) => {
                                let Some((sender, chunk, last)) = token else {
                                    break Ok(());
                                };
                                // The stream task may already wait for it.
                                let _ = sender.send(chunk);
                                rows_so_far = rows;
                                Phase::Reading { after }.next(Input::Read {
                                    chunk: chunk_no,
                                    last: Some(last),
                                })
                            }
                        }
                    }
                    Phase::Handed { chunk, last } => {
                        match self.wait_acked(chunk, &mut generation).await {
                            Ok(true) => {
                                self.record_done(sql, req.id, &last).await?;
                                self.progress_event(req, rows_so_far, false);
                                Phase::Handed { chunk, last }.next(Input::Acked)
                            }
                            Ok(false) => Phase::Handed { chunk, last }.next(Input::Restarted),
                            Err(Stop::Stopped) => {
                                // A clean close after the consumer acked the
                                // chunk must not read it again.
                                if self.acked_chunk(chunk) {
                                    let _ = self.record_done(sql, req.id, &last).await;
                                }
                                break Err(Stop::Stopped);
                            }
                            Err(e) => break Err(e),
                        }
                    }
                    Phase::Finished => break Ok(()),
                };
            }
        }
        .await;
        self.link.end(&table);
        result
    }

    /// Waits until the stream handed chunk `n` over and the consumer acked
    /// it; `false` if the stream restarted first.
    async fn wait_acked(
        &mut self,
        n: u64,
        generation: &mut watch::Receiver<u64>,
    ) -> Result<bool, Stop> {
        let mut handed = self.link.handed_rx();
        let ack = tokio::select! {
            h = handed.wait_for(|h| h.is_some_and(|(c, _)| c >= n)) => match h {
                Ok(h) => h.map_or(Lsn(0), |(_, ack)| ack),
                Err(_) => return Err(Stop::Stopped),
            },
            _ = generation.changed() => return Ok(false),
            _ = self.stop.wait_for(|s| *s) => return Err(Stop::Stopped),
        };
        let mut acked = self.shared.ack_watch.subscribe();
        tokio::select! {
            a = acked.wait_for(|a| *a >= ack.0) => match a {
                Ok(_) => Ok(true),
                Err(_) => Err(Stop::Stopped),
            },
            _ = generation.changed() => Ok(false),
            _ = self.stop.wait_for(|s| *s) => Err(Stop::Stopped),
        }
    }

    /// Whether the consumer acked chunk `n`, as handed over.
    fn acked_chunk(&self, n: u64) -> bool {
        let handed = *self.link.handed_rx().borrow();
        handed.is_some_and(|(c, ack)| c == n && self.shared.acked.load(Ordering::Acquire) >= ack.0)
    }

    /// Records that the consumer acked the chunk ending at `last`.
    async fn record_done(&self, sql: &Sql, id: i64, last: &[String]) -> Result<(), Stop> {
        const STAGE: &str = "WAL snapshot: record progress";
        self.exec
            .run_with(STAGE, |client| async move {
                client
                    .execute(&sql.done, &[&id, &last])
                    .await
                    .map_err(|e| Error::pg(Origin::Wal, STAGE, e))
            })
            .await?;
        Ok(())
    }

    /// The key to resume after: the last chunk's the consumer acked (the
    /// chunk in flight when a feed stopped without recording it is read
    /// again).
    async fn progress(&self, sql: &Sql, id: i64) -> Result<Option<Vec<String>>, Stop> {
        const STAGE: &str = "WAL snapshot: read progress";
        let row = self
            .exec
            .run_with(STAGE, |client| async move {
                client
                    .query_opt(&sql.progress, &[&id])
                    .await
                    .map_err(|e| Error::pg(Origin::Wal, STAGE, e))
            })
            .await?;
        match row {
            Some(r) => Ok(r.get(0)),
            None => Err(Stop::Retry(Error::new(
                Origin::Wal,
                format!("WAL snapshot request {id} is gone"),
            ))),
        }
    }

    fn progress_event(&self, req: &Request, rows: i64, finished: bool) {
        self.events.emit(WalEvent::Snapshot {
            slot: Arc::from(self.slot.as_str()),
            id: req.id,
            table: Arc::from(req.table.as_str()),
            rows: rows.max(0) as u64,
            finished,
        });
    }
}

/// The chunk's rows as the stream would send them, and its last key.
fn chunk_of(table: &Table, read: &store::Read) -> (Chunk, Vec<String>) {
    let rows = read
        .rows
        .iter()
        .map(|cells| {
            // The server printed it with to_json: it parses.
            cells
                .first()
                .and_then(Option::as_deref)
                .and_then(|text| serde_json::from_str(text).ok())
                .unwrap_or(Value::Null)
        })
        .collect();
    let last = read
        .rows
        .last()
        .map(|cells| {
            cells[1..]
                .iter()
                .map(|c| c.clone().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    // An unparsable snapshot cannot happen (the server printed it); were
    // it to, seeing nothing drops every row the stream touched.
    let snapshot = Visibility::parse(&read.snapshot).unwrap_or_else(|_| Visibility::none());
    (
        Chunk {
            table: table.stream_name(),
            snapshot,
            rows,
        },
        last,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Vec<String> {
        vec![k.to_owned()]
    }

    #[test]
    fn a_request_reads_chunks_until_one_is_empty() {
        let mut p = Phase::Settling;
        p = p.next(Input::Settled { after: None });
        assert_eq!(p, Phase::Reading { after: None });
        // Acks of a chunk not handed yet change nothing.
        p = p.next(Input::Acked);
        assert_eq!(p, Phase::Reading { after: None });
        p = p.next(Input::Read {
            chunk: 1,
            last: Some(key("10")),
        });
        assert_eq!(
            p,
            Phase::Handed {
                chunk: 1,
                last: key("10")
            }
        );
        p = p.next(Input::Acked);
        assert_eq!(
            p,
            Phase::Reading {
                after: Some(key("10"))
            }
        );
        p = p.next(Input::Read {
            chunk: 2,
            last: None,
        });
        assert_eq!(p, Phase::Finished);
    }

    #[test]
    fn a_restarted_stream_settles_again_and_resumes_from_the_record() {
        let handed = Phase::Handed {
            chunk: 3,
            last: key("30"),
        };
        let p = handed.next(Input::Restarted);
        assert_eq!(p, Phase::Settling);
        // The record says where: after the last chunk recorded as acked.
        assert_eq!(
            p.next(Input::Settled {
                after: Some(key("20"))
            }),
            Phase::Reading {
                after: Some(key("20"))
            }
        );
    }
}
