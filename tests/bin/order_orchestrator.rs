//! The order saga's orchestrator as a service of its own, on RabbitMQ with its instances and
//! timeouts in Redis: the process the timeout's kill test starts, kills with SIGKILL and
//! starts again (`tests/tests/order_saga_timeout.rs`).
//!
//! Usage: `order-orchestrator <amqp uri> <redis url> <key prefix> <timeout ms>`. Prints
//! `ready` once consuming, then `consumed <urn> <message id>` for every message its saga
//! endpoint consumed. Finalized instances are kept, so the test can read their reason.

use std::time::Duration;

use bus_core::{BoxError, Bus, BusObserver, Envelope};
use bus_rabbitmq::RabbitMqTransport;
use bus_redis::{RedisScheduler, RedisSchedulerOptions};
use bus_saga::{RedisSagaOptions, RedisSagaRepository, Saga};
use examples::order_saga::{order_state_machine_with, OrderState};

/// Prints what the saga's endpoint consumed, one line each.
struct PrintConsumed;

impl BusObserver for PrintConsumed {
    fn on_consumed(&self, endpoint: &str, _consumer_type: &str, envelope: &Envelope) {
        if endpoint == "OrderState" {
            let urn = envelope.message_type.first().map(String::as_str).unwrap_or("");
            let id = envelope.message_id.map(|id| id.to_string()).unwrap_or_default();
            println!("consumed {urn} {id}");
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [amqp, redis, prefix, timeout_ms] = args.as_slice() else {
        return Err("usage: order-orchestrator <amqp uri> <redis url> <key prefix> <timeout ms>".into());
    };
    let timeout = Duration::from_millis(timeout_ms.parse()?);
    let machine = order_state_machine_with(timeout, |m| m.completed_when_finalized(false))?;
    let options = RedisSagaOptions { key_prefix: prefix.clone(), ..RedisSagaOptions::default() };
    let repository = RedisSagaRepository::<OrderState>::connect(redis, options).await?;
    let scheduler_options =
        RedisSchedulerOptions { key_prefix: format!("{prefix}:scheduled"), ..RedisSchedulerOptions::default() };
    let scheduler = RedisScheduler::connect(redis, scheduler_options).await?;
    let transport = RabbitMqTransport::connect(amqp).await?;
    let bus = Bus::builder(transport)
        .observer(PrintConsumed)
        .scheduler(scheduler)
        .endpoint(Saga::new(machine, repository).endpoint())
        .build();
    bus.start().await?;
    println!("ready");
    // Runs until killed, or until its stdin closes (the test is gone).
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
    bus.stop().await?;
    Ok(())
}
