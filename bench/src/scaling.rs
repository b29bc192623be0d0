//! How cost grows with the work:
//!
//! - throughput and p99 latency against the number of endpoints (1, 10, 100), each endpoint
//!   bound to a message type of its own, published round robin; in memory and on RabbitMQ;
//! - throughput against the message size (100 B, 10 KB, 1 MB of payload), in memory beside
//!   tokio mpsc + serde_json and on RabbitMQ beside raw lapin (coalesced acks) publishing
//!   bodies of the bus's envelope size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bus_core::message::interned_types;
use bus_core::{BoxError, Bus, BusBuilder, ConsumeContext, Endpoint, Message};
use bus_inmemory::{InMemoryOptions, InMemoryTransport};
use bus_rabbitmq::RabbitMqTransport;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::report::{figure, point};
use crate::Scale;

/// A message type per endpoint: `urn:message:Bench:Typed{N}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Typed<const N: usize> {
    /// Nanoseconds since the run began, when it was published.
    sent_ns: u64,
    note: String,
}

impl<const N: usize> Message for Typed<N> {
    fn message_types() -> &'static [&'static str] {
        interned_types::<Self>(|| vec![format!("urn:message:Bench:Typed{N}")])
    }
}

fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Latencies recorded by the consumers of a run, and a wake-up at the last expected one.
struct Probe {
    samples: Mutex<Vec<u64>>,
    seen: AtomicU64,
    expected: AtomicU64,
    done: Notify,
}

impl Probe {
    fn new() -> Arc<Self> {
        Arc::new(Probe {
            samples: Mutex::new(Vec::new()),
            seen: AtomicU64::new(0),
            expected: AtomicU64::new(u64::MAX),
            done: Notify::new(),
        })
    }

    fn record(&self, sent_ns: u64) {
        let latency = since_start().saturating_sub(sent_ns);
        if let Ok(mut samples) = self.samples.lock() {
            samples.push(latency);
        }
        if self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.expected.load(Ordering::Relaxed) {
            self.done.notify_one();
        }
    }

    /// Starts a round of `count` messages.
    fn expect(&self, count: u64) {
        if let Ok(mut samples) = self.samples.lock() {
            samples.clear();
        }
        self.seen.store(0, Ordering::Relaxed);
        self.expected.store(count, Ordering::Relaxed);
    }

    fn p99_ms(&self) -> f64 {
        let mut sorted = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 - 1.0) * 0.99).round() as usize;
        sorted.get(index.min(sorted.len().saturating_sub(1))).copied().unwrap_or_default() as f64 / 1e6
    }
}

/// What the run needs of one message type: its endpoint, and a publish of it.
struct Kind {
    endpoint: fn(String, Arc<Probe>) -> Endpoint,
    publish: fn(Bus, String) -> BoxFuture<'static, bus_core::Result<()>>,
}

fn kind<const N: usize>() -> Kind {
    Kind {
        endpoint: |name, probe| {
            Endpoint::new(name).prefetch(100).handler(move |ctx: ConsumeContext<Typed<N>>| {
                probe.record(ctx.message().sent_ns);
                async { Ok(()) }
            })
        },
        publish: |bus, note| Box::pin(async move { bus.publish(Typed::<N> { sent_ns: since_start(), note }).await }),
    }
}

macro_rules! kinds {
    ($($n:literal)*) => { [$(kind::<$n>()),*] };
}

/// One message type per endpoint, for up to 100 endpoints.
static KINDS: LazyLock<[Kind; 100]> = LazyLock::new(|| {
    kinds![
        0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37
        38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72
        73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99
    ]
});

const ENDPOINTS: [usize; 3] = [1, 10, 100];
const IN_FLIGHT: usize = 1_000;
const LATENCY_RATE: u64 = 1_000;

