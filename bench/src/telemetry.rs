//! The cost of tracing, traced against untraced in the same run, with spans exported in
//! batches to an exporter that drops them (the cost of producing spans, not of a backend):
//!
//! - in memory, publish -> consume on one thread each, every message sampled;
//! - in memory, a parent-based 10% trace-id ratio sampler (what
//!   `OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1` gives);
//! - RabbitMQ end to end, every message sampled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus_core::{BoxError, Bus};
use bus_rabbitmq::RabbitMqTransport;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};

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

fn provider(sampler: Sampler, exporter: &NullExporter) -> SdkTracerProvider {
    SdkTracerProvider::builder().with_sampler(sampler).with_batch_exporter(exporter.clone()).build()
}

fn in_memory(count: u64, tracer: Option<&SdkTracerProvider>) -> Result<f64, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(crate::inmemory::bus(count, tracer, false))
}

/// Rounds of each side, alternating; each keeps its best: on this shared two-core machine
/// one run of either can lose a third to a neighbour.
const ROUNDS: u64 = 3;

pub(crate) fn run(scale: Scale, runtime: &tokio::runtime::Runtime) -> Result<(), BoxError> {
    // `BENCH_TRACING=off`, `all` or `ratio` runs one side only in memory, for profiling it
    // alone; `rabbitmq-off` or `rabbitmq-all`, one side only on RabbitMQ.
    let only = std::env::var("BENCH_TRACING").ok();
    match only.as_deref() {
        None | Some("off" | "all" | "ratio") => {}
        Some(side @ ("rabbitmq-off" | "rabbitmq-all")) => return runtime.block_on(rabbitmq(scale, Some(side))),
        Some(other) => {
            return Err(format!("BENCH_TRACING={other}: off, all, ratio, rabbitmq-off or rabbitmq-all").into())
        }
    }
    let count = scale.inmemory / 8;
    let all = NullExporter::default();
    let all_sampled = provider(Sampler::AlwaysOn, &all);
    let tenth = NullExporter::default();
    let ratio = provider(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.1))), &tenth);
    let runs = |side: &str| only.as_deref().is_none_or(|o| o == side);
    let (mut off, mut on, mut sampled) = (0f64, 0f64, 0f64);
    for _ in 0..ROUNDS {
        if runs("off") {
            off = off.max(in_memory(count, None)?);
        }
        if runs("all") {
            on = on.max(in_memory(count, Some(&all_sampled))?);
        }
        if runs("ratio") {
            sampled = sampled.max(in_memory(count, Some(&ratio))?);
        }
    }
    let _ = all_sampled.shutdown();
    let _ = ratio.shutdown();
    if only.is_some() {
        figure("tracing.one_side.publish_consume", off.max(on).max(sampled), "msg/s");
        return Ok(());
    }
    // Three spans per message (send, receive, process); the batch processor drops spans when
    // its queue is full, which would flatter the figure: the counts show it did not.
    let messages = (count * ROUNDS) as f64;
    figure("tracing.inmemory.all.spans_exported_per_message", all.0.load(Ordering::Relaxed) as f64 / messages, "spans");
    figure(
        "tracing.inmemory.ratio.spans_exported_per_message",
        tenth.0.load(Ordering::Relaxed) as f64 / messages,
        "spans",
    );
    figure("tracing.inmemory.off.publish_consume", off, "msg/s");
    figure("tracing.inmemory.all.publish_consume", on, "msg/s");
    figure("tracing.inmemory.ratio.publish_consume", sampled, "msg/s");
    compare("in memory, every message traced vs untraced (one thread each)", on, off, "msg/s", Some(0.75));
    compare("in memory, 10% of messages traced (parent-based ratio) vs untraced", sampled, off, "msg/s", Some(0.9));
    runtime.block_on(rabbitmq(scale, None))
}

/// RabbitMQ end to end, traced (every message sampled) and untraced, alternating; `only`
/// (`rabbitmq-off` or `rabbitmq-all`) runs one side.
async fn rabbitmq(scale: Scale, only: Option<&str>) -> Result<(), BoxError> {
    let exporter = NullExporter::default();
    let traced = provider(Sampler::AlwaysOn, &exporter);
    let transport = RabbitMqTransport::connect(&crate::rabbitmq::address()).await?;
    let plain = Bus::builder(transport.clone()).build();
    let tracing = Bus::builder(transport.clone()).tracer_provider(&traced).build();
    let count = scale.rabbitmq;
    let (mut off, mut on) = (0f64, 0f64);
    let runs = |side: &str| only.is_none_or(|o| o.strip_prefix("rabbitmq-") == Some(side));
    for _ in 0..ROUNDS {
        if runs("off") {
            off = off.max(crate::rabbitmq::bus_end_to_end(&transport, &plain, count, 180, None).await?);
        }
        if runs("all") {
            on = on.max(crate::rabbitmq::bus_end_to_end(&transport, &tracing, count, 180, Some(&traced)).await?);
        }
    }
    transport.close().await;
    let _ = traced.shutdown();
    if let Some(side) = only {
        figure(&format!("tracing.{}.end_to_end", side.replace('-', ".")), off.max(on), "msg/s");
        return Ok(());
    }
    figure(
        "tracing.rabbitmq.all.spans_exported_per_message",
        exporter.0.load(Ordering::Relaxed) as f64 / (count * ROUNDS) as f64,
        "spans",
    );
    figure("tracing.rabbitmq.off.end_to_end", off, "msg/s");
    figure("tracing.rabbitmq.all.end_to_end", on, "msg/s");
    compare("rabbitmq end to end, every message traced vs untraced", on, off, "msg/s", Some(0.95));
    Ok(())
}
