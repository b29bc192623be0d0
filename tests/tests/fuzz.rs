//! Property tests of everything that reads input from the wire: the MassTransit envelope
//! reader, the raw JSON reader, AMQP header conversion both ways, and the address parser.
//! Seeded with real MassTransit output (`../shared/reference/masstransit-samples/`), mutated
//! byte by byte and node by node, and with generated input. Every input ends in a value or a
//! clear error; none panics.
//!
//! `FUZZ_CASES` sets the cases per property (default 2,000 for the test command); a long run:
//! `FUZZ_CASES=250000 cargo test --release -p tests --test fuzz` (four properties: a million).

use std::path::PathBuf;
use std::sync::OnceLock;

use bus_core::serializer::Serializers;
use bus_core::{Headers, TransportMessage};
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

const ENVELOPE: &str = "application/vnd.masstransit+json";

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// The real MassTransit samples: every file that is JSON, as bytes.
fn samples() -> &'static [Vec<u8>] {
    static SAMPLES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/masstransit-samples");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("the fuzz seeds are MassTransit's real output in {}: {e}", dir.display()));
        let mut samples: Vec<Vec<u8>> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .map(|path| std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .collect();
        samples.sort();
        assert!(samples.len() >= 10, "expected the JSON samples in {}, found {}", dir.display(), samples.len());
        samples
    })
}

/// A sample's bytes with a few mutations: bytes flipped, runs cut out, bytes inserted, a slice
/// repeated, or the end cut off.
fn mutated_bytes() -> impl Strategy<Value = Vec<u8>> {
    let count = samples().len();
    (0..count, prop::collection::vec((0u8..5, any::<usize>(), any::<u8>(), 0usize..64), 1..8)).prop_map(
        |(index, edits)| {
            let mut bytes = samples()[index].clone();
            for (kind, at, byte, len) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let at = at % bytes.len();
                match kind {
                    0 => bytes[at] = byte,
                    1 => {
                        let end = (at + len).min(bytes.len());
                        bytes.drain(at..end);
                    }
                    2 => bytes.insert(at, byte),
                    3 => {
                        let end = (at + len).min(bytes.len());
                        let copy = bytes[at..end].to_vec();
                        bytes.splice(at..at, copy);
                    }
                    _ => bytes.truncate(at),
                }
            }
            bytes
        },
    )
}

