//! The protobuf serializer on a bus: prost messages travel as protobuf end to end.

use std::time::Duration;

use bus_core::serializer::{ProtobufSerializer, Serializers};
use bus_core::{BoxError, ConsumeContext, Error, Message};
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
        bus.serializers(Serializers::default().with_default(ProtobufSerializer)).receive_endpoint("proto", |e| {
            e.handler(|ctx: ConsumeContext<OrderPlaced>| async move {
                assert!(ctx.envelope().binary.is_some(), "read from protobuf");
                Ok::<_, BoxError>(())
            });
        })
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
