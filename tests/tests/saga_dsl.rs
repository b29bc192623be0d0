//! The saga DSL in memory: schedules (timeouts), requests, composite events, conditions,
//! catch, when_enter / when_leave / finally, typed states, `build()`'s checks and probes.

use std::sync::Arc;
use std::time::Duration;

use bus_core::{BoxError, ConsumeContext, Endpoint, Fault, Message, SendOptions};
use bus_inmemory::{InMemoryScheduler, InMemoryTestHarness};
use bus_saga::{
    when, Error, InMemorySagaRepository, Request, RequestTimeoutExpired, Saga, SagaHarnessExt as _, StateMachine, FINAL,
};
use examples::order_saga::{
    order_state_machine_with, InventoryConsumer, NewOrderEvent, OrderState, OrderTimeoutExpired, TIMEOUT_REASON,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

/// The order saga, its instances kept when finalized (to read their reason), timing out
/// after `timeout`.
fn kept_orders(timeout: Duration) -> Arc<StateMachine<OrderState>> {
    order_state_machine_with(timeout, |m| m.completed_when_finalized(false)).expect("valid state machine")
}

fn new_order(order_id: Uuid) -> NewOrderEvent {
    NewOrderEvent { order_id, user_email: "ann@example.com".into() }
}

/// Nobody answers the order: after 30 s (tokio's paused clock runs ahead when all is idle)
/// its timeout fires once, and it ends `Cancelled` with reason "timeout", then finalized.
#[tokio::test(start_paused = true)]
async fn an_order_nobody_answers_is_cancelled_by_its_timeout() {
    let machine = kept_orders(Duration::from_secs(30));
    let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await.expect("harness");
    let order_id = Uuid::now_v7();
    harness.bus().publish(new_order(order_id)).await.expect("publish");
    let pending = harness.saga(&machine).wait_for(order_id, "Pending").await.expect("pending");
    assert!(pending.data.order_timeout_token_id.is_some(), "the token is kept in the instance");

    let cancelled =
        harness.saga(&machine).timeout(Duration::from_secs(60)).wait_for(order_id, FINAL).await.expect("timed out");
    assert_eq!(cancelled.data.cancel_reason.as_deref(), Some(TIMEOUT_REASON));
    assert_eq!(cancelled.data.order_timeout_token_id, None, "the token is cleared when it fires");
    assert_eq!(harness.consumed().count::<OrderTimeoutExpired>(), 1);
    harness.stop().await.expect("stop");
}

/// Inventory answers in time: the timeout is cancelled, and nothing fires after its time.
#[tokio::test(start_paused = true)]
async fn an_order_answered_in_time_cancels_its_timeout() {
    let machine = kept_orders(Duration::from_secs(30));
    let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    let scheduler = InMemoryScheduler::new();
    let waiting = scheduler.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.scheduler(scheduler)
            .endpoint(saga.endpoint())
            .endpoint(Endpoint::new("Inventory").consumer(InventoryConsumer::default()))
    })
    .await
    .expect("harness");
    let order_id = Uuid::now_v7();
    harness.bus().publish(new_order(order_id)).await.expect("publish");
    let accepted = harness.saga(&machine).wait_for(order_id, FINAL).await.expect("accepted");
    assert_eq!(accepted.data.cancel_reason, None);
    assert!(waiting.is_empty(), "the timeout was cancelled");
    // Well past the timeout's time: had it waited, it would have fired by now.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(harness.consumed().count::<OrderTimeoutExpired>(), 0);
    harness.stop().await.expect("stop");
}