/// Any JSON value, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        Just(Value::String("00000000-0000-0000-0000-000000000000".into())),
        Just(Value::String("2024-02-30T25:61:61.12345678+99:99".into())),
        Just(Value::String("urn:message:".into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((".{0,12}", inner), 0..8)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// A sample parsed as JSON with one node (found by a path of indexes) replaced by any value.
fn mutated_json() -> impl Strategy<Value = Vec<u8>> {
    let parsed: Vec<Value> = samples().iter().filter_map(|s| serde_json::from_slice(s).ok()).collect();
    let count = parsed.len();
    (0..count, prop::collection::vec(any::<usize>(), 0..4), json()).prop_map(move |(index, path, replacement)| {
        let mut value = parsed[index].clone();
        replace_at(&mut value, &path, replacement);
        serde_json::to_vec(&value).expect("a JSON value writes")
    })
}

/// Replaces the node that `path` leads to (each step an index into an object's or array's
/// members, taken modulo their number; the walk stops at a leaf).
fn replace_at(node: &mut Value, path: &[usize], replacement: Value) {
    let Some((step, rest)) = path.split_first() else {
        *node = replacement;
        return;
    };
    match node {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(step % map.len()).cloned().unwrap_or_default();
            if let Some(child) = map.get_mut(&key) {
                replace_at(child, rest, replacement);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let len = items.len();
            replace_at(&mut items[step % len], rest, replacement);
        }
        _ => *node = replacement,
    }
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![mutated_bytes(), mutated_json(), prop::collection::vec(any::<u8>(), 0..512)]
}

/// Reads `body` as `content_type`: a value or an error that says something.
fn read(body: Vec<u8>, content_type: &'static str) -> Result<(), TestCaseError> {
    let message =
        TransportMessage { body: body.into(), content_type: Some(content_type.into()), ..TransportMessage::default() };
    if let Err(error) = Serializers::default().deserialize(&message) {
        prop_assert!(!error.to_string().is_empty());
        prop_assert!(!error.is_transient(), "bad input is never worth trying again: {error}");
    }
    Ok(())
}

#[test]
fn every_real_sample_is_read_as_an_envelope() {
    for sample in samples() {
        let message = TransportMessage {
            body: sample.clone().into(),
            content_type: Some(ENVELOPE.into()),
            ..TransportMessage::default()
        };
        // Some samples are a fault's body or an SNS notification around an envelope: read or
        // refused with a reason, never a panic.
        let _ = Serializers::default().deserialize(&message);
    }
}

#[test]
fn the_envelope_reader_takes_any_input_without_panicking() {
    runner().run(&body(), |body| read(body, ENVELOPE)).expect("no panic, every failure an error");
}

#[test]
fn the_raw_json_reader_takes_any_input_without_panicking() {
    runner().run(&body(), |body| read(body, "application/json")).expect("no panic, every failure an error");
}

/// Any AMQP field value, nested a few levels.
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        "[a-z]{0,20}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        prop::collection::vec(any::<u8>(), 0..32).prop_map(|b| AMQPValue::ByteArray(b.into())),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|items| AMQPValue::FieldArray(FieldArray::from(items))),
            prop::collection::vec(("[A-Za-z-]{1,12}", inner), 0..6).prop_map(|entries| {
                let mut table = FieldTable::default();
                for (name, value) in entries {
                    table.insert(ShortString::from(name), value);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

#[test]
fn amqp_headers_from_the_wire_are_read_without_panicking() {
    let strategy = (prop::collection::vec(("[A-Za-z-]{1,30}", amqp_value()), 0..12), ".{0,40}", ".{0,40}");
    runner()
        .run(&strategy, |(entries, message_id, content_type)| {
            let mut table = FieldTable::default();
            for (name, value) in entries {
                table.insert(ShortString::from(name), value);
            }
            let properties = BasicProperties::default()
                .with_headers(table)
                .with_message_id(ShortString::from(message_id))
                .with_content_type(ShortString::from(content_type));
            let message = bus_rabbitmq::testing::transport_message(b"{}".to_vec(), &properties);
            // And back to a table, as a move to `_error` forwards them.
            let again = bus_rabbitmq::testing::properties(&message);
            prop_assert_eq!(again.headers().is_some(), !message.headers.is_empty());
            Ok(())
        })
        .expect("no panic");
}

#[test]
fn headers_become_an_amqp_table_and_back_without_panicking() {
    let strategy = prop::collection::vec((".{0,300}", json()), 0..12);
    runner()
        .run(&strategy, |entries| {
            let headers: Headers = entries.into_iter().collect();
            let message = TransportMessage { headers: headers.clone(), ..TransportMessage::default() };
            let properties = bus_rabbitmq::testing::properties(&message);
            let back = bus_rabbitmq::testing::transport_message(Vec::new(), &properties).headers;
            // Strings and integers come back as they were (names over 255 bytes cannot travel).
            for (name, value) in &headers {
                if name.len() <= 255 && (value.is_string() || value.is_i64()) {
                    prop_assert_eq!(back.get(name), Some(value), "header {}", name);
                }
            }
            Ok(())
        })
        .expect("no panic");
}

#[test]
fn addresses_from_the_wire_are_parsed_without_panicking() {
    let real = prop_oneof![
        Just("rabbitmq://localhost/TrainingContract:OrderPlacedEvent".to_owned()),
        Just("rabbitmq://host/vhost/MACHINE_Process_bus_xxxx?temporary=true".to_owned()),
        Just("rabbitmq://localhost/masstransit/orders?bind=true".to_owned()),
        Just("queue:orders".to_owned()),
        Just("exchange:orders".to_owned()),
        Just("loopback://localhost/orders".to_owned()),
    ];
    let mutated =
        (real, prop::collection::vec((any::<usize>(), any::<char>()), 0..6)).prop_map(|(mut address, edits)| {
            for (at, c) in edits {
                let at =
                    address.char_indices().nth(at % (address.chars().count() + 1)).map_or(address.len(), |(i, _)| i);
                address.insert(at, c);
            }
            address
        });
    let strategy = prop_oneof![mutated, ".{0,300}"];
    runner()
        .run(&strategy, |address| {
            match bus_core::address::entity_name(&address) {
                Ok(name) => prop_assert!(address.contains(name)),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
            Ok(())
        })
        .expect("no panic");
}
