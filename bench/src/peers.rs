//! The bus against the other buses a user could pick, doing the same RabbitMQ end-to-end
//! work in the same run: persistent messages with publisher confirms (1,000 in flight),
//! one consumer with prefetch 100 acknowledging each message, bodies of the bus's envelope
//! size, a fresh durable queue each.
//!
//! - RustStream (`ruststream` + `ruststream-lapin`): JSON messages through its app runtime,
//!   once with its default sequential dispatch and once with a pool of workers; the bus is
//!   compared with its better figure.
//! - FastStream (Python, `faststream[rabbit]`): `bench/peers/faststream_peer.py`, run in a
//!   virtual environment this benchmark creates under `target/bench-venv`.

use std::future::{ready, Future};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus};
use bus_rabbitmq::RabbitMqTransport;
use futures::stream::{FuturesUnordered, StreamExt};
use ruststream::ConnectedBroker as _;
use ruststream_lapin::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::report::{compare, figure};
use crate::Scale;

/// The FastStream release the figures are for.
const FASTSTREAM: &str = "faststream[rabbit]==0.7.8";
const IN_FLIGHT: usize = 1_000;

/// RustStream's message: a JSON body padded to the bus's envelope size.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    id: u64,
    note: String,
}

impl OutgoingDestination for Payload {
    type Form = CallerName;
}

impl MessageHeaders for Payload {
    type Contract = NoHeaders;
}

fn payload(body_size: usize) -> Payload {
    let overhead = serde_json::to_vec(&Payload { id: 0, note: String::new() }).map_or(0, |v| v.len());
    Payload { id: 0, note: "x".repeat(body_size.saturating_sub(overhead)) }
}

/// Counts handled messages and wakes the run at the last one.
#[derive(Clone)]
struct Counter {
    seen: Arc<AtomicU64>,
    target: u64,
    done: Arc<Notify>,
}

