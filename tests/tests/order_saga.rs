//! The ported order saga: every transition without infrastructure, then on the in-memory bus.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{Endpoint, Message};
use bus_inmemory::InMemoryTestHarness;
use bus_saga::{
    InMemorySagaRepository, MissingInstance, Outcome, ProducedKind, Saga, SagaInstance, TransitionRecord, FINAL,
};
use examples::order_saga::{
    order_state_machine, order_state_machine_with, InventoryConsumer, NewOrderEvent, OrderCancelled, OrderProcessed,
    OrderState, OrderTimeoutExpired, ProcessOrder, DEFAULT_ORDER_TIMEOUT,
};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn new_order(order_id: Uuid) -> NewOrderEvent {
    NewOrderEvent { order_id, user_email: "ann@example.com".into() }
}

#[tokio::test]
async fn new_order_creates_a_pending_instance_and_publishes_process_order() {
    let machine = order_state_machine().expect("valid state machine");
    let id = Uuid::now_v7();
    let t = machine.apply(None, &new_order(id)).await.expect("accepted");
    assert_eq!(t.outcome, Outcome::Created);
    assert_eq!(t.begin_state, "Initial");
    assert_eq!(t.instance.current_state, "Pending");
    assert_eq!(t.instance.correlation_id, id);
    assert!(t.instance.data.processing_id.is_some());
    assert_eq!(t.instance.data.user_email.as_deref(), Some("ann@example.com"));
    assert_eq!(t.produced.len(), 2);
    assert_eq!(t.produced[0].message::<ProcessOrder>(), Some(ProcessOrder { order_id: id }));
    // The order's timeout, scheduled under the token the instance keeps.
    assert_eq!(t.produced[1].message::<OrderTimeoutExpired>(), Some(OrderTimeoutExpired { order_id: id }));
    let token = t.instance.data.order_timeout_token_id.expect("token kept");
    assert!(matches!(t.produced[1].kind, ProducedKind::Schedule { token: scheduled, .. } if scheduled == token));
}

async fn pending(id: Uuid) -> SagaInstance<OrderState> {
    let mut instance = order_state_machine()
        .expect("valid state machine")
        .apply(None, &new_order(id))
        .await
        .expect("created")
        .instance;
    instance.version = 1;
    instance
}

#[tokio::test]
async fn order_processed_accepts_and_completes_the_order() {
    let id = Uuid::now_v7();
    let instance = pending(id).await;
    let token = instance.data.order_timeout_token_id;
    let machine = order_state_machine().expect("valid state machine");
    let t = machine.apply(Some(instance), &OrderProcessed { order_id: id }).await.expect("accepted");
    assert_eq!(t.outcome, Outcome::Completed, "finalized instances are deleted");
    assert_eq!(t.path, ["Accepted", FINAL]);
    // Nothing is sent; the timeout is cancelled.
    assert_eq!(t.produced.len(), 1);
    assert!(matches!(t.produced[0].kind, ProducedKind::CancelScheduled(cancelled) if Some(cancelled) == token));
}

#[tokio::test]
async fn order_cancelled_cancels_and_completes_the_order() {
    let id = Uuid::now_v7();
    let event = OrderCancelled { order_id: id, reason: "Item not available".into() };
    let t = order_state_machine()
        .expect("valid state machine")
        .apply(Some(pending(id).await), &event)
        .await
        .expect("accepted");
    assert_eq!(t.outcome, Outcome::Completed);
    assert_eq!(t.path, ["Cancelled", FINAL]);
    assert_eq!(t.instance.data.cancel_reason.as_deref(), Some("Item not available"));
}

#[tokio::test]
async fn out_of_order_and_duplicate_events() {
    let machine = order_state_machine().expect("valid state machine");
    let id = Uuid::now_v7();
    // A result before its order exists (or after it completed): no instance.
    let early = machine.apply(None, &OrderProcessed { order_id: id }).await.expect("no error");
    assert_eq!(early.outcome, Outcome::Missing);
    let late = machine.apply(None, &OrderCancelled { order_id: id, reason: "x".into() }).await.expect("no error");
    assert_eq!(late.outcome, Outcome::Missing);
    // The same order twice: ignored while pending.
    let duplicate = machine.apply(Some(pending(id).await), &new_order(id)).await.expect("ignored");
    assert_eq!(duplicate.outcome, Outcome::Ignored);
    assert_eq!(duplicate.instance.current_state, "Pending");
    assert!(duplicate.produced.is_empty(), "no second ProcessOrder");
    // An event the state does not accept is an error (a fault), not a silent change.
    let mut accepted = pending(id).await;
    accepted.current_state = "Accepted".into();
    let err = machine.apply(Some(accepted), &OrderProcessed { order_id: id }).await.expect_err("not accepted");
    assert!(err.to_string().contains("not accepted in state Accepted"), "{err}");
}

#[tokio::test]
async fn instance_json_has_the_fields_of_the_course_order_state() {
    let json = serde_json::to_value(pending(Uuid::nil()).await).expect("json");
    for field in ["correlationId", "currentState", "version", "processingId"] {
        assert!(json.get(field).is_some(), "{field} in {json}");
    }
    assert_eq!(json["currentState"], "Pending");
}

