//! The cost of tracing: in-memory publish -> consume with propagation and spans exported in
//! batches, versus without a tracing subscriber, in the same run on one thread each.

use bus_core::BoxError;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;

use crate::report::{compare, figure};
use crate::Scale;

/// Takes spans and drops them: measures producing and exporting spans, not a backend.
#[derive(Debug)]
struct NullExporter;

impl SpanExporter for NullExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        std::hint::black_box(batch);
        Ok(())
    }
}

fn measure(count: u64) -> Result<f64, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(crate::inmemory::bus(count))
}

pub(crate) fn run(scale: Scale) -> Result<(), BoxError> {
    let off = measure(scale.inmemory / 4)?;
    let provider = SdkTracerProvider::builder().with_batch_exporter(NullExporter).build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("bench"));
    let subscriber = tracing_subscriber::registry().with(layer);
    let on = tracing::subscriber::with_default(subscriber, || measure(scale.inmemory / 4))?;
    let _ = provider.shutdown();
    figure("tracing.off.publish_consume", off, "msg/s");
    figure("tracing.on.publish_consume", on, "msg/s");
    compare("in-memory with tracing on (batch export) vs off", on, off, "msg/s", Some(0.85));
    Ok(())
}