/// A timeout whose token is not the one the instance keeps (a schedule since cancelled or
/// replaced) is ignored; one sent by hand, without a token, is taken.
#[tokio::test]
async fn a_stale_timeout_is_ignored() {
    let machine = kept_orders(Duration::from_secs(3600));
    let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await.expect("harness");
    let order_id = Uuid::now_v7();
    harness.bus().publish(new_order(order_id)).await.expect("publish");
    harness.saga(&machine).wait_for(order_id, "Pending").await.expect("pending");

    let stale = SendOptions::new().header(bus_core::header_names::SCHEDULING_TOKEN_ID, Uuid::now_v7().to_string());
    harness.bus().publish_with(OrderTimeoutExpired { order_id }, stale).await.expect("publish");
    harness.consumed().wait_for::<OrderTimeoutExpired>(1, WAIT).await.expect("consumed");
    let still = harness.saga(&machine).instance(order_id).await.expect("load").expect("exists");
    assert_eq!(still.current_state, "Pending", "a stale timeout changes nothing");
    assert!(harness.transport().peek("OrderState_error").is_empty());

    harness.bus().publish(OrderTimeoutExpired { order_id }).await.expect("publish");
    let cancelled = harness.saga(&machine).wait_for(order_id, FINAL).await.expect("cancelled");
    assert_eq!(cancelled.data.cancel_reason.as_deref(), Some(TIMEOUT_REASON));
    harness.stop().await.expect("stop");
}

// ---- requests -------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shipment {
    reserve_request_id: Option<Uuid>,
    outcome: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Shipping:Ship")]
struct Ship {
    shipment: Uuid,
    /// What the stock service does: "reserve", "fail" or "ignore".
    stock: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Shipping:ReserveStock")]
struct ReserveStock {
    shipment: Uuid,
    stock: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Shipping:StockReserved")]
struct StockReserved {
    shipment: Uuid,
}

fn shipping_machine(timeout: Duration) -> Arc<StateMachine<Shipment>> {
    let reserve = Request::<Shipment, ReserveStock, StockReserved>::new("queue:stock", |s| &mut s.reserve_request_id)
        .timeout(timeout);
    StateMachine::<Shipment>::builder("Shipment")
        .states(["Reserving", "Reserved", "Failed"])
        .event::<Ship>(|m| m.shipment)
        .request(&reserve)
        .initially(
            when::<Shipment, Ship>()
                .request(&reserve, |s, m| ReserveStock { shipment: s.correlation_id, stock: m.stock.clone() })
                .transition_to("Reserving"),
        )
        .during(
            "Reserving",
            when::<Shipment, StockReserved>()
                .then(|s, _| s.data.outcome = Some("reserved".into()))
                .transition_to("Reserved"),
        )
        .during(
            "Reserving",
            when::<Shipment, Fault<ReserveStock>>()
                .then(|s, fault| s.data.outcome = Some(format!("faulted: {}", fault.exceptions[0].message)))
                .transition_to("Failed"),
        )
        .during(
            "Reserving",
            when::<Shipment, RequestTimeoutExpired<ReserveStock>>()
                .then(|s, _| s.data.outcome = Some("timed out".into()))
                .transition_to("Failed"),
        )
        .completed_when_finalized(false)
        .build()
        .expect("valid state machine")
}

/// The stock service: reserves, fails, or never answers, as the request says.
fn stock_service() -> Endpoint {
    Endpoint::new("stock").handler(|ctx: ConsumeContext<ReserveStock>| async move {
        match ctx.message().stock.as_str() {
            "reserve" => ctx.respond(StockReserved { shipment: ctx.message().shipment }).await?,
            "fail" => return Err(bus_core::Permanent::new("out of stock").into()),
            _ => {}
        }
        Ok::<_, BoxError>(())
    })
}

/// A saga's request is answered by its response, by its fault, or by its timeout; the
/// request id is kept while it is pending and cleared by whichever comes first.
#[tokio::test(start_paused = true)]
async fn a_saga_request_completes_faults_or_times_out() {
    let machine = shipping_machine(Duration::from_secs(20));
    let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint()).endpoint(stock_service()))
        .await
        .expect("harness");
    let probe = harness.saga(&machine).timeout(Duration::from_secs(60));
    let mut ended = Vec::new();
    for stock in ["reserve", "fail", "ignore"] {
        let shipment = Uuid::now_v7();
        harness.bus().publish(Ship { shipment, stock: stock.into() }).await.expect("publish");
        let state = if stock == "reserve" { "Reserved" } else { "Failed" };
        let instance = probe.wait_for(shipment, state).await.expect("answered");
        assert_eq!(instance.data.reserve_request_id, None, "no request pending any more");
        ended.push(instance.data.outcome.unwrap_or_default());
    }
    assert_eq!(ended[0], "reserved");
    assert!(ended[1].starts_with("faulted: out of stock"), "{}", ended[1]);
    assert_eq!(ended[2], "timed out");
    // The request carried the instance's id as its request id, and the saga's endpoint
    // as where to answer.
    let requests = harness.sent().envelopes::<ReserveStock>();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.response_address.as_deref().is_some_and(|a| a.ends_with("Shipment"))));
    harness.stop().await.expect("stop");
}

