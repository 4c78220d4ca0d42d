//! End to end in one command: `cargo run --example quickstart`.
//!
//! Uses `DATABASE_URL` when set, else starts a throwaway PostgreSQL. Publishes
//! typed messages, kills the listener's backend to show the gap signal, and
//! shows that delivery resumes by itself.

use std::time::{Duration, Instant};

use futures::StreamExt;
use pg_pubsub::testing::TestServer;
use pg_pubsub::{ConnectionEvent, Delivery, PgPubSub};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    item: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = TestServer::from_env_or_start()?;
    println!(
        "server: {}",
        if server.is_owned() {
            "throwaway cluster"
        } else {
            "DATABASE_URL"
        }
    );

    let pubsub = PgPubSub::connect(server.url()).await?;
    let mut events = pubsub.events();
    let mut orders = pubsub.listen::<Order>("orders").await?;

    pubsub
        .notify(
            "orders",
            &Order {
                id: 1,
                item: "pen".into(),
            },
        )
        .await?;
    show(orders.next().await);

    // A real fault: terminate the listener's backend from another session.
    let pid = pubsub.listener_pid().ok_or("listener not connected")?;
    let (admin, conn) = tokio_postgres::connect(server.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await?;
    let killed = Instant::now();
    println!("terminated listener backend {pid}");

    // The subscription reports the gap once it is listening again.
    show(orders.next().await);
    println!("listening again after {:?}", killed.elapsed());
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(50), events.next()).await
    {
        if matches!(
            event,
            ConnectionEvent::Disconnected { .. } | ConnectionEvent::Reconnected { .. }
        ) {
            println!("event: {event:?}");
        }
    }

    pubsub
        .notify(
            "orders",
            &Order {
                id: 2,
                item: "ink".into(),
            },
        )
        .await?;
    show(orders.next().await);
    pubsub.shutdown().await;
    println!("shut down cleanly");
    Ok(())
}

fn show(delivery: Option<Delivery<Order>>) {
    match delivery {
        Some(Delivery::Message(m)) => println!(
            "received {:?} on {} from backend {}",
            m.payload(),
            m.channel(),
            m.process_id()
        ),
        Some(Delivery::Gap(gap)) => println!("gap: {gap}; re-read state now"),
        other => println!("{other:?}"),
    }
}
