//! [`Changes`]: installing, removing and consuming trigger change feeds.

use serde::de::DeserializeOwned;

use super::event::{ChangeEvent, Column, Op};
use super::options::{FeedInfo, FeedOptions, TriggerLevel};
use super::store::{InstallParams, Sql};
use crate::client::PgPubSub;
use crate::durable::{Durable, DurableSubscription, Start};
use crate::error::{Error, Origin, Result};
use crate::subscription::Subscription;

/// Trigger change feeds in one schema, through a [`PgPubSub`]. Cheap to
/// clone. Made by [`PgPubSub::changes`] or [`Changes::with_schema`].
///
/// ```no_run
/// # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
/// use futures::StreamExt;
/// use pg_pubsub::changes::FeedOptions;
/// use pg_pubsub::durable::DurableDelivery;
///
/// #[derive(serde::Deserialize, Debug)]
/// struct Order { id: i64, total: f64 }
///
/// let changes = pubsub.changes();
/// changes.install_change_feed("shop.orders", &FeedOptions::new()).await?;
/// let mut feed = changes.subscribe::<Order>("shop.orders", "billing").await?;
/// while let Some(item) = feed.next().await {
///     match item {
///         DurableDelivery::Message(m) => {
///             let change = m.payload();
///             println!("{} {:?} -> {:?}", change.op, change.old, change.new);
///             m.ack();
///         }
///         // Rows that are not an `Order`: this change is not applied. Say
///         // so and ack it, or stop without acking, fix the type, and it is
///         // delivered again.
///         DurableDelivery::Undecodable { message, error } => {
///             eprintln!("change at {} not applied: {error}", message.position());
///             message.ack();
///         }
///         DurableDelivery::Truncated { lost } => eprintln!("{lost} changes expired unread"),
///         other => eprintln!("{other:?}"),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Changes {
    durable: Durable,
}

impl PgPubSub {
    /// Trigger change feeds whose functions live in the default schema
    /// (`pgpubsub`, shared with durable channels).
    pub fn changes(&self) -> Changes {
        Changes {
            durable: self.durable(),
        }
    }
}

/// Maps a row of [`Changes::feed_select`].
fn feed_of(row: &tokio_postgres::Row) -> Result<FeedInfo> {
    let ops = row
        .get::<_, Vec<String>>(4)
        .iter()
        .map(|op| op.parse())
        .collect::<Result<Vec<Op>>>()?;
    Ok(FeedInfo {
        table: row.get(0),
        channel: row.get(1),
        notify: row.get(2),
        level: row.get::<_, String>(3).parse::<TriggerLevel>()?,
        ops,
        columns: row.get(5),
        exclude: row.get(6),
    })
}

/// Maps a failed statement to a [`Stage::Changes`] error, keeping the cause.
fn pg_err(stage: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |e| Error::pg(Origin::Changes, stage, e)
}

impl Changes {
    /// Trigger change feeds of the same handle in another `schema` (a
    /// lowercase identifier of at most 40 bytes).
    pub fn with_schema(&self, schema: &str) -> Result<Changes> {
        Ok(Changes {
            durable: self.durable.with_schema(schema)?,
        })
    }

    /// The durable channels the feeds write to.
    pub fn durable(&self) -> &Durable {
        &self.durable
    }

