//! The dashboard's router served on a loopback port, driven by a real HTTP
//! client against the test server.
#![cfg(feature = "ui")]

mod common;

use pg_pubsub::ui::UiOptions;
use reqwest::header::{AUTHORIZATION, CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::Value;

use common::ui::{dead_job, serve};
use common::{channel, raw_client, where_is, WAIT};

const TOKEN: &str = "t0ken-for-tests";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()
        .expect("client")
}

async fn get_json(url: &str) -> Value {
    let resp = http().get(url).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    resp.json().await.expect("json")
}

async fn get_text(url: &str) -> (StatusCode, String) {
    let resp = http().get(url).send().await.expect("GET");
    let status = resp.status();
    (status, resp.text().await.expect("body"))
}

/// A POST or DELETE of `url` with `auth` as its Authorization header.
async fn with_token(method: reqwest::Method, url: String, auth: &str) -> reqwest::Response {
    http()
        .request(method, url)
        .header(AUTHORIZATION, auth)
        .send()
        .await
        .expect("request")
}

/// A form POST of `fields` to `url`, with the session `cookie` if any.
async fn post_form(
    url: String,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http().post(url).form(fields);
    if let Some(c) = cookie {
        req = req.header(COOKIE, c);
    }
    req.send().await.expect("POST")
}

/// The page at `url` as the session `cookie` sees it.
async fn page_as(url: String, cookie: &str) -> String {
    http()
        .get(url)
        .header(COOKIE, cookie)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body")
}

fn find_queue<'a>(queues: &'a Value, name: &str) -> &'a Value {
    queues
        .as_array()
        .expect("array")
        .iter()
        .find(|q| q["queue"] == name)
        .unwrap_or_else(|| panic!("queue {name} missing from {queues}"))
}

