//! Failure handling: retries, delayed redelivery, the error queue, a fault, a skipped
//! message, and an unreadable one. Runs on the in-memory transport, or on RabbitMQ when
//! `AMQP_ADDR` is set (it empties `payments_error` and `payments_skipped` first). Exits by itself.
//!
//! ```text
//! cargo run --example failures
//! AMQP_ADDR=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example failures
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::{
    BoxError, Bus, ConsumeContext, Endpoint, Fault, Message, RedeliveryPolicy, Transport, TransportMessage,
};
use bus_inmemory::InMemoryTransport;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Shop:ChargeCard")]
struct ChargeCard {
    order_id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Shop:Unwanted")]
struct Unwanted;

const WAIT: Duration = Duration::from_secs(10);

/// Where the example looks into queues: the in-memory broker, or a channel of its own on RabbitMQ.
enum Queues {
    InMemory(InMemoryTransport),
    RabbitMq(lapin::Channel),
}

impl Queues {
    /// Waits (up to `WAIT`) until `queue` holds a message, and takes it.
    async fn take_one(&self, queue: &str) -> Result<TransportMessage, BoxError> {
        match self {
            Queues::InMemory(transport) => {
                transport.wait_for_queue_len(queue, 1, WAIT).await?;
                transport.drain(queue).into_iter().next().ok_or_else(|| format!("{queue} is empty").into())
            }
            Queues::RabbitMq(channel) => {
                let deadline = tokio::time::Instant::now() + WAIT;
                let mut poll = tokio::time::interval(Duration::from_millis(50));
                loop {
                    poll.tick().await;
                    let options = lapin::options::BasicGetOptions { no_ack: true };
                    if let Some(got) = channel.basic_get(queue.into(), options).await? {
                        let delivery = got.delivery;
                        return Ok(bus_rabbitmq::testing::transport_message(delivery.data, &delivery.properties));
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(format!("nothing reached {queue} within {WAIT:?}").into());
                    }
                }
            }
        }
    }

    /// Empties what earlier runs left in `queue`.
    async fn empty(&self, queue: &str) -> Result<(), BoxError> {
        match self {
            Queues::InMemory(transport) => drop(transport.drain(queue)),
            Queues::RabbitMq(channel) => {
                channel.queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default()).await?;
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into())).init();
    match std::env::var("AMQP_ADDR") {
        Ok(address) => {
            let transport = bus_rabbitmq::RabbitMqTransport::connect(&address).await?;
            println!("failures (transport: RabbitMQ at {})\n", transport.address_redacted());
            let inspector = lapin::Connection::connect(&address, lapin::ConnectionProperties::default()).await?;
            let queues = Queues::RabbitMq(inspector.create_channel().await?);
            let result = run(transport.clone(), queues).await;
            transport.close().await;
            let _ = inspector.close(200, "done".into()).await;
            result
        }
        Err(_) => {
            println!("failures (transport: in-memory; set AMQP_ADDR for RabbitMQ)\n");
            let transport = InMemoryTransport::new();
            run(transport.clone(), Queues::InMemory(transport)).await
        }
    }
}

async fn run(transport: impl Transport + Clone, queues: Queues) -> Result<(), BoxError> {
    let attempts = Arc::new(AtomicU32::new(0));
    let (fault_tx, mut fault_rx) = mpsc::unbounded_channel();

    let counter = attempts.clone();
    let bus = Bus::builder(transport.clone())
        .endpoint(
            Endpoint::new("payments")
                .retry(RetryPolicy::intervals([Duration::from_millis(50), Duration::from_millis(100)]))
                .redelivery(RedeliveryPolicy::intervals([Duration::from_millis(300)]))
                .handler(move |ctx: ConsumeContext<ChargeCard>| {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    println!(
                        "  attempt {n}: order {} (retry {}, redelivery {}) -> card gateway down",
                        ctx.message().order_id,
                        ctx.retry_attempt(),
                        ctx.redelivery_count()
                    );
                    async { Err::<(), BoxError>("card gateway timed out".into()) }
                }),
        )
        .endpoint(Endpoint::new("payment-faults").handler_with_state(
            fault_tx,
            |ctx: ConsumeContext<Fault<ChargeCard>>, fault_tx| async move {
                fault_tx.send(ctx.into_message())?;
                Ok(())
            },
        ))
        .build();
    bus.start().await?;
    queues.empty("payments_error").await?;
    queues.empty("payments_skipped").await?;

    println!("1. A consumer that always fails: 2 retries in process, then 1 delayed redelivery.");
    bus.send("queue:payments", ChargeCard { order_id: 7 }).await?;
    let failed = queues.take_one("payments_error").await?;
    let fault = tokio::time::timeout(WAIT, fault_rx.recv()).await?.ok_or("fault channel closed")?;
    println!("   {} attempts in all (3 per delivery x 2 deliveries).", attempts.load(Ordering::SeqCst));
    println!("   payments_error holds the original message with:");
    for name in
        ["MT-Reason", "MT-Fault-ExceptionType", "MT-Fault-Message", "MT-Fault-RetryCount", "MT-Redelivery-Count"]
    {
        let value = failed.headers.get(name).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
        println!("     {name}: {}", value.unwrap_or_default());
    }
    println!(
        "   one Fault<ChargeCard> was published: order {}, \"{}\"\n",
        fault.message.order_id, fault.exceptions[0].message
    );

    println!("2. A message nobody on the endpoint consumes goes to payments_skipped.");
    bus.send("queue:payments", Unwanted).await?;
    let skipped = queues.take_one("payments_skipped").await?;
    println!("   MT-Reason: {}\n", skipped.headers.get_str("MT-Reason").unwrap_or_default());

    println!("3. A message that is not JSON goes straight to payments_error, never retried.");
    let garbage = TransportMessage {
        body: "{not json".into(),
        content_type: Some("application/vnd.masstransit+json".into()),
        ..Default::default()
    };
    transport.send("payments", garbage).await?;
    let unreadable = queues.take_one("payments_error").await?;
    println!("   reason: {}\n", unreadable.headers.get_str("MT-Fault-Message").unwrap_or_default());

    bus.stop().await?;
    println!("done: nothing lost; every failure is in a known place with its reason.");
    Ok(())
}
