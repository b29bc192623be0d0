//! Encode + decode per second and bytes per message, per serializer.

use std::hint::black_box;
use std::time::Instant;

use bus_core::serializer::{MassTransitJsonSerializer, ProtobufSerializer, RawJsonSerializer, Serializer};
use bus_core::Envelope;
use serde::{Deserialize, Serialize};

use crate::report::figure;
use crate::Scale;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Order {
    pub(crate) order_id: uuid::Uuid,
    pub(crate) user_email: String,
    pub(crate) amount_cents: u64,
    pub(crate) note: String,
}

impl Order {
    pub(crate) fn sample() -> Self {
        Order {
            order_id: uuid::Uuid::now_v7(),
            user_email: "customer@example.com".into(),
            amount_cents: 12_345,
            note: "x".repeat(100),
        }
    }
}

fn measure(name: &str, serializer: &dyn Serializer, rounds: u64) {
    let order = Order::sample();
    let mut envelope = Envelope::new(
        vec!["urn:message:Bench:Order".into()],
        serde_json::value::to_raw_value(&order).unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned()),
    );
    envelope.conversation_id = Some(uuid::Uuid::now_v7());
    envelope.host = Some(bus_core::HostInfo::current());
    let mut bytes = 0;
    let started = Instant::now();
    for _ in 0..rounds {
        // The whole path a message takes: typed value -> envelope -> bytes -> envelope -> typed value.
        let mut envelope = envelope.clone();
        envelope.message = serde_json::value::to_raw_value(black_box(&order)).unwrap_or(envelope.message);
        let wire = serializer.serialize(&envelope).unwrap_or_default();
        bytes = wire.body.len();
        let back = serializer.deserialize(&wire).ok();
        let decoded: Option<Order> = back.and_then(|e| e.message_as().ok());
        black_box(decoded);
    }
    let rate = rounds as f64 / started.elapsed().as_secs_f64();
    figure(&format!("serializer.{name}.roundtrips"), rate, "msg/s");
    figure(&format!("serializer.{name}.bytes"), bytes as f64, "bytes/msg");
}

/// The same order as a prost message, for the protobuf serializer.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize, bus_core::Message)]
#[message(urn = "urn:message:Bench:Order", protobuf)]
struct ProtoOrder {
    #[prost(string, tag = "1")]
    order_id: String,
    #[prost(string, tag = "2")]
    user_email: String,
    #[prost(uint64, tag = "3")]
    amount_cents: u64,
    #[prost(string, tag = "4")]
    note: String,
}

fn measure_protobuf(rounds: u64) {
    use bus_core::Message as _;
    let order = Order::sample();
    let proto = ProtoOrder {
        order_id: order.order_id.to_string(),
        user_email: order.user_email,
        amount_cents: order.amount_cents,
        note: order.note,
    };
    let mut envelope =
        Envelope::new(vec!["urn:message:Bench:Order".into()], serde_json::value::RawValue::NULL.to_owned());
    envelope.conversation_id = Some(uuid::Uuid::now_v7());
    let mut bytes = 0;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut envelope = envelope.clone();
        envelope.binary = black_box(&proto).to_protobuf().map(Into::into);
        let wire = ProtobufSerializer.serialize(&envelope).unwrap_or_default();
        bytes = wire.body.len();
        let back = ProtobufSerializer.deserialize(&wire).ok();
        let decoded: Option<ProtoOrder> = back.and_then(|e| e.message_of().ok());
        black_box(decoded);
    }
    figure("serializer.protobuf.roundtrips", rounds as f64 / started.elapsed().as_secs_f64(), "msg/s");
    figure("serializer.protobuf.bytes", bytes as f64, "bytes/msg");
}

pub(crate) fn run(scale: Scale) {
    measure("masstransit_json", &MassTransitJsonSerializer, scale.serializer_rounds);
    measure("raw_json", &RawJsonSerializer, scale.serializer_rounds);
    measure_protobuf(scale.serializer_rounds);
    // The floor: serde_json on the bare struct.
    let order = Order::sample();
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..scale.serializer_rounds {
        let encoded = serde_json::to_vec(black_box(&order)).unwrap_or_default();
        bytes = encoded.len();
        let decoded: Option<Order> = serde_json::from_slice(&encoded).ok();
        black_box(decoded);
    }
    figure(
        "serializer.serde_json_bare.roundtrips",
        scale.serializer_rounds as f64 / started.elapsed().as_secs_f64(),
        "msg/s",
    );
    figure("serializer.serde_json_bare.bytes", bytes as f64, "bytes/msg");
}
