//! Sagas on PostgreSQL, with the inbox: no lost update under two racing buses, queries by
//! state and by field, and a finalizing transition whose messages cannot leave yet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::{Bus, ConsumeContext, Endpoint, Message, Subscription, Transport, TransportMessage};
use bus_inmemory::{InMemoryTestHarness, InMemoryTransport};
use bus_postgres::{PostgresInbox, PostgresOptions, PostgresOutbox, PostgresSagaRepository};
use bus_saga::{when, Saga, SagaRepository, StateMachine};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use tests::postgres_support::{database_url, TestSchema};
use tests::{unique, WAIT};
use uuid::Uuid;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CounterState {
    count: u32,
    owner: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:PgSagaTests:Increment")]
struct Increment {
    counter_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:PgSagaTests:Close")]
struct Close {
    counter_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:PgSagaTests:Closed")]
struct Closed {
    counter_id: Uuid,
    count: u32,
}

fn counter_machine(name: &str) -> Arc<StateMachine<CounterState>> {
    StateMachine::<CounterState>::builder(name)
        .states(["Counting"])
        .event::<Increment>(|m| m.counter_id)
        .event::<Close>(|m| m.counter_id)
        .initially(
            when::<CounterState, Increment>()
                .then(|c, _| {
                    c.data.count += 1;
                    c.data.owner = "ann".to_owned();
                })
                .transition_to("Counting"),
        )
        .during("Counting", when::<CounterState, Increment>().then(|c, _| c.data.count += 1))
        .during(
            "Counting",
            when::<CounterState, Close>()
                .publish(|c, _| Closed { counter_id: c.correlation_id, count: c.data.count })
                .finalize(),
        )
        .build()
        .expect("valid state machine")
}

fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::new().schema(schema).poll_interval(Duration::from_millis(200))
}

/// A saga endpoint with the inbox, its instances in the test's schema.
fn saga_endpoint(
    schema: &TestSchema,
    pool: &sqlx::PgPool,
    name: &str,
) -> (Endpoint, PostgresSagaRepository<CounterState>) {
    let repository =
        PostgresSagaRepository::with_options(pool.clone(), options(&schema.name), name).expect("repository");
    let inbox = PostgresInbox::with_options(pool.clone(), options(&schema.name)).expect("inbox");
    let saga = Saga::new(counter_machine(name), repository.clone());
    (saga.endpoint().attempt_middleware(inbox), repository)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_on_two_buses_lose_no_update() {
    const INSTANCES: usize = 1_000;
    const EVENTS: u32 = 16;
    let schema = TestSchema::create("saga-race").await;
    let pool = PgPoolOptions::new().max_connections(24).connect(&database_url()).await.expect("pool");
    let name = unique("Counter");
    let transport = InMemoryTransport::new();
    let mut buses = Vec::new();
    let mut repository = None;
    for _ in 0..2 {
        let (endpoint, saga_repository) = saga_endpoint(&schema, &pool, &name);
        let bus = Bus::builder(transport.clone())
            .endpoint(endpoint.concurrency_limit(8).retry(RetryPolicy::immediate(5)))
            .build();
        buses.push(bus);
        repository = Some(saga_repository);
    }
    let repository = repository.expect("a repository");
    let outbox = PostgresOutbox::with_options(pool.clone(), buses[0].clone(), options(&schema.name)).expect("outbox");
    outbox.migrate().await.expect("migrated");
    for bus in &buses {
        bus.start().await.expect("bus starts");
    }
    let ids: Vec<Uuid> = (0..INSTANCES).map(|_| Uuid::now_v7()).collect();
    let publisher = buses[0].clone();
    let mut sends = Vec::new();
    for id in &ids {
        for _ in 0..EVENTS {
            sends.push(publisher.publish(Increment { counter_id: *id }));
        }
    }
    futures::future::try_join_all(sends).await.expect("all published");
    let inbox_rows = format!("SELECT count(*) FROM \"{}\".inbox_messages", schema.name);
    let total = i64::from(EVENTS) * INSTANCES as i64;
    // Every event leaves one inbox row when its transaction commits.
    let done = async {
        loop {
            let consumed: i64 = sqlx::query_scalar(&inbox_rows).fetch_one(&pool).await.expect("count");
            if consumed >= total {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(240), done).await.expect("every event applied");
    for bus in &buses {
        bus.stop().await.expect("stop");
    }
    let mut wrong = Vec::new();
    for id in &ids {
        let instance = repository.load(*id).await.expect("load").expect("instance exists");
        if instance.data.count != EVENTS || instance.version != u64::from(EVENTS) {
            wrong.push((instance.data.count, instance.version));
        }
    }
    let errors = transport.peek(&format!("{name}_error"));
    let counting = repository.in_state("Counting").await.expect("query by state");
    let owned = repository.find_by("owner", "ann").await.expect("query by field");
    pool.close().await;
    schema.remove().await;
    assert!(wrong.is_empty(), "lost updates (count, version): {:?}", &wrong[..wrong.len().min(10)]);
    assert!(errors.is_empty(), "nothing failed for good");
    assert_eq!(counting.len(), INSTANCES, "every instance found by its state");
    assert_eq!(owned.len(), INSTANCES, "and by a field of its data");
}

/// The in-memory transport, refusing to publish `Closed` while `down` is set: the broker out
/// of reach for what the outbox delivers.
#[derive(Clone)]
struct ClosedCannotLeave {
    inner: InMemoryTransport,
    down: Arc<AtomicBool>,
}

impl Transport for ClosedCannotLeave {
    fn system(&self) -> &'static str {
        self.inner.system()
    }
    fn address(&self, name: &str) -> String {
        self.inner.address(name)
    }
    fn declare<'a>(&'a self, topology: &'a bus_core::EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        self.inner.declare(topology)
    }
    fn publish<'a>(&'a self, types: &'a [&'a str], message: TransportMessage) -> BoxFuture<'a, bus_core::Result<()>> {
        if types.first() == Some(&Closed::message_type()) && self.down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(bus_core::Error::transport("the broker is unreachable", true, None)) });
        }
        self.inner.publish(types, message)
    }
    fn send<'a>(&'a self, destination: &'a str, message: TransportMessage) -> BoxFuture<'a, bus_core::Result<()>> {
        self.inner.send(destination, message)
    }
    fn subscribe<'a>(
        &'a self,
        topology: &'a bus_core::EndpointTopology,
        prefetch: u16,
    ) -> BoxFuture<'a, bus_core::Result<Subscription>> {
        self.inner.subscribe(topology, prefetch)
    }
    fn delete<'a>(&'a self, topology: &'a bus_core::EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        self.inner.delete(topology)
    }
}

