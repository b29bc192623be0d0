//! The ported order saga end to end on RabbitMQ and Redis, driven as a .NET website would.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::Endpoint;
use bus_saga::{RedisSagaOptions, RedisSagaRepository, Saga, SagaRepository, TransitionRecord, FINAL};
use examples::order_saga::{order_state_machine_with, InventoryConsumer, OrderState, DEFAULT_ORDER_TIMEOUT};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use tests::rabbit_fixture::RabbitFixture;
use tests::{runtime, unique, Fixture};
use uuid::Uuid;

const VECTOR: &str = include_str!("../../bus-core/tests/vectors/new-order-event.envelope.json");

#[test]
fn a_raw_masstransit_new_order_drives_the_saga_to_accepted_or_cancelled_and_the_key_is_gone() {
    runtime().block_on(async {
        if std::net::TcpStream::connect(("127.0.0.1", 6379)).is_err() {
            panic!("Redis does not answer on 127.0.0.1:6379: run scripts/test.sh, which starts it");
        }
        let fixture = RabbitFixture::shared("saga-e2e").await;
        let prefix = unique("OrderState");
        let options = RedisSagaOptions { key_prefix: prefix.clone(), ..RedisSagaOptions::default() };
        let repository =
            RedisSagaRepository::<OrderState>::connect("redis://127.0.0.1:6379", options.clone()).await.expect("redis");
        let records = Arc::new(Mutex::new(Vec::<TransitionRecord>::new()));
        let (tx, mut finished) = tokio::sync::mpsc::unbounded_channel();
        let hook_records = records.clone();
        let machine = order_state_machine_with(DEFAULT_ORDER_TIMEOUT, move |m| {
            m.on_transition(move |r| {
                if let Ok(mut all) = hook_records.lock() {
                    all.push(r.clone());
                }
                if r.path.last().map(String::as_str) == Some(FINAL) {
                    let _ = tx.send(r.id);
                }
            })
        })
        .expect("valid state machine");
        let inventory = InventoryConsumer::default();
        let inventory_endpoint = inventory.clone();
        let bus = fixture
            .bus()
            .scheduler(bus_inmemory::InMemoryScheduler::new())
            .endpoint(Saga::new(machine, repository).endpoint())
            .endpoint(Endpoint::new("Inventory").consumer(inventory_endpoint))
            .build();
        bus.start().await.expect("bus starts");

        let (accepted, cancelled) = (Uuid::now_v7(), Uuid::now_v7());
        inventory.mark_unavailable(cancelled);
        let channel = fixture.channel().await;
        for order_id in [accepted, cancelled] {
            // The reference envelope, as the .NET website writes it, for a new order id.
            let body = VECTOR
                .replace("3f2a9d41-1c7b-4e0a-9a55-2d8c6e1b7f03", &order_id.to_string())
                .replace("0a790000-5d3a-0015-4ccf-08dd5f3c2a41", &Uuid::now_v7().to_string());
            let properties = BasicProperties::default()
                .with_content_type("application/vnd.masstransit+json".into())
                .with_delivery_mode(2);
            channel
                .basic_publish(
                    "SagaWithMasstransitShared:NewOrderEvent".into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await
                .expect("publish")
                .await
                .expect("sent");
        }
        let mut done = Vec::new();
        for _ in 0..2 {
            let id = tokio::time::timeout(Duration::from_secs(30), finished.recv())
                .await
                .expect("a saga finished")
                .expect("open");
            done.push(id);
        }
        let errors = fixture.take_messages("OrderState_error", 0, Duration::ZERO).await;
        bus.stop().await.expect("stop");

        let records = records.lock().expect("lock").clone();
        let path_of = |id: Uuid| records.iter().filter(|r| r.id == id).flat_map(|r| r.path.clone()).collect::<Vec<_>>();
        assert_eq!(path_of(accepted), ["Pending", "Accepted", FINAL]);
        assert_eq!(path_of(cancelled), ["Pending", "Cancelled", FINAL]);
        let check = RedisSagaRepository::<OrderState>::connect("redis://127.0.0.1:6379", options).await.expect("redis");
        for id in [accepted, cancelled] {
            assert!(check.load(id).await.expect("load").is_none(), "instance key {prefix}:{id} is gone");
        }
        assert!(errors.is_empty(), "{errors:?}");
    });
}
