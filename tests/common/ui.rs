//! Helpers for the dashboard tests (tests/ui.rs, tests/ui_browser.rs): the
//! router on a loopback port, dead jobs made by hand.

use pg_pubsub::ui::{router, UiOptions};
use pg_pubsub::PgPubSub;

use super::insert_dead_job;

/// The router served on 127.0.0.1:0; its base URL.
pub async fn serve(ps: &PgPubSub, opts: UiOptions) -> String {
    let app = router(ps, opts).expect("router");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { pg_pubsub::ui::axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// Installs the schema and makes a dead job of `queue` by hand (three
/// attempts, the last failing with `boom <b>`); its id.
pub async fn dead_job(ps: &PgPubSub, queue: &str, payload: &str) -> i64 {
    ps.queue().install().await.expect("install");
    insert_dead_job(queue, payload, 3, "boom <b>").await
}