#[tokio::test]
async fn a_finalizing_transition_whose_messages_cannot_leave_sends_them_when_the_broker_returns() {
    let schema = TestSchema::create("saga-final").await;
    let name = unique("Closing");
    let down = Arc::new(AtomicBool::new(true));
    let transport = ClosedCannotLeave { inner: InMemoryTransport::new(), down: down.clone() };
    let (endpoint, repository) = saga_endpoint(&schema, &schema.pool, &name);
    let closed_log = Arc::new(bus_core::testing::MessageLog::default());
    let watcher = Endpoint::new(unique("closed-watch")).handler_with_state(
        closed_log.clone(),
        |ctx: ConsumeContext<Closed>, log| async move {
            log.record(ctx.envelope());
            Ok(())
        },
    );
    let bus = Bus::builder(transport.clone()).endpoint(endpoint).endpoint(watcher).build();
    let outbox = PostgresOutbox::with_options(schema.pool.clone(), bus.clone(), options(&schema.name)).expect("outbox");
    outbox.migrate().await.expect("migrated");
    bus.start().await.expect("bus starts");
    let delivery = outbox.start();
    let id = Uuid::now_v7();
    for _ in 0..3 {
        bus.publish(Increment { counter_id: id }).await.expect("publish");
    }
    let counted = async {
        while repository.load(id).await.expect("load").is_none_or(|i| i.data.count < 3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, counted).await.expect("three increments applied");
    bus.publish(Close { counter_id: id }).await.expect("publish");
    // Committed with the transition: the instance is gone, its message waits in the outbox.
    let waiting = format!("SELECT count(*) FROM \"{}\".outbox_messages WHERE delivered_at IS NULL", schema.name);
    let committed = async {
        loop {
            let gone = repository.load(id).await.expect("load").is_none();
            let pending: i64 = sqlx::query_scalar(&waiting).fetch_one(&schema.pool).await.expect("count");
            if gone && pending == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, committed).await.expect("finalized, its message stored");
    assert_eq!(closed_log.len(), 0, "nothing left while the broker is down");
    down.store(false, Ordering::SeqCst);
    let closed = closed_log.wait_for::<Closed>(1, WAIT * 2).await.expect("sent when the broker returns");
    delivery.stop().await;
    bus.stop().await.expect("stop");
    let errors = transport.inner.peek(&format!("{name}_error"));
    schema.remove().await;
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].count, 3, "with the state of the transition");
    assert!(errors.is_empty(), "the event did not fail: the transition committed with its message");
}

#[tokio::test]
async fn a_harness_saga_with_the_inbox_runs_pessimistically() {
    let schema = TestSchema::create("saga-lock").await;
    let name = unique("Locked");
    let repository =
        PostgresSagaRepository::<CounterState>::with_options(schema.pool.clone(), options(&schema.name), &name)
            .expect("repository")
            .pessimistic();
    let inbox = PostgresInbox::with_options(schema.pool.clone(), options(&schema.name)).expect("inbox");
    let saga = Saga::new(counter_machine(&name), repository.clone());
    let stats = saga.stats();
    let endpoint = saga.endpoint().attempt_middleware(inbox).concurrency_limit(8);
    let harness = InMemoryTestHarness::start(move |b| b.endpoint(endpoint)).await.expect("harness");
    let outbox = PostgresOutbox::with_options(schema.pool.clone(), harness.bus().clone(), options(&schema.name))
        .expect("outbox");
    outbox.migrate().await.expect("migrated");
    let id = Uuid::now_v7();
    harness.bus().publish(Increment { counter_id: id }).await.expect("first");
    harness.consumed().wait_for::<Increment>(1, WAIT).await.expect("created");
    for _ in 0..31 {
        harness.bus().publish(Increment { counter_id: id }).await.expect("publish");
    }
    harness.consumed().wait_for::<Increment>(32, WAIT).await.expect("all applied");
    harness.stop().await.expect("stop");
    let instance = repository.load(id).await.expect("load").expect("exists");
    schema.remove().await;
    assert_eq!(instance.data.count, 32, "no lost update");
    assert_eq!(stats.conflicts(), 0, "the lock serialized the events: no conflict to retry");
}
