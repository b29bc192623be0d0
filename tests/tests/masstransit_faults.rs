//! `Fault<T>` both ways against MassTransit's real output
//! (`../shared/reference/masstransit-samples/`): .NET faults read and consumed by a Rust
//! `Fault<T>` consumer (on RabbitMQ), and the fault the bus writes compared member by member,
//! in order, with MassTransit 8's.

use std::path::PathBuf;
use std::sync::Arc;

use bus_core::testing::MessageLog;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Fault, Message, Permanent};
use bus_inmemory::InMemoryTestHarness;
use bus_rabbitmq::RabbitMqTransport;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tests::json_order::Node;
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::Vhost;
use tests::WAIT;
use uuid::Uuid;

fn sample(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/masstransit-samples").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("the MassTransit sample {}: {e}", path.display()))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:MassTransit.Sandbox.RequestResponse.Contracts:CheckOrderStatus")]
struct CheckOrderStatus {
    order_id: String,
}

/// The real fault body of MassTransit 8.0.10 (Azure Service Bus), read as `Fault<T>`: every
/// member, the exception's nulls included.
#[test]
fn a_masstransit_8_fault_body_reads_as_fault() {
    let fault: Fault<serde_json::Value> =
        serde_json::from_str(&sample("ext-datavere-fault-body-8.0.10-asb.json")).expect("reads");
    assert_eq!(fault.fault_id, Uuid::parse_str("101b0000-a566-c025-9d4d-08dafb14324e").expect("uuid"));
    assert_eq!(fault.faulted_message_id, Uuid::parse_str("101b0000-a566-c025-a81b-08dafb143207").ok());
    assert_eq!(bus_core::envelope::format_time(&fault.timestamp), "2023-01-20T18:28:58.8277047Z");
    assert_eq!(fault.exceptions.len(), 1);
    let exception = &fault.exceptions[0];
    assert_eq!(
        exception.exception_type,
        "System.ServiceModel.FaultException<Microsoft.Xrm.Sdk.OrganizationServiceFault>"
    );
    assert_eq!(exception.message, "Incorrect attribute value type System.String");
    assert_eq!(exception.source.as_deref(), Some("System.Private.ServiceModel"));
    assert!(exception.stack_trace.as_deref().is_some_and(|s| s.contains("AcceptConsumer.Consume")));
    assert_eq!((exception.inner_exception.as_ref(), exception.data.as_ref()), (None, None));
    assert_eq!(fault.host.mass_transit_version.as_deref(), Some("8.0.10.0"));
    assert_eq!(fault.host.process_id, Some(6928));
    assert_eq!(fault.fault_message_types, ["urn:message:DOMAIN.Messages:AcceptMessage"]);
    assert_eq!(fault.message["logicalName"], "contact");
}

/// A .NET exception that wraps others (`InnerException`), with `Data`: read as a chain.
/// (No real sample has one; this is the datavere fault with its exception wrapped twice.)
#[test]
fn a_fault_with_inner_exceptions_reads_as_a_chain() {
    let mut body: serde_json::Value =
        serde_json::from_str(&sample("ext-datavere-fault-body-8.0.10-asb.json")).expect("json");
    let inner = body["exceptions"][0].clone();
    body["exceptions"][0] = serde_json::json!({
        "exceptionType": "System.AggregateException",
        "innerException": {
            "exceptionType": "System.InvalidOperationException",
            "innerException": inner,
            "stackTrace": null,
            "message": "The contact could not be created",
            "source": "DOMAIN",
            "data": { "Attempt": 3 }
        },
        "stackTrace": null,
        "message": "One or more errors occurred.",
        "source": null,
        "data": null
    });
    let fault: Fault<serde_json::Value> = serde_json::from_value(body).expect("reads");
    let outer = &fault.exceptions[0];
    let middle = outer.inner_exception.as_deref().expect("inner");
    let innermost = middle.inner_exception.as_deref().expect("inner of inner");
    assert_eq!(outer.exception_type, "System.AggregateException");
    assert_eq!(middle.data.as_ref().and_then(|d| d.get("Attempt")), Some(&serde_json::json!(3)));
    assert_eq!(innermost.message, "Incorrect attribute value type System.String");
}

