//! Events correlated by a field of the instance (MassTransit's `CorrelateBy`): in memory, in
//! Redis through its secondary index (kept in the instance's own script), and in PostgreSQL
//! through a query.

use std::sync::Arc;

use bus_core::{Bus, Message};
use bus_inmemory::InMemoryTestHarness;
use bus_postgres::{PostgresOptions, PostgresOutbox, PostgresSagaRepository};
use bus_saga::{
    when, Error, InMemorySagaRepository, RedisSagaOptions, RedisSagaRepository, Saga, SagaData, SagaRepository,
    StateMachine,
};
use serde::{Deserialize, Serialize};
use tests::postgres_support::TestSchema;
use tests::{unique, WAIT};
use uuid::Uuid;

const REDIS: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Order {
    order_number: Option<String>,
    paid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:CorrelateBy:OrderSubmitted")]
struct OrderSubmitted {
    order_id: Uuid,
    order_number: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:CorrelateBy:PaymentReceived")]
struct PaymentReceived {
    order_number: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:CorrelateBy:Renumbered")]
struct Renumbered {
    order_id: Uuid,
    order_number: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:CorrelateBy:Archived")]
struct Archived {
    order_id: Uuid,
}

fn machine(name: &str) -> Arc<StateMachine<Order>> {
    StateMachine::<Order>::builder(name)
        .states(["Submitted", "Paid"])
        .event::<OrderSubmitted>(|m| m.order_id)
        .event::<Renumbered>(|m| m.order_id)
        .event::<Archived>(|m| m.order_id)
        .event_correlated_by::<PaymentReceived, _>("orderNumber", |m| m.order_number.clone())
        .initially(
            when::<Order, OrderSubmitted>()
                .then(|o, m| o.data.order_number = Some(m.order_number.clone()))
                .transition_to("Submitted"),
        )
        .during("Submitted", when::<Order, PaymentReceived>().then(|o, _| o.data.paid += 1).transition_to("Paid"))
        .during_any(when::<Order, Renumbered>().then(|o, m| o.data.order_number = Some(m.order_number.clone())))
        .during_any(when::<Order, Archived>().finalize())
        .build()
        .expect("valid state machine")
}

/// The same story on any repository: an event that carries only the order number finds
/// the order by it; after the number changes, the old number finds nothing (skipped) and
/// the new one finds it; a finalized order is found by neither.
async fn correlates_by_field<R: SagaRepository<Order> + Clone>(name: &str, repository: R) {
    let machine = machine(name);
    let saga = Saga::new(machine.clone(), repository.clone());
    let probe = saga.probe();
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await.expect("harness");
    let bus: &Bus = harness.bus();
    let (order_id, number) = (Uuid::now_v7(), unique("A"));
    bus.publish(OrderSubmitted { order_id, order_number: number.clone() }).await.expect("publish");
    probe.wait_for(order_id, "Submitted").await.expect("submitted");
    let found = repository.find_id_by("orderNumber", &serde_json::json!(number)).await.expect("lookup");
    assert_eq!(found, Some(order_id));

    let renumbered = unique("B");
    bus.publish(Renumbered { order_id, order_number: renumbered.clone() }).await.expect("publish");
    harness.consumed().wait_for::<Renumbered>(1, WAIT).await.expect("renumbered");
    assert_eq!(repository.find_id_by("orderNumber", &serde_json::json!(number)).await.expect("lookup"), None);

    // The old number finds no order: skipped, as an event for a missing instance.
    bus.publish(PaymentReceived { order_number: number.clone() }).await.expect("publish");
    let skipped = format!("{name}_skipped");
    harness.dead_letters().wait_until("skipped", WAIT, |d| !d.is_empty()).await.expect("skipped");
    assert_eq!(harness.transport().peek(&skipped).len(), 1);

    bus.publish(PaymentReceived { order_number: renumbered.clone() }).await.expect("publish");
    let paid = probe.wait_for(order_id, "Paid").await.expect("paid");
    assert_eq!(paid.data.paid, 1);

    bus.publish(Archived { order_id }).await.expect("publish");
    probe.wait_finalized(order_id).await.expect("finalized");
    let gone = repository.find_id_by("orderNumber", &serde_json::json!(renumbered)).await.expect("lookup");
    assert_eq!(gone, None, "a deleted instance is found by no field");
    harness.stop().await.expect("stop");
}

#[tokio::test]
async fn in_memory_correlates_by_field() {
    correlates_by_field("MemoryOrder", InMemorySagaRepository::new()).await;
}

async fn redis_repository<S: SagaData>(prefix: &str, indexed: &[&str]) -> RedisSagaRepository<S> {
    let options = RedisSagaOptions {
        key_prefix: prefix.to_owned(),
        indexed_fields: indexed.iter().map(|f| (*f).to_owned()).collect(),
        ..RedisSagaOptions::default()
    };
    RedisSagaRepository::connect(REDIS, options).await.unwrap_or_else(|e| {
        panic!("Redis does not answer on {REDIS} ({e}); run scripts/test.sh (it starts or installs Redis)")
    })
}

#[tokio::test]
async fn redis_correlates_by_field_through_its_index() {
    let prefix = unique("correlate");
    correlates_by_field("RedisOrder", redis_repository::<Order>(&prefix, &["orderNumber"]).await).await;
    // Nothing of the index is left once the instance is gone.
    let client = redis::Client::open(REDIS).expect("url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("redis");
    let left: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut connection).await.expect("keys");
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn redis_refuses_a_field_it_does_not_index() {
    let repository = redis_repository::<Order>(&unique("correlate"), &[]).await;
    let refused = repository.find_id_by("orderNumber", &serde_json::json!("A-1")).await;
    assert!(matches!(refused, Err(Error::NotIndexed(field)) if field == "orderNumber"));
}

#[tokio::test]
async fn postgres_correlates_by_field_through_a_query() {
    let schema = TestSchema::create("correlate").await;
    let options = PostgresOptions::new().schema(&schema.name);
    let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).build();
    PostgresOutbox::with_options(schema.pool.clone(), bus, options.clone())
        .expect("outbox")
        .migrate()
        .await
        .expect("migrated");
    let repository = PostgresSagaRepository::with_options(schema.pool.clone(), options, "PgOrder").expect("repository");
    correlates_by_field("PgOrder", repository).await;
    schema.remove().await;
}

/// Two events that create an instance by the same field value at once create one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_events_by_field_create_one_instance() {
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Tally {
        order_number: Option<String>,
        payments: u32,
    }
    let machine = StateMachine::<Tally>::builder("TallyByNumber")
        .states(["Open"])
        .event_correlated_by::<PaymentReceived, _>("orderNumber", |m| m.order_number.clone())
        .initially(
            when::<Tally, PaymentReceived>()
                .then(|t, m| {
                    t.data.order_number = Some(m.order_number.clone());
                    t.data.payments += 1;
                })
                .transition_to("Open"),
        )
        .during("Open", when::<Tally, PaymentReceived>().then(|t, _| t.data.payments += 1))
        .build()
        .expect("valid state machine");
    let prefix = unique("correlate-race");
    let repository = redis_repository::<Tally>(&prefix, &["orderNumber"]).await;
    let saga = Saga::new(machine, repository.clone());
    let stats = saga.stats();
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint().concurrency_limit(8)))
        .await
        .expect("harness");
    let number = unique("C");
    let sends = (0..8).map(|_| harness.bus().publish(PaymentReceived { order_number: number.clone() }));
    futures::future::try_join_all(sends).await.expect("published");
    assert!(stats.wait_for_transitions(8, WAIT).await, "all eight applied");
    let id = repository.find_id_by("orderNumber", &serde_json::json!(number)).await.expect("lookup").expect("found");
    let instance = repository.load(id).await.expect("load").expect("one instance");
    assert_eq!(instance.data.payments, 8, "every payment on the one instance");
    harness.stop().await.expect("stop");
}
