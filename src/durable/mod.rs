//! Durable channels: at-least-once delivery with replay, gap-free under
//! out-of-order commits, any payload size.
//!
//! ```no_run
//! # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), pg_pubsub::Error> {
//! use futures::StreamExt;
//! use pg_pubsub::durable::DurableDelivery;
//!
//! let durable = pubsub.durable();
//! durable.publish("orders", &serde_json::json!({"id": 1})).await?;
//! let mut orders = durable.subscribe::<serde_json::Value>("orders", "billing").await?;
//! while let Some(item) = orders.next().await {
//!     match item {
//!         DurableDelivery::Message(m) => {
//!             println!("{} at {}", m.payload(), m.position());
//!             m.ack();
//!         }
//!         // Not JSON (published as `Text`): it never will be, so
//!         // say so and ack it; the next ack would pass it anyway.
//!         DurableDelivery::Undecodable { message, error } => {
//!             eprintln!("skipping the message at {}: {error}", message.position());
//!             message.ack();
//!         }
//!         DurableDelivery::Truncated { lost } => eprintln!("{lost} messages expired unread"),
//!         other => eprintln!("{other:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A loop written `while let Some(DurableDelivery::Message(m)) = ...` ends
//! at the first item that is not a message, and as that item stays unacked,
//! every restart ends at it again.
//!
//! Messages are rows in a table; `NOTIFY` is only a wake-up hint, so a
//! consumer that was down, slow or standing by reads what it missed.
//! From SQL (any session, trigger or language): `SELECT pgpubsub.publish('orders', '{"id":1}')`.
//!
//! ## The table
//!
//! [`schema_sql`](crate::schema::schema_sql) prints the whole script (`pg-pubsub migrate print`). In schema
//! `pgpubsub` (configurable, [`Durable::with_schema`]):
//! * `messages(channel, xid xid8 DEFAULT pg_current_xact_id(), seq, published_at, payload text, part)`,
//!   indexed on `(channel, xid, seq)`, list-partitioned on `part` into
//!   `messages_0` to `messages_3` (see [retention](#retention-by-rotation));
//! * `rotation(cur)`: the partition publishers write to;
//! * `ticks(channel, tick_id, snap pg_snapshot, created_at, snap_xmax)`;
//! * `groups(channel, group_name, tick_id, xid, seq, lost, ...)`: each group's cursor;
//! * `channels(channel, quiet, max_age)`: channels that publish without
//!   `NOTIFY`, and each channel's maximum age;
//! * functions `publish`, `publish_many` (`SECURITY DEFINER`: a role that
//!   only publishes needs `EXECUTE` on them, not `INSERT` on `messages`;
//!   see [`schema_sql`](crate::schema::schema_sql) for grants), `tick`,
//!   `read`, `range_of`, `rotate`, `retain`.
//!
//! ## The cursor: ticks (as in PgQ)
//!
//! A sequence is not commit order: a transaction that took `seq` 10 may
//! commit after 11 was read, and a "last id seen" cursor skips it. A cursor
//! on the xmin horizon does not skip, but one transaction left open anywhere
//! on the server stalls every consumer. This module cuts the log by
//! snapshots instead:
//!
//! * **Tick.** `tick(channel)` takes a transaction advisory lock for the
//!   channel, then, in one statement, records `S_n = pg_current_snapshot()`
//!   as tick `n` (the channel's previous tick id plus one), but only if a
//!   message became visible since `S_{n-1}`: a row whose `xid` is visible
//!   in `S_n` and not in `S_{n-1}` (two index probes, see below). So idle
//!   channels add no rows, every tick's batch holds a message when it is
//!   taken, and ticks are at most as many as the transactions that
//!   published. A batch can still lose its rows later (max-age retention
//!   of a group that was away): `read` then finds the next batch holding
//!   a message by bisection over the ticks (`next_batch`: whether some
//!   row is visible in `S_t` and not in `S_p` only turns from false to
//!   true as `t` grows), a few index probes however many empty batches
//!   lie between.
//!   Ticks are per channel. Consumers call it before reading (nobody else
//!   has to); it must run in READ COMMITTED (it checks).
//! * **Batch.** Batch `n` is the messages whose `xid` is visible in `S_n`
//!   and not in `S_{n-1}` (`S_0` sees nothing). "Not visible in `S_{n-1}`"
//!   is `xid >= xmax(S_{n-1})` or `xid ∈ xip(S_{n-1})` (every xid below
//!   `xmin` had ended; rows of aborted ones are invisible anyway), so a batch is one
//!   index range scan plus one lookup per transaction that was in progress
//!   at the previous tick. Within a batch, messages are ordered by
//!   `(xid, seq)`: a transaction's messages are contiguous, in publish order.
//! * **Position** ([`Position`]) of a message is `(n, xid, seq)`; a group's
//!   cursor is the position of its last ack. Delivery order is position
//!   order.
//!
//! **Proof sketch (no committed message is skipped or delivered in two
//! batches).** (1) *Snapshots are monotone*: tick `n` is taken by a
//! statement that starts after tick `n-1`'s transaction committed (the
//! advisory lock is held until commit), and every transaction visible in
//! `S_{n-1}` had finished before `S_{n-1}` was taken; so it is visible in
//! `S_n`. Visibility of a given `xid` therefore goes from "not visible" to
//! "visible" at exactly one tick and stays so. (2) A message of a committed
//! transaction `x` is in batch `n` iff `n` is that first tick: by
//! definition of the batch and (1). Every such `n` exists once a tick is
//! taken after `x` commits, which the next consumer poll does (the row is
//! new, so the tick is not skipped). (3) When a consumer reads batch `n`,
//! every message with `xid` visible in `S_n` is committed and visible to the
//! reader (its transaction ended before `S_n`, and tick `n` committed
//! before the read began); rows of transactions that committed later are
//! excluded by the `pg_visible_in_snapshot(xid, S_n)` test, not by timing.
//! Rows of rolled-back transactions are never visible. (4) So each
//! committed message is in exactly one batch, at one position, the same for
//! every group, and reading batches in tick order with a `(xid, seq)`
//! keyset within each misses nothing. A transaction left open does not
//! stall anyone: it is in `xip` of every tick until it ends, and its rows
//! land in the first batch after it commits, while other transactions'
//! rows are delivered meanwhile. Top-level xids are used (also inside
//! savepoints), matching `pg_current_snapshot()`'s `xip`.
//!
//! **xids and restores.** `xid8` values are per cluster and never wrap.
//! `pg_upgrade` keeps them. A `pg_dump`/restore into a new cluster restarts
//! them: restored rows keep their old (now future) xids and the ticks'
//! snapshots mean nothing any more. After such a restore, delete the
//! `ticks` and reset every group (`UPDATE pgpubsub.groups SET tick_id = 0, xid = '0', seq = 0`,
//! which redelivers what is retained), or empty `messages` first.
//! A row whose `xid` is not below the current snapshot's `xmax` (restored,
//! replicated from another cluster, or inserted by hand with a chosen
//! `xid`) is *foreign*: no tick counts it (it cannot stall a channel with
//! empty ticks), no batch holds it, and retention removes it with its
//! partition, counting it as lost for every group (so it is reported as
//! [`DurableDelivery::Truncated`], [`Retained::foreign`] and a server
//! `WARNING`, never kept forever). Publishers that go through
//! `publish`/`publish_many` cannot choose an `xid`.
//!
//! ## Consuming
//!
//! [`Durable::subscribe`] (options are methods of the request it returns) joins a
//! consumer group. One consumer per group is active at a time, elected
//! with the crate's single-listener election on a channel derived from
//! `(schema, channel, group)` ([`election_channel`]) on which nothing is
//! published: [`PgPubSub::is_leader`] on
//! [`DurableSubscription::election_channel`] and the `LockAcquired` /
//! `LockLost` events tell which. A standby takes over within the lock retry
//! interval after the active one dies, from the group's last ack; what was
//! delivered but not acked is delivered again (at least once).
//! Different groups are independent and each get every message.
//!
//! Wake-up: the SQL `publish` sends `pg_notify('<schema>_wake', channel)`,
//! the same payload for every message of a transaction, so the server sends
//! one notification per channel per transaction. [`Durable::publish`], which
//! commits by itself, sends it after the commit instead, merged with what
//! its handle publishes meanwhile (one notifying commit for many
//! publishers: NOTIFY's commit lock is what limits one-message
//! transactions). A handle listens to it once per schema, on its listener
//! connection, and hands each wake-up to the consumers of that channel
//! only (a reconnect wakes them all: a wake-up may have been lost), so a
//! publish costs each consuming process one lookup, however many
//! consumers it runs. Consumers also poll, so a lost notification or a
//! reconnect only delays: every second
//! ([`ConsumerBuilder::poll_interval`]) at first, then, while polls find
//! nothing, twice as long each time up to 8 s
//! ([`ConsumerBuilder::max_poll_interval`]); a wake-up, a reconnect, a
//! change of role or a message found sets it back to the poll interval.
//! A [quiet](Durable::set_quiet) channel (no wake-ups) is thus delivered
//! within the poll interval while busy, and within the maximum poll
//! interval after it was idle. [`DurableSubscription::stats`] counts a
//! consumer's reads and wake-ups.
//!
//! **Many consumers in one process.** Measured with 2,000 channels, one
//! consumer each, in one handle (pool of 16) against one server on two
//! CPUs, 1,000 messages/s in total: subscribing all took 4 to 6 s, every
//! message arrived, latency p50 11 to 18 ms, p99 27 to 92 ms over three
//! runs on a busy machine (`BENCH_PHASES=channels` in `benches/durable.rs`).
//! What limits more:
//! * each active consumer holds its group's election lock, a session
//!   advisory lock on the listener connection: the server's lock table
//!   holds about `max_locks_per_transaction` × (`max_connections` +
//!   `max_prepared_transactions`) locks (6,400 with the defaults), shared
//!   by every session, and a full table fails lock requests everywhere
//!   ("out of shared memory"); raise `max_locks_per_transaction` for
//!   thousands of consumers per server;
//! * every message costs its consumer a tick and a read, and its acks a
//!   write every [`ConsumerBuilder::ack_interval`], all through the
//!   handle's pool; idle consumers poll through it too (one tick and read
//!   per consumer per maximum poll interval, when idle): size the pool
//!   ([`Builder::pool_size`](crate::Builder::pool_size)) for that, or
//!   spread the channels over several handles.
//!
//! **Behind a pooler in transaction mode**
//! ([`PgPubSub::is_transaction_pooled`]) there is no session to `LISTEN`
//! or hold a lock on: consumers poll every
//! [`ConsumerBuilder::poll_interval`] (no idle backoff unless
//! [`ConsumerBuilder::max_poll_interval`] asks for it), and the group's
//! active consumer holds a lease, a row of `<schema>.leases` named by the
//! election channel, renewed every third of
//! [`Builder::lease_duration`](crate::Builder::lease_duration) (10 s by
//! default). A standby takes an expired lease at its next try (every
//! [`Builder::lock_retry_interval`](crate::Builder::lock_retry_interval)),
//! so a dead consumer is replaced within the lease duration and the retry
//! interval; closing or dropping a consumer, or shutting its handle down,
//! releases its lease at once. An active consumer that cannot renew (its
//! server unreachable) stops delivering when its lease runs out, before
//! anyone else can take it. Every statement is sent unnamed.
//!
//! [`Durable::events`] reports the role of each of the instance's
//! consumers: [`DurableEvent::Active`] when one becomes active,
//! [`DurableEvent::Standby`] when it stands by (or loses the election). The
//! consumer itself reads its role from the handle's state, never from this
//! (lossy) stream.
//!
//! Reading: after a wake-up the consumer sends `tick` and `read()` in one
//! pipelined write (one round trip; the server runs them in order, each in
//! its own transaction, so the read sees the new tick). It reads on
//! without ticking while pages come back full or from batches older than
//! the latest tick its tick returned; a short page of that batch ends the
//! round: whatever commits later sends its own wake-up (or is found by the
//! next poll, on a quiet channel), so no read goes out only to find nothing. A page is `read()`
//! (the SQL function) while a batch may hold rows of transactions that
//! were in progress at the previous tick; once a page is full and
//! `range_of()` says none has rows left, the rest of the batch is one
//! plain index range scan, which the consumer runs as its own statement
//! (a function's result set is copied once more on the server), eight
//! pages per statement, streamed: each page goes to the subscription as
//! soon as its rows arrived, while the server produces the next ones.
//! `xid8` and snapshots travel in binary.
//!
//! Acks are cumulative: acking a message acks every message before it in
//! delivery order. After a take-over (or a lost and regained election),
//! messages already handed to the stream may come again: at least once.
//!
//! Names: channels follow [`ChannelName`](crate::ChannelName) rules (1 to 63
//! bytes, no NUL); groups are 1 to 200 bytes without NUL; the schema is a
//! lowercase identifier of at most 40 bytes. All wake-ups of a schema share
//! one channel, `<schema>_wake`, with the durable channel's name as payload:
//! SQL and Rust agree on it without any hashing, and the server still
//! merges a transaction's wake-ups per channel.
//!
//! ## Retention by rotation
//!
//! [`Durable::retain`] removes what every group of a channel has acked
//! and, optionally, what is older than a maximum age (groups that had not
//! read it get [`DurableDelivery::Truncated`], and their instance a
//! [`DurableEvent::Truncated`]).
//! Each group's active consumer runs it on its channel every 30 s
//! ([`ConsumerBuilder::retain_every`], with [`ConsumerBuilder::max_age`]),
//! so nobody has to schedule it while the channel has a running consumer;
//! a consumer that finds another session retaining skips its round
//! (`pg_try_advisory_xact_lock`) instead of waiting before its next read.
//!
//! **One max age per channel.** It removes messages for every group, so a
//! group asking for another one than the channel's would cost the others
//! their unread messages: [`Durable::retain`] with another `max_age`, and
//! a consumer built with one, fail with
//! [`ErrorKind::Config`](crate::ErrorKind::Config); the first one given is
//! recorded, and [`Durable::set_max_age`] changes it for everyone.
//! **A channel without any group** (say a change feed installed before its
//! consumers) keeps its messages for its max age, or one day when it has
//! none (`unclaimed_max_age()` in SQL); while more than 1000 of them keep a
//! partition from being emptied, retention logs a warning naming the
//! channels, and [`Retained::blocked`] counts the partitions left.
//! What it did is reported as
//! [`DurableEvent::Retained`].
//!
//! It never deletes rows: `messages` is a ring of four list partitions
//! (`messages_0` to `messages_3`, on a column `part`), created at install;
//! no DDL runs on the table afterwards. `rotation.cur` names the partition
//! publishers write to (`publish_many` reads it once per statement; the
//! column default reads it for single rows). A call is two transactions:
//!
//! 1. `rotate()`: if the current partition holds rows and another one is
//!    empty, make that one current. Publishers only read `rotation`, so
//!    this waits for nobody and nobody waits for it.
//! 2. `retain(channel, max_age)`: record `max_age` as the channel's
//!    (`channels.max_age`, one per channel; each rotation applies every
//!    channel's own), then, for every other partition `P` that holds
//!    rows: give each row a verdict, the first that applies: *foreign*
//!    (see above), *acked* (passed by the channel's slowest cursor),
//!    *old* (published before `now() - max_age` of its channel), or
//!    *needed* (its channel has no group, or a group has not passed it).
//!    Positions are totally ordered and "passed" is monotone in the
//!    cursor, so "passed by every group" is "passed by the slowest": one
//!    comparison per row, whatever the number of groups. A first look
//!    without locks skips `P` as soon as it finds more than 1000 needed
//!    rows (a group is still reading it). Otherwise take
//!    `LOCK P IN SHARE MODE NOWAIT` (retried for ~100 ms, then left for
//!    the next call; `SHARE` keeps writers out, not readers) and judge
//!    again. If at most 1000 rows are needed, copy them unchanged (same
//!    `xid`, `seq`, `published_at`) into the current partition, add to
//!    each group's `lost` the old and foreign rows of its channel it had
//!    not passed, take `ACCESS EXCLUSIVE` on `P` (`NOWAIT`, between
//!    readers' statements) and `TRUNCATE P`. All of it commits at once.
//!    No cursor is locked to judge: only the rows of groups that lose
//!    messages are, by the `lost` update, so acks of every other group
//!    never wait for retention. A row's position is (the first tick that
//!    sees its `xid`: one probe of `ticks (channel, snap_xmax)` per
//!    transaction, `xid`, `seq`), so `lost` is counted for every group by
//!    one sort of the removed rows and the cursors, not row by group
//!    (50,000 expired rows, 100 groups: under a second).
//!
//! `TRUNCATE` returns the space at once and leaves no dead tuples, so the
//! table's size does not depend on autovacuum or on the xmin horizon; the
//! small `ticks` and `groups` tables are still updated row by row.
//! Storage is about what groups still need plus up to four rotation
//! intervals of traffic (a partition's newest row must be past every
//! group, or past the max age, before it goes).
//!
//! **Proof sketch (no unacked message of a registered group is removed,
//! except by max age, which is counted).** (1) *Once the `SHARE` lock on
//! `P` is granted, every row ever inserted into `P` is committed or
//! aborted, and none can be added until we commit*: inserting into a
//! partition takes `ROW EXCLUSIVE` on it, held until the inserting
//! transaction ends, and that conflicts with `SHARE`. A
//! transaction that had read the old `rotation.cur` but had not yet
//! inserted waits for our commit and then inserts into the emptied `P`:
//! its rows survive there and are judged by a later call, so which
//! partition a row is in never matters, only its content. (2) *The
//! verdicts see every such row*: each statement of `retain` (a `VOLATILE`
//! function in READ COMMITTED, which it checks) takes its snapshot after
//! the lock was granted, so every committed row of `P` is visible. (3) A
//! row is removed only if it is old or foreign (then every group that had
//! not passed it gets it counted in `lost`: the count is written only if
//! the cursor is still the one it was counted against, else counted
//! again, so an ack in between never makes it wrong), or every group of
//! its channel had passed it: the slowest cursor is at or after the row's
//! position, and cursors only move forward (acks use a row comparison). Rows still needed are re-inserted in the same transaction
//! with the same `(xid, seq)`, so their position (`tick` comes from
//! whether `xid` is visible in the tick snapshots, not from where the row
//! lives) and order are unchanged, and nobody sees both copies or
//! neither: (4) every reader of `messages` (`tick`, `read`, `range_of`,
//! the consumer's range scan, `groups()`) is a plain statement or a
//! `VOLATILE` function whose statements lock all partitions before taking
//! their snapshot, so a reader either holds its lock before our
//! `ACCESS EXCLUSIVE` (then `NOWAIT` fails and nothing is removed) or
//! takes its snapshot after our commit (and sees the copies, not the
//! emptied partition). That is why
//! `read` and `range_of` are not `STABLE`: a `STABLE` function reuses its
//! caller's snapshot, which could predate a `TRUNCATE` that locks the
//! partition later (`TRUNCATE` is not MVCC-safe). Do not read `messages`
//! in a REPEATABLE READ transaction for the same reason (`read` refuses).
//!
//! Costs and limits: the ring is shared by every channel of the schema; a
//! channel with no group keeps its messages for its max age or a day
//! (carried forward while few); a transaction left open
//! after publishing keeps its partition (the other three keep rotating);
//! a session that read `messages` and stays open in a transaction holds
//! every partition (rotation waits for it). No lock is ever queued: a
//! publisher is delayed only if its statement read `rotation.cur` before a
//! switch committed and inserts while that partition is being emptied,
//! for the rest of that `retain` transaction (milliseconds).