    /// Runs `f` on a pooled connection (installing the schema first),
    /// bounded by the notify timeout like every pooled statement.
    async fn run<R, F, Fut>(&self, stage: &'static str, f: F) -> Result<R>
    where
        F: FnOnce(crate::exec::Conn) -> Fut,
        Fut: std::future::Future<Output = Result<R>>,
    {
        self.durable.install().await?;
        self.durable.pubsub().exec().run_with(stage, f).await
    }

    fn sql(&self) -> Sql {
        Sql::new(self.durable.schema().as_str())
    }

    /// The script [`install_change_feed`](Self::install_change_feed) runs
    /// (`DROP TRIGGER IF EXISTS`, `CREATE TRIGGER`, and a row in
    /// `change_feeds`), in a transaction, for a DBA to read or run with
    /// `psql` (the schema must be installed: `pg-pubsub migrate up`). `table`
    /// is any name `regclass` accepts: `orders`, `shop.orders`,
    /// `"Weird Schema"."Order Items"`.
    pub async fn install_change_feed_sql(
        &self,
        table: &str,
        options: &FeedOptions,
    ) -> Result<String> {
        options.check()?;
        let sql = self.sql().install_script;
        const STAGE: &str = "generating the change feed script";
        let row = self
            .run(STAGE, |client| async move {
                client
                    .query_one(&sql, &InstallParams::new(table, options).as_refs())
                    .await
                    .map_err(pg_err(STAGE))
            })
            .await?;
        Ok(format!("BEGIN;\n{}COMMIT;\n", row.get::<_, String>(0)))
    }

    /// Installs (or re-installs with new options) the change feed of
    /// `table`: triggers that turn each `INSERT`, `UPDATE`, `DELETE` (and
    /// `TRUNCATE`, as one event) into a [`ChangeEvent`] in a durable
    /// channel or a NOTIFY (see [`FeedOptions`]). Works on tables in any
    /// schema and on partitioned tables (events name the parent). The same
    /// from SQL: `SELECT pgpubsub.install_change_feed('shop.orders')`.
    pub async fn install_change_feed(
        &self,
        table: &str,
        options: &FeedOptions,
    ) -> Result<FeedInfo> {
        options.check()?;
        let sql = self.sql().install;
        const STAGE: &str = "installing the change feed";
        let feed = self
            .run(STAGE, |client| async move {
                client
                    .execute(&sql, &InstallParams::new(table, options).as_refs())
                    .await
                    .map_err(pg_err(STAGE))?;
                self.feed_on(&client, table).await
            })
            .await?;
        feed.ok_or_else(|| {
            Error::new(
                Origin::Changes,
                format!("no feed on {table} after installing it"),
            )
        })
    }

    /// The script [`uninstall_change_feed`](Self::uninstall_change_feed) runs.
    pub async fn uninstall_change_feed_sql(&self, table: &str) -> Result<String> {
        let sql = self.sql().uninstall_script;
        const STAGE: &str = "generating the uninstall script";
        let row = self
            .run(STAGE, |client| async move {
                client
                    .query_one(&sql, &[&table])
                    .await
                    .map_err(pg_err(STAGE))
            })
            .await?;
        Ok(format!("BEGIN;\n{}COMMIT;\n", row.get::<_, String>(0)))
    }

    /// Removes the feed's triggers (nothing is sent for later changes).
    /// The durable channel keeps its messages and consumer groups.
    pub async fn uninstall_change_feed(&self, table: &str) -> Result<()> {
        let sql = self.sql().uninstall;
        const STAGE: &str = "removing the change feed";
        self.run(STAGE, |client| async move {
            client
                .execute(&sql, &[&table])
                .await
                .map_err(pg_err(STAGE))
                .map(drop)
        })
        .await
    }

    /// The feed installed on `table`, if any.
    pub async fn feed(&self, table: &str) -> Result<Option<FeedInfo>> {
        self.run("looking the change feed up", |client| async move {
            self.feed_on(&client, table).await
        })
        .await
    }

    /// Every feed installed in this schema, by table.
    pub async fn feeds(&self) -> Result<Vec<FeedInfo>> {
        let sql = self.sql().feeds;
        self.run("listing the change feeds", |client| async move {
            client
                .query(&sql, &[])
                .await
                .map_err(pg_err("listing the change feeds"))?
                .iter()
                .map(feed_of)
                .collect()
        })
        .await
    }

    async fn feed_on(
        &self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<Option<FeedInfo>> {
        let sql = self.sql().feed;
        client
            .query_opt(&sql, &[&table])
            .await
            .map_err(pg_err("looking the change feed up"))?
            .as_ref()
            .map(feed_of)
            .transpose()
    }

    /// The columns of `table` (any name `regclass` accepts) with their
    /// types, in table order, `key` set on the primary key's: what trigger
    /// feed events do not carry, named as the WAL feed's
    /// [`ChangeEvent::columns`] names them (`format_type(oid, NULL)`).
    pub async fn columns(&self, table: &str) -> Result<Vec<Column>> {
        const STAGE: &str = "reading the table's columns";
        let rows = self
            .durable
            .pubsub()
            .exec()
            .run_with(STAGE, |client| async move {
                client
                    .query(
                        "SELECT a.attname::text, format_type(a.atttypid, NULL), a.atttypid, \
                                COALESCE(a.attnum = ANY(i.indkey), false) \
                         FROM pg_attribute a \
                         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                         WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 \
                           AND NOT a.attisdropped ORDER BY a.attnum",
                        &[&table],
                    )
                    .await
                    .map_err(pg_err(STAGE))
            })
            .await?;
        Ok(rows
            .iter()
            .map(|r| Column::new(r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    async fn require_feed(&self, table: &str, notify: bool) -> Result<FeedInfo> {
        let feed = self.feed(table).await?.ok_or_else(|| {
            Error::new(Origin::Changes, format!("table {table} has no change feed"))
        })?;
        if feed.notify != notify {
            let (has, wants) = if feed.notify {
                ("NOTIFY", "subscribe (durable)")
            } else {
                ("durable", "listen (NOTIFY)")
            };
            return Err(Error::new(
                Origin::Changes,
                format!("the change feed of {table} is a {has} feed; {wants} cannot read it"),
            ));
        }
        Ok(feed)
    }

    /// Joins consumer `group` on the durable feed of `table`, decoding
    /// `old` and `new` into `T`. A new group starts at the oldest retained
    /// change; see [`subscribe_from`](Self::subscribe_from).
    ///
    /// Order: the durable channel's, i.e. transaction by transaction, each
    /// transaction's changes in statement order. Within one batch (one
    /// tick, [`Position::tick`](crate::durable::Position)) transactions
    /// come in xid order, which is not always commit order; two changes of
    /// the same row are in commit order when sorted by `(tick, seq)` of
    /// their positions (the second writer of a row writes only after the
    /// first committed, so it draws a later `seq`).
    pub async fn subscribe<T>(
        &self,
        table: &str,
        group: &str,
    ) -> Result<DurableSubscription<ChangeEvent<T>>>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        self.subscribe_from(table, group, Start::Earliest).await
    }

    /// [`subscribe`](Self::subscribe) with where a new group starts.
    pub async fn subscribe_from<T>(
        &self,
        table: &str,
        group: &str,
        start: Start,
    ) -> Result<DurableSubscription<ChangeEvent<T>>>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let feed = self.require_feed(table, false).await?;
        self.durable
            .subscribe::<ChangeEvent<T>>(&feed.channel, group)
            .start(start)
            .await
    }

    /// Listens to the NOTIFY feed of `table` ([`FeedOptions::notify`]).
    /// At most once: changes made while not listening are not seen, and
    /// a reconnect yields a [`Gap`](crate::Gap).
    pub async fn listen<T>(&self, table: &str) -> Result<Subscription<ChangeEvent<T>>>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let feed = self.require_feed(table, true).await?;
        self.durable
            .pubsub()
            .listen::<ChangeEvent<T>>(&feed.channel)
            .await
    }
}
