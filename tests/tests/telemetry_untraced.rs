//! A bus without a tracer provider (OpenTelemetry's global no-op one) still passes a trace
//! on: what it produces while consuming a traced message carries that trace, and what it
//! produces from an untraced one carries none. (Its own binary: the telemetry tests install
//! a global provider.)

use std::time::Duration;

use bus_core::testing::MessageLog;
use bus_core::{Bus, ConsumeContext, Endpoint, Message, SendOptions};
use bus_inmemory::InMemoryTransport;
use opentelemetry::trace::{FutureExt as _, Status, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Untraced:Asked")]
struct Asked {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Untraced:Answered")]
struct Answered {
    n: u32,
}

#[tokio::test]
async fn a_bus_without_a_tracer_passes_an_incoming_trace_on_and_starts_none() {
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answered = MessageLog::default();
    let bus = Bus::builder(InMemoryTransport::new())
        .endpoint(Endpoint::new(tests::unique("asked")).handler(|ctx: ConsumeContext<Asked>| async move {
            ctx.publish(Answered { n: ctx.message().n }).await?;
            Ok(())
        }))
        .endpoint(tests::record::<Answered>(Endpoint::new(tests::unique("answered")), &answered))
        .build();
    bus.start().await.expect("bus starts");
    // Untraced and traced in turn, several times: the first spans tell the bus its tracer is
    // a no-op one, and the ones after take the shorter way.
    for round in 0..4 {
        bus.publish(Asked { n: round * 2 }).await.expect("untraced");
        let traced = SendOptions::new().header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"));
        bus.publish_with(Asked { n: round * 2 + 1 }, traced).await.expect("traced");
    }
    answered.wait_for::<Answered>(8, WAIT).await.expect("every answer arrives");
    bus.stop().await.expect("stop");
    for envelope in answered.envelopes::<Answered>() {
        let n = envelope.message_as::<Answered>().expect("an answer").n;
        let traceparent = envelope.headers.get_str("traceparent");
        if n % 2 == 1 {
            let traceparent = traceparent.unwrap_or_else(|| panic!("answer {n} carries the trace on"));
            assert!(traceparent.contains(TRACE_ID), "answer {n}: {traceparent}");
        } else {
            assert_eq!(traceparent, None, "answer {n} starts no trace");
        }
    }
}

/// The caller's own span, current while it publishes (made so by a `tracing` layer with a
/// provider the bus was not given, say), stays the caller's: a bus without a tracer neither
/// ends it nor marks it failed, not even when a send fails.
#[tokio::test]
async fn a_bus_without_a_tracer_leaves_the_callers_span_alone() {
    let spans = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build();
    let caller = Context::current_with_span(provider.tracer("caller").start("the caller's work"));
    let bus = Bus::builder(InMemoryTransport::new()).build();
    bus.start().await.expect("bus starts");
    let unroutable = async {
        bus.publish(Asked { n: 1 }).await.expect("published");
        bus.send("queue:nowhere", Asked { n: 2 }).await
    }
    .with_context(caller.clone())
    .await;
    bus.stop().await.expect("stop");
    assert!(unroutable.is_err(), "a send to a queue that does not exist fails");
    assert!(caller.span().is_recording(), "the caller's span is still open");
    assert!(spans.get_finished_spans().expect("finished spans").is_empty(), "nothing ended it");
    caller.span().end();
    let finished = spans.get_finished_spans().expect("finished spans");
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].status, Status::Unset, "not marked failed by the bus");
}
