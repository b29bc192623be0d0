//! The PostgreSQL outbox and inbox, on the real database (a schema per test) and the
//! in-memory transport: atomic with the caller's transaction, in order per transaction,
//! once per message with the inbox, shared by several delivery services, cleaned up.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message, Permanent, SendOptions};
use bus_inmemory::{InMemoryTestHarness, InMemoryTransport};
use bus_postgres::{PostgresInbox, PostgresOptions, PostgresOutbox};
use serde::{Deserialize, Serialize};
use tests::postgres_support::TestSchema;
use tests::WAIT;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Outbox:OrderPlaced")]
struct OrderPlaced {
    order: i64,
    step: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Outbox:Charged")]
struct Charged {
    order: i64,
}

/// An outbox in the test's schema, migrated, with quick polling.
async fn outbox(schema: &TestSchema, bus: &Bus) -> PostgresOutbox {
    let options = PostgresOptions::new().schema(&schema.name).poll_interval(Duration::from_millis(200));
    let outbox = PostgresOutbox::with_options(schema.pool.clone(), bus.clone(), options).expect("valid names");
    outbox.migrate().await.expect("migrated");
    outbox
}

async fn count(schema: &TestSchema, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(&sql.replace("{schema}", &schema.name)).fetch_one(&schema.pool).await.expect("count")
}

#[tokio::test]
async fn a_committed_transaction_delivers_its_messages_in_order_and_a_rolled_back_one_nothing() {
    let schema = TestSchema::create("outbox-commit").await;
    let harness = InMemoryTestHarness::start(|bus| {
        bus.endpoint(
            Endpoint::new("orders").concurrency_limit(1).handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) }),
        )
    })
    .await
    .expect("harness");
    let outbox = outbox(&schema, harness.bus()).await;
    sqlx::query(&format!("CREATE TABLE \"{}\".orders (id BIGINT PRIMARY KEY)", schema.name))
        .execute(&schema.pool)
        .await
        .expect("orders table");
    let delivery = outbox.start();

    let mut ids = Vec::new();
    let mut tx = schema.pool.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO \"{}\".orders (id) VALUES (1)", schema.name))
        .execute(&mut *tx)
        .await
        .expect("row");
    for step in 0..3 {
        let id = uuid::Uuid::now_v7();
        ids.push(id);
        let options = SendOptions::new().message_id(id);
        outbox.publish_with(&mut tx, OrderPlaced { order: 1, step }, options).await.expect("written");
    }
    tx.commit().await.expect("commit");
    let mut rolled_back = schema.pool.begin().await.expect("begin");
    sqlx::query(&format!("INSERT INTO \"{}\".orders (id) VALUES (2)", schema.name))
        .execute(&mut *rolled_back)
        .await
        .expect("row");
    outbox.publish(&mut rolled_back, OrderPlaced { order: 2, step: 0 }).await.expect("written");
    rolled_back.rollback().await.expect("rollback");

    let consumed = harness.consumed().wait_for::<OrderPlaced>(3, WAIT).await.expect("the committed messages arrive");
    let envelopes = harness.consumed().envelopes::<OrderPlaced>();
    delivery.stop().await;
    harness.stop().await.expect("stop");
    assert_eq!(consumed.iter().map(|m| m.step).collect::<Vec<_>>(), [0, 1, 2], "in the order written");
    assert!(consumed.iter().all(|m| m.order == 1), "nothing of the rolled-back transaction: {consumed:?}");
    let delivered_ids: Vec<_> = envelopes.iter().map(|e| e.message_id.expect("id")).collect();
    assert_eq!(delivered_ids, ids, "each message keeps the id it was written with");
    assert_eq!(
        count(&schema, "SELECT count(*) FROM \"{schema}\".outbox_messages").await,
        3,
        "the rollback left no row"
    );
    assert_eq!(
        count(&schema, "SELECT count(*) FROM \"{schema}\".outbox_messages WHERE delivered_at IS NULL").await,
        0,
        "every committed message is marked delivered"
    );
    schema.remove().await;
}

/// The billing endpoint of the inbox tests: each `OrderPlaced` inserts one charge and
/// publishes `Charged`; `fail` makes it fail after both, for good.
fn billing(schema: &TestSchema, fail: bool) -> Endpoint {
    let options = PostgresOptions::new().schema(&schema.name);
    let inbox = PostgresInbox::with_options(schema.pool.clone(), options).expect("inbox");
    let insert = format!("INSERT INTO \"{}\".charges (order_id) VALUES ($1)", schema.name);
    Endpoint::new(format!("billing-{}", schema.name)).attempt_middleware(inbox).handler_with_state(
        insert,
        move |ctx: ConsumeContext<OrderPlaced>, insert| async move {
            {
                let mut db = bus_postgres::transaction(&ctx).await?;
                sqlx::query(&insert).bind(ctx.message().order).execute(&mut *db).await?;
            }
            ctx.publish(Charged { order: ctx.message().order }).await?;
            if fail {
                return Err(Permanent::new(std::io::Error::other("card declined")).into());
            }
            Ok::<_, BoxError>(())
        },
    )
}