fn collecting_machine(records: &Arc<Mutex<Vec<TransitionRecord>>>) -> Arc<bus_saga::StateMachine<OrderState>> {
    let records = records.clone();
    order_state_machine_with(DEFAULT_ORDER_TIMEOUT, move |m| {
        m.on_transition(move |r| {
            if let Ok(mut all) = records.lock() {
                all.push(r.clone());
            }
        })
    })
    .expect("valid state machine")
}

#[tokio::test]
async fn the_saga_runs_end_to_end_on_the_in_memory_bus() {
    let records = Arc::new(Mutex::new(Vec::new()));
    let repository = InMemorySagaRepository::<OrderState>::new();
    let saga_repository = repository.clone();
    let machine = collecting_machine(&records);
    let inventory = InventoryConsumer::default();
    let inventory_endpoint = inventory.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(Saga::new(machine, saga_repository).endpoint())
            .endpoint(Endpoint::new("Inventory").consumer(inventory_endpoint))
    })
    .await
    .expect("harness");
    assert!(harness.transport().has_queue("OrderState"), "the saga's endpoint is named after its instance type");
    let (ok, ko) = (Uuid::now_v7(), Uuid::now_v7());
    inventory.mark_unavailable(ko);
    harness.bus().publish(new_order(ok)).await.expect("publish");
    harness.bus().publish(new_order(ko)).await.expect("publish");
    harness.consumed().wait_for::<OrderProcessed>(1, WAIT).await.expect("processed");
    harness.consumed().wait_for::<OrderCancelled>(1, WAIT).await.expect("cancelled");
    harness.stop().await.expect("stop");
    assert!(repository.is_empty(), "both instances completed and deleted");
    let records = records.lock().expect("lock").clone();
    let path_of = |id: Uuid| records.iter().filter(|r| r.id == id).flat_map(|r| r.path.clone()).collect::<Vec<_>>();
    assert_eq!(path_of(ok), ["Pending", "Accepted", FINAL]);
    assert_eq!(path_of(ko), ["Pending", "Cancelled", FINAL]);
    // The produced ProcessOrder carried the conversation on.
    let process = &harness.published().envelopes::<ProcessOrder>()[0];
    assert!(process.conversation_id.is_some());
}

#[tokio::test]
async fn an_event_for_a_missing_instance_goes_to_skipped_or_is_discarded_when_configured() {
    let harness = InMemoryTestHarness::start(|bus| {
        bus.endpoint(
            Saga::new(order_state_machine().expect("valid state machine"), InMemorySagaRepository::new()).endpoint(),
        )
    })
    .await
    .expect("harness");
    harness.bus().publish(OrderProcessed { order_id: Uuid::now_v7() }).await.expect("publish");
    harness.transport().wait_for_queue_len("OrderState_skipped", 1, WAIT).await.expect("skipped");
    harness.stop().await.expect("stop");
    let skipped = harness.transport().peek("OrderState_skipped");
    assert_eq!(skipped[0].headers.get_str("MT-Reason"), Some("dead-letter"));
    assert!(harness.transport().peek("OrderState_error").is_empty());

    let machine = order_state_machine_with(DEFAULT_ORDER_TIMEOUT, |m| {
        m.on_missing_instance::<OrderProcessed>(MissingInstance::Discard)
    })
    .expect("valid state machine");
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(Saga::new(machine, InMemorySagaRepository::new()).endpoint())
    })
    .await
    .expect("harness");
    harness.bus().publish(OrderProcessed { order_id: Uuid::now_v7() }).await.expect("publish");
    harness.consumed().wait_for::<OrderProcessed>(1, WAIT).await.expect("acknowledged");
    harness.stop().await.expect("stop");
    assert!(harness.transport().peek("OrderState_skipped").is_empty(), "discarded, not skipped");
    assert!(harness.transport().peek("OrderState_error").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_initiating_events_create_one_instance_and_one_process_order() {
    let repository = InMemorySagaRepository::<OrderState>::new();
    let saga_repository = repository.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(
            Saga::new(order_state_machine().expect("valid state machine"), saga_repository)
                .endpoint()
                .concurrency_limit(8),
        )
    })
    .await
    .expect("harness");
    let id = Uuid::now_v7();
    let sends = (0..8).map(|_| harness.bus().publish(new_order(id)));
    futures::future::try_join_all(sends).await.expect("published");
    harness.consumed().wait_for::<NewOrderEvent>(8, WAIT).await.expect("all consumed");
    harness.stop().await.expect("stop");
    assert_eq!(repository.len(), 1);
    assert_eq!(repository.get(id).map(|i| i.current_state), Some("Pending".into()));
    assert_eq!(harness.published().count::<ProcessOrder>(), 1, "exactly one ProcessOrder");
    assert_eq!(ProcessOrder::message_type(), "urn:message:SagaWithMasstransitShared:ProcessOrder");
}