impl Counter {
    fn hit(&self) {
        if self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

struct CountPayloads(Counter);

impl Handle<Payload> for CountPayloads {
    fn handle(
        &self,
        message: &Payload,
        _outs: &(),
        _ctx: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerOutcome>> + Send {
        std::hint::black_box(message);
        self.0.hit();
        ready(Ok(()))
    }
}

/// RustStream end to end; `workers` handlers at once (`None`: its default, one at a time).
async fn ruststream(address: &str, count: u64, body_size: usize, workers: Option<usize>) -> Result<f64, BoxError> {
    let queue = format!("bench-ruststream-{}", uuid::Uuid::now_v7().simple());
    let counter = Counter { seen: Arc::new(AtomicU64::new(0)), target: count, done: Arc::new(Notify::new()) };
    let handler = CountPayloads(counter.clone());
    let source = RabbitQueue::new(queue.as_str()).durable(true).prefetch(nonzero!(100));
    let broker = LapinBroker::new(address).declare_topology(true);
    let app = RustStream::new(AppInfo::new("bench", "0.1.0")).with_broker(broker, move |b| {
        let chain = subscriber(source, handler);
        match workers.and_then(std::num::NonZeroUsize::new) {
            Some(n) => {
                b.include(chain.workers(n).build());
            }
            None => {
                b.include(chain.build());
            }
        }
    });
    let running = app.start().await?;
    let producer = LapinBroker::new(address).connect().await?;
    let publisher = producer.publisher(LapinPublish::default().persistent(true).confirms());
    let message = payload(body_size);
    let finished = counter.done.notified();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for _ in 0..count {
        if pending.len() >= IN_FLIGHT {
            if let Some(result) = pending.next().await {
                result?;
            }
        }
        pending.push(publisher.message(&message).to(queue.as_str()).publish());
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    tokio::time::timeout(Duration::from_secs(600), finished).await?;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    drop(pending);
    drop(publisher);
    producer.shutdown().await?;
    running.shutdown().await?;
    crate::rabbitmq::delete_queues(&[queue]).await?;
    Ok(rate)
}

/// The virtual environment with FastStream installed, made on first use.
fn faststream_python() -> Result<PathBuf, BoxError> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from);
    let venv = target.join("bench-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join(FASTSTREAM);
    if stamp.exists() {
        return Ok(python);
    }
    run(std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(std::process::Command::new(&python).args(["-m", "pip", "install", "--quiet", FASTSTREAM]))?;
    std::fs::write(&stamp, "")?;
    Ok(python)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn run(command: &mut std::process::Command) -> Result<std::process::Output, BoxError> {
    let output = command.output()?;
    if !output.status.success() {
        return Err(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(output)
}

/// FastStream end to end, in its own process.
async fn faststream(python: &Path, count: u64, body_size: usize) -> Result<f64, BoxError> {
    let script = workspace().join("bench/peers/faststream_peer.py");
    let mut command = tokio::process::Command::new(python);
    command.arg(script).args(["--address", &crate::rabbitmq::address()]).args([
        "--count",
        &count.to_string(),
        "--body-size",
        &body_size.to_string(),
    ]);
    let output = command.output().await?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("faststream.end_to_end ")?.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| {
            format!("the FastStream peer printed no figure: {text}{}", String::from_utf8_lossy(&output.stderr)).into()
        })
}

/// Rounds of each, alternating; each keeps its best.
const ROUNDS: usize = 2;

pub(crate) async fn run_peers(scale: Scale) -> Result<(), BoxError> {
    let address = crate::rabbitmq::address();
    let count = scale.peers;
    let transport = RabbitMqTransport::connect(&address).await?;
    let publisher = Bus::builder(transport.clone()).build();
    let body_size = crate::rabbitmq::bus_body_size(&publisher, 180)?;
    // `BENCH_PEERS_ONLY=bus|ruststream|ruststream-16` runs one side alone, to profile it or
    // to read what the broker spends on it.
    if let Ok(only) = std::env::var("BENCH_PEERS_ONLY") {
        let mut rate = 0f64;
        for _ in 0..ROUNDS {
            rate = rate.max(match only.as_str() {
                "bus" => crate::rabbitmq::bus_end_to_end(&transport, &publisher, count, 180, None).await?,
                "ruststream" => ruststream(&address, count, body_size, None).await?,
                "ruststream-16" => ruststream(&address, count, body_size, Some(16)).await?,
                other => return Err(format!("BENCH_PEERS_ONLY={other}: bus, ruststream or ruststream-16").into()),
            });
        }
        transport.close().await;
        figure(&format!("peers.{}.one_side", only.replace('-', "_")), rate, "msg/s");
        return Ok(());
    }
    let python = faststream_python()?;
    let (mut bus, mut sequential, mut pooled, mut fast) = (0f64, 0f64, 0f64, 0f64);
    for _ in 0..ROUNDS {
        bus = bus.max(crate::rabbitmq::bus_end_to_end(&transport, &publisher, count, 180, None).await?);
        sequential = sequential.max(ruststream(&address, count, body_size, None).await?);
        pooled = pooled.max(ruststream(&address, count, body_size, Some(16)).await?);
        fast = fast.max(faststream(&python, count, body_size).await?);
    }
    transport.close().await;
    figure("peers.body_size", body_size as f64, "bytes");
    figure("peers.bus.end_to_end", bus, "msg/s");
    figure("peers.ruststream.end_to_end.sequential", sequential, "msg/s");
    figure("peers.ruststream.end_to_end.16_workers", pooled, "msg/s");
    figure("peers.faststream.end_to_end", fast, "msg/s");
    compare(
        "rabbitmq end to end: bus vs RustStream (its best dispatch)",
        bus,
        sequential.max(pooled),
        "msg/s",
        Some(1.0),
    );
    compare("rabbitmq end to end: bus vs FastStream", bus, fast, "msg/s", Some(4.0));
    Ok(())
}