mod acks;
mod consumer;
mod groups;
mod message;
mod plan;
mod position;
mod publish;
mod quiet;
mod reader;
mod role;
mod store;
mod subscription;
mod wakeups;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::OnceCell;

pub use crate::event::DurableEvent;
pub use crate::schema::election_channel;
pub(crate) use crate::schema::SchemaName;
pub use consumer::{ConsumerBuilder, Start};
pub use groups::{GroupInfo, Retained};
pub use message::{DurableDelivery, DurableMessage};
pub use position::Position;
pub use reader::ConsumerStats;
pub use subscription::DurableSubscription;
pub(crate) use subscription::{AckWriter, Activity};

use crate::client::PgPubSub;
use crate::error::{Origin, Result};

pub(crate) use wakeups::Dispatchers;

/// Durable channels in one schema, through a [`PgPubSub`]. Cheap to clone.
///
/// Made by [`PgPubSub::durable`] or [`Durable::with_schema`]. The schema
/// is installed on first use (or by [`install`](Self::install)). Keep one
/// (and clone it) rather than making one per publish: it remembers that
/// the schema is installed and, for a second, each channel's quiet flag.
#[derive(Clone)]
pub struct Durable {
    /// Every statement runs here.
    exec: crate::exec::Exec,
    /// The listener (wake-ups, elections), events and services only.
    pub(crate) pubsub: PgPubSub,
    pub(crate) schema: SchemaName,
    installed: Arc<OnceCell<()>>,
    publisher: Arc<publish::Publisher>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("schema", &self.schema)
            .finish()
    }
}

