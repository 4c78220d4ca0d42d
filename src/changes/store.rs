//! The trigger feeds' statements (script generation, install, uninstall,
//! lookup) and their parameters, built per schema. Statements only: who
//! runs them, and when, is `trigger.rs`'s business.

use tokio_postgres::types::{ToSql, Type};

use super::options::FeedOptions;

/// The trigger feeds' statements, for one schema.
pub(super) struct Sql {
    /// The install script, as text; parameters: [`InstallParams`].
    pub(super) install_script: String,
    /// Installs a feed; parameters: [`InstallParams`].
    pub(super) install: String,
    /// The uninstall script, as text; parameter: the table.
    pub(super) uninstall_script: String,
    /// Removes a feed; parameter: the table.
    pub(super) uninstall: String,
    /// The feed of a table; parameter: the table. Columns: table, channel,
    /// notify, level, ops, columns, exclude.
    pub(super) feed: String,
    /// Every feed, by table; the same columns.
    pub(super) feeds: String,
}

impl Sql {
    pub(super) fn new(s: &str) -> Self {
        // Column names as they are now (the row holds attribute numbers).
        let select = format!(
            "SELECT tbl::text, channel, target = 'notify', level, ops, \
                    {s}.change_feed_names(tbl, columns), {s}.change_feed_names(tbl, exclude) \
             FROM {s}.change_feeds"
        );
        Sql {
            install_script: format!(
                "SELECT {s}.change_feed_sql($1::text::regclass, $2, $3, $4, $5, $6, $7)"
            ),
            install: format!(
                "SELECT {s}.install_change_feed($1::text::regclass, $2, $3, $4, $5, $6, $7)"
            ),
            uninstall_script: format!("SELECT {s}.uninstall_change_feed_sql($1::text::regclass)"),
            uninstall: format!("SELECT {s}.uninstall_change_feed($1::text::regclass)"),
            feed: format!("{select} WHERE tbl = $1::text::regclass"),
            feeds: format!("{select} ORDER BY tbl::text"),
        }
    }
}

/// The parameters of `change_feed_sql` / `install_change_feed`.
pub(super) struct InstallParams<'a> {
    table: &'a str,
    channel: Option<&'a str>,
    notify: bool,
    columns: Option<&'a [String]>,
    exclude: Option<&'a [String]>,
    ops: Option<Vec<String>>,
    level: &'static str,
}

impl<'a> InstallParams<'a> {
    pub(super) fn new(table: &'a str, options: &'a FeedOptions) -> Self {
        InstallParams {
            table,
            channel: options.channel.as_deref(),
            notify: options.notify,
            columns: options.columns.as_deref(),
            exclude: options.exclude.as_deref(),
            ops: options.ops_text(),
            level: options.level.as_str(),
        }
    }

    /// With their types: the statements go unnamed behind a pooler.
    pub(super) fn typed(&self) -> [(&(dyn ToSql + Sync), Type); 7] {
        [
            (&self.table, Type::TEXT),
            (&self.channel, Type::TEXT),
            (&self.notify, Type::BOOL),
            (&self.columns, Type::TEXT_ARRAY),
            (&self.exclude, Type::TEXT_ARRAY),
            (&self.ops, Type::TEXT_ARRAY),
            (&self.level, Type::TEXT),
        ]
    }
}
