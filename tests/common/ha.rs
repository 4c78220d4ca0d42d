//! A primary and its streaming standby (`pg_basebackup`), for failover tests.

use std::sync::Arc;

use pg_pubsub::testing::{TestOptions, TestServer};

use super::raw_client_to;

/// Two throwaway clusters: `primary`, and `standby` streaming from it.
pub struct Pair {
    pub primary: Arc<TestServer>,
    pub standby: Arc<TestServer>,
}

/// Runs a blocking harness call off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("harness task")
}

impl Pair {
    /// Starts both; with `sync`, every commit on the primary waits until
    /// the standby has it (`synchronous_standby_names = '*'`).
    pub async fn start(sync: bool) -> Pair {
        let settings = if sync {
            vec![
                "synchronous_standby_names=*".to_owned(),
                "synchronous_commit=on".to_owned(),
            ]
        } else {
            Vec::new()
        };
        blocking(move || {
            let primary = TestServer::start_with(TestOptions {
                settings,
                ..Default::default()
            })
            .expect("start the primary");
            let standby = primary
                .start_standby(TestOptions::default())
                .expect("start the standby");
            Pair {
                primary: Arc::new(primary),
                standby: Arc::new(standby),
            }
        })
        .await
    }

    /// Both hosts, primary first, as a failover-aware client is given them
    /// (no `target_session_attrs`: pg-pubsub requires a primary itself).
    pub fn url(&self) -> String {
        let port = |s: &TestServer| s.port().expect("owned");
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
            port(&self.primary),
            port(&self.standby)
        )
    }

    /// Waits until the standby streams from the primary (so a synchronous
    /// commit does not wait for it to connect).
    pub async fn wait_streaming(&self) {
        let client = raw_client_to(&self.primary).await;
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .await
                .expect("pg_stat_replication")
                .get(0);
            if n > 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the standby never streamed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Crashes the primary (`-m immediate`).
    pub async fn crash_primary(&self) {
        let p = self.primary.clone();
        blocking(move || p.crash())
            .await
            .expect("crash the primary");
    }

    /// Stops the primary cleanly (`-m fast`: the standby receives all of its WAL).
    pub async fn stop_primary(&self) {
        let p = self.primary.clone();
        blocking(move || p.stop()).await.expect("stop the primary");
    }

    /// Promotes the standby.
    pub async fn promote(&self) {
        let s = self.standby.clone();
        blocking(move || s.promote()).await.expect("promote");
    }

    /// Restarts the old primary as a standby of the promoted one.
    pub async fn rejoin_old_primary(&self) {
        let (p, s) = (self.primary.clone(), self.standby.clone());
        blocking(move || p.restart_as_standby_of(&s))
            .await
            .expect("restart the old primary as a standby");
    }
}
