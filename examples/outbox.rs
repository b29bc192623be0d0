//! The course's database-backed events, made real with the PostgreSQL outbox and inbox.
//!
//! An orders service inserts an order row and publishes `OrderPlaced` in one database
//! transaction; a billing consumer with the inbox inserts one charge per order, in its own
//! transaction. The same `OrderPlaced` is then delivered a second time, as a broker does after
//! a lost acknowledgement, and charges nothing more. Runs on the in-memory transport, or on
//! RabbitMQ when `AMQP_ADDR` is set, against `DATABASE_URL` (default: the local server's
//! `test` database); its tables live in a schema of its own, dropped at the end.
//!
//! ```sh
//! cargo run --example outbox
//! AMQP_ADDR=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example outbox
//! ```

use std::time::Duration;

use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message, SendOptions, Transport};
use bus_inmemory::InMemoryTransport;
use bus_postgres::{PostgresInbox, PostgresOptions, PostgresOutbox};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:OutboxExample:OrderPlaced")]
struct OrderPlaced {
    order_id: i64,
    amount: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:OutboxExample:OrderCharged")]
struct OrderCharged {
    order_id: i64,
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = PgPool::connect(&url).await.map_err(|e| format!("PostgreSQL does not answer at {url}: {e}"))?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    // Short: PostgreSQL cuts the names made from it at 63 bytes.
    let schema = format!("outbox_example_{}", &id[id.len() - 12..]);
    let result = match std::env::var("AMQP_ADDR") {
        Ok(address) => {
            let transport = bus_rabbitmq::RabbitMqTransport::connect(&address).await?;
            println!("outbox (transport: RabbitMQ at {}; database: {url})\n", transport.address_redacted());
            let result = run(transport.clone(), &pool, &schema).await;
            transport.close().await;
            result
        }
        Err(_) => {
            println!("outbox (transport: in-memory, set AMQP_ADDR for RabbitMQ; database: {url})\n");
            run(InMemoryTransport::new(), &pool, &schema).await
        }
    };
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).execute(&pool).await?;
    result
}

async fn run(transport: impl Transport + Clone, pool: &PgPool, schema: &str) -> Result<(), BoxError> {
    let options = PostgresOptions::new().schema(schema).poll_interval(Duration::from_millis(200));
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\"")).execute(pool).await?;
    sqlx::query(&format!("CREATE TABLE \"{schema}\".orders (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL)"))
        .execute(pool)
        .await?;
    sqlx::query(&format!("CREATE TABLE \"{schema}\".charges (order_id BIGINT NOT NULL, amount BIGINT NOT NULL)"))
        .execute(pool)
        .await?;

    // Billing: one charge per order, in the inbox's transaction.
    let (charged_tx, mut charged) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let inbox = PostgresInbox::with_options(pool.clone(), options.clone())?;
    let insert_charge = format!("INSERT INTO \"{schema}\".charges (order_id, amount) VALUES ($1, $2)");
    let billing = Endpoint::new(format!("{schema}-billing")).attempt_middleware(inbox).handler_with_state(
        insert_charge,
        |ctx: ConsumeContext<OrderPlaced>, insert_charge| async move {
            let order = ctx.message();
            let mut db = bus_postgres::transaction(&ctx).await?;
            sqlx::query(&insert_charge).bind(order.order_id).bind(order.amount).execute(&mut *db).await?;
            drop(db);
            println!("billing: charged order {} ({} cents)", order.order_id, order.amount);
            ctx.publish(OrderCharged { order_id: order.order_id }).await?;
            Ok(())
        },
    );
    let notices = Endpoint::new(format!("{schema}-notices")).handler_with_state(
        charged_tx,
        |ctx: ConsumeContext<OrderCharged>, charged| async move {
            println!("notices: order {} is paid", ctx.message().order_id);
            charged.send(ctx.message().order_id)?;
            Ok(())
        },
    );
    // Watches what was consumed, to know when the duplicate has been handled.
    let recorder = std::sync::Arc::new(bus_core::testing::BusRecorder::default());
    let bus = Bus::builder(transport).endpoint(billing).endpoint(notices).observer_arc(recorder.clone()).build();
    let outbox = PostgresOutbox::with_options(pool.clone(), bus.clone(), options)?;
    outbox.migrate().await?;
    bus.start().await?;
    let delivery = outbox.start();

    // Orders: the row and its event, in one transaction.
    let order_id = 1001;
    let event_id = uuid::Uuid::now_v7();
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("INSERT INTO \"{schema}\".orders (id, amount) VALUES ($1, $2)"))
        .bind(order_id)
        .bind(4_200_i64)
        .execute(&mut *tx)
        .await?;
    let placed = OrderPlaced { order_id, amount: 4_200 };
    outbox.publish_with(&mut tx, placed.clone(), SendOptions::new().message_id(event_id)).await?;
    tx.commit().await?;
    println!("orders: order {order_id} saved and OrderPlaced committed with it (message {event_id})");
    tokio::time::timeout(WAIT, charged.recv()).await?.ok_or("billing never charged")?;

    // The same event again, as after a lost acknowledgement: recognised by its id.
    bus.publish_with(placed, SendOptions::new().message_id(event_id)).await?;
    println!("orders: OrderPlaced {event_id} delivered a second time");
    recorder.consumed.wait_for::<OrderPlaced>(2, WAIT).await?;
    let charges: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".charges")).fetch_one(pool).await?;
    delivery.stop().await;
    bus.stop().await?;
    println!("\ncharges for order {order_id}: {charges} (the duplicate delivery charged nothing)");
    if charges != 1 {
        return Err(format!("expected one charge, found {charges}").into());
    }
    Ok(())
}
