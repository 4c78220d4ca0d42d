//! The scheduler service: sleeps until the earliest due slot (at most a
//! second), then fires what is due in one transaction (see the module docs).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::types::Type;

use super::store::{tick_lock_key, Sql};
use super::{from_row, spec_of, to_ts, CatchUp, Target};
use crate::error::{Error, Origin, Result};
use crate::queue::Queue;

/// The longest a scheduler sleeps: how late a slot may fire after a
/// schedule is added, resumed or its scheduler changes hands.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// A running scheduler, from [`Schedules::run_scheduler`](super::Schedules::run_scheduler)
/// (workers run their own). Dropping it stops it without waiting; the
/// handle's [`shutdown`](crate::PgPubSub::shutdown) stops it too.
pub struct Scheduler {
    stop: Arc<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field(
                "finished",
                &self.task.as_ref().is_none_or(JoinHandle::is_finished),
            )
            .finish()
    }
}

impl Scheduler {
    /// Stops it and waits until it has (a round in flight commits or
    /// rolls back first).
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop.send_replace(true);
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        task.await.map_err(|e| {
            Error::new(Origin::Queue, format!("the scheduler task failed: {e}")).with_source(e)
        })
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// The schedulers workers share: one per handle and schema, however many
/// workers it runs. Keyed by the handle's address, which stays unique
/// while a scheduler (whose task holds the handle) is alive.
type SharedKey = (usize, String);
static SHARED: std::sync::Mutex<
    Option<std::collections::HashMap<SharedKey, std::sync::Weak<Scheduler>>>,
> = std::sync::Mutex::new(None);

/// The scheduler of `queue`'s handle and schema, started if none runs
/// (the schema is installed already). Stopped when the last holder drops it.
pub(crate) fn shared(queue: &Queue) -> Result<Arc<Scheduler>> {
    let key = (
        Arc::as_ptr(&queue.pubsub().inner) as usize,
        queue.schema().as_str().to_owned(),
    );
    let mut map = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    let map = map.get_or_insert_with(Default::default);
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(s) = map.get(&key).and_then(std::sync::Weak::upgrade) {
        return Ok(s);
    }
    let s = Arc::new(start(
        queue.clone(),
        Arc::new(Sql::new(queue.schema().as_str())),
    )?);
    map.insert(key, Arc::downgrade(&s));
    Ok(s)
}

/// Starts a scheduler for `queue`'s schema, registered with its handle's
/// services (the schema is installed already).
pub(crate) fn start(queue: Queue, sql: Arc<Sql>) -> Result<Scheduler> {
    let stop = Arc::new(watch::Sender::new(false));
    let registration = {
        let stop = stop.clone();
        queue
            .pubsub()
            .inner
            .services
            .register("scheduler", move |_| {
                stop.send_replace(true);
            })?
    };
    let mut stopped = stop.subscribe();
    let key = tick_lock_key(queue.schema().as_str());
    let task = tokio::spawn(async move {
        let _registration = registration;
        let mut failing = false;
        loop {
            if *stopped.borrow() {
                break;
            }
            let sleep = match round(&queue, &sql, key).await {
                Ok(wait) => {
                    if failing {
                        tracing::info!(schema = %queue.schema(), "pg-pubsub: scheduler recovered");
                        failing = false;
                    }
                    wait.unwrap_or(MAX_SLEEP).min(MAX_SLEEP)
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(schema = %queue.schema(), error = %e, "pg-pubsub: scheduler round failed");
                        failing = true;
                    }
                    MAX_SLEEP
                }
            };
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    });
    Ok(Scheduler {
        stop,
        task: Some(task),
    })
}

/// One round: fires what is due; returns how long until the next due slot
/// (None: nothing scheduled, or another scheduler has the turn).
async fn round(queue: &Queue, sql: &Sql, key: i64) -> Result<Option<Duration>> {
    queue
        .exec
        .run(Origin::Queue, "schedule round", |mut client| async move {
            let tx = client.transaction_p().await?;
            let turn: bool = tx
                .query_one_p(sql.try_tick, &[(&key, Type::INT8)])
                .await?
                .get(0);
            if !turn {
                return Ok(None);
            }
            let now: SystemTime = tx.query_one_p(&sql.now, &[]).await?.get(0);
            for row in tx.query_p(&sql.due, &[]).await? {
                let name: &str = row.get(0);
                let info = from_row(&row);
                let planned = spec_of(&row).and_then(|spec| {
                    let info = info?;
                    let due = info.next_at.and_then(to_ts);
                    match (due, to_ts(now)) {
                        (Some(due), Some(now)) => {
                            Ok((spec.plan(due, now, CatchUp::policy(info.catch_up)), info))
                        }
                        _ => Err(Error::new(Origin::Config, "time out of range")),
                    }
                });
                let (plan, info) = match planned {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(schedule = name, error = %e, "pg-pubsub: schedule unreadable, stopped");
                        let error = e.to_string();
                        tx.execute_p(&sql.broken, &[(&name, Type::TEXT), (&error, Type::TEXT)])
                            .await?;
                        continue;
                    }
                };
                for slot in &plan.fire {
                    let slot = SystemTime::from(*slot);
                    match &info.target {
                        Target::Queue(q) => {
                            tx.execute_p(
                                &sql.enqueue,
                                &[
                                    (q, Type::TEXT),
                                    (&info.payload, Type::TEXT),
                                    (&slot, Type::TIMESTAMPTZ),
                                ],
                            )
                            .await?;
                        }
                        Target::Channel(c) => {
                            tx.execute_p(
                                &sql.publish,
                                &[(c, Type::TEXT), (&info.payload, Type::TEXT)],
                            )
                            .await?;
                        }
                    }
                }
                let last = plan.fire.last().copied().map(SystemTime::from);
                let next = plan.next.map(SystemTime::from);
                let n = plan.fire.len() as i64;
                tx.execute_p(
                    &sql.fired,
                    &[
                        (&name, Type::TEXT),
                        (&next, Type::TIMESTAMPTZ),
                        (&last, Type::TIMESTAMPTZ),
                        (&n, Type::INT8),
                    ],
                )
                .await?;
            }
            let wait: Option<f64> = tx.query_one_p(&sql.wait, &[]).await?.get(0);
            tx.commit().await?;
            Ok(wait.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(MAX_SLEEP)))
        })
        .await
}
