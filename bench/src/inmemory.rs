//! In-memory transport, publish -> consume, against two tokio mpsc baselines: one that
//! encodes and decodes the same MassTransit envelope as the bus (the wire format's own
//! cost), and one with bare serde_json (the floor). The bus runs with the MassTransit
//! envelope, in raw JSON mode, and with the message's JSON alone on the wire (the bus's
//! floor: what its machinery costs beyond serde_json).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::serializer::{MassTransitJsonSerializer, RawJsonSerializer, Serializer, Serializers};
use bus_core::{BoxError, Bus, Endpoint, Envelope, Message, TransportMessage};
use bus_inmemory::{InMemoryOptions, InMemoryTransport};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};

use crate::counting::{counting, counting_with};
use crate::rabbitmq::{shipment_of, Shipment};
use crate::report::{compare, figure};
use crate::serializers::Order;
use crate::Scale;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:OrderPlaced")]
struct OrderPlaced {
    order_id: uuid::Uuid,
    user_email: String,
    amount_cents: u64,
    note: String,
}

const PRODUCERS: u64 = 2;

/// Rounds of each side; each keeps its best.
const ROUNDS: usize = 3;

/// What a baseline's channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// The order as bare serde_json.
    BareJson,
    /// The order in a MassTransit envelope, written and read by the bus's own serializer.
    Envelope,
}

/// An envelope like the one the bus writes for a publish: ids, types, host and time.
fn envelope_of(order: &Order) -> Result<TransportMessage, BoxError> {
    let mut envelope = Envelope::new(vec![OrderPlaced::message_type().into()], serde_json::value::to_raw_value(order)?);
    // Made as the bus makes its ids.
    envelope.conversation_id = Some(uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::timestamp::context::NoContext)));
    envelope.source_address = Some("loopback://localhost/bench-publisher".into());
    envelope.destination_address = Some("loopback://localhost/Bench:OrderPlaced".into());
    envelope.host = Some(bus_core::HostInfo::current());
    Ok(MassTransitJsonSerializer.serialize(&envelope)?)
}

