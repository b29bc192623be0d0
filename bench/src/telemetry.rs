//! The cost of tracing, traced against untraced in the same run, with spans exported in
//! batches to an exporter that drops them (the cost of producing spans, not of a backend):
//!
//! - in memory, publish -> consume on one thread each, every message sampled;
//! - in memory, a parent-based 10% trace-id ratio sampler (what
//!   `OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1` gives);
//! - the SDK's floor for both samplers: the untraced bus with three bare spans per message
//!   (no attributes, no headers) made beside it, what any tracing built on the SDK costs at
//!   least;
//! - the same floor with propagation: the bare spans' trace context carried by the untraced
//!   bus in its trace headers (`traceparent` and `MT-Activity-Id`), the consumer's spans made
//!   under the context read back: what any tracing on the SDK that carries MassTransit's
//!   trace headers costs at least;
//! - RabbitMQ end to end, every message sampled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus_core::{BoxError, Bus};
use bus_rabbitmq::RabbitMqTransport;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};

use crate::inmemory::Tracing;
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

fn in_memory(count: u64, tracing: Tracing<'_>) -> Result<f64, BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(crate::inmemory::bus(count, tracing, crate::inmemory::BusWire::Envelope))
}

/// Rounds of each side, alternating; each keeps its best: on this shared two-core machine
/// one run of either can lose a third to a neighbour.
const ROUNDS: u64 = 3;

/// One side of the in-memory comparison: how it traces, and its best rate.
struct Side {
    name: &'static str,
    /// `None` for the untraced side.
    provider: Option<SdkTracerProvider>,
    exporter: NullExporter,
    /// How the provider's spans are made: by the bus, or bare beside an untraced bus.
    floor: Floor,
    rate: f64,
}

/// Who makes a side's spans.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Floor {
    /// The bus.
    No,
    /// Bare spans beside the untraced bus ([`Tracing::BareSpans`]).
    Spans,
    /// Bare spans whose context the untraced bus carries ([`Tracing::PropagatedSpans`]).
    Propagated,
}

impl Side {
    fn new(name: &'static str, sampler: Option<Sampler>, floor: Floor) -> Self {
        let exporter = NullExporter::default();
        let provider = sampler.map(|sampler| provider(sampler, &exporter));
        Side { name, provider, exporter, floor, rate: 0.0 }
    }

    fn run(&mut self, count: u64) -> Result<(), BoxError> {
        let tracing = match (&self.provider, self.floor) {
            (None, _) => Tracing::Off,
            (Some(provider), Floor::No) => Tracing::Bus(provider),
            (Some(provider), Floor::Spans) => Tracing::BareSpans(provider),
            (Some(provider), Floor::Propagated) => Tracing::PropagatedSpans(provider),
        };
        self.rate = self.rate.max(in_memory(count, tracing)?);
        Ok(())
    }

    /// Spans exported per message; the batch processor drops spans when its queue is full,
    /// which would flatter the figure: the count shows it did not.
    fn spans_per_message(&self, messages: u64) -> f64 {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
        self.exporter.0.load(Ordering::Relaxed) as f64 / messages as f64
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Some(provider) = &self.provider {
            let _ = provider.shutdown();
        }
    }
}

fn tenth() -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.1)))
}