#[tokio::test]
async fn health_queues_jobs_pages_and_one_job() {
    let ps = common::pubsub().await;
    let q = channel("uiq");
    let queue = ps.queue();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            queue
                .enqueue(&q, &serde_json::json!({ "n": i }))
                .await
                .expect("enqueue")
                .id()
                .expect("new"),
        );
    }
    raw_client()
        .await
        .execute(
            "INSERT INTO pgpubsub.jobs (queue, run_at, payload) VALUES ($1, now() + interval '1 hour', 'later')",
            &[&q],
        )
        .await
        .expect("scheduled job");
    let dead = dead_job(&ps, &q, "dead payload").await;
    let base = serve(&ps, UiOptions::new()).await;

    assert_eq!(get_text(&format!("{base}/healthz")).await.0, StatusCode::OK);
    assert_eq!(get_text(&format!("{base}/readyz")).await.0, StatusCode::OK);

    let queues = get_json(&format!("{base}/api/queues")).await;
    let mine = find_queue(&queues, &q);
    assert_eq!(mine["ready"], 3);
    assert_eq!(mine["scheduled"], 1);
    assert_eq!(mine["running"], 0);
    assert_eq!(mine["dead"], 1);

    // Keyset paging: two pages of two and one, then nothing.
    let p1 = get_json(&format!("{base}/api/queues/{q}/jobs?state=ready&limit=2")).await;
    let got: Vec<i64> = p1["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(got, ids[..2]);
    let after = p1["next_after"].as_i64().expect("next page");
    let p2 = get_json(&format!(
        "{base}/api/queues/{q}/jobs?state=ready&limit=2&after={after}"
    ))
    .await;
    assert_eq!(p2["jobs"][0]["id"], ids[2]);
    assert_eq!(p2["next_after"], Value::Null);
    let sched = get_json(&format!("{base}/api/queues/{q}/jobs?state=scheduled")).await;
    assert_eq!(sched["jobs"][0]["payload"], "later");
    assert_eq!(sched["jobs"][0]["state"], "scheduled");

    let job = get_json(&format!("{base}/api/jobs/{}", ids[1])).await;
    assert_eq!(job["queue"], q.as_str());
    assert_eq!(job["state"], "ready");
    assert_eq!(job["payload"], r#"{"n":1}"#);
    let dj = get_json(&format!("{base}/api/jobs/{dead}")).await;
    assert_eq!(dj["state"], "dead");
    assert_eq!(dj["last_error"], "boom <b>");
    assert_eq!(dj["attempt"], 3);
    let (status, body) = get_text(&format!("{base}/api/jobs/{}", i64::MAX)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let deadlist = get_json(&format!("{base}/api/dead?queue={q}")).await;
    assert_eq!(deadlist["jobs"][0]["id"], dead);
    let (status, _) = get_text(&format!("{base}/api/queues/{q}/jobs?state=finished")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The pages show the same.
    let (status, html) = get_text(&format!("{base}/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(&q), "{html}");
    assert!(html.contains("<svg"), "charts: {html}");
    let (_, html) = get_text(&format!("{base}/queues/{q}?state=dead")).await;
    assert!(html.contains("dead payload"), "{html}");
    assert!(html.contains("Read-only"), "{html}");
    let (_, html) = get_text(&format!("{base}/jobs/{}", ids[0])).await;
    assert!(html.contains("{&quot;n&quot;:0}"), "{html}");
    for page in ["/dead", "/durable", "/changes", "/elected", "/api/history"] {
        let (status, body) = get_text(&format!("{base}{page}")).await;
        assert_eq!(status, StatusCode::OK, "{page}: {body}");
    }
    ps.shutdown().await;
}

#[tokio::test]
async fn mutations_are_refused_without_a_token_and_need_it_with_one() {
    let ps = common::pubsub().await;
    let q = channel("uimut");
    let a = dead_job(&ps, &q, "a").await;
    let b = dead_job(&ps, &q, "b").await;

    // Read-only: 403 with a message saying how to allow changes.
    let ro = serve(&ps, UiOptions::new()).await;
    let resp = with_token(
        reqwest::Method::POST,
        format!("{ro}/api/dead/{a}/retry"),
        &format!("Bearer {TOKEN}"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let msg: Value = resp.json().await.expect("json");
    assert!(
        msg["error"]
            .as_str()
            .is_some_and(|m| m.contains("admin token")),
        "{msg}"
    );
    let resp = post_form(format!("{ro}/dead/{a}/retry"), None, &[("csrf", "x")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(where_is(a).await, "dead");

    let rw = serve(&ps, UiOptions::new().admin_token(TOKEN)).await;
    for auth in [None, Some("Bearer wrong"), Some("t0ken-for-tests")] {
        let mut req = http().post(format!("{rw}/api/dead/{a}/retry"));
        if let Some(h) = auth {
            req = req.header(AUTHORIZATION, h);
        }
        let resp = req.send().await.expect("POST");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    assert_eq!(where_is(a).await, "dead");

    let bearer = format!("Bearer {TOKEN}");
    let resp = with_token(
        reqwest::Method::POST,
        format!("{rw}/api/dead/{a}/retry"),
        &bearer,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(where_is(a).await, "ready");
    // Again: it is no longer dead.
    let resp = with_token(
        reqwest::Method::POST,
        format!("{rw}/api/dead/{a}/retry"),
        &bearer,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let resp = with_token(
        reqwest::Method::DELETE,
        format!("{rw}/api/dead/{b}"),
        &bearer,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(where_is(b).await, "gone");

    // Bulk: a queue must be named (or every queue asked for).
    let c = dead_job(&ps, &q, "c").await;
    let d = dead_job(&ps, &q, "d").await;
    let resp = with_token(
        reqwest::Method::POST,
        format!("{rw}/api/dead/retry"),
        &bearer,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = with_token(
        reqwest::Method::POST,
        format!("{rw}/api/dead/retry?queue={q}"),
        &bearer,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let n: Value = resp.json().await.expect("json");
    assert_eq!(n["retried"], 2);
    assert_eq!(where_is(c).await, "ready");
    assert_eq!(where_is(d).await, "ready");
    let e = dead_job(&ps, &q, "e").await;
    let resp = with_token(
        reqwest::Method::DELETE,
        format!("{rw}/api/dead?queue={q}"),
        &bearer,
    )
    .await;
    let n: Value = resp.json().await.expect("json");
    assert_eq!(n["deleted"], 1);
    assert_eq!(where_is(e).await, "gone");
    ps.shutdown().await;
}

/// The `name=value` of the session cookie a login sets.
async fn log_in(base: &str) -> String {
    let resp = http()
        .post(format!("{base}/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = resp
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("session cookie")
        .to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    cookie.split(';').next().expect("pair").to_owned()
}

/// The CSRF token in a page's forms.
fn csrf_in(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let at = html.find(marker).expect("a form with a CSRF token") + marker.len();
    html[at..].split('"').next().expect("value").to_owned()
}

#[tokio::test]
async fn page_mutations_need_a_session_and_its_csrf_token() {
    let ps = common::pubsub().await;
    let q = channel("uiform");
    let a = dead_job(&ps, &q, "a").await;
    let base = serve(&ps, UiOptions::new().admin_token(TOKEN)).await;

    let resp = http()
        .post(format!("{base}/login"))
        .form(&[("token", "wrong")])
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().get(SET_COOKIE).is_none());

    let cookie = log_in(&base).await;
    let html = page_as(format!("{base}/queues/{q}?state=dead"), &cookie).await;
    let csrf = csrf_in(&html);
    assert!(html.contains("Retry"), "{html}");

    // No session; a session with a wrong CSRF token: refused.
    let resp = post_form(
        format!("{base}/dead/{a}/retry"),
        None,
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = post_form(
        format!("{base}/dead/{a}/retry"),
        Some(&cookie),
        &[("csrf", "forged")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(where_is(a).await, "dead");

    let resp = post_form(
        format!("{base}/dead/{a}/retry"),
        Some(&cookie),
        &[("csrf", csrf.as_str()), ("back", "//evil.example/")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()),
        Some("/dead"),
        "only local redirects"
    );
    assert_eq!(where_is(a).await, "ready");

    // Logged out: the session is gone.
    let resp = post_form(
        format!("{base}/logout"),
        Some(&cookie),
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let b = dead_job(&ps, &q, "b").await;
    let resp = post_form(
        format!("{base}/dead/{b}/delete"),
        Some(&cookie),
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(where_is(b).await, "dead");
    ps.shutdown().await;
}

#[tokio::test]
async fn injected_markup_is_shown_as_text_and_no_script_may_run() {
    let ps = common::pubsub().await;
    let q = format!("<script>alert('q')</script>{}", channel(""));
    let id = dead_job(
        &ps,
        &q,
        "<script>alert('payload')</script><img src=x onerror=alert(1)>",
    )
    .await;
    let base = serve(&ps, UiOptions::new().admin_token(TOKEN)).await;
    let cookie = log_in(&base).await;
    let enc: String = q
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    for path in [
        "/".to_owned(),
        "/dead".to_owned(),
        format!("/jobs/{id}"),
        format!("/queues/{enc}?state=dead"),
    ] {
        let resp = http()
            .get(format!("{base}{path}"))
            .header(COOKIE, &cookie)
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let csp = resp
            .headers()
            .get(CONTENT_SECURITY_POLICY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        let html = resp.text().await.expect("body");
        assert!(!html.contains("<script"), "{path}: {html}");
        assert!(!html.contains("<img"), "{path}: {html}");
        assert!(html.contains("&lt;script&gt;alert("), "{path}: {html}");
    }
    // The JSON API returns the text as it is (JSON is not HTML).
    let dead = get_json(&format!("{base}/api/jobs/{id}")).await;
    assert_eq!(dead["queue"], q.as_str());
    ps.shutdown().await;
}

#[tokio::test]
async fn hidden_payloads_are_in_no_page_or_answer() {
    let ps = common::pubsub().await;
    let q = channel("uihide");
    let id = dead_job(&ps, &q, "secret-payload-text").await;
    let base = serve(&ps, UiOptions::new().hide_payloads(true)).await;
    let job = get_json(&format!("{base}/api/jobs/{id}")).await;
    assert_eq!(job["payload"], Value::Null);
    let list = get_json(&format!("{base}/api/dead?queue={q}")).await;
    assert_eq!(list["jobs"][0]["payload"], Value::Null);
    for path in [
        format!("/jobs/{id}"),
        format!("/queues/{q}?state=dead"),
        "/dead".into(),
    ] {
        let (_, html) = get_text(&format!("{base}{path}")).await;
        assert!(!html.contains("secret-payload-text"), "{path}");
        assert!(html.contains("(hidden)"), "{path}: {html}");
    }
    ps.shutdown().await;
}

#[tokio::test]
async fn durable_groups_change_feeds_slots_and_leaders() {
    let ps = common::builder()
        .single_listener(true)
        .connect()
        .await
        .expect("connect");
    let ch = channel("uidur");
    let durable = ps.durable();
    durable
        .publish(&ch, &serde_json::json!({ "x": 1 }))
        .await
        .expect("publish");
    let _sub = durable
        .subscribe::<Value>(&ch, "g1")
        .await
        .expect("subscribe");

    let table = channel("uitbl");
    raw_client()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("table");
    ps.changes()
        .install_change_feed(&table, &Default::default())
        .await
        .expect("feed");
    let slot = channel("uislot");
    common::create_slot(&slot).await;

    let elected = channel("uilead");
    let mut events = ps.events();
    let _listen = ps.listen::<String>(&elected).await.expect("listen");
    common::wait_event(&mut events, |e| {
        matches!(e, pg_pubsub::ConnectionEvent::LockAcquired { channel } if channel.as_str() == elected)
    })
    .await;

    let base = serve(&ps, UiOptions::new()).await;
    let channels = get_json(&format!("{base}/api/durable")).await;
    let mine = channels
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["channel"] == ch.as_str())
        .unwrap_or_else(|| panic!("{ch} missing: {channels}"));
    assert_eq!(mine["groups"][0]["group"], "g1");
    assert!(mine["groups"][0]["position"].is_string());
    let groups = get_json(&format!("{base}/api/durable/{ch}/groups")).await;
    assert_eq!(groups[0]["group"], "g1");

    let feeds = get_json(&format!("{base}/api/changes/feeds")).await;
    let feed = feeds
        .as_array()
        .expect("array")
        .iter()
        .find(|f| f["table"] == table.as_str())
        .unwrap_or_else(|| panic!("{table} missing: {feeds}"));
    assert_eq!(feed["target"], "durable");

    let slots = get_json(&format!("{base}/api/changes/slots")).await;
    let s = slots
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == slot.as_str())
        .unwrap_or_else(|| panic!("{slot} missing: {slots}"));
    assert_eq!(s["plugin"], "pgoutput");
    assert_eq!(s["active"], false);
    assert!(s["lag_bytes"].is_u64(), "{s}");

    let leaders = get_json(&format!("{base}/api/elected")).await;
    let l = leaders
        .as_array()
        .expect("array")
        .iter()
        .find(|l| l["channel"] == elected.as_str())
        .unwrap_or_else(|| panic!("{elected} missing: {leaders}"));
    assert_eq!(l["leader_pid"].as_i64(), ps.listener_pid().map(i64::from));

    let (_, html) = get_text(&format!("{base}/changes")).await;
    assert!(html.contains(&slot) && html.contains(&table), "{html}");
    let (_, html) = get_text(&format!("{base}/durable")).await;
    assert!(html.contains(&ch), "{html}");
    raw_client()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
    ps.shutdown().await;
}

/// `/metrics` is served when the router has a recorder: the database
/// gauges are read at the scrape, with the text format's content type.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn metrics_are_served_with_the_database_gauges() {
    // The only test of this binary that installs the process's recorder.
    let prometheus = pg_pubsub::metrics::install_prometheus().expect("recorder");
    let ps = common::pubsub().await;
    let queue = channel("ui_metrics");
    dead_job(&ps, &queue, "{}").await;
    let without = serve(&ps, UiOptions::new()).await;
    assert_eq!(
        get_text(&format!("{without}/metrics")).await.0,
        StatusCode::NOT_FOUND
    );
    let base = serve(&ps, UiOptions::new().prometheus(prometheus)).await;
    let resp = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let kind = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(kind.starts_with("text/plain"), "{kind}");
    let text = resp.text().await.expect("body");
    let line = format!("pgpubsub_queue_jobs{{queue=\"{queue}\",state=\"dead\"}} 1");
    assert!(text.contains(&line), "no {line:?} in:\n{text}");
    ps.shutdown().await;
}

#[tokio::test]
async fn cancel_and_pause_need_the_token_in_the_api_and_a_session_and_csrf_in_pages() {
    let ps = common::pubsub().await;
    let q = channel("uictl");
    let queue = ps.queue();
    queue.install().await.expect("install");
    let a = queue
        .enqueue(&q, pg_pubsub::Text("a"))
        .delay(std::time::Duration::from_secs(3600))
        .await
        .expect("enqueue")
        .id()
        .expect("new");
    let b = queue
        .enqueue(&q, pg_pubsub::Text("b"))
        .delay(std::time::Duration::from_secs(3600))
        .await
        .expect("enqueue")
        .id()
        .expect("new");

    // Read-only and unauthenticated: refused, nothing changes.
    let ro = serve(&ps, UiOptions::new()).await;
    let resp = with_token(
        reqwest::Method::POST,
        format!("{ro}/api/jobs/{a}/cancel"),
        &format!("Bearer {TOKEN}"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let rw = serve(&ps, UiOptions::new().admin_token(TOKEN)).await;
    for path in [
        format!("/api/jobs/{a}/cancel"),
        format!("/api/queues/{q}/pause"),
    ] {
        let resp = with_token(reqwest::Method::POST, format!("{rw}{path}"), "Bearer wrong").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(where_is(a).await, "ready");
    assert!(!queue.is_paused(&q).await.expect("is_paused"));

    // API with the token.
    let bearer = format!("Bearer {TOKEN}");
    let post = |path: String| {
        http()
            .post(format!("{rw}{path}"))
            .header(AUTHORIZATION, &bearer)
            .send()
    };
    let resp = post(format!("/api/jobs/{a}/cancel")).await.expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["cancelled"], "removed");
    assert_eq!(where_is(a).await, "gone");
    let v: Value = post(format!("/api/jobs/{a}/cancel"))
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    assert_eq!(v["cancelled"], "already_finished");
    let resp = post(format!("/api/jobs/{}/cancel", i64::MAX))
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let v: Value = post(format!("/api/queues/{q}/pause"))
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (v["paused"].as_bool(), v["changed"].as_bool()),
        (Some(true), Some(true))
    );
    let queues = get_json(&format!("{rw}/api/queues")).await;
    let s = find_queue(&queues, &q);
    assert_eq!(
        (s["paused"].as_bool(), s["cancelled"].as_u64()),
        (Some(true), Some(1)),
        "{s}"
    );
    let v: Value = post(format!("/api/queues/{q}/resume"))
        .await
        .expect("POST")
        .json()
        .await
        .expect("json");
    assert_eq!(v["changed"], true);
    assert!(!queue.is_paused(&q).await.expect("is_paused"));
    let job = get_json(&format!("{rw}/api/jobs/{a}")).await;
    assert_eq!(job["state"], "cancelled");
    let list = get_json(&format!("{rw}/api/queues/{q}/jobs?state=cancelled")).await;
    assert_eq!(list["jobs"][0]["id"], a);

    // Pages: a session and its CSRF token.
    let cookie = log_in(&rw).await;
    let html = page_as(format!("{rw}/queues/{q}?state=scheduled"), &cookie).await;
    assert!(html.contains("Pause") && html.contains("Cancel"), "{html}");
    let csrf = csrf_in(&html);
    let resp = post_form(
        format!("{rw}/queues/{q}/pause"),
        Some(&cookie),
        &[("csrf", "forged")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = post_form(
        format!("{rw}/jobs/{b}/cancel"),
        None,
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no session");
    assert!(!queue.is_paused(&q).await.expect("is_paused"));
    assert_eq!(where_is(b).await, "ready");
    let resp = post_form(
        format!("{rw}/queues/{q}/pause"),
        Some(&cookie),
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(queue.is_paused(&q).await.expect("is_paused"));
    let (_, html) = get_text(&format!("{rw}/queues/{q}")).await;
    assert!(html.contains("Paused"), "{html}");
    let resp = post_form(
        format!("{rw}/jobs/{b}/cancel"),
        Some(&cookie),
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(where_is(b).await, "gone");
    let (status, html) = get_text(&format!("{rw}/jobs/{b}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("cancelled"), "{html}");
    let resp = post_form(
        format!("{rw}/queues/{q}/resume"),
        Some(&cookie),
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(!queue.is_paused(&q).await.expect("is_paused"));
    ps.shutdown().await;
}
