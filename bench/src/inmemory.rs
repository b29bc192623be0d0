//! In-memory transport, publish -> consume with the JSON envelope, versus tokio mpsc + serde_json.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::{InMemoryOptions, InMemoryTransport};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::report::{compare, figure};
use crate::serializers::Order;
use crate::Scale;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:OrderPlaced")]
struct OrderPlaced {
    order_id: uuid::Uuid,
    user_email: String,
    amount_cents: u64,
    note: String,
}

const PRODUCERS: u64 = 2;

async fn baseline(count: u64) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(bytes) = rx.recv().await {
            let order: Option<Order> = serde_json::from_slice(&bytes).ok();
            std::hint::black_box(order);
            n += 1;
        }
        n
    });
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let tx = tx.clone();
        producers.push(tokio::spawn(async move {
            let order = Order::sample();
            for _ in 0..count / PRODUCERS {
                let bytes = serde_json::to_vec(&order).unwrap_or_default();
                if tx.send(bytes).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    for p in producers {
        let _ = p.await;
    }
    let received = consumer.await.unwrap_or_default();
    received as f64 / started.elapsed().as_secs_f64()
}

/// The bus's figure; with `tracer`, every message is traced with it.
pub(crate) async fn bus(count: u64, tracer: Option<&SdkTracerProvider>) -> Result<f64, BoxError> {
    let transport =
        InMemoryTransport::with_options(InMemoryOptions { queue_capacity: 10_000, ..InMemoryOptions::default() });
    let consumed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let total = count / PRODUCERS * PRODUCERS;
    let (c, d) = (consumed.clone(), done.clone());
    let mut builder = Bus::builder(transport);
    if let Some(tracer) = tracer {
        builder = builder.tracer_provider(tracer);
    }
    let bus = builder
        .endpoint(Endpoint::new("bench-orders").prefetch(1000).concurrency_limit(64).handler(
            move |ctx: ConsumeContext<OrderPlaced>| {
                std::hint::black_box(ctx.message());
                if c.fetch_add(1, Ordering::Relaxed) + 1 == total {
                    d.notify_one();
                }
                async { Ok(()) }
            },
        ))
        .build();
    bus.start().await?;
    let started = Instant::now();
    let finished = done.notified();
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let bus = bus.clone();
        producers.push(tokio::spawn(async move {
            let order = Order::sample();
            for _ in 0..count / PRODUCERS {
                let message = OrderPlaced {
                    order_id: order.order_id,
                    user_email: order.user_email.clone(),
                    amount_cents: order.amount_cents,
                    note: order.note.clone(),
                };
                bus.publish(message).await?;
            }
            Ok::<_, bus_core::Error>(())
        }));
    }
    for p in producers {
        p.await??;
    }
    tokio::time::timeout(Duration::from_secs(300), finished).await?;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    bus.stop().await?;
    Ok(rate)
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    let raw = baseline(scale.inmemory).await;
    figure("inmemory.baseline.mpsc_serde_json", raw, "msg/s");
    let measured = bus(scale.inmemory, None).await?;
    figure("inmemory.bus.publish_consume", measured, "msg/s");
    compare("inmemory publish->consume (JSON envelope) vs mpsc+serde_json", measured, raw, "msg/s", Some(0.6));
    Ok(())
}