async fn charges_table(schema: &TestSchema) {
    sqlx::query(&format!("CREATE TABLE \"{}\".charges (order_id BIGINT NOT NULL)", schema.name))
        .execute(&schema.pool)
        .await
        .expect("charges table");
}

#[tokio::test]
async fn the_same_message_delivered_three_times_charges_once() {
    let schema = TestSchema::create("inbox-dup").await;
    charges_table(&schema).await;
    let endpoint = billing(&schema, false);
    let harness = InMemoryTestHarness::start(move |b| b.endpoint(endpoint)).await.expect("harness");
    let outbox = outbox(&schema, harness.bus()).await;
    let delivery = outbox.start();
    let id = uuid::Uuid::now_v7();
    let queue = format!("queue:billing-{}", schema.name);
    for _ in 0..3 {
        let options = SendOptions::new().message_id(id);
        harness.bus().send_with(&queue, OrderPlaced { order: 42, step: 0 }, options).await.expect("sent");
    }
    harness.consumed().wait_for::<OrderPlaced>(3, WAIT).await.expect("three deliveries, each acknowledged");
    harness.published().wait_for::<Charged>(1, WAIT).await.expect("the charge is announced");
    delivery.stop().await;
    harness.stop().await.expect("stop");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".charges").await, 1, "one business row");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".inbox_messages").await, 1, "one inbox row");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".outbox_messages").await, 1, "one Charged, once");
    assert_eq!(harness.published().count::<Charged>(), 1);
    schema.remove().await;
}

#[tokio::test]
async fn a_consume_that_fails_leaves_no_inbox_row_no_business_row_and_publishes_nothing() {
    let schema = TestSchema::create("inbox-fail").await;
    charges_table(&schema).await;
    let endpoint = billing(&schema, true);
    let harness = InMemoryTestHarness::start(move |b| b.endpoint(endpoint)).await.expect("harness");
    let outbox = outbox(&schema, harness.bus()).await;
    let delivery = outbox.start();
    let queue = format!("billing-{}", schema.name);
    harness.bus().send(&format!("queue:{queue}"), OrderPlaced { order: 7, step: 0 }).await.expect("sent");
    let transport = harness.transport();
    transport.wait_for_queue_len(&format!("{queue}_error"), 1, WAIT).await.expect("the failed message ends in _error");
    delivery.stop().await;
    harness.stop().await.expect("stop");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".charges").await, 0, "the charge rolled back");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".inbox_messages").await, 0, "no inbox row");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".outbox_messages").await, 0, "nothing in the outbox");
    assert_eq!(harness.published().count::<Charged>(), 0, "nothing published");
    schema.remove().await;
}

#[tokio::test]
async fn two_delivery_services_publish_each_message_once_and_each_transaction_in_order() {
    const TRANSACTIONS: i64 = 200;
    const PER_TRANSACTION: u32 = 5;
    let schema = TestSchema::create("outbox-two").await;
    let transport = InMemoryTransport::new();
    let harness = InMemoryTestHarness::start_on(transport.clone(), |bus| {
        bus.endpoint(
            Endpoint::new("orders").concurrency_limit(1).handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) }),
        )
    })
    .await
    .expect("harness");
    // Two service instances: a bus and a delivery service each, on one outbox table.
    let first = outbox(&schema, harness.bus()).await;
    let other_bus = Bus::builder(transport.clone()).build();
    other_bus.start().await.expect("second bus");
    let second = outbox(&schema, &other_bus).await;
    let (one, two) = (first.start(), second.start());
    let writers = (0..TRANSACTIONS).map(|order| {
        let (pool, outbox) = (schema.pool.clone(), if order % 2 == 0 { first.clone() } else { second.clone() });
        tokio::spawn(async move {
            let mut tx = pool.begin().await.expect("begin");
            for step in 0..PER_TRANSACTION {
                outbox.publish(&mut tx, OrderPlaced { order, step }).await.expect("written");
            }
            tx.commit().await.expect("commit");
        })
    });
    for writer in writers.collect::<Vec<_>>() {
        writer.await.expect("writer");
    }
    let total = (TRANSACTIONS as usize) * PER_TRANSACTION as usize;
    let consumed = harness.consumed().wait_for::<OrderPlaced>(total, WAIT * 3).await.expect("every message arrives");
    let envelopes = harness.consumed().envelopes::<OrderPlaced>();
    one.stop().await;
    two.stop().await;
    other_bus.stop().await.expect("stop");
    harness.stop().await.expect("stop");
    let ids: HashSet<_> = envelopes.iter().map(|e| e.message_id).collect();
    assert_eq!(envelopes.len(), total, "no message published twice");
    assert_eq!(ids.len(), total);
    let mut steps: HashMap<i64, Vec<u32>> = HashMap::new();
    for message in consumed {
        steps.entry(message.order).or_default().push(message.step);
    }
    for (order, seen) in steps {
        assert_eq!(seen, (0..PER_TRANSACTION).collect::<Vec<_>>(), "transaction {order} out of order");
    }
    schema.remove().await;
}

