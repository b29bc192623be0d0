//! Failure handling on the in-memory transport: retries, delayed redelivery, the error
//! queue, a fault, a skipped message, and an unreadable one. Exits by itself.
//!
//! ```text
//! cargo run --example failures
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::{BoxError, Bus, ConsumeContext, Fault, Message, RedeliveryPolicy, Transport, TransportMessage};
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

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into())).init();
    let transport = InMemoryTransport::new();
    let attempts = Arc::new(AtomicU32::new(0));
    let (fault_tx, mut fault_rx) = mpsc::unbounded_channel();

    let counter = attempts.clone();
    let bus = Bus::builder(transport.clone())
        .receive_endpoint("payments", move |e| {
            e.retry(RetryPolicy::intervals([Duration::from_millis(50), Duration::from_millis(100)]))
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
                });
        })
        .receive_endpoint("payment-faults", move |e| {
            e.handler(move |ctx: ConsumeContext<Fault<ChargeCard>>| {
                let fault_tx = fault_tx.clone();
                async move {
                    fault_tx.send(ctx.into_message())?;
                    Ok::<_, BoxError>(())
                }
            });
        })
        .build();
    bus.start().await?;

    println!("1. A consumer that always fails: 2 retries in process, then 1 delayed redelivery.");
    bus.send("queue:payments", ChargeCard { order_id: 7 }).await?;
    transport.wait_for_queue_len("payments_error", 1, WAIT).await?;
    let fault = tokio::time::timeout(WAIT, fault_rx.recv()).await?.ok_or("fault channel closed")?;
    println!("   {} attempts in all (3 per delivery x 2 deliveries).", attempts.load(Ordering::SeqCst));
    let failed = &transport.peek("payments_error")[0];
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
    transport.wait_for_queue_len("payments_skipped", 1, WAIT).await?;
    let skipped = &transport.peek("payments_skipped")[0];
    println!("   MT-Reason: {}\n", skipped.headers.get_str("MT-Reason").unwrap_or_default());

    println!("3. A message that is not JSON goes straight to payments_error, never retried.");
    let garbage = TransportMessage {
        body: "{not json".into(),
        content_type: Some("application/vnd.masstransit+json".into()),
        ..Default::default()
    };
    transport.send("payments", garbage).await?;
    transport.wait_for_queue_len("payments_error", 2, WAIT).await?;
    let unreadable = &transport.peek("payments_error")[1];
    println!("   reason: {}\n", unreadable.headers.get_str("MT-Fault-Message").unwrap_or_default());

    bus.stop().await?;
    println!("done: nothing lost; every failure is in a known place with its reason.");
    Ok(())
}