impl PgPubSub {
    /// Durable channels in the default schema (`pgpubsub`).
    pub fn durable(&self) -> Durable {
        Durable::new(self.clone(), SchemaName::default())
    }
}

impl Durable {
    /// Durable channels of the same handle in another `schema` (a
    /// lowercase identifier of at most 40 bytes).
    pub fn with_schema(&self, schema: &str) -> Result<Durable> {
        Ok(Durable::new(self.pubsub.clone(), SchemaName::new(schema)?))
    }

    fn new(pubsub: PgPubSub, schema: SchemaName) -> Durable {
        Durable {
            publisher: Arc::new(publish::Publisher::new(&schema)),
            exec: pubsub.exec().clone(),
            pubsub,
            schema,
            installed: Arc::new(OnceCell::new()),
        }
    }

    /// The schema.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The [`PgPubSub`] this uses.
    pub fn pubsub(&self) -> &PgPubSub {
        &self.pubsub
    }

    /// Creates or checks the schema (see [`crate::schema`]). Safe when several
    /// processes install at once; fails with [`ErrorKind::Config`](crate::ErrorKind::Config) if the
    /// database holds a newer schema version.
    pub async fn install(&self) -> Result<()> {
        crate::schema::ensure(&self.pubsub, &self.schema, &self.installed).await
    }

