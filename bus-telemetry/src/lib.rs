//! bus-telemetry: one call that wires OpenTelemetry for a service on the bus.
//!
//! [`init`] installs the global tracer provider (the bus records its send, receive and
//! process spans with it: build buses after calling `init`), a `tracing` subscriber
//! (readable logs filtered by `RUST_LOG`, plus the OpenTelemetry layer that makes your own
//! `tracing` spans part of the same traces), the W3C trace-context and baggage propagators,
//! and a global meter provider. With `OTEL_EXPORTER_OTLP_ENDPOINT` set (and the `otlp`
//! feature, on by default) traces and metrics go there over OTLP/HTTP; otherwise each trace
//! is printed as a tree on stdout when the returned guard drops, so a newcomer sees what
//! happened, and the metrics are printed as a short table at the end ([`MetricsTable`]).
//!
//! ```no_run
//! # fn main() -> Result<(), bus_core::BoxError> {
//! let _telemetry = bus_telemetry::init("orders")?;
//! // ... run the bus; traces are exported (or printed) when `_telemetry` drops.
//! # Ok(()) }
//! ```

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

mod table;
mod tree;

use bus_core::BoxError;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use table::MetricsTable;
pub use tree::TreeExporter;

/// Keeps the providers alive; flushes and shuts them down when dropped.
#[derive(Debug)]
pub struct Telemetry {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.tracer.force_flush();
        let _ = self.tracer.shutdown();
        let _ = self.meter.shutdown();
    }
}

/// Sets up tracing, propagation and metrics for `service`; see the crate docs.
pub fn init(service: &str) -> Result<Telemetry, BoxError> {
    let resource = Resource::builder().with_service_name(service.to_owned()).build();
    let endpoint = std::env::var_os(OTLP_ENDPOINT);
    let export = export_to(endpoint.as_deref());
    let (tracer, meter) = match export {
        Export::Otlp => otlp(resource)?,
        Export::Stdout => stdout(resource, TreeExporter::default(), MetricsTable::default()),
    };
    opentelemetry::global::set_text_map_propagator(propagator());
    opentelemetry::global::set_meter_provider(meter.clone());
    opentelemetry::global::set_tracer_provider(tracer.clone());
    let logs = tracing_subscriber::fmt::layer()
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    let traces = tracing_opentelemetry::layer().with_tracer(tracer.tracer("rust-bus")).with_filter(LevelFilter::INFO);
    tracing_subscriber::registry().with(logs).with(traces).try_init()?;
    if export == Export::Stdout && endpoint.is_some_and(|e| !e.is_empty()) {
        // Logged once the subscriber is there to write it.
        tracing::warn!("{OTLP_ENDPOINT} is set but this build has no `otlp` feature: printing instead");
    }
    Ok(Telemetry { tracer, meter })
}

/// The variable that names the OTLP collector, as every OpenTelemetry SDK reads it.
const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Where telemetry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Export {
    /// To the OTLP collector the environment names.
    Otlp,
    /// To stdout: a trace tree and the metrics, for someone at a terminal.
    Stdout,
}

/// OTLP when the endpoint is set (and not empty, which OpenTelemetry's configuration reads
/// as unset) and this build has the `otlp` feature; stdout otherwise.
fn export_to(endpoint: Option<&std::ffi::OsStr>) -> Export {
    match endpoint {
        Some(endpoint) if !endpoint.is_empty() && cfg!(feature = "otlp") => Export::Otlp,
        _ => Export::Stdout,
    }
}

/// W3C trace context and baggage, for the service's own HTTP calls and handlers (the bus
/// carries both in message headers itself).
fn propagator() -> opentelemetry::propagation::TextMapCompositePropagator {
    opentelemetry::propagation::TextMapCompositePropagator::new(vec![
        Box::new(opentelemetry_sdk::propagation::TraceContextPropagator::new()),
        Box::new(opentelemetry_sdk::propagation::BaggagePropagator::new()),
    ])
}

#[cfg(feature = "otlp")]
fn otlp(resource: Resource) -> Result<(SdkTracerProvider, SdkMeterProvider), BoxError> {
    let spans = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    let metrics = opentelemetry_otlp::MetricExporter::builder().with_http().build()?;
    let tracer = SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(spans).build();
    let meter = SdkMeterProvider::builder().with_resource(resource).with_periodic_exporter(metrics).build();
    Ok((tracer, meter))
}

#[cfg(not(feature = "otlp"))]
fn otlp(_resource: Resource) -> Result<(SdkTracerProvider, SdkMeterProvider), BoxError> {
    Err("this build of bus-telemetry has no `otlp` feature".into())
}

/// Spans to `spans` as each ends, metrics to `metrics` periodically and at shutdown.
fn stdout<S, M>(resource: Resource, spans: S, metrics: M) -> (SdkTracerProvider, SdkMeterProvider)
where
    S: opentelemetry_sdk::trace::SpanExporter + 'static,
    M: opentelemetry_sdk::metrics::exporter::PushMetricExporter,
{
    let tracer = SdkTracerProvider::builder().with_resource(resource.clone()).with_simple_exporter(spans).build();
    let meter = SdkMeterProvider::builder().with_resource(resource).with_periodic_exporter(metrics).build();
    (tracer, meter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::{Span as _, Tracer as _};

    #[test]
    fn otlp_only_when_the_endpoint_is_set() {
        assert_eq!(export_to(None), Export::Stdout);
        assert_eq!(export_to(Some("".as_ref())), Export::Stdout, "empty reads as unset");
        let set = export_to(Some("http://collector:4318".as_ref()));
        assert_eq!(set, if cfg!(feature = "otlp") { Export::Otlp } else { Export::Stdout });
    }

    #[test]
    fn printing_keeps_spans_and_metrics() {
        let spans = TreeExporter::default();
        let metrics = opentelemetry_sdk::metrics::InMemoryMetricExporter::default();
        let resource = Resource::builder().with_service_name("test").build();
        let (tracer, meter) = stdout(resource, spans.clone(), metrics.clone());
        let mut span = tracer.tracer("test").start("orders process");
        span.end();
        meter.meter("test").u64_counter("messaging.bus.consumed").build().add(2, &[]);
        meter.force_flush().expect("metrics flushed");
        let exported = metrics.get_finished_metrics().expect("metrics");
        let names: Vec<String> = exported
            .iter()
            .flat_map(|r| r.scope_metrics())
            .flat_map(|s| s.metrics())
            .map(|m| m.name().to_owned())
            .collect();
        assert_eq!(names, ["messaging.bus.consumed"], "metrics reach the exporter, not dropped");
        assert!(spans.rendered().contains("orders process"), "{}", spans.rendered());
    }

    #[test]
    fn the_propagator_carries_trace_context_and_baggage() {
        use opentelemetry::baggage::BaggageExt as _;
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
        let remote = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new()
            .with_remote_span_context(remote)
            .with_baggage([opentelemetry::KeyValue::new("tenant", "acme")]);
        let mut headers = std::collections::HashMap::new();
        propagator().inject_context(&cx, &mut headers);
        assert_eq!(
            headers.get("traceparent").map(String::as_str),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(headers.get("baggage").map(String::as_str), Some("tenant=acme"));
    }
}
