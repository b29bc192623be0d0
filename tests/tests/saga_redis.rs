//! Sagas on the real Redis (127.0.0.1:6379): concurrency, initiating races, an outage.

use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::{Bus, Message, RedeliveryPolicy};
use bus_inmemory::InMemoryTransport;
use bus_saga::{when, RedisSagaOptions, RedisSagaRepository, Saga, SagaRepository, StateMachine};
use examples::order_saga::{order_state_machine, NewOrderEvent, OrderState, ProcessOrder};
use serde::{Deserialize, Serialize};
use tests::redis_support::ThrowawayRedis;
use tests::unique;
use uuid::Uuid;

const REDIS: &str = "redis://127.0.0.1:6379";

fn require_redis() {
    if std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], 6379).into(), Duration::from_secs(2)).is_err() {
        panic!(
            "Redis does not answer on 127.0.0.1:6379. These tests need a real Redis: run scripts/test.sh \
             (it starts or installs Redis), or start it with `redis-server --daemonize yes`."
        );
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CounterState {
    count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaTests:Increment")]
struct Increment {
    counter_id: Uuid,
}

fn counter_machine(name: &str) -> Arc<StateMachine<CounterState>> {
    StateMachine::<CounterState>::builder(name)
        .states(["Counting"])
        .event::<Increment>(|m| m.counter_id)
        .initially(when::<CounterState, Increment>().then(|c, _| c.data.count += 1).transition_to("Counting"))
        .during("Counting", when::<CounterState, Increment>().then(|c, _| c.data.count += 1))
        .build()
        .expect("valid state machine")
}

async fn repository<S>(prefix: &str) -> RedisSagaRepository<S> {
    let options = RedisSagaOptions { key_prefix: prefix.to_owned(), ..RedisSagaOptions::default() };
    RedisSagaRepository::connect(REDIS, options).await.expect("connects to Redis")
}

async fn delete_prefix(prefix: &str) {
    let client = redis::Client::open(REDIS).expect("client");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connection");
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut connection).await.expect("keys");
    for chunk in keys.chunks(500) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut connection).await.expect("del");
    }
}

const INSTANCES: usize = 1_000;
const EVENTS: u32 = 16;