pub(crate) fn run(scale: Scale, runtime: &tokio::runtime::Runtime) -> Result<(), BoxError> {
    // `BENCH_TRACING=` one side's name runs that side only in memory, for profiling it alone
    // (`dropped` is a parent-based 0% ratio: every message sampled out); `rabbitmq-off` or
    // `rabbitmq-all`, one side only on RabbitMQ.
    let mut sides = [
        Side::new("off", None, Floor::No),
        Side::new("all", Some(Sampler::AlwaysOn), Floor::No),
        Side::new("ratio", Some(tenth()), Floor::No),
        Side::new("sdk-all", Some(Sampler::AlwaysOn), Floor::Spans),
        Side::new("sdk-ratio", Some(tenth()), Floor::Spans),
        Side::new("propagated-all", Some(Sampler::AlwaysOn), Floor::Propagated),
        Side::new("propagated-ratio", Some(tenth()), Floor::Propagated),
    ];
    let count = scale.inmemory / 8;
    let only = std::env::var("BENCH_TRACING").ok();
    if let Some(only) = only.as_deref() {
        if let Some(side) = only.strip_prefix("rabbitmq-").filter(|side| ["off", "all"].contains(side)) {
            return runtime.block_on(rabbitmq(scale, Some(side)));
        }
        let mut side = match sides.into_iter().find(|side| side.name == only) {
            Some(side) => side,
            None if only == "dropped" => {
                Side::new("dropped", Some(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0)))), Floor::No)
            }
            None => {
                return Err(format!(
                    "BENCH_TRACING={only}: off, all, ratio, sdk-all, sdk-ratio, propagated-all, propagated-ratio, dropped, rabbitmq-off or rabbitmq-all"
                )
                .into())
            }
        };
        for _ in 0..ROUNDS {
            side.run(count)?;
        }
        figure("tracing.one_side.publish_consume", side.rate, "msg/s");
        return Ok(());
    }
    for _ in 0..ROUNDS {
        for side in &mut sides {
            side.run(count)?;
        }
    }
    let messages = count * ROUNDS;
    for side in &sides[1..] {
        let name = side.name.replace('-', "_");
        figure(
            &format!("tracing.inmemory.{name}.spans_exported_per_message"),
            side.spans_per_message(messages),
            "spans",
        );
    }
    for side in &sides {
        figure(&format!("tracing.inmemory.{}.publish_consume", side.name.replace('-', "_")), side.rate, "msg/s");
    }
    let [off, all, ratio, sdk_all, sdk_ratio, propagated_all, propagated_ratio] =
        sides.each_ref().map(|side| side.rate);
    compare("in memory, every message traced vs untraced (one thread each)", all, off, "msg/s", Some(0.75));
    compare("in memory, 10% of messages traced (parent-based ratio) vs untraced", ratio, off, "msg/s", Some(0.9));
    compare(
        "in memory, the SDK's floor: three bare spans per message, all sampled, vs untraced",
        sdk_all,
        off,
        "msg/s",
        None,
    );
    compare(
        "in memory, the SDK's floor: three bare spans per message, 10% ratio, vs untraced",
        sdk_ratio,
        off,
        "msg/s",
        None,
    );
    compare(
        "in memory, the floor with propagation: three bare spans, their context in the bus's trace headers, all sampled, vs untraced",
        propagated_all,
        off,
        "msg/s",
        None,
    );
    compare(
        "in memory, the floor with propagation: three bare spans, their context in the bus's trace headers, 10% ratio, vs untraced",
        propagated_ratio,
        off,
        "msg/s",
        None,
    );
    drop(sides);
    runtime.block_on(rabbitmq(scale, None))
}

/// RabbitMQ end to end, traced (every message sampled) and untraced, alternating; `only`
/// (`off` or `all`) runs one side.
async fn rabbitmq(scale: Scale, only: Option<&str>) -> Result<(), BoxError> {
    let exporter = NullExporter::default();
    let traced = provider(Sampler::AlwaysOn, &exporter);
    let transport = RabbitMqTransport::connect(&crate::rabbitmq::address()).await?;
    let plain = Bus::builder(transport.clone()).build();
    let tracing = Bus::builder(transport.clone()).tracer_provider(&traced).build();
    let count = scale.rabbitmq;
    let (mut off, mut on) = (0f64, 0f64);
    let runs = |side: &str| only.is_none_or(|o| o == side);
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
        figure(&format!("tracing.rabbitmq.{side}.end_to_end"), off.max(on), "msg/s");
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
