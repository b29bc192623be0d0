//! The course's MassTransit producer/consumer, in Rust.
//!
//! MicroserviceA publishes `NewOrderEvent`s; a consumer logs who ordered. For each order,
//! MicroserviceA then asks MicroserviceB for a payment result (request/response).
//!
//! Runs on the in-memory transport, or on RabbitMQ when `AMQP_ADDR` is set; exits by itself.
//! Ctrl-C stops it gracefully.
//!
//! ```text
//! cargo run --example orders
//! AMQP_ADDR=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example orders
//! ```

use std::time::Duration;

use bus_core::{BoxError, Bus, ConsumeContext, Consumer, Endpoint, Message, Transport};
use bus_inmemory::InMemoryTransport;
use bus_rabbitmq::RabbitMqTransport;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Published by MicroserviceA when a customer orders; same URN as the .NET course's shared contract.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:DistributedAppWithMassTransitShared:NewOrderEvent")]
struct NewOrderEvent {
    user_email: String,
    created: DateTime<Utc>,
}

/// MicroserviceA asks MicroserviceB to charge an order.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:DistributedAppWithMassTransitShared:PaymentRequest")]
struct PaymentRequest {
    user_email: String,
    amount_cents: u64,
}

/// MicroserviceB's answer.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:DistributedAppWithMassTransitShared:PaymentResult")]
struct PaymentResult {
    approved: bool,
    reason: String,
}

/// Logs every new order; tells the demo when it has seen one.
struct NewOrderConsumer {
    seen: mpsc::UnboundedSender<String>,
}

impl Consumer<NewOrderEvent> for NewOrderConsumer {
    async fn consume(&self, ctx: ConsumeContext<NewOrderEvent>) -> Result<(), BoxError> {
        let order = ctx.message();
        println!(
            "  [NewOrderConsumer] {} placed an order at {} (message {})",
            order.user_email,
            order.created.format("%H:%M:%S"),
            short(ctx.message_id())
        );
        self.seen.send(order.user_email.clone())?;
        Ok(())
    }
}

/// MicroserviceB: approves payments up to a limit.
struct PaymentConsumer {
    limit_cents: u64,
}

impl Consumer<PaymentRequest> for PaymentConsumer {
    async fn consume(&self, ctx: ConsumeContext<PaymentRequest>) -> Result<(), BoxError> {
        let request = ctx.message();
        let approved = request.amount_cents <= self.limit_cents;
        println!(
            "  [MicroserviceB] charging {} for {}: {}",
            money(request.amount_cents),
            request.user_email,
            if approved { "approved" } else { "declined" }
        );
        let reason = if approved { "ok".to_owned() } else { format!("over the {} limit", money(self.limit_cents)) };
        ctx.respond(PaymentResult { approved, reason }).await?;
        Ok(())
    }
}

fn money(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn short(id: Option<uuid::Uuid>) -> String {
    // The tail of a v7 id is random; its head is the timestamp, alike for messages sent together.
    id.map(|id| id.simple().to_string()[24..].to_owned()).unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Traces go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, else print as a tree at exit.
    let _telemetry = bus_telemetry::init(env!("CARGO_BIN_NAME"))?;
    match std::env::var("AMQP_ADDR") {
        Ok(address) => {
            let transport = RabbitMqTransport::connect(&address).await?;
            println!(
                "orders: a MassTransit-compatible bus in Rust (transport: RabbitMQ at {})\n",
                transport.address_redacted()
            );
            let result = run(transport.clone()).await;
            transport.close().await;
            result
        }
        Err(_) => {
            println!(
                "orders: a MassTransit-compatible bus in Rust (transport: in-memory; set AMQP_ADDR for RabbitMQ)\n"
            );
            run(InMemoryTransport::new()).await
        }
    }
}

async fn run(transport: impl Transport) -> Result<(), BoxError> {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let bus = Bus::builder(transport)
        // Endpoint names come from the consumer types, as in MassTransit: `NewOrder`, `Payment`.
        .endpoint(Endpoint::for_consumer(NewOrderConsumer { seen: seen_tx }))
        .endpoint(Endpoint::for_consumer(PaymentConsumer { limit_cents: 10_000 }))
        .request_timeout(Duration::from_secs(5))
        .build();
    bus.start().await?;

    let demo = async {
        let orders = [("ann@example.com", 2_500), ("bob@example.com", 12_000), ("cleo@example.com", 9_900)];
        for (email, amount_cents) in orders {
            println!("[MicroserviceA] publishing NewOrderEvent for {email}");
            bus.publish(NewOrderEvent { user_email: email.to_owned(), created: Utc::now() }).await?;
            // The queue may hold orders this run did not publish (left by an earlier run, or
            // from another service on the same broker): they are consumed too.
            loop {
                let consumed = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await?;
                match consumed {
                    Some(seen) if seen == email => break,
                    Some(other) => println!("  (also consumed an order this run did not publish, for {other})"),
                    None => return Err("the NewOrder consumer stopped".into()),
                }
            }

            println!("[MicroserviceA] asking MicroserviceB to charge {} for {email}", money(amount_cents));
            let payment = PaymentRequest { user_email: email.to_owned(), amount_cents };
            let result = bus.request::<PaymentRequest, PaymentResult>(payment).await?;
            let result = result.message();
            println!(
                "[MicroserviceA] payment for {email}: {}\n",
                if result.approved { "approved".to_owned() } else { format!("declined ({})", result.reason) }
            );
        }
        Ok::<_, BoxError>(orders.len())
    };

    let outcome = tokio::select! {
        outcome = demo => Some(outcome),
        _ = tokio::signal::ctrl_c() => None,
    };
    bus.stop().await?;
    match outcome {
        Some(Ok(count)) => println!("done: {count} orders published, consumed and paid for; bus stopped cleanly"),
        Some(Err(error)) => return Err(error),
        None => println!("interrupted: bus stopped cleanly"),
    }
    Ok(())
}
