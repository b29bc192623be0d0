//! Every real MassTransit envelope in `../shared/reference/masstransit-samples/` (versions 5
//! to 8.5, RabbitMQ, Amazon SQS/SNS and the loopback transport) read by the bus's envelope
//! reader, each checked field by field: ids, message types, addresses, headers, host and the
//! message itself.

use std::path::PathBuf;

use bus_core::serializer::Serializers;
use bus_core::{Envelope, TransportMessage};
use uuid::Uuid;

const ENVELOPE: &str = "application/vnd.masstransit+json";

fn sample(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/masstransit-samples").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("the MassTransit sample {}: {e}", path.display()))
}

fn read_body(body: &str) -> bus_core::Result<Envelope> {
    let message = TransportMessage {
        body: body.as_bytes().to_vec().into(),
        content_type: Some(ENVELOPE.into()),
        ..TransportMessage::default()
    };
    Serializers::default().deserialize(&message)
}

fn read(name: &str) -> Envelope {
    read_body(&sample(name)).unwrap_or_else(|e| panic!("{name}: {}", bus_core::logged::chain(&e)))
}

fn id(text: &str) -> Option<Uuid> {
    Some(Uuid::parse_str(text).expect("a uuid"))
}

fn message(envelope: &Envelope) -> serde_json::Value {
    serde_json::from_str(envelope.message.get()).expect("the message is JSON")
}

/// What each sample must read as.
struct Expected {
    message_id: Option<Uuid>,
    conversation_id: Option<Uuid>,
    message_type: &'static str,
    source: Option<&'static str>,
    destination: Option<&'static str>,
    headers: &'static [&'static str],
    masstransit_version: Option<&'static str>,
    field: (&'static str, serde_json::Value),
}

fn check(name: &str, expected: Expected) {
    let envelope = read(name);
    assert_eq!(envelope.message_id, expected.message_id, "{name}: messageId");
    assert_eq!(envelope.conversation_id, expected.conversation_id, "{name}: conversationId");
    assert_eq!(envelope.message_type.first().map(String::as_str), Some(expected.message_type), "{name}: messageType");
    assert_eq!(envelope.source_address.as_deref(), expected.source, "{name}: sourceAddress");
    assert_eq!(envelope.destination_address.as_deref(), expected.destination, "{name}: destinationAddress");
    for header in expected.headers {
        assert!(envelope.headers.get(header).is_some(), "{name}: header {header}");
    }
    let version = envelope.host.as_ref().and_then(|h| h.mass_transit_version.as_deref());
    assert_eq!(version, expected.masstransit_version, "{name}: host");
    let (field, value) = expected.field;
    assert_eq!(message(&envelope)[field], value, "{name}: message.{field}");
}

#[test]
fn masstransit_8_4_publish_on_rabbitmq() {
    check(
        "ext-microservices-rabbitmq-publish-8.4.1.json",
        Expected {
            message_id: id("a88b0000-84d7-1ddb-d46d-08dd9af26165"),
            conversation_id: id("a88b0000-84d7-1ddb-74fa-08dd9af26170"),
            message_type: "urn:message:Contracts.Events:OrderCreated",
            source: Some("rabbitmq://localhost/DESKTOP3VIT6KG_OrdersApi_bus_infoyyrr4hq7s4ptbdq3ih1g88?temporary=true"),
            destination: Some("rabbitmq://localhost/OrderCReted"),
            headers: &["my-custom-header"],
            masstransit_version: Some("8.4.1.0"),
            field: ("orderId", raw_field("ext-microservices-rabbitmq-publish-8.4.1.json", "orderId")),
        },
    );
}

#[test]
fn masstransit_8_0_publish_on_rabbitmq() {
    check(
        "ext-training-rabbitmq-publish-8.0.7.json",
        Expected {
            message_id: id("7c740000-a5be-c025-8e9a-08dabc788911"),
            conversation_id: id("7c740000-a5be-c025-8c47-08dabc7888fc"),
            message_type: "urn:message:TrainingContract:OrderPlacedEvent",
            source: Some("rabbitmq://localhost/PlaceOrder"),
            destination: Some("rabbitmq://localhost/TrainingContract:OrderPlacedEvent"),
            headers: &[],
            masstransit_version: Some("8.0.7.0"),
            field: ("orderNumber", raw_field("ext-training-rabbitmq-publish-8.0.7.json", "orderNumber")),
        },
    );
}

