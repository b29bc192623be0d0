//! One trace across every hop, MassTransit trace headers, errors and retries on spans,
//! and the metrics, with the SDK's in-memory exporters.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::testing::BusRecorder;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message, Transport, TransportMessage};
use bus_inmemory::InMemoryTransport;
use bus_saga::{InMemorySagaRepository, Saga};
use examples::order_saga::{order_state_machine, InventoryConsumer, NewOrderEvent, OrderProcessed};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use tests::unique;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(10);

struct Telemetry {
    spans: InMemorySpanExporter,
    provider: SdkTracerProvider,
    exported: Arc<tokio::sync::Notify>,
}

/// The in-memory exporter, plus a wake-up for tests waiting on spans.
#[derive(Debug)]
struct Notifying {
    inner: InMemorySpanExporter,
    exported: Arc<tokio::sync::Notify>,
}

impl opentelemetry_sdk::trace::SpanExporter for Notifying {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.exported.notify_waiters();
        result
    }
}

/// One tracer provider for the whole test binary, installed globally (buses built after this
/// record with it), and a `tracing` subscriber that turns user code's `tracing` spans into
/// OpenTelemetry spans too (spawned tasks run on any thread).
fn telemetry() -> &'static Telemetry {
    static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let spans = InMemorySpanExporter::default();
        let exported = Arc::new(tokio::sync::Notify::new());
        let exporter = Notifying { inner: spans.clone(), exported: exported.clone() };
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter).build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tests"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        Telemetry { spans, provider, exported }
    })
}

fn finished_spans() -> Vec<SpanData> {
    let telemetry = telemetry();
    let _ = telemetry.provider.force_flush();
    telemetry.spans.get_finished_spans().expect("spans")
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
}

fn string_attribute(span: &SpanData, key: &str) -> Option<String> {
    attribute(span, key).map(|v| v.as_str().into_owned())
}

/// Waits until `found` returns something for the finished spans (checked on every export).
async fn wait_spans<T>(what: &str, found: impl Fn(Vec<SpanData>) -> Option<T>) -> T {
    let wait = async {
        loop {
            let exported = telemetry().exported.notified();
            if let Some(result) = found(finished_spans()) {
                return result;
            }
            exported.await;
        }
    };
    tokio::time::timeout(WAIT, wait).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Spans whose names mention `marker`, once at least `n` are there.
async fn spans_named(marker: &str, n: usize) -> Vec<SpanData> {
    wait_spans(&format!("{n} spans named *{marker}*"), |all| {
        let spans: Vec<SpanData> = all.into_iter().filter(|s| s.name.contains(marker)).collect();
        (spans.len() >= n).then_some(spans)
    })
    .await
}

fn find<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        panic!("no span `{name}` in {:?}", spans.iter().map(|s| s.name.to_string()).collect::<Vec<_>>())
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Telemetry:First")]
struct First {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Telemetry:Second")]
struct Second {
    n: u32,
}

/// publish First -> consume on `{marker}-first` -> the consumer publishes Second -> consume
/// on `{marker}-second`; the spans of that trace, and the first message's ids.
async fn two_hops(transport: impl Transport, marker: &str) -> (Vec<SpanData>, uuid::Uuid, uuid::Uuid) {
    telemetry();
    let recorder = Arc::new(BusRecorder::default());
    let (first, second) = (format!("{marker}-first"), format!("{marker}-second"));
    let bus = Bus::builder(transport)
        .observer_arc(recorder.clone())
        .endpoint(Endpoint::new(&first).handler(|ctx: ConsumeContext<First>| {
            // The consumer's own `tracing` span: a child of the process span.
            let work = tracing::info_span!("reserve stock");
            async move {
                ctx.publish(Second { n: ctx.message().n + 1 }).await?;
                Ok(())
            }
            .instrument(work)
        }))
        .endpoint(Endpoint::new(&second).handler(|_: ConsumeContext<Second>| async { Ok(()) }))
        .build();
    bus.start().await.expect("bus starts");
    let (message_id, correlation_id) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let options = bus_core::SendOptions::new().message_id(message_id).correlation_id(correlation_id);
    bus.publish_with(First { n: 1 }, options).await.expect("publish");
    recorder.consumed.wait_for::<Second>(1, WAIT).await.expect("second consumed");
    bus.stop().await.expect("stop");
    // receive + process on first, receive + process on second (the publishes are named by
    // their message type's exchange).
    let named = spans_named(marker, 4).await;
    let receive = find(&named, &format!("{first} receive"));
    let trace = receive.span_context.trace_id();
    let spans = wait_spans("the consumer's own span and both publishes", |all| {
        let trace: Vec<SpanData> = all.into_iter().filter(|s| s.span_context.trace_id() == trace).collect();
        let done = trace.iter().any(|s| s.name == "reserve stock")
            && trace.iter().filter(|s| s.span_kind == opentelemetry::trace::SpanKind::Producer).count() == 2;
        done.then_some(trace)
    })
    .await;
    (spans, message_id, correlation_id)
}

fn parent_of<'a>(spans: &'a [SpanData], child: &SpanData) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.span_context.span_id() == child.parent_span_id)
        .unwrap_or_else(|| panic!("no parent of {} in its trace", child.name))
}

