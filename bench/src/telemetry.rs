//! The cost of tracing: in-memory publish -> consume with propagation and spans exported in
//! batches, versus without a tracer provider, in the same run on one thread each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus_core::BoxError;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

use crate::report::{compare, figure};
use crate::Scale;

/// Counts spans and drops them: measures producing and exporting spans, not a backend.
#[derive(Debug, Clone, Default)]
struct NullExporter(Arc<AtomicU64>);

impl SpanExporter for NullExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        std::hint::black_box(batch);
        Ok(())
    }
}

fn measure(count: u64, tracer: Option<&SdkTracerProvider>) -> Result<f64, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(crate::inmemory::bus(count, tracer))
}

/// Runs off and on alternately, three times each, and keeps each one's best: on this shared
/// two-core machine one run of either can lose a third to a neighbour, which made a
/// single pair's ratio swing between 55% and 85%.
pub(crate) fn run(scale: Scale) -> Result<(), BoxError> {
    const ROUNDS: u64 = 3;
    let count = scale.inmemory / 8;
    let exporter = NullExporter::default();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter.clone()).build();
    // `BENCH_TRACING=on` (or `off`) runs one side only, for profiling it alone.
    let only = std::env::var("BENCH_TRACING").ok();
    let (mut off, mut on) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        if only.as_deref() != Some("on") {
            off = off.max(measure(count, None)?);
        }
        if only.as_deref() != Some("off") {
            on = on.max(measure(count, Some(&provider))?);
        }
    }
    let _ = provider.shutdown();
    if only.is_some() {
        // One side alone (for a profiler) has nothing to compare with.
        figure("tracing.one_side.publish_consume", off.max(on), "msg/s");
        return Ok(());
    }
    // Three spans per message (send, receive, process); the batch processor drops spans when
    // its queue is full, which would flatter the figure: the count shows it did not.
    let per_message = exporter.0.load(Ordering::Relaxed) as f64 / (count * ROUNDS) as f64;
    figure("tracing.on.spans_exported_per_message", per_message, "spans");
    figure("tracing.off.publish_consume", off, "msg/s");
    figure("tracing.on.publish_consume", on, "msg/s");
    compare("in-memory with tracing on (batch export) vs off", on, off, "msg/s", Some(0.85));
    Ok(())
}
