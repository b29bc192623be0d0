//! bus-telemetry: one call that wires OpenTelemetry for a service on the bus.
//!
//! [`init`] installs the global tracer provider (the bus records its send, receive and
//! process spans with it: build buses after calling `init`), a `tracing` subscriber
//! (readable logs filtered by `RUST_LOG`, plus the OpenTelemetry layer that makes your own
//! `tracing` spans part of the same traces), the W3C propagator, and a global meter
//! provider. With `OTEL_EXPORTER_OTLP_ENDPOINT` set (and the `otlp` feature, on by
//! default) traces and metrics go there over OTLP/HTTP; otherwise each trace is printed as
//! a tree on stdout when the returned guard drops, so a newcomer sees what happened.
//!
//! ```no_run
//! # fn main() -> Result<(), bus_core::BoxError> {
//! let _telemetry = bus_telemetry::init("orders")?;
//! // ... run the bus; traces are exported (or printed) when `_telemetry` drops.
//! # Ok(()) }
//! ```

#![warn(clippy::print_stdout)]

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
    let (tracer, meter) = providers(resource)?;
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    opentelemetry::global::set_meter_provider(meter.clone());
    opentelemetry::global::set_tracer_provider(tracer.clone());
    let logs = tracing_subscriber::fmt::layer()
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    let traces = tracing_opentelemetry::layer().with_tracer(tracer.tracer("rust-bus")).with_filter(LevelFilter::INFO);
    tracing_subscriber::registry().with(logs).with(traces).try_init()?;
    Ok(Telemetry { tracer, meter })
}

#[cfg(feature = "otlp")]
fn providers(resource: Resource) -> Result<(SdkTracerProvider, SdkMeterProvider), BoxError> {
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        return Ok(stdout(resource));
    }
    let spans = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    let metrics = opentelemetry_otlp::MetricExporter::builder().with_http().build()?;
    let tracer = SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(spans).build();
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metrics).build();
    let meter = SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
    Ok((tracer, meter))
}

#[cfg(not(feature = "otlp"))]
fn providers(resource: Resource) -> Result<(SdkTracerProvider, SdkMeterProvider), BoxError> {
    Ok(stdout(resource))
}

fn stdout(resource: Resource) -> (SdkTracerProvider, SdkMeterProvider) {
    let tracer = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_simple_exporter(TreeExporter::default())
        .build();
    let meter = SdkMeterProvider::builder().with_resource(resource).build();
    (tracer, meter)
}