fn check_one_trace(spans: &[SpanData], marker: &str, system: &str, first_ids: (uuid::Uuid, uuid::Uuid)) {
    use opentelemetry::trace::SpanKind;
    let first = format!("{marker}-first");
    let second = format!("{marker}-second");
    let receive = find(spans, &format!("{first} receive"));
    let process = find(spans, &format!("{first} process"));
    let receive2 = find(spans, &format!("{second} receive"));
    let process2 = find(spans, &format!("{second} process"));
    let publish = parent_of(spans, receive);
    assert_eq!(publish.name, "Telemetry:First send", "the first publish is named by its exchange");
    assert_eq!(publish.parent_span_id, SpanId::INVALID, "the publish starts the trace");
    let trace = publish.span_context.trace_id();
    assert_ne!(trace, TraceId::INVALID);
    for span in [receive, process, receive2, process2] {
        assert_eq!(span.span_context.trace_id(), trace, "{} is in the one trace", span.name);
    }
    assert_eq!(process.parent_span_id, receive.span_context.span_id(), "process is a child of receive");
    let work = find(spans, "reserve stock");
    assert_eq!(work.parent_span_id, process.span_context.span_id(), "the consumer's own span is a child of process");
    let publish2 = parent_of(spans, receive2);
    assert_eq!(publish2.name, "Telemetry:Second send");
    assert_eq!(publish2.parent_span_id, work.span_context.span_id(), "the consumer's publish is a child of its span");
    assert_eq!(process2.parent_span_id, receive2.span_context.span_id());
    for span in [publish, publish2] {
        assert_eq!(span.span_kind, SpanKind::Producer, "{}", span.name);
        assert_eq!(string_attribute(span, "messaging.operation").as_deref(), Some("publish"));
    }
    for span in [receive, process, receive2, process2] {
        assert_eq!(span.span_kind, SpanKind::Consumer, "{}", span.name);
    }
    for (hop, (publish, receive, process), exchange, urn) in [
        (&first, (publish, receive, process), "Telemetry:First", "urn:message:Telemetry:First"),
        (&second, (publish2, receive2, process2), "Telemetry:Second", "urn:message:Telemetry:Second"),
    ] {
        for span in [publish, receive, process] {
            assert_eq!(string_attribute(span, "messaging.system").as_deref(), Some(system), "{}", span.name);
        }
        assert_eq!(string_attribute(publish, "messaging.destination.name").as_deref(), Some(exchange));
        for span in [receive, process] {
            assert_eq!(string_attribute(span, "messaging.destination.name").as_deref(), Some(hop.as_str()));
        }
        assert_eq!(string_attribute(receive, "messaging.operation").as_deref(), Some("receive"));
        assert_eq!(string_attribute(process, "messaging.operation").as_deref(), Some("process"));
        let id = string_attribute(publish, "messaging.message.id");
        assert!(id.as_deref().is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()), "{}: {id:?}", publish.name);
        assert_eq!(string_attribute(receive, "messaging.message.id"), id, "the receive names the message it got");
        for span in [publish, receive] {
            assert_eq!(string_attribute(span, "messaging.masstransit.message_types").as_deref(), Some(urn));
        }
        assert!(
            string_attribute(process, "messaging.masstransit.consumer_type").is_some_and(|c| !c.is_empty()),
            "{}",
            process.name
        );
    }
    let (message_id, correlation_id) = first_ids;
    assert_eq!(string_attribute(publish, "messaging.message.id"), Some(message_id.to_string()));
    assert_eq!(string_attribute(receive, "messaging.masstransit.correlation_id"), Some(correlation_id.to_string()));
    // MassTransit's id flow: what the consumer publishes is initiated by the consumed
    // message's correlation id, in the same conversation.
    assert_eq!(string_attribute(receive2, "messaging.masstransit.initiator_id"), Some(correlation_id.to_string()));
    let conversation = string_attribute(receive, "messaging.message.conversation_id");
    assert!(conversation.as_deref().is_some_and(|c| uuid::Uuid::parse_str(c).is_ok()), "{conversation:?}");
    for span in [publish, publish2, receive2] {
        assert_eq!(string_attribute(span, "messaging.message.conversation_id"), conversation, "{}", span.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_publish_consume_is_one_trace() {
    let marker = unique("trace");
    let (spans, message_id, correlation_id) = two_hops(InMemoryTransport::new(), &marker).await;
    check_one_trace(&spans, &marker, "in-memory", (message_id, correlation_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_on_rabbitmq_too() {
    tests::rabbit_fixture::require_broker();
    // A vhost of its own (deleted by the next run), so no queue is left on the shared one.
    let vhost = tokio::task::spawn_blocking(|| tests::rabbit_support::Vhost::create("telemetry")).await.expect("vhost");
    let transport = bus_rabbitmq::RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("rabbitmq");
    let marker = unique("trace-rabbit");
    let (spans, message_id, correlation_id) = two_hops(transport.clone(), &marker).await;
    check_one_trace(&spans, &marker, "rabbitmq", (message_id, correlation_id));
    // The other cases, on the same connection.
    activity_id_case(transport.clone(), &unique("mt-activity-rabbit")).await;
    failures_case(transport.clone(), &unique("failing-rabbit")).await;
    saga_case(transport.clone()).await;
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masstransit_activity_id_continues_its_trace_and_bad_headers_are_ignored() {
    activity_id_case(InMemoryTransport::new(), &unique("mt-activity")).await;
}

/// Two messages as MassTransit writes them, with only `MT-Activity-Id`: a valid one
/// continues its trace, a malformed one starts a new trace and is consumed all the same.
async fn activity_id_case<T: Transport + Clone>(transport: T, marker: &str) {
    telemetry();
    let marker = marker.to_owned();
    let recorder = Arc::new(BusRecorder::default());
    let bus = Bus::builder(transport.clone())
        .observer_arc(recorder.clone())
        .endpoint(Endpoint::new(&marker).handler(|_: ConsumeContext<First>| async { Ok(()) }))
        .build();
    bus.start().await.expect("bus starts");
    let envelope = |activity: &str| {
        let body = format!(
            r#"{{"messageId":"{}","messageType":["urn:message:Telemetry:First"],"message":{{"n":1}},"headers":{{"MT-Activity-Id":"{activity}"}}}}"#,
            uuid::Uuid::now_v7()
        );
        TransportMessage {
            body: body.into_bytes().into(),
            content_type: Some("application/vnd.masstransit+json".into()),
            ..Default::default()
        }
    };
    transport.send(&marker, envelope("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).await.expect("send");
    transport.send(&marker, envelope("00-not-a-trace-01")).await.expect("send");
    recorder.consumed.wait_for::<First>(2, WAIT).await.expect("both consumed, the bad header ignored");
    bus.stop().await.expect("stop");
    let receives: Vec<SpanData> =
        spans_named(&marker, 4).await.into_iter().filter(|s| s.name.ends_with("receive")).collect();
    let continued = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
    let parent = SpanId::from_hex("00f067aa0ba902b7").expect("span id");
    assert!(
        receives.iter().any(|s| s.span_context.trace_id() == continued && s.parent_span_id == parent),
        "the MassTransit trace continues"
    );
    assert!(receives.iter().any(|s| s.span_context.trace_id() != continued), "a malformed header starts a new trace");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Telemetry:Flaky")]
struct Flaky;

type Metrics = [opentelemetry_sdk::metrics::data::ResourceMetrics];

/// The latest export only: each holds the totals so far (cumulative), so adding up every
/// export the periodic reader made before the flush would count twice.
fn latest(metrics: &Metrics) -> impl Iterator<Item = &opentelemetry_sdk::metrics::data::ResourceMetrics> {
    metrics.last().into_iter()
}

/// The data points' attributes that `wanted` all match (an attribute of each name given).
fn matches(attributes: Vec<&KeyValue>, wanted: &[(&str, &str)]) -> bool {
    wanted.iter().all(|(k, v)| attributes.iter().any(|kv| kv.key.as_str() == *k && kv.value.as_str() == *v))
}

/// The sum of a counter's data points with these attributes; `None` when the bus never
/// recorded the instrument at all. `points` picks the counter's data of the wanted kind.
fn sum_of<T: Copy + std::iter::Sum<T> + std::ops::AddAssign + Default>(
    metrics: &Metrics,
    name: &str,
    wanted: &[(&str, &str)],
    points: impl Fn(&AggregatedMetrics) -> Option<&opentelemetry_sdk::metrics::data::Sum<T>>,
) -> Option<T> {
    let mut total = None;
    for metric in latest(metrics).flat_map(|r| r.scope_metrics()).flat_map(|s| s.metrics()).filter(|m| m.name() == name)
    {
        if let Some(sum) = points(metric.data()) {
            let matching = sum.data_points().filter(|p| matches(p.attributes().collect(), wanted));
            *total.get_or_insert_with(T::default) += matching.map(|p| p.value()).sum::<T>();
        }
    }
    total
}

fn sum_u64(metrics: &Metrics, name: &str, wanted: &[(&str, &str)]) -> Option<u64> {
    sum_of(metrics, name, wanted, |data| match data {
        AggregatedMetrics::U64(MetricData::Sum(sum)) => Some(sum),
        _ => None,
    })
}

fn sum_i64(metrics: &Metrics, name: &str, wanted: &[(&str, &str)]) -> Option<i64> {
    sum_of(metrics, name, wanted, |data| match data {
        AggregatedMetrics::I64(MetricData::Sum(sum)) => Some(sum),
        _ => None,
    })
}

/// How many values a histogram recorded with these attributes.
fn histogram_count(metrics: &Metrics, name: &str, wanted: &[(&str, &str)]) -> u64 {
    let mut total = 0;
    for metric in latest(metrics).flat_map(|r| r.scope_metrics()).flat_map(|s| s.metrics()).filter(|m| m.name() == name)
    {
        if let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() {
            let points = histogram.data_points().filter(|p| matches(p.attributes().collect(), wanted));
            total += points.map(|p| p.count()).sum::<u64>();
        }
    }
    total
}

fn event_attribute(event: &opentelemetry::trace::Event, key: &str) -> Option<String> {
    event.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().into_owned())
}

/// A consumer that always fails: two immediate retries per delivery, one delayed
/// redelivery, then `_error`. Its spans record the error and the retries and redelivery as
/// events; every instrument counts what happened, by endpoint, message type and consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_recorded_on_spans_and_in_metrics() {
    failures_case(InMemoryTransport::new(), &unique("failing")).await;
}

async fn failures_case(transport: impl Transport, marker: &str) {
    telemetry();
    let exporter = InMemoryMetricExporter::default();
    let meters = SdkMeterProvider::builder().with_reader(PeriodicReader::builder(exporter.clone()).build()).build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&meters, "tests");
    let marker = marker.to_owned();
    let recorder = Arc::new(BusRecorder::default());
    let bus = Bus::builder(transport)
        .meter(&meter)
        .observer_arc(recorder.clone())
        .endpoint(
            Endpoint::new(&marker)
                .retry(RetryPolicy::immediate(2))
                .redelivery(bus_core::RedeliveryPolicy::intervals([Duration::from_millis(10)]))
                .handler(|_: ConsumeContext<Flaky>| async { Err::<(), BoxError>("flaky dependency".into()) })
                .handler(|_: ConsumeContext<First>| async { Ok(()) }),
        )
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{marker}"), Flaky).await.expect("send");
    for n in 0..2 {
        bus.send(&format!("queue:{marker}"), First { n }).await.expect("send");
    }
    bus.publish(First { n: 2 }).await.expect("publish");
    recorder
        .dead_letters
        .wait_until("the move to _error", WAIT, |moved| !moved.is_empty())
        .await
        .expect("failed for good");
    recorder.consumed.wait_for::<First>(3, WAIT).await.expect("the others consumed");
    bus.stop().await.expect("stop");
    // Flaky: two deliveries (receive + process each); First: three (receive + process each).
    let spans = wait_spans("every delivery's receive and process spans", |all| {
        let consumed = |s: &SpanData| s.name == format!("{marker} receive") || s.name == format!("{marker} process");
        let spans: Vec<SpanData> = all.into_iter().filter(consumed).collect();
        (spans.len() >= 2 * 2 + 3 * 2).then_some(spans)
    })
    .await;
    meters.force_flush().expect("flush");
    let metrics = exporter.get_finished_metrics().expect("metrics");

    let failed: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == format!("{marker} process") && s.status != opentelemetry::trace::Status::Unset)
        .collect();
    assert_eq!(failed.len(), 2, "the first delivery and the redelivery each failed");
    for span in &failed {
        assert!(
            matches!(&span.status, opentelemetry::trace::Status::Error { description } if description.contains("flaky dependency"))
        );
        let retries = span.events.iter().filter(|e| e.name == "retry").count();
        assert_eq!(retries, 2, "two retries as events on each delivery's process span");
        let exception = span.events.iter().find(|e| e.name == "exception").expect("an exception event");
        assert!(event_attribute(exception, "exception.type").is_some_and(|t| !t.is_empty()));
        assert_eq!(event_attribute(exception, "exception.message").as_deref(), Some("flaky dependency"));
    }
    let redeliveries: Vec<&opentelemetry::trace::Event> = spans
        .iter()
        .filter(|s| s.name == format!("{marker} receive"))
        .flat_map(|s| s.events.iter().filter(|e| e.name == "redelivery"))
        .collect();
    assert_eq!(redeliveries.len(), 1, "one redelivery, as an event of the delivery that failed");
    assert_eq!(event_attribute(redeliveries[0], "redelivery.count").as_deref(), Some("1"));

    let endpoint = ("endpoint", marker.as_str());
    let (flaky, first) =
        (("message_type", "urn:message:Telemetry:Flaky"), ("message_type", "urn:message:Telemetry:First"));
    assert_eq!(sum_u64(&metrics, "messaging.bus.sent", &[flaky]), Some(1));
    assert_eq!(sum_u64(&metrics, "messaging.bus.sent", &[first]), Some(2));
    assert_eq!(sum_u64(&metrics, "messaging.bus.published", &[first]), Some(1));
    assert_eq!(sum_u64(&metrics, "messaging.bus.consumed", &[endpoint, first]), Some(3));
    assert_eq!(sum_u64(&metrics, "messaging.bus.consumed", &[endpoint, flaky]), Some(0));
    assert_eq!(sum_u64(&metrics, "messaging.bus.failed", &[endpoint, flaky]), Some(1));
    assert_eq!(sum_u64(&metrics, "messaging.bus.failed", &[endpoint, first]), Some(0));
    let consumer = failed[0].attributes.iter().find(|kv| kv.key.as_str() == "messaging.masstransit.consumer_type");
    let consumer = consumer.map(|kv| kv.value.as_str().into_owned()).expect("the failing consumer's type");
    assert_eq!(sum_u64(&metrics, "messaging.bus.failed", &[endpoint, ("consumer", consumer.as_str())]), Some(1));
    assert_eq!(sum_u64(&metrics, "messaging.bus.retries", &[endpoint]), Some(4), "two per delivery");
    assert_eq!(sum_u64(&metrics, "messaging.bus.redeliveries", &[endpoint]), Some(1));
    assert_eq!(sum_i64(&metrics, "messaging.bus.in_flight", &[endpoint]), Some(0), "recorded, and back to none");
    assert_eq!(histogram_count(&metrics, "messaging.bus.consume.duration", &[endpoint, first]), 3);
    assert_eq!(histogram_count(&metrics, "messaging.bus.consume.duration", &[endpoint, flaky]), 2);
    assert_eq!(histogram_count(&metrics, "messaging.bus.delivery.latency", &[endpoint]), 5, "every delivery");
    for name in ["messaging.bus.consume.duration", "messaging.bus.delivery.latency"] {
        let bounds: Vec<f64> = latest(&metrics)
            .flat_map(|r| r.scope_metrics())
            .flat_map(|s| s.metrics())
            .filter(|m| m.name() == name)
            .filter_map(|m| match m.data() {
                AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                    h.data_points().next().map(|p| p.bounds().collect())
                }
                _ => None,
            })
            .next()
            .expect("a histogram");
        assert_eq!(bounds, bus_core::telemetry::SECONDS_BUCKETS, "{name} has buckets in seconds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_saga_flow_is_one_trace_with_saga_attributes() {
    saga_case(InMemoryTransport::new()).await;
}

async fn saga_case(transport: impl Transport) {
    telemetry();
    let recorder = Arc::new(BusRecorder::default());
    let saga = Saga::new(order_state_machine().expect("valid state machine"), InMemorySagaRepository::new());
    let bus = Bus::builder(transport)
        .observer_arc(recorder.clone())
        .scheduler(bus_inmemory::InMemoryScheduler::new())
        .endpoint(saga.endpoint())
        .endpoint(Endpoint::new("Inventory").consumer(InventoryConsumer::default()))
        .build();
    bus.start().await.expect("bus starts");
    let order_id = uuid::Uuid::now_v7();
    bus.publish(NewOrderEvent { order_id, user_email: "ann@example.com".into() }).await.expect("publish");
    recorder.consumed.wait_for::<OrderProcessed>(1, WAIT).await.expect("order processed");
    bus.stop().await.expect("stop");
    let order = order_id.to_string();
    let (spans, saga) = wait_spans("the saga's spans", |spans| {
        let saga: Vec<SpanData> = spans
            .iter()
            .filter(|s| string_attribute(s, "saga.id").as_deref() == Some(order.as_str()))
            .cloned()
            .collect();
        (saga.len() >= 2).then_some((spans, saga))
    })
    .await;
    let trace = saga[0].span_context.trace_id();
    assert!(saga.iter().all(|s| s.span_context.trace_id() == trace), "NewOrderEvent to finalization is one trace");
    let trace_spans: Vec<SpanData> = spans.iter().filter(|s| s.span_context.trace_id() == trace).cloned().collect();
    // The trace starts at the NewOrderEvent publish, and every other span hangs from it.
    let roots: Vec<&SpanData> = trace_spans.iter().filter(|s| s.parent_span_id == SpanId::INVALID).collect();
    assert_eq!(roots.len(), 1, "one root: {:?}", roots.iter().map(|s| s.name.to_string()).collect::<Vec<_>>());
    assert_eq!(roots[0].name, "SagaWithMasstransitShared:NewOrderEvent send");
    assert_eq!(string_attribute(roots[0], "messaging.operation").as_deref(), Some("publish"));
    for span in trace_spans.iter().filter(|s| s.parent_span_id != SpanId::INVALID) {
        parent_of(&trace_spans, span);
    }
    // The transitions: Initial -> Pending on NewOrderEvent, then on to Final.
    let transition = |span: &SpanData| {
        (
            string_attribute(span, "saga.begin_state").unwrap_or_default(),
            string_attribute(span, "saga.end_state").unwrap_or_default(),
        )
    };
    let transitions: Vec<(String, String)> = saga.iter().map(transition).collect();
    assert!(transitions.contains(&("Initial".to_owned(), "Pending".to_owned())), "{transitions:?}");
    assert!(transitions.iter().any(|(begin, end)| begin == "Pending" && end == "Final"), "{transitions:?}");
    let started = saga.iter().find(|s| transition(s) == ("Initial".to_owned(), "Pending".to_owned())).expect("start");
    let received = parent_of(&trace_spans, started);
    assert!(received.name.ends_with(" receive"), "the transition is a consumer's processing: {}", received.name);
    assert_eq!(parent_of(&trace_spans, received).span_context.span_id(), roots[0].span_context.span_id());
    let inventory = trace_spans.iter().find(|s| s.name == "Inventory process");
    assert!(inventory.is_some(), "inventory's processing is in the same trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_propagation_links_the_producer_and_baggage_flows_on() {
    telemetry();
    let marker = unique("link");
    let next = format!("{marker}-next");
    let transport = InMemoryTransport::new();
    let recorder = Arc::new(BusRecorder::default());
    let bus = Bus::builder(transport.clone())
        .observer_arc(recorder.clone())
        .endpoint(Endpoint::new(&marker).handler_with_state(
            format!("queue:{next}"),
            |ctx: ConsumeContext<First>, next| async move {
                ctx.send(&next, Second { n: 2 }).await?;
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    let topology = bus_core::EndpointTopology { queue: next.clone(), ..Default::default() };
    transport.declare(&topology).await.expect("the next queue");
    let body = format!(
        r#"{{"messageId":"{}","messageType":["urn:message:Telemetry:First"],"message":{{"n":1}},
            "headers":{{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                        "MT-Activity-Propagation":"Link","baggage":"tenant=acme"}}}}"#,
        uuid::Uuid::now_v7()
    );
    let message = TransportMessage {
        body: body.into_bytes().into(),
        content_type: Some("application/vnd.masstransit+json".into()),
        ..Default::default()
    };
    transport.send(&marker, message).await.expect("send");
    transport.wait_for_queue_len(&next, 1, WAIT).await.expect("the consumer sent on");
    bus.stop().await.expect("stop");
    let receive = spans_named(&marker, 2).await.into_iter().find(|s| s.name == format!("{marker} receive"));
    let receive = receive.expect("the receive span");
    let producer_trace = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("trace id");
    assert_ne!(receive.span_context.trace_id(), producer_trace, "linked, so a trace of its own");
    assert_eq!(receive.parent_span_id, SpanId::INVALID, "a root, not a child of the producer");
    let links: Vec<_> = receive.links.iter().map(|l| (l.span_context.trace_id(), l.span_context.span_id())).collect();
    assert_eq!(links, [(producer_trace, SpanId::from_hex("b7ad6b7169203331").expect("span id"))]);
    let forwarded = transport.peek(&next).into_iter().next().expect("the message sent on");
    let envelope = bus_core::Envelope::from_json(&forwarded.body).expect("envelope");
    assert_eq!(envelope.headers.get_str("baggage"), Some("tenant=acme"), "baggage flows on");
    assert_eq!(
        envelope.headers.get_str("MT-Activity-Correlation-Context"),
        Some("tenant=acme"),
        "under MassTransit's name too"
    );
    assert!(
        envelope
            .headers
            .get_str("traceparent")
            .is_some_and(|t| t.contains(&receive.span_context.trace_id().to_string())),
        "the message sent on continues the consumer's trace"
    );
}

/// An endpoint set to link starts a trace of its own for every message, linked to the
/// producer's span, without the producer asking for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_set_to_link_starts_its_own_linked_traces() {
    telemetry();
    let marker = unique("linking");
    let recorder = Arc::new(BusRecorder::default());
    let bus = Bus::builder(InMemoryTransport::new())
        .observer_arc(recorder.clone())
        .endpoint(
            Endpoint::new(&marker)
                .trace_propagation(bus_core::TracePropagation::Link)
                .handler(|_: ConsumeContext<First>| async { Ok(()) }),
        )
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{marker}"), First { n: 1 }).await.expect("send");
    recorder.consumed.wait_for::<First>(1, WAIT).await.expect("consumed");
    bus.stop().await.expect("stop");
    let spans = spans_named(&marker, 3).await;
    let send = find(&spans, &format!("{marker} send"));
    let receive = find(&spans, &format!("{marker} receive"));
    let process = find(&spans, &format!("{marker} process"));
    assert_ne!(receive.span_context.trace_id(), send.span_context.trace_id(), "a trace of its own");
    assert_eq!(receive.parent_span_id, SpanId::INVALID, "the receive span is its root");
    let links: Vec<_> = receive.links.iter().map(|l| l.span_context.span_id()).collect();
    assert_eq!(links, [send.span_context.span_id()], "linked to the producer's span");
    assert_eq!(process.parent_span_id, receive.span_context.span_id());
    assert_eq!(process.span_context.trace_id(), receive.span_context.trace_id());
}

/// Drops every span of one destination, by the attribute it is created with.
#[derive(Debug, Clone)]
struct DropDestination(String);

impl opentelemetry_sdk::trace::ShouldSample for DropDestination {
    fn should_sample(
        &self,
        _parent: Option<&opentelemetry::Context>,
        _trace: TraceId,
        name: &str,
        _kind: &opentelemetry::trace::SpanKind,
        attributes: &[KeyValue],
        _links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        use opentelemetry::trace::TraceState;
        use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult};
        let dropped = attributes
            .iter()
            .any(|kv| kv.key.as_str() == "messaging.destination.name" && kv.value.as_str() == self.0.as_str());
        let decision = if dropped || name.starts_with(&self.0) {
            SamplingDecision::Drop
        } else {
            SamplingDecision::RecordAndSample
        };
        SamplingResult { decision, attributes: Vec::new(), trace_state: TraceState::default() }
    }
}

/// Samplers see each span's name and attributes when it is created: spans of a dropped
/// endpoint are dropped, the others all recorded whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samplers_see_names_and_attributes_of_every_span() {
    let marker = unique("sampled");
    let (kept, dropped) = (format!("{marker}-kept"), format!("{marker}-dropped"));
    let spans = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_sampler(DropDestination(dropped.clone()))
        .with_simple_exporter(spans.clone())
        .build();
    let transport = InMemoryTransport::new();
    let recorder = Arc::new(BusRecorder::default());
    let bus = Bus::builder(transport)
        .tracer_provider(&provider)
        .observer_arc(recorder.clone())
        .endpoint(Endpoint::new(&kept).handler(|_: ConsumeContext<First>| async { Ok(()) }))
        .endpoint(Endpoint::new(&dropped).handler(|_: ConsumeContext<Second>| async { Ok(()) }))
        .build();
    bus.start().await.expect("bus starts");
    for n in 0..5 {
        bus.send(&format!("queue:{dropped}"), Second { n }).await.expect("send");
        bus.send(&format!("queue:{kept}"), First { n }).await.expect("send");
    }
    recorder.consumed.wait_for::<First>(5, WAIT).await.expect("kept consumed");
    recorder.consumed.wait_for::<Second>(5, WAIT).await.expect("dropped consumed");
    bus.stop().await.expect("stop");
    let _ = provider.force_flush();
    let finished = spans.get_finished_spans().expect("spans");
    assert!(finished.iter().all(|s| !s.name.contains(&dropped)), "no span of the dropped endpoint");
    for suffix in ["send", "receive", "process"] {
        let name = format!("{kept} {suffix}");
        let named: Vec<&SpanData> = finished.iter().filter(|s| s.name == name).collect();
        assert_eq!(named.len(), 5, "{name}");
        for span in named {
            assert_eq!(string_attribute(span, "messaging.destination.name").as_deref(), Some(kept.as_str()));
            assert!(string_attribute(span, "messaging.operation").is_some(), "{name} has its attributes");
        }
    }
    let _ = provider.shutdown();
}

/// With a parent-based ratio sampler (what `OTEL_TRACES_SAMPLER=parentbased_traceidratio`
/// gives), a message's spans are kept or dropped together: each kept trace holds its send,
/// receive and process spans whole, with the message's ids added after the sampler kept
/// them. A message sampled out records nothing, yet carries its trace context marked not
/// sampled, so the services downstream drop it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ratio_sampler_keeps_or_drops_each_message_whole() {
    use opentelemetry_sdk::trace::Sampler;
    const MESSAGES: u32 = 200;
    let endpoint = unique("ratio");
    let spans = InMemorySpanExporter::default();
    let asked_for_process = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = CountingProcess {
        inner: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.25))),
        asked: asked_for_process.clone(),
    };
    let provider = SdkTracerProvider::builder().with_sampler(sampler).with_simple_exporter(spans.clone()).build();
    let received = Arc::new(std::sync::Mutex::new(Vec::<(u32, String)>::new()));
    let all_in = Arc::new(tokio::sync::Notify::new());
    let (seen, done) = (received.clone(), all_in.clone());
    let bus = Bus::builder(InMemoryTransport::new())
        .tracer_provider(&provider)
        .endpoint(Endpoint::new(&endpoint).handler(move |ctx: ConsumeContext<First>| {
            let traceparent = ctx.headers().get_str("traceparent").unwrap_or_default().to_owned();
            let mut seen = seen.lock().expect("lock");
            seen.push((ctx.message().n, traceparent));
            if seen.len() == MESSAGES as usize {
                done.notify_one();
            }
            async { Ok(()) }
        }))
        .build();
    bus.start().await.expect("bus starts");
    for n in 0..MESSAGES {
        bus.send(&format!("queue:{endpoint}"), First { n }).await.expect("send");
    }
    tokio::time::timeout(WAIT, all_in.notified()).await.expect("every message consumed");
    bus.stop().await.expect("stop");
    let _ = provider.force_flush();
    let finished: Vec<SpanData> =
        spans.get_finished_spans().expect("spans").into_iter().filter(|s| s.name.starts_with(&endpoint)).collect();

    let mut sampled = 0;
    for (n, traceparent) in received.lock().expect("lock").iter() {
        let fields: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(fields.len(), 4, "message {n} carries a traceparent: `{traceparent}`");
        let trace_id = TraceId::from_hex(fields[1]).expect("trace id");
        let trace: Vec<&SpanData> = finished.iter().filter(|s| s.span_context.trace_id() == trace_id).collect();
        match fields[3] {
            "01" => {
                sampled += 1;
                let mut names: Vec<&str> = trace.iter().map(|s| s.name.as_ref()).collect();
                names.sort_unstable();
                let wanted = ["process", "receive", "send"].map(|op| format!("{endpoint} {op}"));
                assert_eq!(names, wanted, "message {n}: its three spans, whole");
                for span in trace.iter().filter(|s| !s.name.ends_with("process")) {
                    assert!(attribute(span, "messaging.message.id").is_some(), "{} has the message id", span.name);
                }
            }
            "00" => assert!(trace.is_empty(), "message {n} was sampled out, yet spans were recorded"),
            other => panic!("message {n}: unexpected trace flags {other}"),
        }
    }
    // 25% of 200: 50 expected; outside 20..=85 by chance about once in ten million runs.
    assert!((20..=85).contains(&sampled), "{sampled} of {MESSAGES} messages sampled at a ratio of 0.25");
    assert_eq!(finished.len(), sampled * 3, "only the sampled messages' spans were exported");
    let asked = asked_for_process.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(asked, sampled, "a process span is built only under a kept receive span");
    let _ = provider.shutdown();
}

/// A sampler that counts the process spans it is asked about.
#[derive(Debug, Clone)]
struct CountingProcess {
    inner: opentelemetry_sdk::trace::Sampler,
    asked: Arc<std::sync::atomic::AtomicUsize>,
}

impl opentelemetry_sdk::trace::ShouldSample for CountingProcess {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &opentelemetry::trace::SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        if name.ends_with(" process") {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}