    /// Runs `f` on a pooled connection (installing the schema first) within
    /// the notify timeout.
    pub(crate) async fn with_client<R, F, Fut>(&self, stage: &'static str, f: F) -> Result<R>
    where
        F: FnOnce(crate::exec::Conn) -> Fut,
        Fut: Future<Output = Result<R, tokio_postgres::Error>>,
    {
        self.install().await?;
        self.exec.run(Origin::Durable, stage, f).await
    }

    /// Events of the durable consumers of this handle's [`PgPubSub`] (every
    /// schema) from now on: which consumer is active, truncations,
    /// retention. Bounded and lossy (see [`Events`](crate::event::Events)).
    pub fn events(&self) -> crate::event::Events<DurableEvent> {
        self.pubsub.inner.buses.durable.subscribe()
    }

    /// Takes a tick of `channel` if anything new became visible, and
    /// returns its latest tick id. Consumers do this before each read;
    /// call it yourself only to cut batches from elsewhere.
    pub async fn tick(&self, channel: &str) -> Result<i64> {
        let channel = crate::ChannelName::new(channel)?;
        let sql = format!("SELECT {}.tick($1)", self.schema.as_str());
        self.with_client("durable tick", |client| async move {
            let row = client
                .query_one_p(
                    &sql,
                    &[(&channel.as_str(), tokio_postgres::types::Type::TEXT)],
                )
                .await?;
            Ok(row.get::<_, i64>(0))
        })
        .await
    }
}
