//! How ids, addresses and headers flow from a consumed message to what its consumer produces.

use bus_core::{ConsumeContext, Endpoint, Message, SendOptions};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::support::{log, record};
use crate::{unique, Fixture, WAIT};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:FlowStarted", correlation_id = "flow_id")]
struct FlowStarted {
    flow_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:FlowContinued")]
struct FlowContinued {
    step: u32,
}

/// `conversationId` carries over, `initiatorId` is the consumed message's `correlationId`,
/// `sourceAddress` is the consuming endpoint, non-`MT-` headers are copied, ids are new.
pub async fn ids_flow_from_consumed_to_produced_messages<F: Fixture>(fixture: &F) {
    let (started, continued) = (log(), log());
    let first = unique("flow-first");
    let started_log = started.clone();
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&first).handler_with_state(
            started_log,
            |ctx: ConsumeContext<FlowStarted>, started| async move {
                started.record(ctx.envelope());
                ctx.publish(FlowContinued { step: 2 }).await?;
                Ok(())
            },
        ))
        .endpoint(record::<FlowContinued>(Endpoint::new(unique("flow-second")), &continued))
        .build();
    bus.start().await.expect("bus starts");
    let flow_id = Uuid::now_v7();
    let message_id = Uuid::now_v7();
    let options = SendOptions::new().header("Tenant", "acme").header("MT-Custom", "not copied").message_id(message_id);
    bus.publish_with(FlowStarted { flow_id }, options).await.expect("publish");
    continued.wait_for::<FlowContinued>(1, WAIT).await.expect("second consumer receives");
    bus.stop().await.expect("stop");

    let a = &started.all()[0];
    let b = &continued.all()[0];
    assert!(a.message_id.is_some() && b.message_id.is_some());
    assert_eq!(a.message_id, Some(message_id), "the id given in the options");
    assert_ne!(a.message_id, b.message_id, "every message has its own id");
    assert_eq!(a.correlation_id, Some(flow_id), "correlation id taken from the message");
    assert!(a.conversation_id.is_some(), "a new flow starts a conversation");
    assert_eq!(a.initiator_id, None, "the first message has no initiator");
    assert_eq!(a.source_address.as_deref(), Some(bus.address()), "published from the bus itself");
    assert_eq!(b.conversation_id, a.conversation_id, "conversation carried over");
    assert_eq!(b.initiator_id, Some(flow_id), "initiator is the consumed message's correlation id");
    assert_eq!(b.source_address.as_deref(), Some(bus.endpoint_address(&first).as_str()));
    assert_eq!(b.correlation_id, None);
    assert_eq!(b.headers.get_str("Tenant"), Some("acme"), "user headers copied");
    assert!(!b.headers.contains("MT-Custom"), "MT- headers not copied");
    assert!(b.sent_time.is_some() && b.host.is_some());
}
