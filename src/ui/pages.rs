//! The HTML pages: maud templates (every value escaped), no script.

use std::time::SystemTime;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use super::api::{status_of, ListQuery};
use super::auth::{cleared_cookie, session_cookie, session_id, Refusal, READ_ONLY};
use super::{history, Shared, Ui};
use crate::admin::{JobState, JobSummary};

const STYLE: &str = include_str!("style.css");

/// No script may run, whatever a value holds; forms post only here.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What a page needs to know about the viewer.
struct Viewer {
    /// The session's CSRF token when logged in.
    csrf: Option<String>,
}

impl Viewer {
    fn of(ui: &Ui, headers: &HeaderMap) -> Viewer {
        Viewer {
            csrf: ui.session_csrf(headers),
        }
    }
}

/// A whole page with the security headers.
fn page(ui: &Ui, viewer: &Viewer, status: StatusCode, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · pg-pubsub" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                header {
                    a.brand href=(ui.url("/")) { "pg-pubsub" }
                    a href=(ui.url("/")) { "Queues" }
                    a href=(ui.url("/dead")) { "Dead jobs" }
                    a href=(ui.url("/durable")) { "Durable" }
                    a href=(ui.url("/changes")) { "Changes" }
                    a href=(ui.url("/elected")) { "Elected" }
                    span.who {
                        @if let Some(csrf) = &viewer.csrf {
                            form.inline method="post" action=(ui.url("/logout")) {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        } @else if ui.opts.admin_token.is_some() {
                            a #login href=(ui.url("/login")) { "Log in" }
                        } @else {
                            "read-only"
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    let mut resp = (status, markup.into_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A page saying what went wrong.
fn error_page(ui: &Ui, viewer: &Viewer, status: StatusCode, message: &str) -> Response {
    page(
        ui,
        viewer,
        status,
        "Error",
        html! { p.error #error { (message) } },
    )
}

fn db_error(ui: &Ui, viewer: &Viewer, e: &crate::Error) -> Response {
    error_page(ui, viewer, status_of(e), &e.to_string())
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `2026-12-02 04:30:09Z`.
fn time(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.replace('T', " ")
}

fn opt_time(t: Option<SystemTime>) -> String {
    t.map(time).unwrap_or_else(|| "-".to_owned())
}

/// `3.2s`, `5m 10s`: an age for a table cell.
fn age(secs: f64) -> String {
    if secs <= 0.0 {
        return "-".to_owned();
    }
    let d = std::time::Duration::from_secs(secs.round() as u64);
    humantime::format_duration(d).to_string()
}

/// A form button for a mutation (only shown to a logged-in viewer).
fn action(
    ui: &Ui,
    viewer: &Viewer,
    path: &str,
    label: &str,
    back: &str,
    queue: Option<&str>,
) -> Markup {
    html! {
        @if let Some(csrf) = &viewer.csrf {
            form.inline method="post" action=(ui.url(path)) {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="back" value=(back);
                @if let Some(q) = queue {
                    input type="hidden" name="queue" value=(q);
                }
                button type="submit" { (label) }
            }
        }
    }
}

/// A note telling how to get the buttons, where mutations are possible.
fn login_hint(ui: &Ui, viewer: &Viewer) -> Markup {
    html! {
        @if viewer.csrf.is_none() {
            @if ui.opts.admin_token.is_some() {
                p.note { a href=(ui.url("/login")) { "Log in" } " with the admin token to retry or delete dead jobs, cancel jobs or pause queues." }
            } @else {
                p.note { "Read-only: started without an admin token." }
            }
        }
    }
}

/// A job list's table; dead jobs get their buttons.
fn job_table(ui: &Ui, viewer: &Viewer, jobs: &[JobSummary], back: &str) -> Markup {
    html! {
        table #jobs {
            tr {
                th { "id" } th { "queue" } th { "state" } th { "attempt" } th { "due / died" }
                th { "created" } th { "last error" } th { "payload" }
                @if viewer.csrf.is_some() { th { "" } }
            }
            @for j in jobs {
                tr.job data-id=(j.id) {
                    td.num { a href=(ui.url(&format!("/jobs/{}", j.id))) { (j.id) } }
                    td { a href=(ui.url(&format!("/queues/{}", enc(&j.queue)))) { (j.queue) } }
                    td { (j.state) }
                    td.num { (j.attempt) "/" (j.max_attempts) }
                    td { (time(j.at)) }
                    td { (time(j.created_at)) }
                    td { code.cut { (j.last_error.as_deref().unwrap_or("")) } }
                    td { code.cut { (payload_text(ui, j.payload.as_deref())) } }
                    @if j.state == JobState::Dead && viewer.csrf.is_some() {
                        td {
                            (action(ui, viewer, &format!("/dead/{}/retry", j.id), "Retry", back, None))
                            " "
                            (action(ui, viewer, &format!("/dead/{}/delete", j.id), "Delete", back, None))
                        }
                    } @else if j.state.is_live() && viewer.csrf.is_some() {
                        td { (action(ui, viewer, &format!("/jobs/{}/cancel", j.id), "Cancel", back, None)) }
                    } @else if viewer.csrf.is_some() {
                        td { "" }
                    }
                }
            }
        }
        @if jobs.is_empty() { p { em { "No jobs." } } }
    }
}

fn payload_text<'a>(ui: &Ui, payload: Option<&'a str>) -> &'a str {
    if ui.opts.hide_payloads {
        "(hidden)"
    } else {
        payload.unwrap_or("(hidden)")
    }
}

/// `GET /`: the queues and the charts.
pub(super) async fn overview(State(ui): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    let queues = match ui.admin.queues().await {
        Ok(q) => q,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let samples = ui
        .history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .samples();
    let body = html! {
        (history::charts(&samples))
        h2 { "Queues" }
        table #queues {
            tr {
                th { "queue" } th { "ready" } th { "scheduled" } th { "running" } th { "dead" }
                th { "completed" } th { "cancelled" } th { "oldest ready" } th { "" }
            }
            @for q in &queues {
                @let base = format!("/queues/{}", enc(&q.queue));
                tr.queue {
                    td.name { a href=(ui.url(&base)) { (q.queue) } }
                    td.num.ready { a href=(ui.url(&format!("{base}?state=ready"))) { (q.ready) } }
                    td.num.scheduled { a href=(ui.url(&format!("{base}?state=scheduled"))) { (q.scheduled) } }
                    td.num.running { a href=(ui.url(&format!("{base}?state=running"))) { (q.running) } }
                    td.num.dead { a href=(ui.url(&format!("{base}?state=dead"))) { (q.dead) } }
                    td.num.completed { a href=(ui.url(&format!("{base}?state=completed"))) { (q.completed) } }
                    td.num.cancelled { a href=(ui.url(&format!("{base}?state=cancelled"))) { (q.cancelled) } }
                    td { (age(q.oldest_ready_age_seconds)) }
                    td.paused { @if q.paused { strong { "paused" } } }
                }
            }
        }
        @if queues.is_empty() { p { em { "No queue has jobs." } } }
    };
    page(&ui, &viewer, StatusCode::OK, "Overview", body)
}

/// `GET /queues/{queue}?state=&after=&limit=`.
pub(super) async fn queue(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    let state = match q.state() {
        Ok(s) => s,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let page_req = q.page();
    let jobs = match ui.admin.jobs(&queue, state, page_req).await {
        Ok(j) => j,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let paused = match ui.admin.is_paused(&queue).await {
        Ok(p) => p,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let base = format!("/queues/{}", enc(&queue));
    let back = ui.url(&format!("{base}?state={state}"));
    let full = jobs.len() >= page_req.limit.clamp(1, crate::admin::Page::MAX_LIMIT) as usize;
    let body = html! {
        p #paused-state {
            @if paused {
                strong { "Paused: " } "workers claim nothing from this queue. "
                (action(&ui, &viewer, &format!("{base}/resume"), "Resume", &back, None))
            } @else {
                "Running. "
                (action(&ui, &viewer, &format!("{base}/pause"), "Pause", &back, None))
            }
        }
        p.tabs {
            @for s in JobState::ALL {
                a class=(if s == state { "on" } else { "" })
                    href=(ui.url(&format!("{base}?state={s}"))) { (s) }
            }
        }
        @if state == JobState::Dead {
            (login_hint(&ui, &viewer))
            @if viewer.csrf.is_some() && !jobs.is_empty() {
                p {
                    (action(&ui, &viewer, "/dead/retry-all", "Retry all dead jobs of this queue", &back, Some(&queue)))
                    " "
                    (action(&ui, &viewer, "/dead/delete-all", "Delete all dead jobs of this queue", &back, Some(&queue)))
                }
            }
        }
        (job_table(&ui, &viewer, &jobs, &back))
        @if let (true, Some(last)) = (full, jobs.last()) {
            p { a #next href=(ui.url(&format!("{base}?state={state}&after={}&limit={}", last.id, page_req.limit))) { "Next page" } }
        }
    };
    page(
        &ui,
        &viewer,
        StatusCode::OK,
        &format!("Queue {queue}: {state} jobs"),
        body,
    )
}

/// `GET /dead?queue=&after=&limit=`.
pub(super) async fn dead(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    let page_req = q.page();
    let jobs = match ui.admin.dead_jobs(q.queue.as_deref(), page_req).await {
        Ok(j) => j,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let back = ui.url("/dead");
    let full = jobs.len() >= page_req.limit.clamp(1, crate::admin::Page::MAX_LIMIT) as usize;
    let body = html! {
        (login_hint(&ui, &viewer))
        (job_table(&ui, &viewer, &jobs, &back))
        @if let (true, Some(last)) = (full, jobs.last()) {
            p { a #next href=(ui.url(&format!("/dead?after={}&limit={}{}", last.id, page_req.limit,
                q.queue.as_deref().map(|q| format!("&queue={}", enc(q))).unwrap_or_default()))) { "Next page" } }
        }
    };
    page(&ui, &viewer, StatusCode::OK, "Dead jobs", body)
}

/// `GET /jobs/{id}`.
pub(super) async fn job(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    let job = match ui.admin.job(id).await {
        Ok(Some(j)) => j,
        Ok(None) => {
            return error_page(
                &ui,
                &viewer,
                StatusCode::NOT_FOUND,
                &format!("No job {id}: it never existed or left the history."),
            )
        }
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let back = ui.url(&format!("/queues/{}?state=dead", enc(&job.queue)));
    let body = html! {
        dl {
            dt { "queue" } dd { a href=(ui.url(&format!("/queues/{}", enc(&job.queue)))) { (job.queue) } }
            dt { "state" } dd #state { (job.state) }
            dt { "priority" } dd { (job.priority) }
            dt { "attempt" } dd { (job.attempt) " of " (job.max_attempts) }
            dt { "due" } dd { (opt_time(job.run_at)) }
            dt { "lease until" } dd { (opt_time(job.lease_until)) }
            dt { "unique key" } dd { (job.unique_key.as_deref().unwrap_or("-")) }
            dt { "created" } dd { (time(job.created_at)) }
            dt { "died" } dd { (opt_time(job.died_at)) }
            dt { "finished" } dd { (opt_time(job.finished_at)) }
        }
        @if job.state == JobState::Completed {
            h2 { "Output" }
            pre #output { (payload_text(&ui, job.output.as_deref().or(Some("-")))) }
        }
        h2 { "Last error" }
        pre #last-error { (job.last_error.as_deref().unwrap_or("-")) }
        h2 { "Payload" }
        pre #payload { (payload_text(&ui, job.payload.as_deref())) }
        @if job.state == JobState::Dead {
            (login_hint(&ui, &viewer))
            p {
                (action(&ui, &viewer, &format!("/dead/{id}/retry"), "Retry", &back, None))
                " "
                (action(&ui, &viewer, &format!("/dead/{id}/delete"), "Delete", &back, None))
            }
        }
        @if job.state.is_live() {
            (login_hint(&ui, &viewer))
            p { (action(&ui, &viewer, &format!("/jobs/{id}/cancel"), "Cancel", &ui.url(&format!("/jobs/{id}")), None)) }
        }
    };
    page(&ui, &viewer, StatusCode::OK, &format!("Job {id}"), body)
}

/// `GET /durable`.
pub(super) async fn durable(State(ui): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    let channels = match ui.admin.durable_channels().await {
        Ok(c) => c,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let body = html! {
        @if channels.is_empty() { p { em { "No durable channel has a group." } } }
        @for ch in &channels {
            h2 { (ch.channel) }
            p {
                @if ch.quiet { "quiet (consumers poll); " }
                "max age: "
                @match ch.max_age_seconds { Some(s) => (age(s)), None => "none" }
            }
            table.groups {
                tr { th { "group" } th { "position" } th { "acked" } th { "lag (messages)" } th { "lag (age)" } }
                @for g in &ch.groups {
                    tr {
                        td { (g.group) }
                        td { code { (g.position) } }
                        td { (time(g.acked_at)) }
                        td.num { (g.lag_messages) }
                        td { (age(g.lag_seconds)) }
                    }
                }
            }
        }
    };
    page(&ui, &viewer, StatusCode::OK, "Durable channels", body)
}

/// `GET /changes`: trigger feeds and replication slots.
pub(super) async fn changes(State(ui): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    let feeds = match ui.admin.change_feeds().await {
        Ok(f) => f,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let slots = match ui.admin.wal_slots().await {
        Ok(s) => s,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let body = html! {
        h2 { "Trigger feeds" }
        table #feeds {
            tr { th { "table" } th { "channel" } th { "target" } th { "level" } th { "operations" } th { "columns" } th { "excluded" } }
            @for f in &feeds {
                tr {
                    td { (f.table) } td { (f.channel) } td { (f.target) } td { (f.level) }
                    td { (f.ops.join(", ")) }
                    td { (f.columns.as_ref().map(|c| c.join(", ")).unwrap_or_else(|| "all".into())) }
                    td { (f.exclude.as_ref().map(|c| c.join(", ")).unwrap_or_default()) }
                }
            }
        }
        @if feeds.is_empty() { p { em { "No trigger feed." } } }
        h2 { "Replication slots" }
        table #slots {
            tr { th { "slot" } th { "kind" } th { "plugin" } th { "database" } th { "active" } th { "pid" } th { "WAL held" } th { "status" } }
            @for s in &slots {
                tr {
                    td { (s.name) } td { (s.kind) } td { (s.plugin.as_deref().unwrap_or("-")) }
                    td { (s.database.as_deref().unwrap_or("-")) }
                    td { (if s.active { "yes" } else { "no" }) }
                    td.num { (s.active_pid.map(|p| p.to_string()).unwrap_or_default()) }
                    td.num { (s.lag_bytes.map(bytes).unwrap_or_else(|| "-".into())) }
                    td { (s.wal_status.as_deref().unwrap_or("-")) }
                }
            }
        }
        @if slots.is_empty() { p { em { "No replication slot." } } }
    };
    page(&ui, &viewer, StatusCode::OK, "Change feeds", body)
}

/// `1.5 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `GET /elected`.
pub(super) async fn elected(State(ui): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    let names = ui.elected_names();
    let channels = match ui.admin.elected_channels(&names).await {
        Ok(c) => c,
        Err(e) => return db_error(&ui, &viewer, &e),
    };
    let body = html! {
        p { "Channels configured for the dashboard, and those this process leads. Election locks are keyed by hashes of the names, so others are not listed." }
        table #elected {
            tr { th { "channel" } th { "leader pid" } th { "application" } th { "client" } th { "session since" } }
            @for c in &channels {
                tr {
                    td { (c.channel) }
                    td.num { (c.leader_pid.map(|p| p.to_string()).unwrap_or_else(|| "none".into())) }
                    td { (c.application_name.as_deref().unwrap_or("-")) }
                    td { (c.client_addr.as_deref().unwrap_or("-")) }
                    td { (opt_time(c.leader_since)) }
                }
            }
        }
        @if channels.is_empty() { p { em { "No elected channel known." } } }
    };
    page(&ui, &viewer, StatusCode::OK, "Elected channels", body)
}

/// `GET /login`.
pub(super) async fn login_form(State(ui): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    if ui.opts.admin_token.is_none() {
        return error_page(&ui, &viewer, StatusCode::FORBIDDEN, READ_ONLY);
    }
    let body = html! {
        form #login-form method="post" action=(ui.url("/login")) {
            label { "Admin token " input #token type="password" name="token" autocomplete="current-password" autofocus; }
            " "
            button #login-submit type="submit" { "Log in" }
        }
    };
    page(&ui, &viewer, StatusCode::OK, "Log in", body)
}

/// The login form.
#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

/// `POST /login`: a session cookie for the right token.
pub(super) async fn login(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let viewer = Viewer::of(&ui, &headers);
    match ui.login(&form.token) {
        Ok((id, _csrf)) => {
            tracing::info!(target: "pg_pubsub::ui", "admin: dashboard login");
            let mut resp = Redirect::to(&ui.url("/")).into_response();
            if let Ok(v) = HeaderValue::from_str(&session_cookie(&id)) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(Refusal::ReadOnly) => error_page(&ui, &viewer, StatusCode::FORBIDDEN, READ_ONLY),
        Err(_) => {
            tracing::warn!(target: "pg_pubsub::ui", "admin: dashboard login with a wrong token");
            error_page(&ui, &viewer, StatusCode::UNAUTHORIZED, "Wrong admin token.")
        }
    }
}

/// A mutation form's fields.
#[derive(Deserialize)]
pub(super) struct ActionForm {
    #[serde(default)]
    csrf: String,
    /// Where to go afterwards (a path of this dashboard).
    back: Option<String>,
    /// The queue of a bulk action.
    queue: Option<String>,
}

/// `POST /logout`.
pub(super) async fn logout(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if ui.check_form(&headers, &form.csrf).is_ok() {
        if let Some(id) = session_id(&headers) {
            ui.lock_sessions().close(&id);
        }
    }
    let mut resp = Redirect::to(&ui.url("/")).into_response();
    if let Ok(v) = HeaderValue::from_str(&cleared_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// Checks a mutation form; the refusal page if it fails.
fn refused(ui: &Ui, headers: &HeaderMap, form: &ActionForm) -> Option<Response> {
    let viewer = Viewer::of(ui, headers);
    ui.check_form(headers, &form.csrf).err().map(|r| match r {
        Refusal::ReadOnly => error_page(ui, &viewer, StatusCode::FORBIDDEN, READ_ONLY),
        Refusal::Unauthorized => error_page(
            ui,
            &viewer,
            StatusCode::FORBIDDEN,
            "Log in with the admin token first (your session may have expired).",
        ),
        Refusal::BadCsrf => error_page(
            ui,
            &viewer,
            StatusCode::FORBIDDEN,
            "This form is stale or was not sent by this dashboard (CSRF check failed); reload the page.",
        ),
    })
}

/// Where to go after an action: the form's `back` when it is a local path.
fn back(ui: &Ui, form: &ActionForm, default: &str) -> Response {
    let local = |p: &&String| p.starts_with('/') && !p.starts_with("//") && !p.contains('\\');
    match form.back.as_ref().filter(local) {
        Some(p) => Redirect::to(p).into_response(),
        None => Redirect::to(&ui.url(default)).into_response(),
    }
}

/// `POST /dead/{id}/retry`.
pub(super) async fn retry_dead(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(form): Form<ActionForm>,
) -> Response {
    on_dead_job(ui, headers, id, form, true).await
}

/// Retries (`retry`) or deletes dead job `id`, back to the form's page.
async fn on_dead_job(
    ui: Shared,
    headers: HeaderMap,
    id: i64,
    form: ActionForm,
    retry: bool,
) -> Response {
    if let Some(r) = refused(&ui, &headers, &form) {
        return r;
    }
    let viewer = Viewer::of(&ui, &headers);
    let done = if retry {
        ui.admin.retry_dead(id).await
    } else {
        ui.admin.delete_dead(id).await
    };
    match done {
        Ok(true) => {
            let what = if retry { "retried" } else { "deleted" };
            tracing::info!(target: "pg_pubsub::ui", via = "page", id, "admin: dead job {what}");
            back(&ui, &form, "/dead")
        }
        Ok(false) => error_page(
            &ui,
            &viewer,
            StatusCode::NOT_FOUND,
            &format!("No dead job {id}."),
        ),
        Err(e) => db_error(&ui, &viewer, &e),
    }
}

/// `POST /jobs/{id}/cancel`.
pub(super) async fn cancel_job(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(r) = refused(&ui, &headers, &form) {
        return r;
    }
    let viewer = Viewer::of(&ui, &headers);
    match ui.admin.cancel(id).await {
        Ok(crate::queue::Cancelled::Unknown) => error_page(
            &ui,
            &viewer,
            StatusCode::NOT_FOUND,
            &format!("No job {id}."),
        ),
        Ok(what) => {
            tracing::info!(target: "pg_pubsub::ui", via = "page", id, ?what, "admin: job cancelled");
            back(&ui, &form, &format!("/jobs/{id}"))
        }
        Err(e) => db_error(&ui, &viewer, &e),
    }
}

/// `POST /queues/{queue}/pause`.
pub(super) async fn pause_queue(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    set_paused(ui, headers, queue, form, true).await
}

/// `POST /queues/{queue}/resume`.
pub(super) async fn resume_queue(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    set_paused(ui, headers, queue, form, false).await
}

async fn set_paused(
    ui: Shared,
    headers: HeaderMap,
    queue: String,
    form: ActionForm,
    pause: bool,
) -> Response {
    if let Some(r) = refused(&ui, &headers, &form) {
        return r;
    }
    let viewer = Viewer::of(&ui, &headers);
    let done = match pause {
        true => ui.admin.pause(&queue).await,
        false => ui.admin.resume(&queue).await,
    };
    match done {
        Ok(changed) => {
            let what = if pause { "paused" } else { "resumed" };
            tracing::info!(target: "pg_pubsub::ui", via = "page", queue, changed, "admin: queue {what}");
            back(&ui, &form, &format!("/queues/{}", enc(&queue)))
        }
        Err(e) => db_error(&ui, &viewer, &e),
    }
}

/// `POST /dead/{id}/delete`.
pub(super) async fn delete_dead(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(form): Form<ActionForm>,
) -> Response {
    on_dead_job(ui, headers, id, form, false).await
}

/// `POST /dead/retry-all` (field `queue`).
pub(super) async fn retry_dead_all(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    bulk(ui, headers, form, true).await
}

/// `POST /dead/delete-all` (field `queue`).
pub(super) async fn delete_dead_all(
    State(ui): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    bulk(ui, headers, form, false).await
}

/// A bulk action on the dead jobs of one queue (pages always name one).
async fn bulk(ui: Shared, headers: HeaderMap, form: ActionForm, retry: bool) -> Response {
    if let Some(r) = refused(&ui, &headers, &form) {
        return r;
    }
    let viewer = Viewer::of(&ui, &headers);
    let Some(queue) = form.queue.as_deref() else {
        return error_page(&ui, &viewer, StatusCode::BAD_REQUEST, "No queue named.");
    };
    let done = if retry {
        ui.admin.retry_dead_all(Some(queue)).await
    } else {
        ui.admin.delete_dead_all(Some(queue)).await
    };
    match done {
        Ok(n) => {
            let what = if retry { "retried" } else { "deleted" };
            tracing::info!(target: "pg_pubsub::ui", via = "page", queue, count = n, "admin: dead jobs {what}");
            back(&ui, &form, "/dead")
        }
        Err(e) => db_error(&ui, &viewer, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(enc("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(enc("émail"), "%C3%A9mail");
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
