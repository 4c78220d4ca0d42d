//! What the connection string sets wins over the builder's defaults;
//! explicit builder calls win over both.

mod common;

use std::time::Duration;

use common::*;
use pg_pubsub::{ErrorKind, PgPubSub};

fn url_with(query: &str) -> String {
    let base = server().url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{query}")
}

async fn application_name_of(pid: i32) -> String {
    raw_client()
        .await
        .query_one(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn url_options_win_over_defaults() {
    let ps = PgPubSub::connect(url_with("application_name=from-url&connect_timeout=2"))
        .await
        .unwrap();
    assert_eq!(ps.config().get_application_name(), Some("from-url"));
    assert_eq!(
        ps.config().get_connect_timeout(),
        Some(&Duration::from_secs(2))
    );
    assert_eq!(
        application_name_of(ps.listener_pid().unwrap()).await,
        "from-url"
    );
    let pooled = ps.pool().get().await.unwrap();
    let name: String = pooled
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "from-url");
    drop(pooled);
    ps.shutdown().await;
}

#[tokio::test]
async fn builder_calls_win_over_the_url() {
    let ps = PgPubSub::builder(url_with("application_name=from-url&connect_timeout=2"))
        .unwrap()
        .application_name("from-builder")
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    assert_eq!(ps.config().get_application_name(), Some("from-builder"));
    assert_eq!(
        ps.config().get_connect_timeout(),
        Some(&Duration::from_secs(3))
    );
    assert_eq!(
        application_name_of(ps.listener_pid().unwrap()).await,
        "from-builder"
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn defaults_apply_when_nothing_is_set() {
    let ps = pubsub().await;
    assert_eq!(ps.config().get_application_name(), Some("pg-pubsub"));
    assert_eq!(
        ps.config().get_connect_timeout(),
        Some(&Duration::from_secs(10))
    );
    ps.shutdown().await;
}

#[tokio::test]
async fn url_connect_timeout_bounds_a_silent_server() {
    // Accepts TCP connections and never answers the startup packet.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?connect_timeout=1");
    let err = tokio::time::timeout(WAIT, PgPubSub::connect(url))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(err.is_connection());
    // The URL's timeout was the one used, not the builder's default of 10 s.
    assert!(err.to_string().contains("within 1s"), "{err}");
    hold.abort();
}