/// 1,000 counters, 16 increments each published back to back, consumed by `buses` buses at
/// concurrency 8 with the saga's endpoint partitioned by instance or not: every increment
/// applied once. Returns the optimistic-concurrency conflicts retried.
async fn count_concurrently(buses_count: usize, partitioned: bool) -> u64 {
    require_redis();
    let prefix = unique("counters");
    let endpoint = unique("Counter");
    let transport = InMemoryTransport::new();
    // Conflicts are counted on the buses' own meter, not only in the stats.
    let exporter = opentelemetry_sdk::metrics::InMemoryMetricExporter::default();
    let meters = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter.clone()).build())
        .build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&meters, "saga-tests");
    let mut buses = Vec::new();
    let mut stats = Vec::new();
    for _ in 0..buses_count {
        let saga = Saga::new(counter_machine(&endpoint), repository::<CounterState>(&prefix).await);
        let saga_stats = saga.stats();
        let mut saga_endpoint = saga.endpoint().concurrency_limit(8).retry(RetryPolicy::immediate(5));
        if !partitioned {
            saga_endpoint = saga_endpoint.unpartitioned();
        }
        let builder = Bus::builder(transport.clone()).meter(&meter).endpoint(saga_endpoint);
        buses.push(builder.build());
        stats.push(saga_stats);
    }
    for bus in &buses {
        bus.start().await.expect("bus starts");
    }
    let ids: Vec<Uuid> = (0..INSTANCES).map(|_| Uuid::now_v7()).collect();
    // Every instance gets its 16 events back to back, so they meet in both buses at once.
    let publisher = buses[0].clone();
    let mut sends = Vec::new();
    for id in &ids {
        for _ in 0..EVENTS {
            sends.push(publisher.publish(Increment { counter_id: *id }));
        }
    }
    futures::future::try_join_all(sends).await.expect("all published");
    let total = u64::from(EVENTS) * INSTANCES as u64;
    // Each event is consumed once, by one of the two buses: together they reach the total.
    let done = async {
        loop {
            let saved: u64 = stats.iter().map(|s| s.transitions()).sum();
            if saved >= total {
                return;
            }
            let next =
                stats.iter().map(|s| Box::pin(s.wait_for_transitions(s.transitions() + 1, Duration::from_secs(5))));
            futures::future::select_all(next).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(180), done).await.expect("every event applied");
    for bus in &buses {
        bus.stop().await.expect("stop");
    }
    let repository = repository::<CounterState>(&prefix).await;
    let mut wrong = Vec::new();
    for id in &ids {
        let instance = repository.load(*id).await.expect("load").expect("instance exists");
        if instance.data.count != EVENTS || instance.version != u64::from(EVENTS) {
            wrong.push((instance.data.count, instance.version));
        }
    }
    let conflicts: u64 = stats.iter().map(|s| s.conflicts()).sum();
    let errors = transport.peek(&format!("{endpoint}_error"));
    delete_prefix(&prefix).await;
    println!(
        "redis saga concurrency: {buses_count} bus(es), {}, {INSTANCES} instances x {EVENTS} events, {conflicts} conflicts retried",
        if partitioned { "partitioned by instance" } else { "unpartitioned" }
    );
    assert!(wrong.is_empty(), "lost updates (count, version): {:?}", &wrong[..wrong.len().min(10)]);
    assert!(errors.is_empty(), "nothing failed for good");
    meters.force_flush().expect("flush");
    let metrics = exporter.get_finished_metrics().expect("metrics");
    // The latest export holds the totals (cumulative): earlier ones would count twice.
    let counted: u64 = metrics
        .last()
        .into_iter()
        .flat_map(|r| r.scope_metrics())
        .flat_map(|s| s.metrics())
        .filter(|m| m.name() == "messaging.saga.conflicts")
        .filter_map(|m| match m.data() {
            opentelemetry_sdk::metrics::data::AggregatedMetrics::U64(
                opentelemetry_sdk::metrics::data::MetricData::Sum(sum),
            ) => Some(sum.data_points().map(|p| p.value()).sum::<u64>()),
            _ => None,
        })
        .sum();
    assert_eq!(counted, conflicts, "every conflict counted on the buses' meter");
    conflicts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_on_real_redis_lose_no_update() {
    // Two buses take the same instance's events at once: partitions order each bus's own.
    let conflicts = count_concurrently(2, true).await;
    assert!(conflicts > 0, "two buses with concurrency really raced");
}

/// One bus: partitioned by instance (the saga's default), an instance's events never meet,
/// so there is no conflict to retry; unpartitioned, they meet at concurrency 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_by_instance_spare_a_saga_its_conflicts() {
    let partitioned = count_concurrently(1, true).await;
    let unpartitioned = count_concurrently(1, false).await;
    assert_eq!(partitioned, 0, "partitioned: no two events of an instance at once");
    assert!(unpartitioned > 0, "unpartitioned, the same events conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_initiating_events_create_one_instance_in_redis() {
    require_redis();
    let prefix = unique("orders");
    let transport = InMemoryTransport::new();
    let recorder = Arc::new(bus_core::testing::BusRecorder::default());
    let saga = Saga::new(order_state_machine().expect("valid state machine"), repository::<OrderState>(&prefix).await);
    let bus = Bus::builder(transport.clone())
        .observer_arc(recorder.clone())
        .scheduler(bus_inmemory::InMemoryScheduler::new())
        .endpoint(saga.endpoint().concurrency_limit(16))
        .build();
    bus.start().await.expect("bus starts");
    let id = Uuid::now_v7();
    let sends = (0..16).map(|_| bus.publish(NewOrderEvent { order_id: id, user_email: "ann@example.com".into() }));
    futures::future::try_join_all(sends).await.expect("published");
    recorder.consumed.wait_for::<NewOrderEvent>(16, Duration::from_secs(20)).await.expect("all consumed");
    bus.stop().await.expect("stop");
    let repository = repository::<OrderState>(&prefix).await;
    let instance = repository.load(id).await.expect("load").expect("one instance");
    delete_prefix(&prefix).await;
    assert_eq!(instance.current_state, "Pending");
    assert_eq!(instance.version, 1, "created once, never overwritten");
    assert_eq!(recorder.published.count::<ProcessOrder>(), 1, "exactly one ProcessOrder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_redis_outage_and_complete_after_it_returns() {
    const INSTANCES: u32 = 200;
    let redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await.expect("redis starts");
    let endpoint = unique("Outage");
    let options = RedisSagaOptions {
        key_prefix: "outage".into(),
        response_timeout: Duration::from_millis(500),
        ..RedisSagaOptions::default()
    };
    let repository =
        RedisSagaRepository::<CounterState>::connect(&redis.url(), options.clone()).await.expect("connects");
    let transport = InMemoryTransport::new();
    let recorder = Arc::new(bus_core::testing::BusRecorder::default());
    let saga = Saga::new(counter_machine(&endpoint), repository);
    let stats = saga.stats();
    let bus = Bus::builder(transport.clone())
        .observer_arc(recorder.clone())
        .endpoint(
            saga.endpoint()
                .concurrency_limit(4)
                .retry(RetryPolicy::intervals([Duration::from_millis(100); 3]))
                .redelivery(RedeliveryPolicy::intervals([Duration::from_millis(500); 20])),
        )
        .build();
    bus.start().await.expect("bus starts");
    let ids: Vec<Uuid> = (0..INSTANCES).map(|_| Uuid::now_v7()).collect();
    for id in &ids[..INSTANCES as usize / 2] {
        bus.publish(Increment { counter_id: *id }).await.expect("publish");
    }
    assert!(stats.wait_for_transitions(u64::from(INSTANCES / 2), Duration::from_secs(30)).await, "first half saved");

    let redis = Arc::new(redis);
    let stopped = redis.clone();
    tokio::task::spawn_blocking(move || stopped.stop()).await.expect("redis stopped");
    for id in &ids[INSTANCES as usize / 2..] {
        bus.publish(Increment { counter_id: *id }).await.expect("publishing does not need Redis");
    }
    // The consumers meet the outage: attempts fail, are retried, then redelivered later.
    recorder
        .faults
        .wait_until("a delivery failing on the outage", Duration::from_secs(20), |faults| !faults.is_empty())
        .await
        .expect("the outage was met");
    let saved_during_outage = stats.transitions() - u64::from(INSTANCES / 2);
    let restarted = redis.clone();
    tokio::task::spawn_blocking(move || restarted.launch()).await.expect("redis back");
    assert!(
        stats.wait_for_transitions(u64::from(INSTANCES), Duration::from_secs(60)).await,
        "every message completed after Redis returned"
    );
    bus.stop().await.expect("stop");
    let check = RedisSagaRepository::<CounterState>::connect(&redis.url(), options).await.expect("connects");
    for id in &ids {
        let instance = check.load(*id).await.expect("load").expect("every instance saved");
        assert_eq!(instance.data.count, 1);
    }
    assert!(transport.peek(&format!("{endpoint}_error")).is_empty(), "nothing given up on");
    assert_eq!(saved_during_outage, 0, "nothing could be saved while Redis was down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pessimistic_mode_serializes_an_instance_without_conflicts() {
    require_redis();
    const INSTANCES: usize = 50;
    const EVENTS: u32 = 8;
    let prefix = unique("locked");
    let endpoint = unique("Locked");
    let options = RedisSagaOptions {
        key_prefix: prefix.clone(),
        lock_lease: Some(Duration::from_secs(5)),
        ..RedisSagaOptions::default()
    };
    let locking = RedisSagaRepository::<CounterState>::connect(REDIS, options).await.expect("redis");
    let saga = Saga::new(counter_machine(&endpoint), locking);
    let stats = saga.stats();
    let bus = Bus::builder(InMemoryTransport::new()).endpoint(saga.endpoint().concurrency_limit(8)).build();
    bus.start().await.expect("bus starts");
    let ids: Vec<Uuid> = (0..INSTANCES).map(|_| Uuid::now_v7()).collect();
    let sends =
        ids.iter().flat_map(|id| (0..EVENTS).map(move |_| Increment { counter_id: *id })).map(|m| bus.publish(m));
    futures::future::try_join_all(sends).await.expect("published");
    let total = u64::from(EVENTS) * INSTANCES as u64;
    assert!(stats.wait_for_transitions(total, Duration::from_secs(60)).await, "every event applied");
    bus.stop().await.expect("stop");
    let check = repository::<CounterState>(&prefix).await;
    for id in &ids {
        assert_eq!(check.load(*id).await.expect("load").expect("instance").data.count, EVENTS);
    }
    let client = redis::Client::open(REDIS).expect("client");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connection");
    let locks: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*_lock")).query_async(&mut connection).await.expect("keys");
    delete_prefix(&prefix).await;
    assert_eq!(stats.conflicts(), 0, "the lock serialized every instance");
    assert!(locks.is_empty(), "every lock released: {locks:?}");
}

/// State with a field named like the instance's own `version`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct VersionedState {
    version: u32,
}

/// Such state would be stored with two `version` keys and never load again: the Redis
/// repository refuses it at once, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_with_a_reserved_field_name_is_refused_with_the_reason() {
    require_redis();
    let prefix = unique("saga-reserved");
    let repository = repository::<VersionedState>(&prefix).await;
    let instance = bus_saga::SagaInstance::new(Uuid::now_v7(), VersionedState { version: 3 });
    let refused = repository.insert(&instance).await;
    delete_prefix(&prefix).await;
    match refused {
        Err(bus_saga::Error::ReservedField(field)) => assert_eq!(field, "version"),
        other => panic!("expected ReservedField, got {other:?}"),
    }
}

/// A stored instance whose version is the largest a `u64` holds (written by something other
/// than this bus) cannot be updated: its next version would repeat an old one. The update is
/// refused with that reason instead of overflowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stored_at_the_last_version_is_refused_not_overflowed() {
    require_redis();
    let prefix = unique("saga-last-version");
    let repository = repository::<CounterState>(&prefix).await;
    let id = Uuid::now_v7();
    repository.insert(&bus_saga::SagaInstance::new(id, CounterState { count: 1 })).await.expect("insert");
    let client = redis::Client::open(REDIS).expect("client");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connection");
    let stored: String = redis::cmd("GET").arg(repository.key(id)).query_async(&mut connection).await.expect("get");
    let mut json: serde_json::Value = serde_json::from_str(&stored).expect("stored JSON");
    json["version"] = serde_json::Value::from(u64::MAX);
    let _: () = redis::cmd("SET")
        .arg(repository.key(id))
        .arg(json.to_string())
        .query_async(&mut connection)
        .await
        .expect("set");

    let mut loaded = repository.load(id).await.expect("load").expect("the instance");
    assert_eq!(loaded.version, u64::MAX);
    loaded.data.count += 1;
    let refused = repository.update(&loaded, loaded.version).await;
    delete_prefix(&prefix).await;
    match refused {
        Err(bus_saga::Error::VersionExhausted(instance)) => assert_eq!(instance, id),
        other => panic!("expected VersionExhausted, got {other:?}"),
    }
}
