//! The course's rate-limiting sample, in Rust: MicroserviceA publishes a burst of
//! `NewOrderEvent`s, and the consumer takes at most 5 a second (MassTransit's
//! `UseRateLimit(5, TimeSpan.FromSeconds(1))`), however many wait in its queue. The rest
//! wait in the queue, not in the consumer's memory.
//!
//! Runs on the in-memory transport, or on RabbitMQ when `AMQP_ADDR` is set; exits by itself.
//!
//! ```text
//! cargo run --example rate_limit
//! AMQP_ADDR=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example rate_limit
//! ```

use std::time::Duration;

use bus_core::{BoxError, Bus, BusBuilder, ConsumeContext, Endpoint, Message, RateLimit};
use bus_inmemory::InMemoryTransport;
use bus_rabbitmq::RabbitMqTransport;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Published by MicroserviceA when a customer orders; same URN as the .NET course's shared contract.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:DistributedAppWithMassTransitShared:NewOrderEvent")]
struct NewOrderEvent {
    user_email: String,
}

const ORDERS: usize = 10;
const PER_SECOND: u32 = 5;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (builder, transport): (BusBuilder, &str) = match std::env::var("AMQP_ADDR") {
        Ok(addr) => (Bus::builder(RabbitMqTransport::connect(&addr).await?), "RabbitMQ"),
        Err(_) => (Bus::builder(InMemoryTransport::new()), "in-memory"),
    };
    println!("rate limit: at most {PER_SECOND} orders a second (transport: {transport})");
    let started = Instant::now();
    let (consumed, mut orders) = mpsc::unbounded_channel();
    // Temporary: the queue goes with the example, so a second run starts empty.
    let new_orders = Endpoint::new(format!("new-order-rate-limited-{}", std::process::id()))
        .temporary()
        .rate_limit(RateLimit::new(PER_SECOND, Duration::from_secs(1)))
        .handler_with_state(consumed, move |ctx: ConsumeContext<NewOrderEvent>, consumed| async move {
            let elapsed = started.elapsed().as_secs_f64();
            println!("  {elapsed:5.2} s  order from {}", ctx.message().user_email);
            consumed.send(())?;
            Ok(())
        });
    let bus = builder.endpoint(new_orders).build();
    bus.start().await?;
    for n in 0..ORDERS {
        bus.publish(NewOrderEvent { user_email: format!("customer{n}@example.com") }).await?;
    }
    for _ in 0..ORDERS {
        tokio::time::timeout(Duration::from_secs(30), orders.recv()).await?.ok_or("the consumer stopped")?;
    }
    let took = started.elapsed().as_secs_f64();
    bus.stop().await?;
    println!("consumed {ORDERS} orders in {took:.2} s: at most {PER_SECOND} a second");
    Ok(())
}
