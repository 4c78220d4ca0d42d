//! TLS (feature `tls`): sslmode levels against a cluster with a certificate
//! for `localhost` signed by its own CA, and reconnects over TLS.
#![cfg(feature = "tls")]

mod common;

use std::path::PathBuf;

use common::*;
use pg_pubsub::{Delivery, ErrorKind, PgPubSub};

/// `sslmode=verify-full` with the cluster's CA, connecting as `host`.
fn verified_url(host: &str, mode: &str) -> String {
    let server = tls_server();
    let ca = server.ca_cert().expect("TLS cluster").display().to_string();
    url_via(server, host, &format!("sslmode={mode}&sslrootcert={ca}"))
}

/// Whether the session `pid` of the TLS cluster is encrypted.
async fn encrypted(pid: i32) -> bool {
    raw_client_to(tls_server())
        .await
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

/// A CA that signed nothing the server has.
fn unrelated_ca() -> PathBuf {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    let path =
        std::env::temp_dir().join(format!("pg-pubsub-other-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test]
async fn verify_full_round_trip_encrypts_listener_and_pool() {
    let ps = PgPubSub::connect(verified_url("localhost", "verify-full"))
        .await
        .expect("verify-full against the right CA and name");
    let ch = channel("tls");
    let mut sub = ps.listen::<u32>(&ch).await.unwrap();
    ps.notify(&ch, &7u32).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 7);

    assert!(encrypted(ps.listener_pid().unwrap()).await, "listener");
    let pooled = ps.pool().get().await.unwrap();
    let row = pooled
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "pool");
    drop(pooled);
    ps.shutdown().await;
}

#[tokio::test]
async fn wrong_ca_is_a_certificate_error() {
    let ca = unrelated_ca();
    let url = url_via(
        tls_server(),
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let err = PgPubSub::connect(url).await.unwrap_err();
    std::fs::remove_file(&ca).unwrap();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err:?}");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(!err.is_connection(), "{err:?}");
    assert!(
        chain(&err).iter().any(|e| e.is::<tokio_postgres::Error>()),
        "the tokio-postgres error is kept: {err:?}"
    );
}

#[tokio::test]
async fn host_name_mismatch_fails_verify_full_but_passes_verify_ca() {
    // The certificate names `localhost`, not `127.0.0.1`.
    let err = PgPubSub::connect(verified_url("127.0.0.1", "verify-full"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err:?}");
    assert!(err.to_string().contains("certificate"), "{err}");

    let ps = PgPubSub::connect(verified_url("127.0.0.1", "verify-ca"))
        .await
        .expect("verify-ca ignores the host name");
    assert!(encrypted(ps.listener_pid().unwrap()).await);
    ps.shutdown().await;
}

#[tokio::test]
async fn require_encrypts_without_verifying() {
    let url = url_via(tls_server(), "127.0.0.1", "sslmode=require");
    let ps = PgPubSub::connect(url)
        .await
        .expect("require: no verification");
    assert!(encrypted(ps.listener_pid().unwrap()).await);
    ps.shutdown().await;
}

#[tokio::test]
async fn require_against_a_server_without_tls_fails_clearly() {
    if !own_server("assume has TLS off") {
        return;
    }
    let url = url_via(server(), "127.0.0.1", "sslmode=require");
    let err = PgPubSub::connect(url).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err:?}");
    assert!(err.to_string().contains("does not support TLS"), "{err}");
    assert!(!err.is_connection(), "{err:?}");
}

#[tokio::test]
async fn own_rustls_config_is_used() {
    let server = tls_server();
    let config = trusting_the_test_ca(server);
    let ps = PgPubSub::builder(url_via(server, "localhost", "sslmode=require"))
        .unwrap()
        .tls_config(config.clone())
        .connect()
        .await
        .expect("own config with the right roots");
    assert!(encrypted(ps.listener_pid().unwrap()).await);
    ps.shutdown().await;

    // The same config verifies host names: 127.0.0.1 is refused.
    let err = PgPubSub::builder(url_via(server, "127.0.0.1", "sslmode=require"))
        .unwrap()
        .tls_config(config)
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err:?}");
}

#[tokio::test]
async fn reconnects_over_tls_with_a_gap() {
    let ps = PgPubSub::connect(verified_url("localhost", "verify-full"))
        .await
        .unwrap();
    let ch = channel("tls_reconnect");
    let mut sub = ps.listen::<u32>(&ch).await.unwrap();
    let old = ps.listener_pid().unwrap();
    terminate_on(tls_server(), old).await;
    match next(&mut sub).await {
        Delivery::Gap(_) => {}
        other => panic!("expected a gap, got {other:?}"),
    }
    ps.notify(&ch, &1u32).await.unwrap();
    assert_eq!(*next_message(&mut sub).await.payload(), 1);
    let new = ps.listener_pid().unwrap();
    assert_ne!(new, old);
    assert!(encrypted(new).await);
    ps.shutdown().await;
}

/// The WAL feed's replication connection over TLS: `verify-full` with
/// SCRAM on a cluster that refuses replication without TLS, and the
/// walsender's session encrypted.
#[cfg(feature = "wal")]
#[tokio::test]
async fn wal_feed_streams_over_verified_tls_with_scram() {
    use pg_pubsub::changes::wal::{WalFeed, WalItem};
    const PW: &str = "Wal-Tls-Pa55";
    let server = own_cluster(pg_pubsub::testing::TestOptions {
        tls: true,
        hba: vec![
            "hostnossl all wal_tls all reject".to_owned(),
            "hostssl all wal_tls all scram-sha-256".to_owned(),
            "hostnossl replication wal_tls all reject".to_owned(),
            "hostssl replication wal_tls all scram-sha-256".to_owned(),
        ],
        ..Default::default()
    })
    .await;
    let admin = raw_client_to(&server).await;
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE wal_tls LOGIN SUPERUSER REPLICATION PASSWORD '{PW}';
             CREATE TABLE wal_tls_t (id int PRIMARY KEY, v text);"
        ))
        .await
        .unwrap();
    let ca = server.ca_cert().unwrap().display().to_string();
    let port = server.port().unwrap();
    let url = |host: &str, mode: &str| {
        format!("postgres://wal_tls:{PW}@{host}:{port}/postgres?sslmode={mode}&sslrootcert={ca}")
    };
    // `require` (the chain checked with a root certificate, as libpq does)
    // and `verify-full`: both stream, encrypted.
    for (i, (host, mode)) in [("localhost", "verify-full"), ("127.0.0.1", "require")]
        .into_iter()
        .enumerate()
    {
        let ps = PgPubSub::connect(url(host, mode)).await.expect(mode);
        let slot = format!("wal_tls_{i}");
        let mut feed: WalFeed = ps
            .wal_feed(&slot)
            .tables(&["wal_tls_t"])
            .start()
            .await
            .expect(mode);
        admin
            .execute("INSERT INTO wal_tls_t VALUES ($1, 'x')", &[&(i as i32)])
            .await
            .unwrap();
        let event = loop {
            if let WalItem::Change { event, .. } = next(&mut feed).await {
                break event;
            }
        };
        assert_eq!(
            event.new,
            Some(serde_json::json!({"id": i, "v": "x"})),
            "{mode}"
        );
        let ssl: bool = admin
            .query_one(
                "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid
                 WHERE r.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "{mode}: the walsender's session is encrypted");
        feed.close().await.unwrap();
        ps.drop_slot(&slot).await.unwrap();
        ps.shutdown().await;
    }
}

/// A connector given with `Builder::tls` cannot open the replication
/// connection: a feed that needs TLS is refused before connecting.
#[cfg(feature = "wal")]
#[tokio::test]
async fn wal_feed_with_a_custom_connector_and_required_tls_is_refused() {
    let server = tls_server();
    let config = trusting_the_test_ca(server);
    let ps = PgPubSub::builder(url_via(server, "localhost", "sslmode=require"))
        .unwrap()
        .tls(tokio_postgres_rustls::MakeRustlsConnect::new(config))
        .connect()
        .await
        .expect("custom connector");
    let err = ps
        .wal_feed("wal_tls_custom")
        .start::<serde_json::Value>()
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    assert!(err.to_string().contains("tls_config"), "{err}");
    ps.shutdown().await;
}

/// A rustls client configuration (on `ring`) whose only root is the TLS
/// test server's CA.
fn trusting_the_test_ca(server: &pg_pubsub::testing::TestServer) -> rustls::ClientConfig {
    let pem = std::fs::read(server.ca_cert().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}
