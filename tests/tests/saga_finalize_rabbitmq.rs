//! A saga event that finalizes its instance, whose messages cannot leave, on RabbitMQ and
//! Redis: the instance is kept until they do, then deleted.

use std::sync::Arc;
use std::time::Duration;

use bus_core::testing::MessageLog;
use bus_core::{Bus, Endpoint, Message};
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use bus_saga::{when, RedisSagaOptions, RedisSagaRepository, Saga, SagaRepository, StateMachine};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::{rabbitmqctl, Vhost};
use tests::{record, unique, WAIT};
use uuid::Uuid;

const REDIS: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TripState {}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaEdges:TripBooked")]
struct TripBooked {
    trip_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaEdges:TripEnded")]
struct TripEnded {
    trip_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaEdges:TripClosed")]
struct TripClosed {
    trip_id: Uuid,
}

fn trip_machine(name: &str) -> Arc<StateMachine<TripState>> {
    StateMachine::<TripState>::builder(name)
        .states(["Open"])
        .event::<TripBooked>(|m| m.trip_id)
        .event::<TripEnded>(|m| m.trip_id)
        .initially(when::<TripState, TripBooked>().transition_to("Open"))
        .during("Open", when::<TripState, TripEnded>().publish(|_, e| TripClosed { trip_id: e.trip_id }).finalize())
        .build()
        .expect("valid state machine")
}

async fn ctl(args: Vec<String>) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rabbitmqctl(&args)
    })
    .await
    .expect("rabbitmqctl runs");
}

/// Breaks: the broker refuses the message the finalizing event publishes (no write permission
/// on its exchange), so the event fails and ends in `_error`. Proves: the instance is kept
/// (not deleted with its message unsent); once the permission is back and the event is moved
/// back from `_error`, the message is published exactly once and the instance is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finalizing_events_refused_message_leaves_once_it_can_and_the_instance_goes() {
    require_broker();
    let vhost = Arc::new(tokio::task::spawn_blocking(|| Vhost::create("saga-final")).await.expect("vhost"));
    let name = vhost.name.clone();
    let options = RabbitMqOptions { publish_timeout: Duration::from_secs(10), ..RabbitMqOptions::default() };
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options).await.expect("connects");
    let saga = unique("Trip");
    let prefix = unique("trips");
    let repository = RedisSagaRepository::<TripState>::connect(
        REDIS,
        RedisSagaOptions { key_prefix: prefix.clone(), ..RedisSagaOptions::default() },
    )
    .await
    .unwrap_or_else(|e| panic!("Redis does not answer on {REDIS} ({e}): run scripts/test.sh to start it"));
    let closed = Arc::new(MessageLog::default());
    let bus = Bus::builder(transport.clone())
        .stop_timeout(Duration::from_secs(10))
        .endpoint(record::<TripClosed>(Endpoint::new(unique("trip-closed")), &closed))
        .endpoint(Saga::new(trip_machine(&saga), repository.clone()).endpoint())
        .build();
    bus.start().await.expect("bus starts");
    let trip_id = Uuid::now_v7();
    bus.publish(TripBooked { trip_id }).await.expect("published");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while repository.load(trip_id).await.expect("loads").is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the instance was never created");
        poll.tick().await;
    }

    // The saga may no longer write to TripClosed's exchange (declared already by its consumer).
    let deny = |write: &str| ["set_permissions", "-p", &name, "guest", ".*", write, ".*"].map(str::to_owned).to_vec();
    ctl(deny("^(?!SagaEdges:TripClosed$).*")).await;
    bus.publish(TripEnded { trip_id }).await.expect("published");
    let error_queue = format!("{saga}_error");
    let inspector = lapin::Connection::connect(&vhost.uri(5672), lapin::ConnectionProperties::default())
        .await
        .expect("inspection connection");
    let channel = inspector.create_channel().await.expect("channel");
    let mut failed = channel
        .basic_consume(
            error_queue.as_str().into(),
            "inspector".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consumes _error");
    let moved = tokio::time::timeout(WAIT, failed.next()).await.expect("in _error").expect("a delivery").expect("ok");
    let kept = repository.load(trip_id).await.expect("loads").expect("the finalized instance is kept");
    assert_eq!(kept.current_state, "Final");
    assert_eq!(closed.count::<TripClosed>(), 0, "nothing left while refused");

    // Permission back; the event moved back from `_error` to the saga's queue, as an operator does.
    ctl(deny(".*")).await;
    channel
        .basic_publish(
            "".into(),
            saga.as_str().into(),
            BasicPublishOptions::default(),
            &moved.data,
            moved.properties.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    moved.acker.ack(BasicAckOptions::default()).await.expect("ack");
    closed.wait_for::<TripClosed>(1, WAIT).await.expect("the message leaves");
    let deadline = tokio::time::Instant::now() + WAIT;
    while repository.load(trip_id).await.expect("loads").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the finalized instance was never deleted");
        poll.tick().await;
    }
    bus.stop().await.expect("stop");
    transport.close().await;
    assert_eq!(closed.count::<TripClosed>(), 1, "published exactly once");
}
