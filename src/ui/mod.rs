//! The dashboard and admin API (feature `ui`): an [`axum`] [`Router`] to
//! mount in your own server, or to run with `pg-pubsub serve`.
//!
//! ```no_run
//! # async fn demo(pubsub: pg_pubsub::PgPubSub) -> Result<(), Box<dyn std::error::Error>> {
//! use pg_pubsub::ui::{router, UiOptions};
//! let app = router(&pubsub, UiOptions::new().admin_token("s3cret"))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9187").await?;
//! pg_pubsub::ui::axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! It serves:
//!
//! * `GET /healthz` (the process answers) and `GET /readyz` (the database
//!   answers too: 503 otherwise);
//! * JSON under `/api/`: `queues`, `queues/{queue}/jobs?state=&after=&limit=`,
//!   `jobs/{id}`, `dead?queue=&after=&limit=`, `durable`,
//!   `durable/{channel}/groups`, `changes/feeds`, `changes/slots`,
//!   `elected`, `history` (the sampled series), and the mutations
//!   `POST dead/{id}/retry`, `DELETE dead/{id}`,
//!   `POST dead/retry?queue=` and `DELETE dead?queue=` (`?all=true`
//!   instead of a queue for every queue);
//! * HTML pages at `/` (queues and charts), `/queues/{queue}`,
//!   `/jobs/{id}`, `/dead`, `/durable`, `/changes`, `/elected`, `/login`.
//!
//! The charts (queue depth, jobs finished per minute, durable group lag,
//! over the last hour) come from samples the router takes itself every
//! [`UiOptions::sample_every`], kept in a bounded ring buffer; they are
//! inline SVG drawn on the server. Pages run no script at all (their
//! `Content-Security-Policy` forbids it) and escape every value.
//!
//! **Security.** Without [`UiOptions::admin_token`] it is read-only: every
//! mutation answers 403. With one, an API mutation needs
//! `Authorization: Bearer <token>` (compared in constant time) and a page
//! mutation a session from the login form (an `HttpOnly`,
//! `SameSite=Strict` cookie) plus the form's CSRF token. Every mutation is
//! logged at `info` under the target `pg_pubsub::ui`. There is no TLS:
//! bind to localhost or put it behind a proxy that terminates TLS.
//! [`UiOptions::hide_payloads`] keeps payloads out of pages and API.

mod api;
mod auth;
mod history;
mod pages;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use axum;
use axum::routing::{get, post};
use axum::Router;

use crate::admin::Admin;
use crate::client::PgPubSub;
use crate::error::Result;

/// How the dashboard behaves: see the [module docs](self).
#[derive(Clone)]
pub struct UiOptions {
    admin_token: Option<String>,
    hide_payloads: bool,
    sample_every: Duration,
    elected: Vec<String>,
    base_path: String,
    schema: Option<String>,
    #[cfg(feature = "metrics")]
    prometheus: Option<crate::metrics::PrometheusHandle>,
}

impl std::fmt::Debug for UiOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UiOptions")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "(set)"))
            .field("hide_payloads", &self.hide_payloads)
            .field("sample_every", &self.sample_every)
            .field("elected", &self.elected)
            .field("base_path", &self.base_path)
            .field("schema", &self.schema)
            .finish()
    }
}

impl Default for UiOptions {
    fn default() -> Self {
        UiOptions {
            admin_token: None,
            hide_payloads: false,
            sample_every: Duration::from_secs(10),
            elected: Vec::new(),
            base_path: String::new(),
            schema: None,
            #[cfg(feature = "metrics")]
            prometheus: None,
        }
    }
}

