#![cfg(feature = "protobuf")]
//! The protobuf serializer on a bus: prost messages travel as protobuf end to end.

use std::time::Duration;

use bus_core::serializer::{ProtobufSerializer, Serializers};
use bus_core::{BoxError, ConsumeContext, Endpoint, Error, Message};
use bus_inmemory::InMemoryTestHarness;
use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Proto:OrderPlaced", protobuf)]
struct OrderPlaced {
    #[prost(string, tag = "1")]
    order_id: String,
    #[prost(uint64, tag = "2")]
    amount_cents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Proto:JsonOnly")]
struct JsonOnly {
    n: u32,
}

#[tokio::test]
async fn prost_messages_travel_as_protobuf() {
    let harness = InMemoryTestHarness::start(|bus| {
        bus.serializers(Serializers::default().with_default(ProtobufSerializer)).endpoint(
            Endpoint::new("proto").handler(|ctx: ConsumeContext<OrderPlaced>| async move {
                assert!(ctx.envelope().binary.is_some(), "read from protobuf");
                Ok(())
            }),
        )
    })
    .await
    .expect("harness");
    harness.bus().publish(OrderPlaced { order_id: "A-1".into(), amount_cents: 1250 }).await.expect("publish");
    let got = harness.consumed().wait_for::<OrderPlaced>(1, Duration::from_secs(5)).await.expect("consumed");
    let refused = harness.bus().publish(JsonOnly { n: 1 }).await;
    harness.stop().await.expect("stop");
    assert_eq!(got, [OrderPlaced { order_id: "A-1".into(), amount_cents: 1250 }]);
    match refused {
        Err(Error::Configuration(why)) => assert!(why.contains("no protobuf encoding"), "{why}"),
        other => panic!("a message without protobuf must be refused clearly: {other:?}"),
    }
    assert!(harness.transport().peek("proto_error").is_empty());
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Proto:Reserve", protobuf)]
struct Reserve {
    #[prost(string, tag = "1")]
    sku: String,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Proto:Reserved", protobuf)]
struct Reserved {
    #[prost(string, tag = "1")]
    sku: String,
}

/// On a bus that writes protobuf, a failing consumer's fault still reaches the requester
/// (as MassTransit JSON: a fault has no protobuf form), which gets the fault, not a timeout.
#[tokio::test]
async fn faults_leave_a_protobuf_bus_as_json() {
    let harness = InMemoryTestHarness::start(|bus| {
        bus.serializers(Serializers::default().with_default(ProtobufSerializer))
            .request_timeout(Duration::from_secs(5))
            .endpoint(Endpoint::new("reservations").handler(|_: ConsumeContext<Reserve>| async move {
                Err::<(), BoxError>(bus_core::Permanent::new(std::io::Error::other("out of stock")).into())
            }))
    })
    .await
    .expect("harness");
    let answer = harness.bus().request::<Reserve, Reserved>(Reserve { sku: "A-1".into() }).await;
    harness.stop().await.expect("stop");
    match answer {
        Err(Error::RequestFaulted { message, .. }) => assert!(message.contains("out of stock"), "{message}"),
        other => panic!("expected the fault, got {other:?}"),
    }
}
