//! The first program of the README ("Install and first program"), as it is
//! shown there: a typed subscriber, three notifications, every kind of
//! delivery handled, a clean shutdown.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@localhost/postgres cargo run --example first_program
//! RUST_LOG=pg_pubsub=debug cargo run --example first_program   # also the crate's logs
//! ```

use futures::StreamExt;
use pg_pubsub::{Delivery, PgPubSub};
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    item: String,
}

#[tokio::main]
async fn main() -> Result<(), pg_pubsub::Error> {
    // The crate logs through `tracing`; RUST_LOG picks what is shown.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("pg_pubsub=info")),
        )
        .init();

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost/postgres".to_owned());
    let pubsub = PgPubSub::connect(url).await?;

    // Listening before publishing: NOTIFY keeps nothing for later listeners.
    let mut orders = pubsub.listen::<Order>("orders").await?;
    for id in 1..=3 {
        let order = Order {
            id,
            item: format!("item {id}"),
        };
        pubsub.notify("orders", &order).await?;
    }

    let mut received = 0;
    while received < 3 {
        let Some(delivery) = orders.next().await else {
            break; // the instance was shut down
        };
        match delivery {
            Delivery::Message(m) => {
                println!("order {:?} from backend {}", m.payload(), m.process_id());
                received += 1;
            }
            // The listener lost its connection (or took over an elected
            // channel): notifications may have been missed, so re-read
            // whatever state they were about.
            Delivery::Gap(gap) => println!("{gap}: re-read state"),
            // This subscriber read too slowly and its queue overflowed.
            Delivery::Lagged(n) => println!("{n} notifications dropped for this subscriber"),
            // Someone sent a payload that is not an `Order`: here is its text.
            Delivery::Undecodable(e) => println!("skipped {:?}: {e}", e.raw()),
            // Kinds added in later versions (the enum is non-exhaustive).
            other => println!("{other:?}"),
        }
    }

    pubsub.shutdown().await;
    Ok(())
}