#[tokio::test]
async fn cleanup_removes_only_rows_older_than_the_window() {
    let schema = TestSchema::create("outbox-cleanup").await;
    let bus = Bus::builder(InMemoryTransport::new()).build();
    let options = PostgresOptions::new().schema(&schema.name).duplicate_window(Duration::from_secs(30 * 60));
    let outbox = PostgresOutbox::with_options(schema.pool.clone(), bus, options).expect("outbox");
    outbox.migrate().await.expect("migrated");
    let name = &schema.name;
    for (delivered, label) in
        [("now() - interval '31 minutes'", "old"), ("now() - interval '29 minutes'", "recent"), ("NULL", "pending")]
    {
        sqlx::query(&format!(
            "INSERT INTO \"{name}\".outbox_messages (destination_kind, destination, headers, body, delivered_at)
             VALUES ('send', '{label}', '{{}}', ''::bytea, {delivered})"
        ))
        .execute(&schema.pool)
        .await
        .expect("row");
    }
    for (consumed, id) in [
        ("now() - interval '31 minutes'", uuid::Uuid::now_v7()),
        ("now() - interval '29 minutes'", uuid::Uuid::now_v7()),
    ] {
        sqlx::query(&format!(
            "INSERT INTO \"{name}\".inbox_messages (endpoint, consumer, message_id, consumed_at)
             VALUES ('billing', 'charge', $1, {consumed})"
        ))
        .bind(id)
        .execute(&schema.pool)
        .await
        .expect("row");
    }
    let removed = outbox.cleanup().await.expect("cleanup");
    assert_eq!(removed, (1, 1), "one old delivered outbox row and one old inbox row");
    let left: Vec<String> =
        sqlx::query_scalar(&format!("SELECT destination FROM \"{name}\".outbox_messages ORDER BY destination"))
            .fetch_all(&schema.pool)
            .await
            .expect("left");
    assert_eq!(left, ["pending", "recent"], "a recent delivered row and an undelivered one stay");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".inbox_messages").await, 1);
    schema.remove().await;
}

#[tokio::test]
async fn two_consumers_of_one_message_each_consume_it_once_through_the_inbox() {
    let schema = TestSchema::create("inbox-two").await;
    charges_table(&schema).await;
    let options = PostgresOptions::new().schema(&schema.name);
    let inbox = PostgresInbox::with_options(schema.pool.clone(), options).expect("inbox");
    let insert = format!("INSERT INTO \"{}\".charges (order_id) VALUES ($1)", schema.name);
    let charge = |offset: i64| {
        let insert = insert.clone();
        move |ctx: ConsumeContext<OrderPlaced>| {
            let insert = insert.clone();
            async move {
                let mut db = bus_postgres::transaction(&ctx).await?;
                sqlx::query(&insert).bind(ctx.message().order + offset).execute(&mut *db).await?;
                Ok(())
            }
        }
    };
    let endpoint =
        Endpoint::new(format!("two-{}", schema.name)).attempt_middleware(inbox).handler(charge(0)).consumer(Audit);
    let harness = InMemoryTestHarness::start(move |b| b.endpoint(endpoint)).await.expect("harness");
    let outbox = outbox(&schema, harness.bus()).await;
    let id = uuid::Uuid::now_v7();
    for _ in 0..2 {
        harness
            .bus()
            .publish_with(OrderPlaced { order: 5, step: 0 }, SendOptions::new().message_id(id))
            .await
            .expect("publish");
    }
    // Two consumers, two deliveries: four acknowledged consumes, two of them duplicates.
    harness.consumed().wait_for::<OrderPlaced>(4, WAIT).await.expect("every consume acknowledged");
    harness.stop().await.expect("stop");
    drop(outbox);
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".charges").await, 2, "each consumer charged once");
    assert_eq!(count(&schema, "SELECT count(*) FROM \"{schema}\".inbox_messages").await, 2, "one record per consumer");
    schema.remove().await;
}

/// A second consumer of `OrderPlaced`: writes its own row, offset so that it is told apart.
struct Audit;

impl bus_core::Consumer<OrderPlaced> for Audit {
    async fn consume(&self, ctx: ConsumeContext<OrderPlaced>) -> Result<(), BoxError> {
        let schema = ctx.endpoint_name().trim_start_matches("two-").to_owned();
        let mut db = bus_postgres::transaction(&ctx).await?;
        sqlx::query(&format!("INSERT INTO \"{schema}\".charges (order_id) VALUES ($1)"))
            .bind(ctx.message().order + 1000)
            .execute(&mut *db)
            .await?;
        Ok(())
    }
}
