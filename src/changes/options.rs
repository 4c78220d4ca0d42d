//! [`FeedOptions`]: what a trigger feed captures and where it sends it;
//! [`FeedInfo`]: an installed feed as the database records it.

use std::fmt;
use std::str::FromStr;

use super::event::Op;
use crate::error::{Error, Origin, Result};

/// How the triggers of a feed run.
///
/// Statement-level triggers are the cheaper choice as soon as statements
/// touch more than a row, and about as cheap for one row, so they are the
/// default (figures in the repository's `BENCHMARKS.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TriggerLevel {
    /// `FOR EACH STATEMENT` with transition tables: one `publish_many` per
    /// statement. `UPDATE` pairs old and new rows on the primary key, so on
    /// a table without one the `UPDATE` trigger is row-level.
    #[default]
    Statement,
    /// `FOR EACH ROW`: one `publish` (or `pg_notify`) per row.
    Row,
}

impl TriggerLevel {
    /// `"statement"` or `"row"`, as the SQL functions take it.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerLevel::Statement => "statement",
            TriggerLevel::Row => "row",
        }
    }
}

impl fmt::Display for TriggerLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TriggerLevel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "statement" => Ok(TriggerLevel::Statement),
            "row" => Ok(TriggerLevel::Row),
            other => Err(Error::new(
                Origin::Config,
                format!("trigger level {other:?} is not statement or row"),
            )),
        }
    }
}

/// Options of [`Changes::install_change_feed`](super::Changes::install_change_feed).
///
/// The default: every operation (insert, update, delete, truncate), every
/// column, into the durable channel `changes.<schema>.<table>`, with
/// statement-level triggers.
///
/// ```
/// use pg_pubsub::changes::{FeedOptions, Op};
/// let options = FeedOptions::new()
///     .channel("orders.changes")
///     .exclude(["password_hash"])
///     .ops([Op::Insert, Op::Update]);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default)]
pub struct FeedOptions {
    pub(crate) notify: bool,
    pub(crate) channel: Option<String>,
    pub(crate) columns: Option<Vec<String>>,
    pub(crate) exclude: Option<Vec<String>>,
    pub(crate) ops: Option<Vec<Op>>,
    pub(crate) level: TriggerLevel,
}

impl FeedOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Send events over plain `NOTIFY` instead of a durable channel:
    /// ephemeral (nobody listening, nothing kept), and an event of 8000
    /// bytes or more is sent with `old`/`new` reduced to the primary key
    /// and [`key_only`](super::ChangeEvent::key_only) set, or, when even
    /// that does not fit, without rows and with
    /// [`rows_omitted`](super::ChangeEvent::rows_omitted) set; the write
    /// never fails for size.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The channel (durable or NOTIFY) instead of `changes.<schema>.<table>`.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// Only these columns in `old` and `new`. An update that changes none
    /// of the kept columns sends nothing. The feed follows renames of these
    /// columns (see the [module docs](super#trigger-feed)).
    pub fn columns<I, S>(mut self, columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.columns = Some(columns.into_iter().map(Into::into).collect());
        self
    }

    /// Leave these columns out of `old` and `new`. An update that changes
    /// only left-out columns sends nothing. A renamed left-out column stays
    /// out.
    pub fn exclude<I, S>(mut self, columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exclude = Some(columns.into_iter().map(Into::into).collect());
        self
    }

    /// Only these operations (default: all four).
    pub fn ops(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.ops = Some(ops.into_iter().collect());
        self
    }

    /// Statement-level (default) or row-level triggers.
    pub fn level(mut self, level: TriggerLevel) -> Self {
        self.level = level;
        self
    }

    pub(crate) fn check(&self) -> Result<()> {
        if let Some(channel) = &self.channel {
            crate::ChannelName::new(channel)?;
        }
        if self.ops.as_ref().is_some_and(Vec::is_empty) {
            return Err(Error::new(
                Origin::Config,
                "a change feed needs at least one operation",
            ));
        }
        if self.ops.as_ref().is_some_and(|ops| ops.contains(&Op::Read)) {
            return Err(Error::new(
                Origin::Config,
                "`read` is not an operation a trigger captures (it marks rows read by a snapshot)",
            ));
        }
        Ok(())
    }

    pub(crate) fn ops_text(&self) -> Option<Vec<String>> {
        self.ops
            .as_ref()
            .map(|ops| ops.iter().map(Op::to_string).collect())
    }
}

/// A feed installed on a table, as recorded in the schema's
/// `change_feeds` table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedInfo {
    /// The table, as PostgreSQL prints it (quoted where needed; schema-
    /// qualified unless on the search path).
    pub table: String,
    /// The durable or NOTIFY channel the events go to.
    pub channel: String,
    /// Whether events go over plain NOTIFY rather than a durable channel.
    pub notify: bool,
    /// How the triggers run.
    pub level: TriggerLevel,
    /// The captured operations.
    pub ops: Vec<Op>,
    /// The kept columns (`None`: all), by their current names; dropped
    /// ones are left out.
    pub columns: Option<Vec<String>>,
    /// The left-out columns, by their current names; dropped ones are
    /// left out.
    pub exclude: Option<Vec<String>>,
}