#[test]
fn masstransit_8_documentation_example() {
    check(
        "mt-doc-envelope-example-8.0.10.json",
        Expected {
            message_id: id("181c0000-6393-3630-36a4-08daf4e7c6da"),
            conversation_id: None,
            message_type: "urn:message:Company.Project:SubmitOrder",
            source: Some("rabbitmq://localhost/source"),
            destination: Some("rabbitmq://localhost/destination"),
            headers: &["Application-Header"],
            masstransit_version: Some("8.0.10.0"),
            field: ("orderId", raw_field("mt-doc-envelope-example-8.0.10.json", "orderId")),
        },
    );
}

#[test]
fn masstransit_8_request_with_accept_types() {
    let name = "ext-firely-request-envelope-abridged.json";
    check(
        name,
        Expected {
            message_id: id("ea230000-90d6-1865-57a4-08dbd54cb610"),
            conversation_id: id("ea230000-90d6-1865-c4a8-08dbd54cb810"),
            message_type: "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand",
            source: Some("rabbitmq://rabbitmq-host/source?temporary=true"),
            destination: Some("rabbitmq://rabbitmq-host/Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand"),
            headers: &["MT-Request-AcceptType", "fhir-release"],
            masstransit_version: None,
            field: ("instructions", raw_field(name, "instructions")),
        },
    );
    let envelope = read(name);
    assert!(envelope.request_id.is_some(), "a request has a request id");
    assert!(
        envelope.headers.get("MT-Request-AcceptType").is_some_and(|v| v.is_array()),
        "accept types as a JSON array"
    );
}

#[test]
fn masstransit_8_5_template_reads_once_its_placeholder_is_filled_in() {
    // A load-test template whose messageId is `{{i}} - <guid>`, filled in by the tool before
    // sending. As written it is refused with a clear reason (MassTransit's reader refuses it
    // too); filled in, it reads as MassTransit 8.5 wrote it.
    let name = "ext-rmqtools-rabbitmq-envelope-8.5.3.template.json";
    let template = sample(name);
    let refused = read_body(&template).expect_err("a placeholder is no GUID");
    assert!(bus_core::logged::chain(&refused).to_string().contains("invalid GUID"), "{refused}");
    let envelope = read_body(&template.replace("{{i}} - ", "")).expect("filled in, it reads");
    assert_eq!(envelope.message_id, id("01000000-f499-3ecf-519c-08de116932bd"));
    assert_eq!(envelope.conversation_id, id("01000000-f499-3ecf-5221-08de116932bd"));
    assert_eq!(envelope.message_type, ["urn:message:Rtl.Subscription.IntegrationEvents:TrustedPartyOfferSwitched"]);
    assert!(envelope.headers.get_str("MT-Activity-Id").is_some_and(|v| v.starts_with("00-")));
    assert_eq!(envelope.host.as_ref().and_then(|h| h.mass_transit_version.as_deref()), Some("8.5.3.0"));
    assert_eq!(message(&envelope)["subscriptionId"], raw_field(name, "subscriptionId"));
}

#[test]
fn masstransit_5_response_and_fault_to_a_request() {
    check(
        "ext-sandbox-rabbitmq-response-5.0.0.json",
        Expected {
            message_id: id("00000000-2700-0a00-8b04-08d5b4a2ef65"),
            conversation_id: id("00000000-2700-0a00-3635-08d5b4a2ef64"),
            message_type: "urn:message:MassTransit.Sandbox.RequestResponse.Contracts:OrderStatusResult",
            source: Some("rabbitmq://localhost/check_order_queue"),
            destination: Some(
                "rabbitmq://localhost/bus-WINBOOK-MassTransit.Sandbox.RequestResponse-yyyyyyb8yyfyy7r9bdk5jewgdd?durable=false&autodelete=true",
            ),
            headers: &[],
            masstransit_version: Some("5.0.0.1475"),
            field: ("statusText", raw_field("ext-sandbox-rabbitmq-response-5.0.0.json", "statusText")),
        },
    );
    let fault = read("ext-sandbox-rabbitmq-fault-response-5.0.0.json");
    assert_eq!(
        fault.message_type,
        [
            "urn:message:MassTransit:Fault[[MassTransit.Sandbox.RequestResponse.Contracts:CheckOrderStatus]]",
            "urn:message:MassTransit:Fault"
        ]
    );
    assert_eq!(fault.request_id, id("00000000-2700-0a00-836c-08d5b4a2f141"));
}