impl UiOptions {
    /// Read-only, payloads shown, a sample every 10 seconds, mounted at
    /// the root, default schema.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows mutations (retrying and deleting dead jobs) to whoever shows
    /// this token. An empty token is ignored (read-only).
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.admin_token = (!token.is_empty()).then_some(token);
        self
    }

    /// Leaves payloads out of every page and API answer (`null` in JSON).
    pub fn hide_payloads(mut self, hide: bool) -> Self {
        self.hide_payloads = hide;
        self
    }

    /// How often the charts' samples are taken (at least a second).
    pub fn sample_every(mut self, every: Duration) -> Self {
        self.sample_every = every.max(Duration::from_secs(1));
        self
    }

    /// Channels whose election leader to show, besides those this handle
    /// leads (the election locks are keyed by hashes, so names are needed).
    pub fn elected_channels<I, S>(mut self, channels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.elected = channels.into_iter().map(Into::into).collect();
        self
    }

    /// The path the router is mounted under (e.g. `/pubsub` with
    /// `Router::nest("/pubsub", ..)`), for the links of its pages.
    pub fn base_path(mut self, path: &str) -> Self {
        self.base_path = path.trim_end_matches('/').to_owned();
        self
    }

    /// Another schema than the default one.
    pub fn schema(mut self, schema: &str) -> Self {
        self.schema = Some(schema.to_owned());
        self
    }

    /// Serves `GET /metrics` (Prometheus text) from this recorder, with
    /// the database gauges read at each scrape
    /// ([`metrics::render`](crate::metrics::render)). Feature `metrics`.
    #[cfg(feature = "metrics")]
    pub fn prometheus(mut self, handle: crate::metrics::PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }
}

/// What every handler shares.
struct Ui {
    admin: Admin,
    opts: UiOptions,
    sessions: Mutex<auth::Sessions>,
    history: Mutex<history::History>,
}

type Shared = Arc<Ui>;

impl Ui {
    /// `path` under the base path, for links.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.opts.base_path)
    }

    /// Channels whose leader to show: the configured ones and those this
    /// handle leads.
    fn elected_names(&self) -> Vec<String> {
        let mut names = self.opts.elected.clone();
        names.extend(
            self.admin
                .pubsub()
                .stats()
                .leading
                .iter()
                .map(|c| c.as_str().to_owned()),
        );
        names.sort();
        names.dedup();
        names
    }
}

/// The dashboard and admin API for `pubsub`'s database, to serve or to
/// nest in your own [`Router`]. Starts the chart sampler when called
/// inside a Tokio runtime; it stops once the router (every clone of it)
/// is dropped or the handle shuts down. Fails on an invalid schema name.
pub fn router(pubsub: &PgPubSub, options: UiOptions) -> Result<Router> {
    let admin = match &options.schema {
        Some(s) => pubsub.admin().with_schema(s)?,
        None => pubsub.admin(),
    };
    let capacity = history::capacity(options.sample_every);
    let ui = Arc::new(Ui {
        admin,
        opts: options,
        sessions: Mutex::new(auth::Sessions::default()),
        history: Mutex::new(history::History::new(capacity)),
    });
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(history::sample(Arc::downgrade(&ui)));
    }
    let router = Router::new();
    #[cfg(feature = "metrics")]
    let router = match ui.opts.prometheus.is_some() {
        true => router.route("/metrics", get(api::metrics)),
        false => router,
    };
    Ok(router
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/api/queues", get(api::queues))
        .route("/api/queues/{queue}/jobs", get(api::jobs))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/cancel", post(api::cancel_job))
        .route("/api/queues/{queue}/pause", post(api::pause_queue))
        .route("/api/queues/{queue}/resume", post(api::resume_queue))
        .route("/api/dead", get(api::dead).delete(api::delete_dead_all))
        .route("/api/dead/retry", post(api::retry_dead_all))
        .route("/api/dead/{id}", axum::routing::delete(api::delete_dead))
        .route("/api/dead/{id}/retry", post(api::retry_dead))
        .route("/api/durable", get(api::durable))
        .route("/api/durable/{channel}/groups", get(api::groups))
        .route("/api/changes/feeds", get(api::feeds))
        .route("/api/changes/slots", get(api::slots))
        .route("/api/elected", get(api::elected))
        .route("/api/history", get(api::history))
        .route("/", get(pages::overview))
        .route("/queues/{queue}", get(pages::queue))
        .route("/jobs/{id}", get(pages::job))
        .route("/dead", get(pages::dead))
        .route("/durable", get(pages::durable))
        .route("/changes", get(pages::changes))
        .route("/elected", get(pages::elected))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/jobs/{id}/cancel", post(pages::cancel_job))
        .route("/queues/{queue}/pause", post(pages::pause_queue))
        .route("/queues/{queue}/resume", post(pages::resume_queue))
        .route("/dead/{id}/retry", post(pages::retry_dead))
        .route("/dead/{id}/delete", post(pages::delete_dead))
        .route("/dead/retry-all", post(pages::retry_dead_all))
        .route("/dead/delete-all", post(pages::delete_dead_all))
        .with_state(ui))
}