/// Publishes `count` messages round robin over the first `types` kinds, `IN_FLIGHT` at a time.
async fn publish_round_robin(bus: &Bus, count: u64, types: usize, note: &str) -> Result<(), BoxError> {
    let mut pending = FuturesUnordered::new();
    for n in 0..count {
        if pending.len() >= IN_FLIGHT {
            if let Some(result) = pending.next().await {
                result?;
            }
        }
        pending.push((KINDS[n as usize % types].publish)(bus.clone(), note.to_owned()));
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    Ok(())
}

/// Throughput (msg/s) and p99 latency (ms, at 1,000 msg/s) with `endpoints` endpoints.
async fn with_endpoints(
    builder: BusBuilder,
    endpoints: usize,
    count: u64,
    duration: Duration,
) -> Result<Outcome, BoxError> {
    let probe = Probe::new();
    let prefix = format!("bench-scale-{}", uuid::Uuid::now_v7().simple());
    let names: Vec<String> = (0..endpoints).map(|i| format!("{prefix}-{i}")).collect();
    let builder = names
        .iter()
        .zip(KINDS.iter())
        .fold(builder, |builder, (name, kind)| builder.endpoint((kind.endpoint)(name.clone(), probe.clone())));
    let bus = builder.build();
    bus.start().await?;
    let note = "x".repeat(180);

    probe.expect(count);
    let finished = probe.done.notified();
    let started = Instant::now();
    let cpu = crate::rabbitmq::cpu_seconds();
    publish_round_robin(&bus, count, endpoints, &note).await?;
    tokio::time::timeout(Duration::from_secs(600), finished).await?;
    let throughput = count as f64 / started.elapsed().as_secs_f64();
    let cpu = (crate::rabbitmq::cpu_seconds() - cpu) * 1e6 / count as f64;

    let paced = (duration.as_secs_f64() * LATENCY_RATE as f64) as u64;
    probe.expect(paced);
    let finished = probe.done.notified();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..paced {
        ticker.tick().await;
        // Each publish on its own task, so a slow confirm does not delay the next.
        tokio::spawn((KINDS[n as usize % endpoints].publish)(bus.clone(), note.clone()));
    }
    tokio::time::timeout(Duration::from_secs(60), finished).await?;
    let p99 = probe.p99_ms();
    bus.stop().await?;
    Ok(Outcome { throughput, cpu, p99, names })
}

/// What a run with some endpoints measured.
struct Outcome {
    /// Messages per second.
    throughput: f64,
    /// Client CPU microseconds per message at full throughput.
    cpu: f64,
    /// p99 latency at 1,000 msg/s, in ms.
    p99: f64,
    /// The endpoints' names.
    names: Vec<String>,
}

async fn endpoints_curve(scale: Scale) -> Result<(), BoxError> {
    // `BENCH_ENDPOINTS=100` runs one count alone.
    let wanted: Option<usize> = std::env::var("BENCH_ENDPOINTS").ok().and_then(|s| s.parse().ok());
    for endpoints in ENDPOINTS.into_iter().filter(|e| wanted.is_none_or(|w| w == *e)) {
        let transport =
            InMemoryTransport::with_options(InMemoryOptions { queue_capacity: 100_000, ..InMemoryOptions::default() });
        let outcome = with_endpoints(Bus::builder(transport), endpoints, scale.inmemory / 4, scale.duration).await?;
        record_endpoints("inmemory", endpoints, &outcome);

        let transport = RabbitMqTransport::connect(&crate::rabbitmq::address()).await?;
        let outcome = with_endpoints(Bus::builder(transport.clone()), endpoints, scale.rabbitmq, scale.duration).await;
        transport.close().await;
        let outcome = outcome?;
        crate::rabbitmq::delete_endpoints(&outcome.names).await?;
        record_endpoints("rabbitmq", endpoints, &outcome);
        let raw = crate::rabbitmq::raw_fan_out(scale.rabbitmq, endpoints).await?;
        figure(&format!("scaling.endpoints_{endpoints}.raw_lapin.throughput"), raw, "msg/s");
        point("endpoints-throughput-rabbitmq", "raw lapin, a queue each", endpoints as f64, raw);
    }
    Ok(())
}

fn record_endpoints(transport: &'static str, endpoints: usize, outcome: &Outcome) {
    figure(&format!("scaling.endpoints_{endpoints}.{transport}.throughput"), outcome.throughput, "msg/s");
    figure(&format!("scaling.endpoints_{endpoints}.{transport}.cpu"), outcome.cpu, "us/msg");
    figure(&format!("scaling.endpoints_{endpoints}.{transport}.p99_at_1000_per_s"), outcome.p99, "ms");
    point(&format!("endpoints-throughput-{transport}"), "bus", endpoints as f64, outcome.throughput);
    let series = if transport == "inmemory" { "in memory" } else { "RabbitMQ" };
    point("endpoints-p99", series, endpoints as f64, outcome.p99);
}

/// Payload sizes, and how many messages each round sends.
fn sizes(scale: Scale) -> [(usize, u64); 3] {
    [(100, scale.rabbitmq / 2), (10_000, scale.rabbitmq / 5), (1_000_000, (scale.rabbitmq / 100).max(3))]
}

async fn size_curve(scale: Scale) -> Result<(), BoxError> {
    // `BENCH_SIZE=1000000` runs one size alone.
    let wanted: Option<usize> = std::env::var("BENCH_SIZE").ok().and_then(|s| s.parse().ok());
    for (size, count) in sizes(scale).into_iter().filter(|(size, _)| wanted.is_none_or(|w| w == *size)) {
        // In memory: the bus against tokio mpsc + serde_json of the same shipment.
        let memory_count = count * 4;
        let bus = crate::inmemory::shipments(memory_count, size).await?;
        let raw = crate::inmemory::mpsc_shipments(memory_count, size).await;
        record_size("inmemory", "bus", size, bus);
        record_size("inmemory", "mpsc + serde_json", size, raw);

        // RabbitMQ: the bus against raw lapin with bodies of the bus's size.
        let transport = RabbitMqTransport::connect(&crate::rabbitmq::address()).await?;
        let publisher = Bus::builder(transport.clone()).build();
        let body_size = crate::rabbitmq::bus_body_size(&publisher, size)?;
        let bus = crate::rabbitmq::bus_end_to_end(&transport, &publisher, count, size, None).await?;
        transport.close().await;
        let raw = crate::rabbitmq::raw_coalesced(count, body_size).await?;
        record_size("rabbitmq", "bus", size, bus);
        record_size("rabbitmq", "raw lapin", size, raw);
    }
    Ok(())
}

fn record_size(transport: &str, side: &str, size: usize, rate: f64) {
    let key = side.replace([' ', '+'], "_").replace("__", "_");
    figure(&format!("scaling.size_{size}.{transport}.{key}"), rate, "msg/s");
    figure(&format!("scaling.size_{size}.{transport}.{key}.bandwidth"), rate * size as f64 / 1e6, "MB/s");
    point(&format!("size-{transport}"), side, size as f64, rate);
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    // `BENCH_SCALING=endpoints` (or `sizes`) runs one curve alone.
    let only = std::env::var("BENCH_SCALING").ok();
    if only.as_deref() != Some("sizes") {
        endpoints_curve(scale).await?;
    }
    if only.as_deref() != Some("endpoints") {
        size_curve(scale).await?;
    }
    Ok(())
}
