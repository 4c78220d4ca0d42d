//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver, started by the test on a free loopback port).
//!
//! Skipped, with a line on stderr, only when `chromium` or `chromedriver`
//! is missing and `PGPUBSUB_REQUIRE_BROWSER` is unset (`.ci/run` installs
//! both and sets it, so CI never skips it).
#![cfg(feature = "ui")]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use pg_pubsub::ui::UiOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use common::ui::{dead_job, serve};
use common::{channel, where_is, WAIT};

const TOKEN: &str = "browser-t0ken";

/// The first of `names` found in `PATH` or /usr/bin.
fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push("/usr/bin".into());
    dirs.push("/usr/lib/chromium".into());
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// chromium and chromedriver, or `None` (after saying why) when the test
/// may be skipped.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = find_binary(&["chromium", "chromium-browser", "google-chrome"]);
    let driver = find_binary(&["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let required = std::env::var_os("PGPUBSUB_REQUIRE_BROWSER").is_some();
            assert!(
                !required,
                "PGPUBSUB_REQUIRE_BROWSER is set but chromium ({c:?}) or chromedriver ({d:?}) \
                 is missing: apt-get install chromium chromium-driver"
            );
            eprintln!(
                "skipped: the browser test needs chromium and chromedriver \
                 (apt-get install chromium chromium-driver); found chromium {c:?}, \
                 chromedriver {d:?}"
            );
            None
        }
    }
}

/// chromedriver on a free loopback port, killed with the test; its URL.
async fn start_driver(driver: &PathBuf) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read chromedriver") {
            if line.contains("started successfully") {
                return;
            }
        }
        panic!("chromedriver exited before it was ready");
    })
    .await
    .expect("chromedriver did not start in time");
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://127.0.0.1:{port}"))
}

async fn open_browser(chromium: &std::path::Path, driver_url: &str) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--no-first-run"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    tokio::time::timeout(
        WAIT * 3,
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(driver_url),
    )
    .await
    .expect("browser session in time")
    .expect("browser session")
}

/// Waits (bounded) for job `id` to be `want`.
async fn wait_until(id: i64, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = where_is(id).await;
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} is {now}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text(b: &Client, css: &str) -> String {
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .expect("text")
}

/// Types `token` into the login page's form and submits it.
async fn submit_login(b: &Client, base: &str, token: &str) {
    b.goto(&format!("{base}/login")).await.expect("login page");
    b.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(token)
        .await
        .expect("type");
    b.find(Locator::Css("#login-submit"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("click");
}

#[tokio::test]
async fn the_dashboard_in_a_browser_shows_queues_and_retries_a_dead_job_after_login() {
    let Some((chromium, driver)) = browser() else {
        return;
    };
    let ps = common::pubsub().await;
    ps.queue().install().await.expect("install");
    let q = channel("browserq");
    ps.queue()
        .enqueue(&q, &serde_json::json!({ "ready": true }))
        .await
        .expect("enqueue");
    let script = "<script>document.title='pwned'</script>";
    let a = dead_job(&ps, &q, script).await;
    let b = dead_job(&ps, &q, "second").await;
    let base = serve(&ps, UiOptions::new().admin_token(TOKEN)).await;

    let (_driver, driver_url) = start_driver(&driver).await;
    let br = open_browser(&chromium, &driver_url).await;
    // Run the steps, then close the browser whether they passed or not
    // (a panic would leave Chromium running under the killed driver).
    let steps = async {
        // The overview lists the queue with its counts.
        br.goto(&format!("{base}/")).await.expect("goto /");
        let row = format!("#queues tr.queue:has(a[href='/queues/{q}'])");
        assert_eq!(text(&br, &format!("{row} td.ready")).await, "1");
        assert_eq!(text(&br, &format!("{row} td.dead")).await, "2");
        assert!(br.find(Locator::Css("svg")).await.is_ok(), "charts");

        // The payload is shown as text; its script never ran.
        br.goto(&format!("{base}/jobs/{a}"))
            .await
            .expect("job page");
        assert_eq!(text(&br, "#payload").await, script);
        let title = br.title().await.expect("title");
        assert!(!title.contains("pwned"), "{title}");

        // Not logged in: no buttons. A wrong token is refused.
        br.goto(&format!("{base}/queues/{q}?state=dead"))
            .await
            .expect("dead page");
        assert!(br
            .find_all(Locator::Css("form[action$='/retry'] button"))
            .await
            .expect("find")
            .is_empty());
        submit_login(&br, &base, "wrong").await;
        assert!(text(&br, "#error").await.contains("Wrong admin token"));

        // Logged in: retry dead job `a` from the queue's dead list.
        submit_login(&br, &base, TOKEN).await;
        br.wait()
            .at_most(WAIT)
            .for_element(Locator::Css("form[action='/logout']"))
            .await
            .expect("logged in");
        br.goto(&format!("{base}/queues/{q}?state=dead"))
            .await
            .expect("dead page");
        br.wait()
            .at_most(WAIT)
            .for_element(Locator::Css(&format!(
                "form[action='/dead/{a}/retry'] button"
            )))
            .await
            .expect("retry button")
            .click()
            .await
            .expect("click retry");
        wait_until(a, "ready").await;
        assert_eq!(where_is(b).await, "dead");

        // The session gone (cookie cleared), the same button is refused.
        br.goto(&format!("{base}/queues/{q}?state=dead"))
            .await
            .expect("dead page");
        let retry_b = br
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(&format!(
                "form[action='/dead/{b}/retry'] button"
            )))
            .await
            .expect("retry button for b");
        br.delete_all_cookies().await.expect("clear cookies");
        retry_b.click().await.expect("click retry");
        assert!(text(&br, "#error").await.contains("Log in"));
        assert_eq!(where_is(b).await, "dead");
    };
    let outcome = std::panic::AssertUnwindSafe(steps).catch_unwind().await;
    let _ = br.close().await;
    ps.shutdown().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
