//! The PostgreSQL scheduler: durable across a restart of the service, each message once,
//! cancellable.

use std::time::Duration;

use bus_core::{Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::InMemoryTestHarness;
use bus_postgres::{PostgresOptions, PostgresScheduler};
use serde::{Deserialize, Serialize};
use tests::postgres_support::TestSchema;
use tests::WAIT;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:PgSchedulerTests:Due")]
struct Due {
    n: u32,
}

fn scheduler(schema: &TestSchema) -> PostgresScheduler {
    let options = PostgresOptions::new().schema(&schema.name).poll_interval(Duration::from_millis(100));
    PostgresScheduler::with_options(schema.pool.clone(), options).expect("scheduler")
}

#[tokio::test]
async fn a_scheduled_message_survives_a_restart_and_fires_once() {
    let schema = TestSchema::create("sched-restart").await;
    let first = scheduler(&schema);
    first.migrate().await.expect("migrated");
    // The first service schedules, and stops before the messages are due.
    let service = Bus::builder(bus_inmemory::InMemoryTransport::new()).scheduler(first.clone()).build();
    service.start().await.expect("start");
    let due = bus_core::DueTime::from(Duration::from_millis(1500));
    service.schedule_send(due, "queue:due", Due { n: 1 }).await.expect("scheduled");
    let cancelled = service.schedule_send(due, "queue:due", Due { n: 2 }).await.expect("scheduled");
    assert!(service.cancel_scheduled(cancelled).await.expect("cancel"), "cancelled while waiting");
    service.stop().await.expect("stop");
    assert_eq!(first.waiting().await.expect("count"), 1, "waits in the table across the restart");

    // Restarted: another bus, another scheduler on the same table.
    let second = scheduler(&schema);
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.scheduler(second).endpoint(Endpoint::new("due").handler(|_: ConsumeContext<Due>| async { Ok(()) }))
    })
    .await
    .expect("harness");
    let fired = harness.consumed().wait_for::<Due>(1, WAIT).await.expect("fires after the restart");
    // Removed in the transaction that delivered it, which commits once the transport took it.
    let removed = async {
        while first.waiting().await.expect("count") > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let left = tokio::time::timeout(WAIT, removed).await.map_or(1, |()| 0);
    harness.stop().await.expect("stop");
    schema.remove().await;
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].n, 1, "the cancelled message never fired");
    assert_eq!(harness.consumed().count::<Due>(), 1, "once");
    assert_eq!(left, 0, "nothing left waiting");
}

/// Scheduling again under a waiting token replaces the row: one message waits, the second.
#[tokio::test]
async fn scheduling_again_under_a_token_replaces_the_waiting_message() {
    let schema = TestSchema::create("sched-again").await;
    let scheduler = scheduler(&schema);
    scheduler.migrate().await.expect("migrated");
    let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).scheduler(scheduler.clone()).build();
    let token = uuid::Uuid::now_v7();
    let later = bus_core::DueTime::from(Duration::from_secs(3600));
    let options = bus_core::SendOptions::new;
    bus.schedule_send_with(token, later, "queue:due", Due { n: 1 }, options()).await.expect("first");
    bus.schedule_send_with(token, later, "queue:due", Due { n: 2 }, options().priority(7)).await.expect("again");
    let waiting = scheduler.waiting().await.expect("count");
    let (body, priority): (Vec<u8>, Option<i16>) =
        sqlx::query_as(&format!("SELECT body, priority FROM \"{}\".scheduled_messages WHERE token = $1", schema.name))
            .bind(token)
            .fetch_one(&schema.pool)
            .await
            .expect("the row");
    schema.remove().await;
    assert_eq!(waiting, 1, "one row under the token");
    assert_eq!(priority, Some(7), "its priority kept for when it is delivered");
    let envelope: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(envelope["message"]["n"], 2, "the second replaced the first");
    assert_eq!(envelope["headers"]["MT-Scheduling-TokenId"], token.to_string());
}

/// Tables made before messages had a priority and a routing key get the columns from
/// `migrate`, and a second `migrate` leaves them as they are.
#[tokio::test]
async fn migrate_adds_the_priority_column_to_older_tables() {
    let schema = TestSchema::create("sched-migrate").await;
    let scheduler = scheduler(&schema);
    scheduler.migrate().await.expect("migrated");
    for table in ["scheduled_messages", "outbox_messages"] {
        let drop = format!("ALTER TABLE \"{}\".{table} DROP COLUMN priority, DROP COLUMN routing_key", schema.name);
        sqlx::query(&drop).execute(&schema.pool).await.expect("made as before");
    }
    scheduler.migrate().await.expect("migrated again");
    scheduler.migrate().await.expect("and once more");
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text || '.' || column_name::text FROM information_schema.columns
         WHERE table_schema = $1 AND column_name IN ('priority', 'routing_key') ORDER BY 1",
    )
    .bind(&schema.name)
    .fetch_all(&schema.pool)
    .await
    .expect("columns");
    schema.remove().await;
    assert_eq!(
        columns,
        [
            "outbox_messages.priority",
            "outbox_messages.routing_key",
            "scheduled_messages.priority",
            "scheduled_messages.routing_key"
        ]
    );
}

/// A scheduled publish keeps the routing key the bus makes for its type, for when it is
/// delivered to a direct or topic exchange.
#[tokio::test]
async fn a_scheduled_publish_keeps_its_routing_key() {
    let schema = TestSchema::create("sched-key").await;
    let scheduler = scheduler(&schema);
    scheduler.migrate().await.expect("migrated");
    let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
        .scheduler(scheduler.clone())
        .routing_key(|due: &Due| format!("due.{}", due.n))
        .build();
    let token = uuid::Uuid::now_v7();
    let later = bus_core::DueTime::from(Duration::from_secs(3600));
    bus.schedule_publish_with(token, later, Due { n: 3 }, bus_core::SendOptions::new()).await.expect("scheduled");
    let key: Option<String> =
        sqlx::query_scalar(&format!("SELECT routing_key FROM \"{}\".scheduled_messages WHERE token = $1", schema.name))
            .bind(token)
            .fetch_one(&schema.pool)
            .await
            .expect("the row");
    let delivered = scheduler.waiting().await.expect("count");
    schema.remove().await;
    assert_eq!((key.as_deref(), delivered), (Some("due.3"), 1));
}
