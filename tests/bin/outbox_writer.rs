//! A service that commits one message to the PostgreSQL outbox, then is killed with SIGKILL
//! before anything delivers it: the writer of the outbox's kill test
//! (`tests/tests/postgres_outbox_faults.rs`).
//!
//! Usage: `outbox-writer <database url> <schema> <message id>`.

use bus_core::{Bus, Message, SendOptions};
use bus_inmemory::InMemoryTransport;
use bus_postgres::{PostgresOptions, PostgresOutbox};
use serde::{Deserialize, Serialize};

/// The message the kill test expects (the same URN as its own `Placed`).
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:OutboxFaults:Placed")]
struct Placed {
    order: i64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), bus_core::BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, schema, id] = args.as_slice() else {
        return Err("usage: outbox-writer <database url> <schema> <message id>".into());
    };
    let id: uuid::Uuid = id.parse()?;
    let pool = sqlx::PgPool::connect(url).await?;
    // No delivery service runs here: the message can only leave after a restart.
    let bus = Bus::builder(InMemoryTransport::new()).build();
    let outbox = PostgresOutbox::with_options(pool.clone(), bus, PostgresOptions::new().schema(schema))?;
    let mut tx = pool.begin().await?;
    outbox.publish_with(&mut tx, Placed { order: 1 }, SendOptions::new().message_id(id)).await?;
    tx.commit().await?;
    // Killed right after the commit, as a crash would.
    std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status()?;
    std::future::pending::<()>().await;
    Ok(())
}
