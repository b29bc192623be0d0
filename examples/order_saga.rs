//! The course's order saga (SagaWithMasstransit), ported: the same contracts, URNs and
//! instance fields, so each program can be swapped with its .NET counterpart on the same
//! RabbitMQ and Redis.
//!
//! - `website` publishes `NewOrderEvent { OrderId, UserEmail }`;
//! - `orchestrator` runs `OrderStateMachine`: initially, on `NewOrderEvent`, it sets a
//!   processing id, publishes `ProcessOrder` and goes to `Pending`; during `Pending`,
//!   `OrderProcessed` goes to `Accepted` and `OrderCancelled` to `Cancelled`, both finalize
//!   (and a finalized instance is deleted);
//! - `inventory` consumes `ProcessOrder` and responds `OrderProcessed` or
//!   `OrderCancelled("Item not available")`;
//! - an order still `Pending` when its timeout comes (30 s by default) is `Cancelled` with
//!   reason "timeout": the orchestrator schedules `OrderTimeoutExpired` when the order
//!   starts, and cancels it when inventory answers. Its bus needs a message scheduler.

use std::sync::Arc;
use std::time::Duration;

use bus_core::{BoxError, ConsumeContext, Consumer, Message};
use bus_saga::{when, Schedule, StateMachine};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A customer ordered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaWithMasstransitShared:NewOrderEvent")]
pub struct NewOrderEvent {
    /// The order, and the saga instance's id.
    pub order_id: Uuid,
    /// Who ordered.
    pub user_email: String,
}

/// The orchestrator asks inventory to process an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaWithMasstransitShared:ProcessOrder")]
pub struct ProcessOrder {
    /// The order.
    pub order_id: Uuid,
}

/// Inventory processed the order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaWithMasstransitShared:OrderProcessed")]
pub struct OrderProcessed {
    /// The order.
    pub order_id: Uuid,
}

/// Inventory could not process the order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaWithMasstransitShared:OrderCancelled")]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Why.
    pub reason: String,
}

/// The orchestrator's timeout for an order inventory has not answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaWithMasstransitShared:OrderTimeoutExpired")]
pub struct OrderTimeoutExpired {
    /// The order.
    pub order_id: Uuid,
}

/// How long an order may stay `Pending` unless the orchestrator is told otherwise.
pub const DEFAULT_ORDER_TIMEOUT: Duration = Duration::from_secs(30);

/// The reason an order that timed out is cancelled with.
pub const TIMEOUT_REASON: &str = "timeout";

/// The saga's own fields; with the instance's `correlationId`, `currentState` and `version`
/// they make the course's `OrderState` JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderState {
    /// Set when the order starts processing.
    pub processing_id: Option<Uuid>,
    /// Who ordered.
    pub user_email: Option<String>,
    /// Why it was cancelled, if it was.
    pub cancel_reason: Option<String>,
    /// The token of the order's timeout while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_timeout_token_id: Option<Uuid>,
}

/// The state machine, named `OrderState` like the course's instance type (and endpoint),
/// with the default timeout.
pub fn order_state_machine() -> Result<Arc<StateMachine<OrderState>>, bus_saga::Error> {
    order_state_machine_with(DEFAULT_ORDER_TIMEOUT, |builder| builder)
}

/// The state machine with its orders timing out after `timeout`, and extra configuration
/// (hooks, missing-instance policies) for tests.
pub fn order_state_machine_with(
    timeout: Duration,
    configure: impl FnOnce(bus_saga::StateMachineBuilder<OrderState>) -> bus_saga::StateMachineBuilder<OrderState>,
) -> Result<Arc<StateMachine<OrderState>>, bus_saga::Error> {
    let order_timeout = Schedule::<OrderState, OrderTimeoutExpired>::new(timeout, |s| &mut s.order_timeout_token_id);
    let builder = StateMachine::<OrderState>::builder("OrderState")
        .states(["Pending", "Accepted", "Cancelled"])
        .event::<NewOrderEvent>(|m| m.order_id)
        .event::<OrderProcessed>(|m| m.order_id)
        .event::<OrderCancelled>(|m| m.order_id)
        .schedule(&order_timeout, |m| m.order_id)
        .initially(
            when::<OrderState, NewOrderEvent>()
                .then(|order, event| {
                    order.data.processing_id = Some(Uuid::now_v7());
                    order.data.user_email = Some(event.user_email.clone());
                })
                .publish(|order, _| ProcessOrder { order_id: order.correlation_id })
                .schedule(&order_timeout, |order, _| OrderTimeoutExpired { order_id: order.correlation_id })
                .transition_to("Pending"),
        )
        .during(
            "Pending",
            when::<OrderState, OrderProcessed>().unschedule(&order_timeout).transition_to("Accepted").finalize(),
        )
        .during(
            "Pending",
            when::<OrderState, OrderCancelled>()
                .unschedule(&order_timeout)
                .then(|order, event| order.data.cancel_reason = Some(event.reason.clone()))
                .transition_to("Cancelled")
                .finalize(),
        )
        .during(
            "Pending",
            when::<OrderState, OrderTimeoutExpired>()
                .then(|order, _| order.data.cancel_reason = Some(TIMEOUT_REASON.to_owned()))
                .transition_to("Cancelled")
                .finalize(),
        )
        // A second NewOrderEvent for an order already in progress changes nothing.
        .ignore::<NewOrderEvent>("Pending");
    configure(builder).build()
}

/// Inventory: processes orders, except those of users it cannot serve.
#[derive(Debug, Clone, Default)]
pub struct InventoryConsumer {
    /// Orders whose id is in here are cancelled: "Item not available".
    pub unavailable: Arc<std::sync::Mutex<std::collections::HashSet<Uuid>>>,
}

impl InventoryConsumer {
    /// Makes orders of `order_id` fail.
    pub fn mark_unavailable(&self, order_id: Uuid) {
        if let Ok(mut unavailable) = self.unavailable.lock() {
            unavailable.insert(order_id);
        }
    }
}

impl Consumer<ProcessOrder> for InventoryConsumer {
    async fn consume(&self, ctx: ConsumeContext<ProcessOrder>) -> Result<(), BoxError> {
        let order_id = ctx.message().order_id;
        let unavailable = self.unavailable.lock().map(|u| u.contains(&order_id)).unwrap_or(false);
        if unavailable {
            ctx.respond(OrderCancelled { order_id, reason: "Item not available".into() }).await?;
        } else {
            ctx.respond(OrderProcessed { order_id }).await?;
        }
        Ok(())
    }
}