/// MassTransit 5.0.0's fault to a request (its nulls and `faultMessageTypes` left out), sent
/// to a RabbitMQ queue as .NET sent it, is consumed by a Rust `Fault<CheckOrderStatus>`
/// consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masstransit_fault_is_consumed_by_a_rust_fault_consumer() {
    require_broker();
    let vhost = Vhost::create("mt-faults");
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("rabbitmq");
    let faults = Arc::new(MessageLog::default());
    let bus = Bus::builder(transport)
        .endpoint(tests::record::<Fault<CheckOrderStatus>>(Endpoint::new("order-faults"), &faults))
        .build();
    bus.start().await.expect("bus starts");
    let connection = lapin::Connection::connect(&vhost.uri(5672), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = connection.create_channel().await.expect("channel");
    let properties = BasicProperties::default()
        .with_content_type("application/vnd.masstransit+json".into())
        .with_message_id("00000000-2700-0a00-476f-08d5b4a2f145".into());
    let body = sample("ext-sandbox-rabbitmq-fault-response-5.0.0.json");
    channel
        .basic_publish("".into(), "order-faults".into(), BasicPublishOptions::default(), body.as_bytes(), properties)
        .await
        .expect("publish")
        .await
        .expect("routed");
    let consumed = faults.wait_for::<Fault<CheckOrderStatus>>(1, WAIT).await.expect("consumed");
    bus.stop().await.expect("stop");
    let fault = &consumed[0];
    assert_eq!(fault.message, CheckOrderStatus { order_id: "666".into() });
    assert_eq!(fault.exceptions[0].exception_type, "System.InvalidOperationException");
    assert_eq!(fault.exceptions[0].message, "Order not found");
    assert!(fault.fault_message_types.is_empty(), "MassTransit 5 did not write them");
    assert_eq!(fault.host.mass_transit_version.as_deref(), Some("5.0.0.1475"));
    let envelope = &faults.all()[0];
    assert_eq!(envelope.request_id, Uuid::parse_str("00000000-2700-0a00-836c-08d5b4a2f141").ok());
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:DOMAIN.Messages:AcceptMessage")]
struct AcceptMessage {
    id: Uuid,
}

/// The fault the bus publishes has MassTransit 8's members, in its order, with the same
/// kinds of values (nulls written): the fault, its exception and its host.
#[tokio::test]
async fn the_fault_we_write_matches_masstransit_8_member_by_member() {
    let faults = Arc::new(MessageLog::default());
    let failing = Endpoint::new("accept").handler(|_: ConsumeContext<AcceptMessage>| async {
        Err::<(), BoxError>(Permanent::new("Incorrect attribute value type System.String").into())
    });
    let recorded = faults.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(failing).endpoint(tests::record::<Fault<AcceptMessage>>(Endpoint::new("accept-faults"), &recorded))
    })
    .await
    .expect("harness");
    harness.bus().publish(AcceptMessage { id: Uuid::now_v7() }).await.expect("publish");
    faults.wait_for::<Fault<AcceptMessage>>(1, WAIT).await.expect("a fault");
    harness.stop().await.expect("stop");
    let ours: Node = serde_json::from_str(faults.all()[0].message.get()).expect("json");
    let theirs: Node = serde_json::from_str(&sample("ext-datavere-fault-body-8.0.10-asb.json")).expect("json");

    assert_eq!(ours.names(), theirs.names(), "the fault's members, in order");
    for name in ["faultId", "faultedMessageId", "timestamp", "exceptions", "host", "faultMessageTypes"] {
        assert_eq!(ours.get(name).kind(), theirs.get(name).kind(), "`{name}`");
    }
    let (Node::Array(ours_exceptions), Node::Array(theirs_exceptions)) =
        (ours.get("exceptions"), theirs.get("exceptions"))
    else {
        panic!("exceptions are arrays");
    };
    let (our_exception, their_exception) = (&ours_exceptions[0], &theirs_exceptions[0]);
    assert_eq!(our_exception.names(), their_exception.names(), "the exception's members, in order");
    for (name, theirs) in their_exception.members() {
        assert_eq!(our_exception.get(name).kind(), theirs.kind(), "exception `{name}`");
    }
    assert_eq!(ours.get("host").names(), theirs.get("host").names(), "the host's members, in order");
    // Seven fraction digits and `Z`, as .NET's round-trip format.
    let Node::String(timestamp) = ours.get("timestamp") else { panic!("timestamp is a string") };
    assert_eq!((timestamp.len(), timestamp.as_bytes()[19], timestamp.ends_with('Z')), (28, b'.', true), "{timestamp}");
}