#[test]
fn masstransit_6_envelope_from_its_own_tests() {
    check(
        "mt-test-deserializer-fault-envelope-6.2.5.json",
        Expected {
            message_id: id("7a000000-9a3c-0005-1813-08d7e7027a0c"),
            conversation_id: id("7a000000-9a3c-0005-ed0b-08d7e7027a10"),
            message_type: "urn:message:MassTransit.Tests.Serialization.TestMessages:SubmitOrder",
            source: Some("loopback://localhost/ULPC15S12C_SampleApi_bus_xeyyyyr48oyymi95bdm6qyucnd?temporary=true"),
            destination: Some("loopback://localhost/input_queue"),
            headers: &["MT-Activity-Id"],
            masstransit_version: Some("6.2.5.0"),
            field: ("customerNumber", raw_field("mt-test-deserializer-fault-envelope-6.2.5.json", "customerNumber")),
        },
    );
}

#[test]
fn a_minimal_envelope_of_message_and_message_type_only() {
    let envelope = read("mt-test-minimal-envelope.json");
    assert_eq!(envelope.message_type, ["urn:message:MassTransit.TestFramework.Messages:PingMessage"]);
    assert_eq!((envelope.message_id, envelope.conversation_id, envelope.source_address.as_deref()), (None, None, None));
    assert!(envelope.headers.is_empty() && envelope.host.is_none());
    assert!(message(&envelope).get("CorrelationId").is_some(), "PascalCase members kept as written");
}

#[test]
fn masstransit_8_envelopes_on_amazon_sqs_and_sns() {
    let sqs = Expected {
        message_id: id("00ab0000-6ab3-f8b4-f78c-08db7c8365ff"),
        conversation_id: id("00ab0000-6ab3-f8b4-739e-08db7c83660f"),
        message_type: "urn:message:TestSerialization:TestMessage",
        source: Some("amazonsqs://us-east-1/some-namespace/some_address?durable=false&autodelete=true"),
        destination: Some("amazonsqs://us-east-1/some-namespace_TestMessage.fifo?type=topic"),
        headers: &[],
        masstransit_version: Some("8.0.16.0"),
        field: ("name", raw_field("mt-test-sqs-envelope-8.0.16.json", "name")),
    };
    check("mt-test-sqs-envelope-8.0.16.json", sqs);
    // The same envelope with CRLF line ends.
    let crlf = read("mt-test-sns-inner-envelope-8.0.16.crlf.json");
    assert_eq!(crlf.message_id, id("00ab0000-6ab3-f8b4-f78c-08db7c8365ff"));
    assert_eq!(
        crlf.message.get().contains('\r'),
        sample("mt-test-sns-inner-envelope-8.0.16.crlf.json").contains("\r\n  \"message\": {\r\n")
    );
    // SNS wraps the envelope as a string in its notification's `Message`.
    let notification: serde_json::Value =
        serde_json::from_str(&sample("mt-test-sns-notification-wrapping-envelope-8.0.16.json")).expect("json");
    let inner = notification["Message"].as_str().expect("the envelope as a string");
    let wrapped = read_body(inner).expect("the wrapped envelope reads");
    assert_eq!(wrapped.message_type, ["urn:message:TestSerialization:TestMessage"]);
}

/// A member of a sample's `message`, as written.
fn raw_field(name: &str, field: &str) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_str(&sample(name)).expect("json");
    json["message"][field].clone()
}

// ---- the surprises of NOTES.md section 8, each on a real sample ---------------------------

/// 1: nulls written (v8's default) and left out (v7, and a v8.5 producer) read alike.
#[test]
fn nulls_written_or_left_out_read_alike() {
    let written = read("ext-training-rabbitmq-publish-8.0.7.json");
    let left_out = read("ext-sandbox-rabbitmq-response-5.0.0.json");
    assert_eq!((written.request_id, written.fault_address.as_deref()), (None, None));
    assert_eq!((left_out.correlation_id, left_out.expiration_time), (None, None));
}

/// 2: a body member left out by Newtonsoft (it equalled its default) reads as its default.
#[test]
fn members_left_out_read_as_their_defaults() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct OrderPlacedEvent {
        order_id: Uuid,
        #[serde(default)]
        quantity: u32,
        #[serde(default)]
        express: bool,
    }
    let envelope = read("ext-training-rabbitmq-publish-8.0.7.json");
    let order: OrderPlacedEvent = serde_json::from_str(envelope.message.get()).expect("reads");
    assert_eq!((order.quantity, order.express), (0, false));
    assert_eq!(
        Some(order.order_id),
        raw_field("ext-training-rabbitmq-publish-8.0.7.json", "orderId").as_str().and_then(|s| Uuid::parse_str(s).ok())
    );
}