async fn baseline(count: u64, wire: Wire) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<TransportMessage>(1024);
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(message) = rx.recv().await {
            let order: Option<Order> = match wire {
                Wire::BareJson => serde_json::from_slice(&message.body).ok(),
                Wire::Envelope => {
                    MassTransitJsonSerializer.deserialize(&message).ok().and_then(|e| e.message_as().ok())
                }
            };
            std::hint::black_box(order);
            n += 1;
        }
        n
    });
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let tx = tx.clone();
        producers.push(tokio::spawn(async move {
            let order = Order::sample();
            for _ in 0..count / PRODUCERS {
                let message = match wire {
                    Wire::BareJson => TransportMessage {
                        body: serde_json::to_vec(&order).unwrap_or_default().into(),
                        ..TransportMessage::default()
                    },
                    Wire::Envelope => envelope_of(&order).unwrap_or_default(),
                };
                if tx.send(message).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    for p in producers {
        let _ = p.await;
    }
    let received = consumer.await.unwrap_or_default();
    received as f64 / started.elapsed().as_secs_f64()
}

/// What the bus writes on the wire in a run of [`bus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BusWire {
    /// The MassTransit envelope (the default).
    Envelope,
    /// Raw JSON, MassTransit's convention: the message bare, the envelope's fields as headers.
    RawJson,
    /// The message's JSON alone, nothing else: the bus's floor (see [`BareSerializer`]).
    Bare,
}

/// Writes a message's JSON and nothing else (no ids, types or headers), and reads it back
/// as the one type this benchmark publishes, with no id or clock read: about serde_json's
/// own work, as the mpsc baseline does it (plus the check of the JSON every envelope's
/// message gets), so that a bus with it measures what the bus's machinery costs on top. No
/// bus could ship it: a message without its type or ids could not be routed or answered.
#[derive(Debug)]
struct BareSerializer;

impl Serializer for BareSerializer {
    fn content_type(&self) -> &'static str {
        "application/x-bench-bare+json"
    }

    fn serialize(&self, envelope: &Envelope) -> bus_core::Result<TransportMessage> {
        Ok(TransportMessage {
            body: envelope.message.get().as_bytes().to_vec().into(),
            content_type: Some(self.content_type().into()),
            ..TransportMessage::default()
        })
    }

    fn deserialize(&self, message: &TransportMessage) -> bus_core::Result<Envelope> {
        let json = serde_json::from_slice(&message.body)
            .map_err(|error| bus_core::Error::deserialize("not JSON", Some(Box::new(error) as BoxError)))?;
        Ok(Envelope::bare(vec![OrderPlaced::message_type().into()], json))
    }
}

/// What tracing a run of [`bus`] does.
#[derive(Clone, Copy)]
pub(crate) enum Tracing<'a> {
    /// None: the bus has no tracer provider.
    Off,
    /// The bus traces with this provider.
    Bus(&'a SdkTracerProvider),
    /// The bus is untraced, and each publish is accompanied by three bare spans of this
    /// provider (send, and receive and process under it), with no attributes and no
    /// headers: what the SDK alone costs, the floor of any tracing built on it.
    BareSpans(&'a SdkTracerProvider),
    /// The bus is untraced and carries three bare spans' trace context, as it carries any
    /// current context: a bare send span is current while each publish runs, so the bus
    /// writes its trace headers (`traceparent` and `MT-Activity-Id`); the consumer makes
    /// bare receive and process spans under the context the bus read back from them. The
    /// SDK's spans with the bus's propagation and nothing more (no attributes, no ids):
    /// the floor of any tracing on the SDK that carries MassTransit's trace headers.
    PropagatedSpans(&'a SdkTracerProvider),
}

/// A span of `tracer` with no attributes, in a context under `parent`.
fn bare_span(
    tracer: &opentelemetry_sdk::trace::SdkTracer,
    name: &'static str,
    kind: opentelemetry::trace::SpanKind,
    parent: &opentelemetry::Context,
) -> opentelemetry::Context {
    use opentelemetry::trace::{SpanBuilder, TraceContextExt, Tracer};
    parent.with_span(tracer.build_with_context(SpanBuilder::from_name(name).with_kind(kind), parent))
}

/// Three bare spans, as a traced message has: send, receive under it, process under that.
fn bare_spans(tracer: &opentelemetry_sdk::trace::SdkTracer) {
    use opentelemetry::trace::{SpanKind, TraceContextExt};
    use opentelemetry::Context;
    let send = bare_span(tracer, "Bench:OrderPlaced send", SpanKind::Producer, &Context::new());
    let receive = bare_span(tracer, "bench-orders receive", SpanKind::Consumer, &send);
    bare_consume(tracer, &receive);
    send.span().end();
}

/// A bare process span under `receive`, then both ended.
fn bare_consume(tracer: &opentelemetry_sdk::trace::SdkTracer, receive: &opentelemetry::Context) {
    use opentelemetry::trace::{SpanKind, TraceContextExt};
    let process = bare_span(tracer, "bench-orders process", SpanKind::Consumer, receive);
    process.span().end();
    receive.span().end();
}

/// The bus's figure: `count` orders published by two producers and consumed.
pub(crate) async fn bus(count: u64, tracing: Tracing<'_>, wire: BusWire) -> Result<f64, BoxError> {
    let transport =
        InMemoryTransport::with_options(InMemoryOptions { queue_capacity: 10_000, ..InMemoryOptions::default() });
    let total = count / PRODUCERS * PRODUCERS;
    let mut builder = Bus::builder(transport);
    match wire {
        BusWire::Envelope => {}
        BusWire::RawJson => builder = builder.serializers(Serializers::default().with_default(RawJsonSerializer)),
        BusWire::Bare => builder = builder.serializers(Serializers::default().with_default(BareSerializer)),
    }
    let (bare, propagated) = match tracing {
        Tracing::Off => (None, None),
        Tracing::Bus(provider) => {
            builder = builder.tracer_provider(provider);
            (None, None)
        }
        Tracing::BareSpans(provider) => {
            use opentelemetry::trace::TracerProvider as _;
            (Some(provider.tracer("bench-floor")), None)
        }
        Tracing::PropagatedSpans(provider) => {
            use opentelemetry::trace::TracerProvider as _;
            (None, Some(provider.tracer("bench-floor")))
        }
    };
    // Messages that reached the consumer without a trace context: with `PropagatedSpans`,
    // the run is refused unless there are none.
    let untraced = Arc::new(AtomicU64::new(0));
    let each = {
        let (tracer, untraced) = (propagated.clone(), untraced.clone());
        move || {
            use opentelemetry::trace::{SpanKind, TraceContextExt};
            let Some(tracer) = &tracer else { return };
            let producer = opentelemetry::Context::current();
            if !producer.span().span_context().is_valid() {
                untraced.fetch_add(1, Ordering::Relaxed);
            }
            let receive = bare_span(tracer, "bench-orders receive", SpanKind::Consumer, &producer);
            bare_consume(tracer, &receive);
        }
    };
    let (endpoint, done) =
        counting_with::<OrderPlaced>(Endpoint::new("bench-orders").prefetch(1000).concurrency_limit(64), total, each);
    let bus = builder.endpoint(endpoint).build();
    bus.start().await?;
    let started = Instant::now();
    let finished = done.notified();
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let bus = bus.clone();
        let (bare, propagated) = (bare.clone(), propagated.clone());
        producers.push(tokio::spawn(async move {
            use opentelemetry::context::FutureExt as _;
            use opentelemetry::trace::{SpanKind, TraceContextExt};
            let order = Order::sample();
            for _ in 0..count / PRODUCERS {
                if let Some(tracer) = &bare {
                    bare_spans(tracer);
                }
                let message = OrderPlaced {
                    order_id: order.order_id,
                    user_email: order.user_email.clone(),
                    amount_cents: order.amount_cents,
                    note: order.note.clone(),
                };
                match &propagated {
                    None => bus.publish(message).await?,
                    Some(tracer) => {
                        let root = opentelemetry::Context::new();
                        let send = bare_span(tracer, "Bench:OrderPlaced send", SpanKind::Producer, &root);
                        bus.publish(message).with_context(send.clone()).await?;
                        send.span().end();
                    }
                }
            }
            Ok::<_, bus_core::Error>(())
        }));
    }
    for p in producers {
        p.await??;
    }
    tokio::time::timeout(Duration::from_secs(300), finished).await?;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    bus.stop().await?;
    let untraced = untraced.load(Ordering::Relaxed);
    if untraced > 0 {
        return Err(format!("{untraced} of {total} messages reached the consumer without their trace context").into());
    }
    Ok(rate)
}

/// The bus publishing `count` shipments with notes of `note` bytes, one consumer;
/// messages per second.
pub(crate) async fn shipments(count: u64, note: usize) -> Result<f64, BoxError> {
    let transport =
        InMemoryTransport::with_options(InMemoryOptions { queue_capacity: 10_000, ..InMemoryOptions::default() });
    let (endpoint, done) =
        counting::<Shipment>(Endpoint::new("bench-shipments").prefetch(1000).concurrency_limit(64), count);
    let bus = Bus::builder(transport).endpoint(endpoint).build();
    bus.start().await?;
    let finished = done.notified();
    let started = Instant::now();
    for _ in 0..count {
        bus.publish(shipment_of(note)).await?;
    }
    tokio::time::timeout(Duration::from_secs(300), finished).await?;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    bus.stop().await?;
    Ok(rate)
}

/// tokio mpsc carrying `count` shipments with notes of `note` bytes as serde_json.
pub(crate) async fn mpsc_shipments(count: u64, note: usize) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            std::hint::black_box(serde_json::from_slice::<Shipment>(&bytes).ok());
        }
    });
    for _ in 0..count {
        if tx.send(serde_json::to_vec(&shipment_of(note)).unwrap_or_default()).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = consumer.await;
    count as f64 / started.elapsed().as_secs_f64()
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    // `BENCH_INMEMORY_ONLY=envelope` (or `raw`, `bare`) runs the bus alone in that mode, for
    // a profiler.
    if let Ok(only) = std::env::var("BENCH_INMEMORY_ONLY") {
        let wire = match only.as_str() {
            "envelope" => BusWire::Envelope,
            "raw" => BusWire::RawJson,
            "bare" => BusWire::Bare,
            other => return Err(format!("BENCH_INMEMORY_ONLY={other}: envelope, raw or bare").into()),
        };
        let rate = bus(scale.inmemory, Tracing::Off, wire).await?;
        figure(&format!("inmemory.bus.{only}_only"), rate, "msg/s");
        return Ok(());
    }
    // A run's rate swings by a third from one run to the next on this shared 2-core machine
    // (where the tasks land on the two threads), so the sides alternate and each keeps its
    // best round.
    let (mut bare, mut enveloped, mut measured, mut raw_json, mut floor) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for _ in 0..ROUNDS {
        bare = bare.max(baseline(scale.inmemory, Wire::BareJson).await);
        enveloped = enveloped.max(baseline(scale.inmemory, Wire::Envelope).await);
        measured = measured.max(bus(scale.inmemory, Tracing::Off, BusWire::Envelope).await?);
        raw_json = raw_json.max(bus(scale.inmemory, Tracing::Off, BusWire::RawJson).await?);
        floor = floor.max(bus(scale.inmemory, Tracing::Off, BusWire::Bare).await?);
    }
    figure("inmemory.baseline.mpsc_serde_json", bare, "msg/s");
    figure("inmemory.baseline.mpsc_masstransit_envelope", enveloped, "msg/s");
    figure("inmemory.bus.publish_consume", measured, "msg/s");
    figure("inmemory.bus.publish_consume_raw_json", raw_json, "msg/s");
    figure("inmemory.bus.publish_consume_bare_json", floor, "msg/s");
    compare(
        "inmemory publish->consume (MassTransit envelope) vs mpsc + the same envelope",
        measured,
        enveloped,
        "msg/s",
        Some(0.6),
    );
    compare("inmemory publish->consume (raw JSON) vs mpsc + serde_json", raw_json, bare, "msg/s", Some(0.5));
    compare(
        "inmemory, the bus's floor: its machinery with serde_json alone on the wire, vs mpsc + serde_json",
        floor,
        bare,
        "msg/s",
        None,
    );
    compare("inmemory publish->consume (MassTransit envelope) vs mpsc + serde_json", measured, bare, "msg/s", None);
    Ok(())
}