// ---- composite events, conditions, catch, enter/leave/finally -------------------------

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Parcel {
    ready_status: u32,
    weight: u32,
    log: Vec<String>,
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Parcels:Paid")]
struct Paid {
    parcel: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Parcels:Packed")]
struct Packed {
    parcel: Uuid,
    weight: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Parcels:ReadyToShip")]
struct ReadyToShip;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Parcels:Label")]
struct Label {
    parcel: Uuid,
    /// The carrier fails to print when true.
    jammed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Parcels:ParcelClosed")]
struct ParcelClosed {
    parcel: Uuid,
    log: Vec<String>,
}

/// The parcel's states, as an enum.
#[derive(Debug, Clone, Copy)]
enum ParcelState {
    Open,
    Shipping,
    Heavy,
    Labelled,
    LabelFailed,
}

impl ParcelState {
    const ALL: [ParcelState; 5] =
        [ParcelState::Open, ParcelState::Shipping, ParcelState::Heavy, ParcelState::Labelled, ParcelState::LabelFailed];
}

impl AsRef<str> for ParcelState {
    fn as_ref(&self) -> &str {
        match self {
            ParcelState::Open => "Open",
            ParcelState::Shipping => "Shipping",
            ParcelState::Heavy => "Heavy",
            ParcelState::Labelled => "Labelled",
            ParcelState::LabelFailed => "LabelFailed",
        }
    }
}

fn parcel_machine() -> Arc<StateMachine<Parcel>> {
    use ParcelState::*;
    let log = |line: &'static str| move |p: &mut bus_saga::SagaInstance<Parcel>, _: &()| p.data.log.push(line.into());
    StateMachine::<Parcel>::builder("Parcel")
        .states(ParcelState::ALL)
        .event::<Paid>(|m| m.parcel)
        .event::<Packed>(|m| m.parcel)
        .event::<Label>(|m| m.parcel)
        .composite_event::<ReadyToShip>(|p| &mut p.ready_status, &[Paid::message_type(), Packed::message_type()])
        .initially(when::<Parcel, Paid>().then(|p, _| p.data.log.push("paid".into())).transition_to(Open))
        .initially(when::<Parcel, Packed>().then(|p, m| p.data.weight = m.weight).transition_to(Open))
        .during(Open, when::<Parcel, Paid>().then(|p, _| p.data.log.push("paid".into())))
        .during(Open, when::<Parcel, Packed>().then(|p, m| p.data.weight = m.weight))
        // Raised once both have come, whichever came first.
        .during(
            Open,
            when::<Parcel, ReadyToShip>().if_else(
                |p, _| p.data.weight > 30,
                |heavy| heavy.transition_to(Heavy),
                |light| light.transition_to(Shipping),
            ),
        )
        .during_any(
            when::<Parcel, Label>()
                .then_async(|_, label| {
                    let jammed = label.jammed;
                    Box::pin(async move {
                        if jammed {
                            Err("printer jammed".into())
                        } else {
                            Ok(())
                        }
                    })
                })
                .transition_to(Labelled)
                .catch(|failed| {
                    failed
                        .then_caught(|p, _, error| p.data.error = Some(bus_core::logged::chain(error).to_string()))
                        .transition_to(LabelFailed)
                })
                .if_then(|p, _| p.is_in("Labelled"), |done| done.finalize()),
        )
        .when_enter(Shipping, |a| a.then(log("enter shipping")))
        .when_leave(Shipping, |a| a.then(log("leave shipping")))
        .when_enter(Heavy, |a| a.then(log("enter heavy")))
        .finally(|a| {
            a.then(log("finally")).publish(|p, _| ParcelClosed { parcel: p.correlation_id, log: p.data.log.clone() })
        })
        .build()
        .expect("valid state machine")
}

/// A composite event fires once both events have come, in either order, and only once;
/// `if_else` picks the state by the parcel's weight.
#[tokio::test]
async fn a_composite_event_fires_once_when_all_have_come_in_any_order() {
    let machine = parcel_machine();
    let (light, heavy) = (Uuid::now_v7(), Uuid::now_v7());
    let opened = machine.apply(None, &Paid { parcel: light }).await.expect("paid");
    let packed = machine.apply(Some(opened.instance), &Packed { parcel: light, weight: 2 }).await.expect("packed");
    assert_eq!(packed.path, ["Shipping"], "ReadyToShip raised by the second event, light: shipping");
    assert_eq!(packed.instance.data.log, ["paid", "enter shipping"]);
    // A third member event changes nothing more: the composite fired already.
    let again = machine.apply(Some(packed.instance), &Label { parcel: light, jammed: true }).await.expect("label");
    assert_eq!(again.instance.current_state, "LabelFailed");

    let opened = machine.apply(None, &Packed { parcel: heavy, weight: 40 }).await.expect("packed");
    assert_eq!(opened.instance.current_state, "Open", "one of two: nothing raised");
    let paid = machine.apply(Some(opened.instance), &Paid { parcel: heavy }).await.expect("paid");
    assert_eq!(paid.path, ["Heavy"]);
    let paid_again = machine.apply(Some(paid.instance), &Paid { parcel: heavy }).await;
    assert!(matches!(paid_again, Err(Error::NotAccepted { .. })), "Paid is not handled in Heavy");
}

/// `catch` turns an activity's error into a transition; `when_leave`, `if_then` and
/// `finally` run in order, and what `finally` publishes leaves.
#[tokio::test]
async fn catch_leave_and_finally_run_where_they_should() {
    let machine = parcel_machine();
    let parcel = Uuid::now_v7();
    let paid = machine.apply(None, &Paid { parcel }).await.expect("paid");
    let shipping = machine.apply(Some(paid.instance), &Packed { parcel, weight: 1 }).await.expect("packed");

    let jammed = machine.apply(Some(shipping.instance.clone()), &Label { parcel, jammed: true }).await.expect("caught");
    assert_eq!(jammed.instance.current_state, "LabelFailed");
    assert_eq!(jammed.instance.data.error.as_deref(), Some("saga activity failed: printer jammed"));
    assert!(jammed.produced.is_empty());

    let labelled = machine.apply(Some(shipping.instance), &Label { parcel, jammed: false }).await.expect("labelled");
    assert_eq!(labelled.path, ["Labelled", FINAL]);
    assert_eq!(labelled.instance.data.log, ["paid", "enter shipping", "leave shipping", "finally"]);
    let closed = labelled.produced[0].message::<ParcelClosed>().expect("ParcelClosed");
    assert_eq!(closed.log, labelled.instance.data.log);
}

/// Without a catch, an activity's error fails the event: retried, then `_error`.
#[tokio::test]
async fn an_uncaught_activity_error_faults_the_event() {
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    struct Plain;
    let machine = StateMachine::<Plain>::builder("Uncaught")
        .states(["Labelled"])
        .event::<Label>(|m| m.parcel)
        .initially(
            when::<Plain, Label>()
                .then_async(|_, _| Box::pin(async { Err::<(), BoxError>("printer jammed".into()) }))
                .transition_to("Labelled"),
        )
        .build()
        .expect("valid state machine");
    let saga = Saga::new(machine, InMemorySagaRepository::new());
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await.expect("harness");
    harness.bus().publish(Label { parcel: Uuid::now_v7(), jammed: true }).await.expect("publish");
    harness.faults().wait_until("a fault", WAIT, |faults| !faults.is_empty()).await.expect("fault");
    let fault = &harness.faults().snapshot()[0];
    assert!(fault.message.contains("printer jammed"), "{}", fault.message);
    harness.stop().await.expect("stop");
}

/// The whole parcel on the bus: events in either order, the composite, finally's publish,
/// and the probe seeing it finalized.
#[tokio::test]
async fn the_parcel_saga_runs_on_the_bus() {
    let machine = parcel_machine();
    let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint().concurrency_limit(1)))
        .await
        .expect("harness");
    let parcel = Uuid::now_v7();
    harness.bus().publish(Packed { parcel, weight: 3 }).await.expect("publish");
    harness.saga(&machine).wait_exists(parcel).await.expect("created");
    harness.bus().publish(Paid { parcel }).await.expect("publish");
    harness.saga(&machine).wait_for(parcel, ParcelState::Shipping).await.expect("shipping");
    harness.bus().publish(Label { parcel, jammed: false }).await.expect("publish");
    harness.saga(&machine).wait_finalized(parcel).await.expect("finalized");
    let closed = harness.published().wait_for::<ParcelClosed>(1, WAIT).await.expect("closed");
    assert_eq!(closed[0].log, ["paid", "enter shipping", "leave shipping", "finally"]);
    harness.stop().await.expect("stop");
}

/// A probe that waits in vain says for what, and where the instance was.
#[tokio::test]
async fn a_probe_times_out_with_the_state_it_saw() {
    let machine = parcel_machine();
    let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await.expect("harness");
    let parcel = Uuid::now_v7();
    harness.bus().publish(Paid { parcel }).await.expect("publish");
    harness.saga(&machine).wait_for(parcel, "Open").await.expect("open");
    let waited = harness.saga(&machine).timeout(Duration::from_millis(200)).wait_for(parcel, "Shipping").await;
    match waited {
        Err(Error::WaitTimedOut { id, last_state, .. }) => {
            assert_eq!(id, parcel);
            assert_eq!(last_state.as_deref(), Some("Open"));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    harness.stop().await.expect("stop");
}

// ---- build() errors -------------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Door;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Doors:Open")]
struct OpenDoor {
    door: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Doors:Close")]
struct CloseDoor {
    door: Uuid,
}

#[test]
fn build_refuses_a_transition_to_an_unknown_state() {
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened"])
        .event::<OpenDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opend"))
        .build();
    let error = built.expect_err("a typo");
    assert!(matches!(&error, Error::UnknownState { state, used_in } if state == "Opend" && used_in == "initially"));
    assert_eq!(error.to_string(), "state `Opend` is not declared (used in initially)");
}

#[test]
fn build_refuses_behaviour_in_an_unknown_state() {
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened"])
        .event::<OpenDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .during("Closed", when::<Door, OpenDoor>().transition_to("Opened"))
        .build();
    assert!(
        matches!(built, Err(Error::UnknownState { state, used_in }) if state == "Closed" && used_in == "during Closed")
    );
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened"])
        .event::<OpenDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .ignore::<OpenDoor>("Shut")
        .build();
    assert!(matches!(built, Err(Error::UnknownState { state, .. }) if state == "Shut"));
}

#[test]
fn build_refuses_an_event_handled_but_never_declared() {
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened", "Closed"])
        .event::<OpenDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .during("Opened", when::<Door, CloseDoor>().transition_to("Closed"))
        .build();
    let error = built.expect_err("CloseDoor has no correlation");
    assert!(
        matches!(error, Error::UndeclaredEvent { event, ref used_in } if event == CloseDoor::message_type() && used_in == "during Opened")
    );
    assert!(error.to_string().contains("not declared with a correlation"), "{error}");
}

#[test]
fn build_refuses_a_state_nothing_reaches() {
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened", "Closed", "Locked"])
        .event::<OpenDoor>(|m| m.door)
        .event::<CloseDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .during("Opened", when::<Door, CloseDoor>().transition_to("Closed"))
        // Locked is left only, never entered.
        .during("Locked", when::<Door, OpenDoor>().transition_to("Opened"))
        .build();
    let error = built.expect_err("Locked is unreachable");
    assert!(matches!(&error, Error::UnreachableState(state) if state == "Locked"));
    assert_eq!(error.to_string(), "state `Locked` is declared but no transition reaches it");
}

#[test]
fn build_refuses_finally_when_nothing_finalizes() {
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened"])
        .event::<OpenDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .finally(|a| a.publish(|d, _| CloseDoor { door: d.correlation_id }))
        .build();
    assert!(matches!(built, Err(Error::UnreachableState(state)) if state == FINAL), "finally would never run");
    // With a finalize somewhere, it is fine; and a machine that never finalizes and has
    // nothing in Final is fine too.
    let finalizing = StateMachine::<Door>::builder("Door")
        .states(["Opened"])
        .event::<OpenDoor>(|m| m.door)
        .event::<CloseDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .during("Opened", when::<Door, CloseDoor>().finalize())
        .finally(|a| a.then(|_, _| ()))
        .build();
    assert!(finalizing.is_ok(), "{finalizing:?}");
}

#[test]
fn states_reached_only_through_when_enter_or_during_any_count_as_reachable() {
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened", "Closed", "Locked"])
        .event::<OpenDoor>(|m| m.door)
        .event::<CloseDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .during_any(when::<Door, CloseDoor>().transition_to("Closed"))
        .when_enter("Closed", |closed| closed.transition_to("Locked"))
        .build();
    assert!(built.is_ok(), "{built:?}");
}

/// Two states entering each other from `when_enter` fail the event instead of looping.
#[tokio::test]
async fn when_enter_loops_are_cut() {
    let machine = StateMachine::<Door>::builder("Door")
        .states(["Opened", "Closed"])
        .event::<OpenDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .when_enter("Opened", |a| a.transition_to("Closed"))
        .when_enter("Closed", |a| a.transition_to("Opened"))
        .build()
        .expect("valid state machine");
    let looped = machine.apply(None, &OpenDoor { door: Uuid::now_v7() }).await;
    assert!(matches!(looped, Err(Error::TransitionLoop { .. })), "{looped:?}");
}

#[test]
fn build_refuses_an_event_declared_twice() {
    let reserve = Request::<Shipment, ReserveStock, StockReserved>::new("queue:stock", |s| &mut s.reserve_request_id);
    let built = StateMachine::<Shipment>::builder("Shipment")
        .states(["Reserving"])
        .event::<Ship>(|m| m.shipment)
        .event::<StockReserved>(|m| m.shipment)
        .request(&reserve)
        .initially(
            when::<Shipment, Ship>()
                .request(&reserve, |s, _| ReserveStock { shipment: s.correlation_id, stock: String::new() })
                .transition_to("Reserving"),
        )
        .build();
    assert!(matches!(built, Err(Error::EventDeclaredTwice(event)) if event == StockReserved::message_type()));
}

#[test]
fn build_refuses_a_composite_of_repeated_events_or_a_transition_while_leaving() {
    let repeated = StateMachine::<Parcel>::builder("Parcel")
        .states(["Open"])
        .event::<Paid>(|m| m.parcel)
        .composite_event::<ReadyToShip>(|p| &mut p.ready_status, &[Paid::message_type(), Paid::message_type()])
        .initially(when::<Parcel, Paid>().transition_to("Open"))
        .build();
    assert!(matches!(repeated, Err(Error::InvalidComposite(event)) if event == ReadyToShip::message_type()));
    let leaving = StateMachine::<Parcel>::builder("Parcel")
        .states(["Open", "Shipping"])
        .event::<Paid>(|m| m.parcel)
        .initially(when::<Parcel, Paid>().transition_to("Open"))
        .when_leave("Open", |a| a.transition_to("Shipping"))
        .build();
    assert!(matches!(leaving, Err(Error::TransitionWhileLeaving(state)) if state == "Open"));
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Shipping:AnswerNow")]
struct AnswerNow {
    request_id: Uuid,
    address: String,
}

/// Each request has its own id: after a timeout the saga asks again, and the first
/// request's late answer is ignored while the second is pending; the second's is taken.
#[tokio::test]
async fn an_answer_to_an_earlier_request_is_ignored() {
    let reserve =
        Request::<Shipment, ReserveStock, StockReserved>::new("queue:slow-stock", |s| &mut s.reserve_request_id)
            .timeout(Duration::from_secs(3600));
    let ask = |s: &bus_saga::SagaInstance<Shipment>| ReserveStock { shipment: s.correlation_id, stock: "slow".into() };
    let machine = StateMachine::<Shipment>::builder("RetriedShipment")
        .states(["Reserving", "Reserved"])
        .event::<Ship>(|m| m.shipment)
        .request(&reserve)
        .initially(when::<Shipment, Ship>().request(&reserve, move |s, _| ask(s)).transition_to("Reserving"))
        // Timed out: ask again.
        .during(
            "Reserving",
            when::<Shipment, RequestTimeoutExpired<ReserveStock>>().request(&reserve, move |s, _| ask(s)),
        )
        .during("Reserving", when::<Shipment, StockReserved>().transition_to("Reserved"))
        .build()
        .expect("valid state machine");
    let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    // The stock service answers only when told to, as part of a flow correlated to the
    // shipment (so its answer carries the shipment as initiator, as a responder's does).
    let requests = Arc::new(bus_core::testing::MessageLog::default());
    let slow = tests::record::<ReserveStock>(Endpoint::new("slow-stock"), &requests).handler(
        |ctx: ConsumeContext<AnswerNow>| async move {
            let mut options = SendOptions::new();
            options.request_id = Some(ctx.message().request_id);
            ctx.send_with(&ctx.message().address, StockReserved { shipment: Uuid::nil() }, options).await?;
            Ok::<_, BoxError>(())
        },
    );
    let harness =
        InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint()).endpoint(slow)).await.expect("harness");
    let shipment = Uuid::now_v7();
    harness.bus().publish(Ship { shipment, stock: "slow".into() }).await.expect("publish");
    requests.wait_for::<ReserveStock>(1, WAIT).await.expect("first request");
    let first = requests.all()[0].clone();
    let first_id = first.request_id.expect("a request id");
    harness.bus().publish(RequestTimeoutExpired::<ReserveStock>::new(shipment, first_id)).await.expect("timeout");
    requests.wait_for::<ReserveStock>(2, WAIT).await.expect("asked again");
    let second_id = requests.all()[1].request_id.expect("a request id");
    assert_ne!(first_id, second_id, "a new id for the new request");
    let address = first.response_address.clone().expect("the saga's address");

    let answer = |request_id| AnswerNow { request_id, address: address.clone() };
    let flow = || SendOptions::new().correlation_id(shipment);
    harness.bus().send_with("queue:slow-stock", answer(first_id), flow()).await.expect("late answer");
    harness.consumed().wait_for::<StockReserved>(1, WAIT).await.expect("consumed");
    let still = harness.saga(&machine).instance(shipment).await.expect("load").expect("exists");
    assert_eq!(still.current_state, "Reserving", "the first request's answer is ignored");
    assert_eq!(still.data.reserve_request_id, Some(second_id));

    harness.bus().send_with("queue:slow-stock", answer(second_id), flow()).await.expect("answer");
    harness.saga(&machine).wait_for(shipment, "Reserved").await.expect("the second's answer is taken");
    assert!(harness.transport().peek("RetriedShipment_error").is_empty());
    harness.stop().await.expect("stop");
}

#[test]
fn build_refuses_a_missing_instance_policy_for_an_undeclared_event() {
    let built = StateMachine::<Door>::builder("Door")
        .states(["Opened"])
        .event::<OpenDoor>(|m| m.door)
        .initially(when::<Door, OpenDoor>().transition_to("Opened"))
        .on_missing_instance::<CloseDoor>(bus_saga::MissingInstance::Discard)
        .build();
    assert!(matches!(built, Err(Error::UndeclaredEvent { event, .. }) if event == CloseDoor::message_type()));
}