/// 5 and 10: times with 1 to 7 fraction digits, with `Z` or an offset; ids in "N" form and
/// upper case.
#[test]
fn times_of_any_precision_and_ids_in_any_form() {
    let base = sample("ext-training-rabbitmq-publish-8.0.7.json");
    let original = read_body(&base).expect("reads");
    let id = original.message_id.expect("an id");
    for (written, digits) in
        [(".1", 1), (".12", 2), (".123", 3), (".1234", 4), (".12345", 5), (".123456", 6), (".1234567", 7)]
    {
        for zone in ["Z", "+02:00"] {
            let time = format!("2022-10-23T10:11:12{written}{zone}");
            let json = replace_member(&base, "sentTime", &format!("\"{time}\""));
            let envelope = read_body(&json).unwrap_or_else(|e| panic!("{time}: {e}"));
            let expected = bus_core::envelope::parse_time(&time).expect("parses");
            assert_eq!(envelope.sent_time, Some(expected), "{time} ({digits} digits)");
        }
    }
    for form in [id.simple().to_string(), id.to_string().to_uppercase(), id.simple().to_string().to_uppercase()] {
        let json = replace_member(&base, "messageId", &format!("\"{form}\""));
        assert_eq!(read_body(&json).expect("reads").message_id, Some(id), "{form}");
    }
}

/// 9: `<`, `>` and `&` unescaped in strings, as System.Text.Json's relaxed escaping writes them.
#[test]
fn relaxed_escaping_reads() {
    let base = sample("mt-doc-envelope-example-8.0.10.json");
    let json = replace_member(&base, "sourceAddress", "\"rabbitmq://localhost/a<b>&c\"");
    assert_eq!(read_body(&json).expect("reads").source_address.as_deref(), Some("rabbitmq://localhost/a<b>&c"));
}

/// 4: CRLF and indentation: the same envelope read from LF and from CRLF with other indentation.
#[test]
fn line_ends_and_indentation_do_not_matter() {
    let lf = sample("mt-test-sqs-envelope-8.0.16.json").replace("\r\n", "\n");
    let crlf = lf.replace('\n', "\r\n").replace("  ", "\t");
    let (a, b) = (read_body(&lf).expect("LF"), read_body(&crlf).expect("CRLF"));
    assert_eq!((a.message_id, a.message_type.clone()), (b.message_id, b.message_type.clone()));
    assert_eq!(message(&a), message(&b));
}

/// The sample's JSON with one top-level member's value replaced (the JSON otherwise as written).
fn replace_member(json: &str, member: &str, value: &str) -> String {
    let key = format!("\"{member}\"");
    let start = json.find(&key).unwrap_or_else(|| panic!("no {member}"));
    let colon = start + json[start..].find(':').expect("a colon");
    let end = colon + json[colon..].find([',', '\n']).expect("the value's end");
    format!("{}: {value}{}", &json[..colon], &json[end..])
}

/// The envelope the bus writes has MassTransit 8's members in its order, nulls written, as
/// the real v8 publish on RabbitMQ has them; its host block too.
#[tokio::test]
async fn the_envelope_we_write_matches_masstransit_8_member_by_member() {
    use tests::json_order::Node;
    #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:TrainingContract:OrderPlacedEvent")]
    struct OrderPlacedEvent {
        order_id: Uuid,
        order_number: String,
    }
    let bus = bus_core::Bus::builder(bus_inmemory::InMemoryTransport::new()).build();
    let prepared = bus
        .prepare_publish(OrderPlacedEvent { order_id: Uuid::now_v7(), order_number: "42".into() }, Default::default())
        .expect("prepared");
    let ours: Node = serde_json::from_slice(&prepared.message.body).expect("json");
    let theirs: Node = serde_json::from_str(&sample("ext-training-rabbitmq-publish-8.0.7.json")).expect("json");
    assert_eq!(ours.names(), theirs.names(), "the envelope's members, in order");
    for (name, value) in theirs.members() {
        if name != "message" {
            assert_eq!(ours.get(name).kind(), value.kind(), "`{name}`");
        }
    }
    assert_eq!(ours.get("host").names(), theirs.get("host").names(), "the host's members, in order");
}
