//! The course's order saga, ported: website, orchestrator and inventory.
//!
//! ```text
//! cargo run --example order_saga                # all three in one process, in memory
//! cargo run --example order_saga -- all         # the same
//! AMQP_ADDR=amqp://guest:guest@127.0.0.1:5672/%2f REDIS_URL=redis://127.0.0.1:6379 \
//!   cargo run --example order_saga -- orchestrator   # or: inventory, website [email]
//! ```
//!
//! With `AMQP_ADDR` the bus runs on RabbitMQ, with `REDIS_URL` saga instances live in Redis
//! (key `OrderState:{orderId}`) and so do the orders' timeouts (a durable scheduler, keys
//! `OrderState:scheduled:*`); each program can be swapped with its .NET counterpart. An
//! order inventory has not answered after `ORDER_TIMEOUT_SECS` (30 by default) is cancelled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{BoxError, Bus, BusBuilder, Endpoint};
use bus_inmemory::{InMemoryScheduler, InMemoryTransport};
use bus_rabbitmq::RabbitMqTransport;
use bus_redis::{RedisScheduler, RedisSchedulerOptions};
use bus_saga::{InMemorySagaRepository, RedisSagaOptions, RedisSagaRepository, Saga, TransitionRecord};
use examples::order_saga::{
    order_state_machine_with, InventoryConsumer, NewOrderEvent, OrderState, DEFAULT_ORDER_TIMEOUT,
};
use uuid::Uuid;

async fn bus_builder(transport: &Option<RabbitMqTransport>, memory: &InMemoryTransport) -> BusBuilder {
    match transport {
        Some(rabbit) => Bus::builder(rabbit.clone()),
        None => Bus::builder(memory.clone()),
    }
}

fn print_transition(record: &TransitionRecord) {
    println!(
        "  [orchestrator] order {}: {} -> {}",
        &record.id.simple().to_string()[24..],
        record.begin_state,
        record.path.join(" -> ")
    );
}

/// How long an order may wait for inventory: `ORDER_TIMEOUT_SECS`, else 30 s.
fn order_timeout() -> Result<Duration, BoxError> {
    match std::env::var("ORDER_TIMEOUT_SECS") {
        Ok(secs) => Ok(Duration::from_secs(secs.parse().map_err(|e| format!("ORDER_TIMEOUT_SECS={secs}: {e}"))?)),
        Err(_) => Ok(DEFAULT_ORDER_TIMEOUT),
    }
}

/// Adds the orchestrator's saga endpoint and the scheduler of its timeouts, both on Redis
/// when `REDIS_URL` is set.
async fn with_orchestrator(
    builder: BusBuilder,
    hook: impl Fn(&TransitionRecord) + Send + Sync + 'static,
) -> Result<BusBuilder, BoxError> {
    let machine = order_state_machine_with(order_timeout()?, |m| m.on_transition(hook))?;
    Ok(match std::env::var("REDIS_URL") {
        Ok(url) => {
            let options = RedisSagaOptions { key_prefix: "OrderState".into(), ..RedisSagaOptions::default() };
            let repository = RedisSagaRepository::<OrderState>::connect(&url, options).await?;
            let scheduler_options =
                RedisSchedulerOptions { key_prefix: "OrderState:scheduled".into(), ..RedisSchedulerOptions::default() };
            let scheduler = RedisScheduler::connect(&url, scheduler_options).await?;
            builder.scheduler(scheduler).endpoint(Saga::new(machine, repository).endpoint())
        }
        Err(_) => builder
            .scheduler(InMemoryScheduler::new())
            .endpoint(Saga::new(machine, InMemorySagaRepository::new()).endpoint()),
    })
}

async fn run_until_ctrl_c(bus: Bus, what: &str) -> Result<(), BoxError> {
    bus.start().await?;
    println!("{what} running; Ctrl-C stops it");
    tokio::signal::ctrl_c().await?;
    bus.stop().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Traces go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, else print as a tree at exit.
    let _telemetry = bus_telemetry::init(env!("CARGO_BIN_NAME"))?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("all");
    let rabbit = match std::env::var("AMQP_ADDR") {
        Ok(address) => Some(RabbitMqTransport::connect(&address).await?),
        Err(_) => None,
    };
    let memory = InMemoryTransport::new();
    if rabbit.is_none() && command != "all" {
        return Err("website, orchestrator and inventory talk through RabbitMQ: set AMQP_ADDR".into());
    }
    match command {
        "website" => {
            let bus = bus_builder(&rabbit, &memory).await.build();
            let email = args.get(1).cloned().unwrap_or_else(|| "customer@example.com".into());
            let order_id = Uuid::now_v7();
            bus.publish(NewOrderEvent { order_id, user_email: email.clone() }).await?;
            println!("[website] published NewOrderEvent {order_id} for {email}");
        }
        "orchestrator" => {
            let bus = with_orchestrator(bus_builder(&rabbit, &memory).await, print_transition).await?.build();
            run_until_ctrl_c(bus, "orchestrator").await?;
        }
        "inventory" => {
            let bus = bus_builder(&rabbit, &memory)
                .await
                .endpoint(Endpoint::new("Inventory").consumer(InventoryConsumer::default()))
                .build();
            run_until_ctrl_c(bus, "inventory").await?;
        }
        "all" => run_all(&rabbit, &memory).await?,
        other => return Err(format!("unknown command `{other}`: use all, website, orchestrator or inventory").into()),
    }
    if let Some(rabbit) = rabbit {
        rabbit.close().await;
    }
    Ok(())
}

/// All three services in one process: two orders, one of which inventory cannot serve.
async fn run_all(rabbit: &Option<RabbitMqTransport>, memory: &InMemoryTransport) -> Result<(), BoxError> {
    println!(
        "order saga: website, orchestrator and inventory in one process (transport: {}, repository: {})\n",
        if rabbit.is_some() { "RabbitMQ" } else { "in-memory" },
        if std::env::var("REDIS_URL").is_ok() { "Redis" } else { "in-memory" }
    );
    let finished = Arc::new(Mutex::new(Vec::<TransitionRecord>::new()));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let recorder = finished.clone();
    let hook = move |record: &TransitionRecord| {
        print_transition(record);
        if record.path.last().map(String::as_str) == Some(bus_saga::FINAL) {
            if let Ok(mut finished) = recorder.lock() {
                finished.push(record.clone());
            }
            let _ = done_tx.send(());
        }
    };
    let inventory = InventoryConsumer::default();
    let inventory_endpoint = inventory.clone();
    let orchestrator = with_orchestrator(bus_builder(rabbit, memory).await, hook).await?;
    let bus = orchestrator.endpoint(Endpoint::new("Inventory").consumer(inventory_endpoint)).build();
    bus.start().await?;

    let (available, unavailable) = (Uuid::now_v7(), Uuid::now_v7());
    inventory.mark_unavailable(unavailable);
    for (order_id, email) in [(available, "ann@example.com"), (unavailable, "bob@example.com")] {
        println!("[website] {email} orders {}", &order_id.simple().to_string()[24..]);
        bus.publish(NewOrderEvent { order_id, user_email: email.into() }).await?;
    }
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), done_rx.recv()).await?;
    }
    bus.stop().await?;
    let finished = finished.lock().map(|f| f.clone()).unwrap_or_default();
    println!("\ndone: {} orders finalized (accepted and cancelled), instances deleted", finished.len());
    Ok(())
}
