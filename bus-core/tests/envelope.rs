//! The wire format: MassTransit's envelope and raw JSON, read and written.

use bus_core::envelope::{format_time, parse_time};
use bus_core::serializer::{MassTransitJsonSerializer, RawJsonSerializer, Serializer, Serializers};
use bus_core::{Envelope, Error, Message, TransportMessage};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const VECTOR: &[u8] = include_bytes!("vectors/new-order-event.envelope.json");

#[derive(Debug, Serialize, Deserialize, Message, PartialEq)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaWithMasstransitShared:NewOrderEvent")]
struct NewOrderEvent {
    order_id: Uuid,
    user_email: String,
}

fn uuid(s: &str) -> Option<Uuid> {
    Some(Uuid::parse_str(s).expect("valid test uuid"))
}

#[test]
fn reference_vector_deserializes_with_every_field() {
    let envelope = Envelope::from_json(VECTOR).expect("the MassTransit vector reads");
    assert_eq!(envelope.message_id, uuid("0a790000-5d3a-0015-4ccf-08dd5f3c2a41"));
    assert_eq!(envelope.conversation_id, uuid("0a790000-5d3a-0015-8e4c-08dd5f3c2a42"));
    assert_eq!(envelope.request_id, None);
    assert_eq!(envelope.correlation_id, None);
    assert_eq!(envelope.initiator_id, None);
    assert_eq!(
        envelope.source_address.as_deref(),
        Some("rabbitmq://localhost/vm_SagaWithMasstransitWebsite_bus_ofuyyyr5kzq1fzrjbdq1ojhbn1?temporary=true")
    );
    assert_eq!(
        envelope.destination_address.as_deref(),
        Some("rabbitmq://localhost/SagaWithMasstransitShared:NewOrderEvent")
    );
    assert_eq!(envelope.message_type, ["urn:message:SagaWithMasstransitShared:NewOrderEvent"]);
    let sent = envelope.sent_time.expect("sent time");
    assert_eq!(format_time(&sent), "2026-03-02T14:07:31.5131874Z", "7 fractional digits kept");
    assert_eq!(
        envelope.headers.get_str("MT-Activity-Id"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let host = envelope.host.as_ref().expect("host");
    assert_eq!(host.machine_name.as_deref(), Some("vm"));
    assert_eq!(host.process_id, Some(4711));
    assert_eq!(host.mass_transit_version.as_deref(), Some("8.5.8.0"));
    let message: NewOrderEvent = envelope.message_as().expect("message reads");
    assert_eq!(
        message,
        NewOrderEvent {
            order_id: Uuid::parse_str("3f2a9d41-1c7b-4e0a-9a55-2d8c6e1b7f03").expect("uuid"),
            user_email: "customer@example.com".into()
        }
    );
}

#[test]
fn property_names_match_case_insensitively() {
    let json = br#"{"MessageId":"0a790000-5d3a-0015-4ccf-08dd5f3c2a41","MESSAGETYPE":["urn:message:A:B"],
        "Message":{"x":1},"SentTime":"2026-03-02T14:07:31Z","Unknown":{"ignored":true}}"#;
    let envelope = Envelope::from_json(json).expect("reads");
    assert_eq!(envelope.message_type, ["urn:message:A:B"]);
    assert_eq!(envelope.message.get(), r#"{"x":1}"#);
}

#[test]
fn written_envelope_has_every_field_masstransit_reads() {
    let mut envelope = Envelope::new(
        NewOrderEvent::message_types().iter().map(|s| (*s).to_owned()).collect(),
        serde_json::value::to_raw_value(&NewOrderEvent { order_id: Uuid::nil(), user_email: "a@b".into() })
            .expect("raw"),
    );
    envelope.conversation_id = Some(Uuid::now_v7());
    envelope.host = Some(bus_core::HostInfo::current());
    let wire = MassTransitJsonSerializer.serialize(&envelope).expect("writes");
    assert_eq!(wire.content_type.as_deref(), Some("application/vnd.masstransit+json"));
    assert_eq!(wire.message_id, envelope.message_id);
    let json: serde_json::Value = serde_json::from_slice(&wire.body).expect("json");
    let object = json.as_object().expect("object");
    assert_eq!(object.len(), bus_core::envelope::FIELDS.len(), "nothing more, nothing less");
    for field in bus_core::envelope::FIELDS {
        assert!(object.contains_key(field), "field {field} written");
    }
    for field in [
        "machineName",
        "processName",
        "processId",
        "assembly",
        "assemblyVersion",
        "frameworkVersion",
        "massTransitVersion",
        "operatingSystemVersion",
    ] {
        assert!(json["host"].get(field).is_some(), "host field {field} written");
    }
    let sent = json["sentTime"].as_str().expect("sent time string");
    assert!(sent.ends_with('Z') && sent.split('.').nth(1).is_some_and(|f| f.len() == 8), "7 digits: {sent}");
    assert_eq!(json["message"]["userEmail"], "a@b");
    let id = json["messageId"].as_str().expect("id");
    assert_eq!(id, id.to_lowercase(), "GUIDs lowercase");
}

#[test]
fn envelope_round_trips_through_the_serializer() {
    let mut envelope = Envelope::new(vec!["urn:message:A:B".into()], serde_json::value::to_raw_value(&1).expect("raw"));
    envelope.request_id = Some(Uuid::now_v7());
    envelope.response_address = Some("loopback://localhost/x".into());
    envelope.headers.insert("Tenant", "acme");
    let back = MassTransitJsonSerializer
        .deserialize(&MassTransitJsonSerializer.serialize(&envelope).expect("write"))
        .expect("read");
    assert_eq!(back.message_id, envelope.message_id);
    assert_eq!(back.request_id, envelope.request_id);
    assert_eq!(back.response_address, envelope.response_address);
    assert_eq!(back.headers.get_str("Tenant"), Some("acme"));
}

#[test]
fn raw_json_round_trips_with_identity_in_headers() {
    let mut envelope = Envelope::new(
        vec!["urn:message:A:B".into(), "urn:message:A:Contract".into()],
        serde_json::value::to_raw_value(&serde_json::json!({"x": 1})).expect("raw"),
    );
    envelope.correlation_id = Some(Uuid::now_v7());
    envelope.conversation_id = Some(Uuid::now_v7());
    envelope.request_id = Some(Uuid::now_v7());
    envelope.initiator_id = Some(Uuid::now_v7());
    envelope.source_address = Some("loopback://localhost/src".into());
    envelope.response_address = Some("loopback://localhost/resp".into());
    envelope.fault_address = Some("loopback://localhost/fault".into());
    envelope.host = Some(bus_core::HostInfo::current());
    envelope.headers.insert("Tenant", "acme");
    let wire = RawJsonSerializer.serialize(&envelope).expect("writes");
    assert_eq!(&wire.body[..], br#"{"x":1}"#, "the body is the bare message");
    assert_eq!(wire.headers.get_str("MT-MessageType"), Some("urn:message:A:B;urn:message:A:Contract"));
    assert_eq!(wire.headers.get_str("MessageId"), envelope.message_id.map(|u| u.to_string()).as_deref());
    let back = RawJsonSerializer.deserialize(&wire).expect("reads");
    assert_eq!(back.message_id, envelope.message_id);
    assert_eq!(back.correlation_id, envelope.correlation_id);
    assert_eq!(back.conversation_id, envelope.conversation_id);
    assert_eq!(back.request_id, envelope.request_id);
    assert_eq!(back.initiator_id, envelope.initiator_id);
    assert_eq!(back.source_address, envelope.source_address);
    assert_eq!(back.response_address, envelope.response_address);
    assert_eq!(back.fault_address, envelope.fault_address);
    assert_eq!(back.message_type, envelope.message_type);
    assert_eq!(back.host.as_ref().and_then(|h| h.process_id), envelope.host.as_ref().and_then(|h| h.process_id));
    assert_eq!(back.headers.get_str("Tenant"), Some("acme"));
    assert!(!back.headers.contains("MessageId"), "identity headers become envelope fields");
}

fn wire(body: &'static [u8], content_type: &'static str) -> TransportMessage {
    TransportMessage { body: Bytes::from_static(body), content_type: Some(content_type.into()), ..Default::default() }
}

fn reason(result: bus_core::Result<Envelope>) -> String {
    match result {
        Err(Error::Deserialize { reason, .. }) => reason,
        other => panic!("expected a deserialization error, got {other:?}"),
    }
}

#[test]
fn body_that_is_not_json_is_a_clear_error() {
    let serializers = Serializers::default();
    let why = reason(serializers.deserialize(&wire(b"\x00\xffnot json", "application/vnd.masstransit+json")));
    assert!(why.contains("not valid JSON"), "{why}");
    let why = reason(serializers.deserialize(&wire(
        b"{\"messageType\":[\"urn:message:A:B\"],\"message\":",
        "application/vnd.masstransit+json",
    )));
    assert!(why.contains("not valid JSON"), "truncated: {why}");
    let why = reason(serializers.deserialize(&wire(b"{nope", "application/json")));
    assert!(why.contains("not valid JSON"), "{why}");
}

#[test]
fn envelope_without_message_type_is_a_clear_error() {
    let why = reason(Envelope::from_json(br#"{"messageId":"0a790000-5d3a-0015-4ccf-08dd5f3c2a41","message":{}}"#));
    assert!(why.contains("no messageType"), "{why}");
    let why = reason(Envelope::from_json(br#"{"messageType":[],"message":{}}"#));
    assert!(why.contains("no messageType"), "{why}");
    let why = reason(Envelope::from_json(br#"{"messageType":["urn:message:A:B"]}"#));
    assert!(why.contains("no message"), "{why}");
    let why =
        reason(Envelope::from_json(br#"{"messageId":"not-a-guid","messageType":["urn:message:A:B"],"message":{}}"#));
    assert!(why.contains("invalid GUID"), "{why}");
    let why = reason(Envelope::from_json(br#"[1,2]"#));
    assert!(why.contains("not a MassTransit envelope"), "{why}");
}

#[test]
fn unknown_content_type_is_a_clear_error() {
    match Serializers::default().deserialize(&wire(b"<xml/>", "text/xml")) {
        Err(Error::UnsupportedContentType(ct)) => assert_eq!(ct, "text/xml"),
        other => panic!("expected unsupported content type, got {other:?}"),
    }
}

#[test]
fn content_type_parameters_and_case_are_ignored() {
    let serializers = Serializers::default();
    assert!(serializers.for_content_type(Some("Application/JSON; charset=utf-8")).is_ok());
}

#[test]
fn times_parse_as_dotnet_writes_them() {
    for text in [
        "2026-03-02T14:07:31.5131874Z",
        "2026-03-02T14:07:31Z",
        "2026-03-02T14:07:31.5131874+00:00",
        "2026-03-02T14:07:31.5131874",
    ] {
        let time = parse_time(text).unwrap_or_else(|| panic!("{text} parses"));
        assert_eq!(time.timestamp(), 1772460451, "{text}");
    }
    assert!(parse_time("yesterday").is_none());
}

#[derive(Debug, Serialize, Deserialize, Message)]
struct DefaultNamed;

#[test]
fn derive_defaults_the_namespace_to_the_crate_name() {
    assert_eq!(DefaultNamed::message_type(), "urn:message:envelope:DefaultNamed");
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Priced {
    user_email: String,
    #[serde(deserialize_with = "bus_core::wire::number_or_string")]
    amount: f64,
}

#[test]
fn payloads_from_dotnet_read_with_pascal_case_names_and_decimal_strings() {
    let json = br#"{"messageType":["urn:message:A:B"],"message":{"UserEmail":"a@b","Amount":"12.50"}}"#;
    let envelope = Envelope::from_json(json).expect("reads");
    let priced: Priced = envelope.message_as().expect("PascalCase names match");
    assert_eq!(priced, Priced { user_email: "a@b".into(), amount: 12.5 });
    let json = br#"{"messageType":["urn:message:A:B"],"message":{"userEmail":"a@b","amount":3}}"#;
    let priced: Priced = Envelope::from_json(json).expect("reads").message_as().expect("numbers too");
    assert_eq!(priced.amount, 3.0);
}

/// The host block is written and read through per-thread caches: envelopes from different
/// hosts, interleaved, must each keep their own host, and a changed host must be written anew.
#[test]
fn hosts_of_interleaved_envelopes_stay_their_own() {
    use std::sync::Arc;
    let host = |machine: &str, pid: i64| {
        Arc::new(bus_core::HostInfo {
            machine_name: Some(machine.into()),
            process_id: Some(pid),
            ..bus_core::HostInfo::default()
        })
    };
    let (a, b) = (host("alpha", 1), host("beta", 2));
    let mut written = Vec::new();
    for (i, h) in [&a, &b, &a, &a, &b].into_iter().enumerate() {
        let mut envelope = Envelope::new(vec!["urn:message:Shop:Ping".into()], raw(&format!("{{\"n\":{i}}}")));
        envelope.host = Some(h.clone());
        written.push((h.clone(), MassTransitJsonSerializer.serialize(&envelope).expect("serialize")));
    }
    for (expected, wire) in written.iter().rev() {
        let back = MassTransitJsonSerializer.deserialize(wire).expect("deserialize");
        assert_eq!(back.host.as_deref(), Some(&**expected));
        let json: serde_json::Value = serde_json::from_slice(&wire.body).expect("json");
        assert_eq!(json["host"]["machineName"], expected.machine_name.as_deref().unwrap_or_default());
    }
    // A host with the same contents but another Arc is written the same; one that differs is not.
    let twin = Arc::new((*a).clone());
    let mut envelope = Envelope::new(vec!["urn:message:Shop:Ping".into()], raw("{}"));
    envelope.host = Some(a.clone());
    let from_a: serde_json::Value = serde_json::from_slice(&envelope.to_json().expect("json")).expect("json");
    envelope.host = Some(twin);
    let from_twin: serde_json::Value = serde_json::from_slice(&envelope.to_json().expect("json")).expect("json");
    assert_eq!(from_a["host"], from_twin["host"]);
    let mut c = (*a).clone();
    c.process_id = Some(3);
    let mut envelope = Envelope::new(vec!["urn:message:Shop:Ping".into()], raw("{}"));
    envelope.host = Some(Arc::new(c));
    let json: serde_json::Value = serde_json::from_slice(&envelope.to_json().expect("json")).expect("json");
    assert_eq!(json["host"]["processId"], 3);
    envelope.host = None;
    let json: serde_json::Value = serde_json::from_slice(&envelope.to_json().expect("json")).expect("json");
    assert!(json["host"].is_null());
    let back = Envelope::from_json(&envelope.to_json().expect("json")).expect("envelope");
    assert!(back.host.is_none());
}

fn raw(json: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(json.to_owned()).expect("raw json")
}

/// `format_time` writes digits by hand; chrono's own formatting is the reference.
#[test]
fn times_are_written_as_chrono_formats_them() {
    use chrono::{DateTime, Utc};
    let mut seconds: i64 = 0;
    let mut nanos: u32 = 0;
    for i in 0..20_000u32 {
        // Spread over years 0001 to about 8000 and many sub-second digit patterns.
        seconds = (seconds + 7_919_007_337 + i64::from(i) * 104_729) % 253_402_300_799;
        nanos = (nanos + 123_456_789 + i * 7) % 1_000_000_000;
        let time = DateTime::<Utc>::from_timestamp(seconds - 62_135_596_800, nanos).expect("time");
        let expected = time.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string();
        // .NET writes seven fractional digits: drop the last two of chrono's nine.
        let expected = format!("{}Z", &expected[..expected.len() - 3]);
        assert_eq!(format_time(&time), expected);
        assert_eq!(parse_time(&format_time(&time)).map(|t| t.timestamp()), Some(time.timestamp()));
    }
    // Out of .NET's range: the nearest time that can be written, still a valid date.
    let far = DateTime::<Utc>::from_timestamp(253_402_300_800 + 59 * 86_400, 0).expect("year 10000");
    assert_eq!(format_time(&far), "9999-12-31T23:59:59.9999999Z");
    assert!(parse_time(&format_time(&far)).is_some());
    let before = DateTime::<Utc>::from_timestamp(-62_167_219_200 - 86_400, 0).expect("year -1");
    assert_eq!(format_time(&before), "0000-01-01T00:00:00.0000000Z");
}

/// `to_json` writes the envelope by hand: it must be JSON that reads back as every value it
/// holds, escapes included, with MassTransit's field names in MassTransit's order.
#[test]
fn written_json_reads_back_as_every_value_in_masstransit_order() {
    use std::sync::Arc;
    let mut envelopes = Vec::new();
    let plain = Envelope::new(vec!["urn:message:Shop:Ping".into()], raw(r#"{"n":1,"s":"a\"b"}"#));
    envelopes.push(plain.clone());
    let mut full = plain.clone();
    full.request_id = Some(Uuid::now_v7());
    full.correlation_id = Some(Uuid::now_v7());
    full.conversation_id = Some(Uuid::now_v7());
    full.initiator_id = Some(Uuid::now_v7());
    full.source_address = Some("rabbitmq://localhost/vhost/orders?temporary=true".into());
    full.destination_address = Some("loopback://localhost/Shop:Ping".into());
    full.response_address = Some("queue:with \"quotes\" and \\ backslash".into());
    full.fault_address = Some("tab\tnewline\ncontrol\u{1}é€😀".into());
    full.message_type = vec!["urn:message:Shop:Ping".into(), "urn:message:Shop:\"Odd\"".into()];
    full.expiration_time = Some(chrono::Utc::now());
    full.headers.insert("Tenant", "acme \"x\"");
    full.headers.insert("n", 3);
    full.headers.insert("nested", serde_json::json!({"a": [1, "b\u{7f}"]}));
    full.host = Some(Arc::new(bus_core::HostInfo {
        machine_name: Some("host \"one\"".into()),
        process_id: Some(42),
        ..bus_core::HostInfo::default()
    }));
    envelopes.push(full);
    let mut empty = plain;
    empty.message_id = None;
    empty.sent_time = None;
    empty.message_type = Vec::new();
    envelopes.push(empty);
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| bus_core::envelope::format_time(&t));
    for envelope in envelopes {
        let written = envelope.to_json().expect("to_json");
        let text = String::from_utf8_lossy(&written).into_owned();
        // Whatever needed escaping was escaped: serde_json reads back every value as it was.
        let read: serde_json::Value = serde_json::from_slice(&written).unwrap_or_else(|e| panic!("{e}: {text}"));
        let expected = serde_json::json!({
            "messageId": envelope.message_id,
            "requestId": envelope.request_id,
            "correlationId": envelope.correlation_id,
            "conversationId": envelope.conversation_id,
            "initiatorId": envelope.initiator_id,
            "sourceAddress": envelope.source_address,
            "destinationAddress": envelope.destination_address,
            "responseAddress": envelope.response_address,
            "faultAddress": envelope.fault_address,
            "messageType": envelope.message_type,
            "message": serde_json::from_str::<serde_json::Value>(envelope.message.get()).expect("message"),
            "expirationTime": time(envelope.expiration_time),
            "sentTime": time(envelope.sent_time),
            "headers": envelope.headers,
            "host": envelope.host.as_deref(),
        });
        assert_eq!(read, expected, "{text}");
        // In MassTransit's order, each field once.
        let order: Vec<usize> =
            bus_core::envelope::FIELDS.iter().map(|f| text.find(&format!("\"{f}\":")).expect(f)).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "fields out of order: {text}");
    }
}

/// The body of a waiting message is kept as written: no spare capacity beyond a little.
#[test]
fn written_envelope_is_sized_to_fit() {
    let mut envelope = Envelope::new(vec!["urn:message:Shop:Ping".into()], raw(r#"{"note":"x"}"#));
    envelope.source_address = Some("rabbitmq://localhost/orders".into());
    envelope.headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    envelope.host = Some(bus_core::HostInfo::current());
    let json = envelope.to_json().expect("json");
    assert!(json.capacity() >= json.len());
    assert!(json.capacity() - json.len() < 8, "{} bytes spare of {}", json.capacity() - json.len(), json.len());
    // And with every field set.
    envelope.request_id = Some(uuid::Uuid::now_v7());
    envelope.correlation_id = Some(uuid::Uuid::now_v7());
    envelope.initiator_id = Some(uuid::Uuid::now_v7());
    envelope.expiration_time = Some(chrono::Utc::now());
    envelope.response_address = Some("rabbitmq://localhost/bus_x?temporary=true".into());
    envelope.fault_address = Some("rabbitmq://localhost/faults".into());
    let json = envelope.to_json().expect("json");
    assert!(json.capacity() - json.len() < 8, "{} bytes spare of {}", json.capacity() - json.len(), json.len());
}
