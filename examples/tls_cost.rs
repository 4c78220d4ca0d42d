//! What TLS costs: connect time and notify→receive round trips, plain vs
//! `sslmode=verify-full`, against one throwaway cluster with TLS on.
//!
//! `cargo run --release --features tls --example tls_cost` (env `ROUNDS`, default 2000).

use std::time::{Duration, Instant};

use pg_pubsub::testing::{TestOptions, TestServer};
use pg_pubsub::Text;
use pg_pubsub::{Delivery, PgPubSub};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: u32 = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let server = tokio::task::spawn_blocking(|| {
        TestServer::start_with(TestOptions {
            tls: true,
            ..Default::default()
        })
    })
    .await??;
    let port = server.port().ok_or("owned cluster")?;
    let ca = server.ca_cert().ok_or("TLS cluster")?.display().to_string();
    let base = format!("postgres://postgres@localhost:{port}/postgres");
    let plain = format!("{base}?sslmode=disable");
    let tls = format!("{base}?sslmode=verify-full&sslrootcert={ca}");
    println!("rounds: {rounds}");
    for (name, url) in [("plain", &plain), ("verify-full", &tls)] {
        let mut connects = Vec::new();
        for _ in 0..10 {
            let start = Instant::now();
            let ps = PgPubSub::connect(url.as_str()).await?;
            connects.push(start.elapsed());
            ps.shutdown().await;
        }
        connects.sort();
        let ps = PgPubSub::connect(url.as_str()).await?;
        let mut sub = ps.listen::<Text>("tls_cost").await?;
        let start = Instant::now();
        for i in 0..rounds {
            ps.notify("tls_cost", Text(&i.to_string())).await?;
            match futures::StreamExt::next(&mut sub).await {
                Some(Delivery::Message(_)) => {}
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
        let per = start.elapsed() / rounds;
        println!(
            "{name:>12}: connect median {:?}; notify+receive round trip {:?} ({:.0}/s)",
            connects[connects.len() / 2],
            per,
            1.0 / per.max(Duration::from_nanos(1)).as_secs_f64()
        );
        ps.shutdown().await;
    }
    Ok(())
}
