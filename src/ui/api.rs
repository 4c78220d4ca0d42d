//! The JSON API and the health checks.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::auth::{Refusal, READ_ONLY};
use super::Shared;
use crate::admin::{JobState, JobSummary, Page};
use crate::error::ErrorKind;

/// An API failure: a status and `{"error": message}`.
pub(super) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// The status a library error answers with.
pub(super) fn status_of(e: &crate::Error) -> StatusCode {
    match e.kind() {
        ErrorKind::InvalidName | ErrorKind::Config | ErrorKind::Limit => StatusCode::BAD_REQUEST,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        _ if e.is_connection() || e.kind() == ErrorKind::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        _ if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        ApiError(status_of(&e), e.to_string())
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::ReadOnly => ApiError(StatusCode::FORBIDDEN, READ_ONLY.to_owned()),
            Refusal::Unauthorized | Refusal::BadCsrf => ApiError(
                StatusCode::UNAUTHORIZED,
                "this needs the admin token: Authorization: Bearer <token>".to_owned(),
            ),
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

/// `GET /healthz`: the process answers.
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: the database answers too.
pub(super) async fn readyz(State(ui): State<Shared>) -> Response {
    match ui.admin.ping().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

/// `GET /metrics`: the recorder's text, after reading the database gauges.
/// A failed read answers 503 so the scrape is marked down.
#[cfg(feature = "metrics")]
pub(super) async fn metrics(State(ui): State<Shared>) -> Response {
    let Some(handle) = ui.opts.prometheus.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let metrics = match ui
        .admin
        .pubsub()
        .metrics()
        .with_schema(ui.admin.schema().as_str())
    {
        Ok(m) => m,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    match metrics.render(handle).await {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("metrics unavailable: {e}\n"),
        )
            .into_response(),
    }
}

/// `GET /api/queues`.
pub(super) async fn queues(State(ui): State<Shared>) -> ApiResult<Vec<crate::admin::QueueSummary>> {
    Ok(Json(ui.admin.queues().await?))
}

/// A job list's query string.
#[derive(Deserialize)]
pub(super) struct ListQuery {
    pub(super) state: Option<String>,
    pub(super) queue: Option<String>,
    pub(super) after: Option<i64>,
    pub(super) limit: Option<u32>,
}

impl ListQuery {
    pub(super) fn page(&self) -> Page {
        Page {
            after: self.after,
            limit: self.limit.unwrap_or(100),
        }
    }

    pub(super) fn state(&self) -> Result<JobState, crate::Error> {
        self.state.as_deref().unwrap_or("ready").parse()
    }
}

/// Jobs with the payloads hidden if so configured, and the next page's key.
fn job_page(ui: &Shared, mut jobs: Vec<JobSummary>, page: Page) -> serde_json::Value {
    if ui.opts.hide_payloads {
        jobs.iter_mut().for_each(|j| j.payload = None);
    }
    let full = jobs.len() >= page.limit.clamp(1, Page::MAX_LIMIT) as usize;
    let next_after = jobs.last().filter(|_| full).map(|j| j.id);
    json!({ "jobs": jobs, "next_after": next_after })
}

/// `GET /api/queues/{queue}/jobs?state=&after=&limit=`.
pub(super) async fn jobs(
    State(ui): State<Shared>,
    Path(queue): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<serde_json::Value> {
    let state = q.state()?;
    let page = q.page();
    let jobs = ui.admin.jobs(&queue, state, page).await?;
    Ok(Json(job_page(&ui, jobs, page)))
}

/// `GET /api/dead?queue=&after=&limit=`.
pub(super) async fn dead(
    State(ui): State<Shared>,
    Query(q): Query<ListQuery>,
) -> ApiResult<serde_json::Value> {
    let page = q.page();
    let jobs = ui.admin.dead_jobs(q.queue.as_deref(), page).await?;
    Ok(Json(job_page(&ui, jobs, page)))
}

/// `GET /api/jobs/{id}`.
pub(super) async fn job(
    State(ui): State<Shared>,
    Path(id): Path<i64>,
) -> ApiResult<crate::admin::JobDetail> {
    let mut job = ui
        .admin
        .job(id)
        .await?
        .ok_or_else(|| not_found(format!("no job {id}")))?;
    if ui.opts.hide_payloads {
        job.payload = None;
        job.output = None;
    }
    Ok(Json(job))
}

/// `POST /api/dead/{id}/retry`.
pub(super) async fn retry_dead(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult<serde_json::Value> {
    on_dead_job(ui, headers, id, true).await
}

/// `POST /api/jobs/{id}/cancel`: `{"cancelled": "removed" | "signalled" |
/// "already_finished"}`; 404 when there is no such job.
pub(super) async fn cancel_job(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult<serde_json::Value> {
    ui.check_bearer(&headers)?;
    let what = ui.admin.cancel(id).await?;
    if what == crate::queue::Cancelled::Unknown {
        return Err(not_found(format!("no job {id}")));
    }
    tracing::info!(target: "pg_pubsub::ui", via = "api", id, ?what, "admin: job cancelled");
    Ok(Json(json!({ "cancelled": what })))
}

/// `POST /api/queues/{queue}/pause`: `{"paused": true, "changed": bool}`.
pub(super) async fn pause_queue(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(queue): Path<String>,
) -> ApiResult<serde_json::Value> {
    set_paused(ui, headers, queue, true).await
}

/// `POST /api/queues/{queue}/resume`: `{"paused": false, "changed": bool}`.
pub(super) async fn resume_queue(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(queue): Path<String>,
) -> ApiResult<serde_json::Value> {
    set_paused(ui, headers, queue, false).await
}

/// `DELETE /api/dead/{id}`.
pub(super) async fn delete_dead(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult<serde_json::Value> {
    on_dead_job(ui, headers, id, false).await
}

/// Pauses (`pause`) or resumes `queue`: `{"paused": pause, "changed": bool}`.
async fn set_paused(
    ui: Shared,
    headers: HeaderMap,
    queue: String,
    pause: bool,
) -> ApiResult<serde_json::Value> {
    ui.check_bearer(&headers)?;
    let changed = if pause {
        ui.admin.pause(&queue).await?
    } else {
        ui.admin.resume(&queue).await?
    };
    let what = if pause { "paused" } else { "resumed" };
    tracing::info!(target: "pg_pubsub::ui", via = "api", queue, changed, "admin: queue {what}");
    Ok(Json(json!({ "paused": pause, "changed": changed })))
}

/// Retries (`retry`) or deletes dead job `id`: `{"retried": 1}` or
/// `{"deleted": 1}`; 404 when there is no such dead job.
async fn on_dead_job(
    ui: Shared,
    headers: HeaderMap,
    id: i64,
    retry: bool,
) -> ApiResult<serde_json::Value> {
    ui.check_bearer(&headers)?;
    let found = if retry {
        ui.admin.retry_dead(id).await?
    } else {
        ui.admin.delete_dead(id).await?
    };
    if !found {
        return Err(not_found(format!("no dead job {id}")));
    }
    let what = if retry { "retried" } else { "deleted" };
    tracing::info!(target: "pg_pubsub::ui", via = "api", id, "admin: dead job {what}");
    Ok(Json(json!({ what: 1 })))
}

/// The filter of a bulk action: a queue, or explicitly every queue.
#[derive(Deserialize)]
pub(super) struct BulkQuery {
    queue: Option<String>,
    #[serde(default)]
    all: bool,
}

impl BulkQuery {
    fn queue(&self) -> Result<Option<&str>, ApiError> {
        match (&self.queue, self.all) {
            (Some(q), _) => Ok(Some(q)),
            (None, true) => Ok(None),
            (None, false) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                "name a queue (?queue=NAME), or ask for every queue with ?all=true".to_owned(),
            )),
        }
    }
}

/// `POST /api/dead/retry?queue=` (or `?all=true`).
pub(super) async fn retry_dead_all(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<BulkQuery>,
) -> ApiResult<serde_json::Value> {
    bulk(ui, headers, q, true).await
}

/// `DELETE /api/dead?queue=` (or `?all=true`).
pub(super) async fn delete_dead_all(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<BulkQuery>,
) -> ApiResult<serde_json::Value> {
    bulk(ui, headers, q, false).await
}

/// Retries (`retry`) or deletes the dead jobs `q` names: `{"retried": n}`
/// or `{"deleted": n}`.
async fn bulk(
    ui: Shared,
    headers: HeaderMap,
    q: BulkQuery,
    retry: bool,
) -> ApiResult<serde_json::Value> {
    ui.check_bearer(&headers)?;
    let queue = q.queue()?;
    let n = if retry {
        ui.admin.retry_dead_all(queue).await?
    } else {
        ui.admin.delete_dead_all(queue).await?
    };
    let what = if retry { "retried" } else { "deleted" };
    tracing::info!(target: "pg_pubsub::ui", via = "api", queue, count = n, "admin: dead jobs {what}");
    Ok(Json(json!({ what: n })))
}

/// `GET /api/durable`.
pub(super) async fn durable(
    State(ui): State<Shared>,
) -> ApiResult<Vec<crate::admin::ChannelSummary>> {
    Ok(Json(ui.admin.durable_channels().await?))
}

/// `GET /api/durable/{channel}/groups`.
pub(super) async fn groups(
    State(ui): State<Shared>,
    Path(channel): Path<String>,
) -> ApiResult<Vec<crate::admin::GroupSummary>> {
    Ok(Json(ui.admin.groups(&channel).await?))
}

/// `GET /api/changes/feeds`.
pub(super) async fn feeds(State(ui): State<Shared>) -> ApiResult<Vec<crate::admin::FeedSummary>> {
    Ok(Json(ui.admin.change_feeds().await?))
}

/// `GET /api/changes/slots`.
pub(super) async fn slots(State(ui): State<Shared>) -> ApiResult<Vec<crate::admin::SlotInfo>> {
    Ok(Json(ui.admin.wal_slots().await?))
}

/// `GET /api/elected`.
pub(super) async fn elected(
    State(ui): State<Shared>,
) -> ApiResult<Vec<crate::admin::ElectedChannel>> {
    let names = ui.elected_names();
    Ok(Json(ui.admin.elected_channels(&names).await?))
}

/// `GET /api/history`: the charts' samples, oldest first.
pub(super) async fn history(State(ui): State<Shared>) -> Json<serde_json::Value> {
    let samples = ui
        .history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .samples();
    Json(json!({ "sample_every_seconds": ui.opts.sample_every.as_secs_f64(), "samples": samples }))
}
