//! Publish -> consume latency at a fixed rate of 1,000 messages/s, in memory and on RabbitMQ.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus, BusBuilder, ConsumeContext, Endpoint, Message};
use bus_inmemory::InMemoryTransport;
use bus_rabbitmq::RabbitMqTransport;
use serde::{Deserialize, Serialize};

use crate::report::figure;
use crate::Scale;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:Timed")]
struct Timed {
    /// Nanoseconds since the run started, when it was published.
    sent_ns: u64,
    note: String,
}

const RATE: u64 = 1_000;

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)] as f64 / 1_000_000.0
}

async fn measure(builder: BusBuilder, name: &str, duration: Duration) -> Result<String, BoxError> {
    let start = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::<u64>::new()));
    let recorded = samples.clone();
    let endpoint = format!("bench-latency-{}", uuid::Uuid::now_v7().simple());
    let bus = builder
        .endpoint(Endpoint::new(&endpoint).prefetch(100).handler(move |ctx: ConsumeContext<Timed>| {
            let latency = (start.elapsed().as_nanos() as u64).saturating_sub(ctx.message().sent_ns);
            if let Ok(mut samples) = recorded.lock() {
                samples.push(latency);
            }
            async { Ok(()) }
        }))
        .build();
    bus.start().await?;
    let count = (duration.as_secs_f64() * RATE as f64) as u64;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..count {
        ticker.tick().await;
        let message = Timed { sent_ns: start.elapsed().as_nanos() as u64, note: "x".repeat(180) };
        let bus = bus.clone();
        // Each publish on its own task, so a slow confirm does not delay the next send.
        tokio::spawn(async move { bus.publish(message).await });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.lock().map(|s| (s.len() as u64) < count).unwrap_or(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.stop().await?;
    let mut sorted = samples.lock().map(|s| s.clone()).unwrap_or_default();
    sorted.sort_unstable();
    figure(&format!("latency.{name}.p50"), percentile(&sorted, 0.50), "ms");
    figure(&format!("latency.{name}.p99"), percentile(&sorted, 0.99), "ms");
    figure(&format!("latency.{name}.p99_9"), percentile(&sorted, 0.999), "ms");
    figure(&format!("latency.{name}.samples"), sorted.len() as f64, "messages");
    Ok(endpoint)
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    measure(Bus::builder(InMemoryTransport::new()), "inmemory", scale.duration).await?;
    let transport = RabbitMqTransport::connect(&bus_rabbitmq::default_address()).await?;
    let endpoint = measure(Bus::builder(transport.clone()), "rabbitmq", scale.duration).await?;
    transport.close().await;
    crate::rabbitmq::delete_endpoints(&[endpoint]).await?;
    Ok(())
}
