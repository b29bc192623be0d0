//! Resident memory, each figure in a fresh child process: an idle bus against its number of
//! endpoints (1, 10, 100; in memory and on RabbitMQ), and the peak against the messages
//! waiting in the in-memory transport (up to 1,000,000).

use std::process::Command;
use std::time::Duration;

use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::{InMemoryOptions, InMemoryTransport};
use serde::{Deserialize, Serialize};

use crate::report::{figure, point};
use crate::Scale;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Bench:Waiting")]
struct Waiting {
    n: u64,
    note: String,
}

/// A line of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or_default()
}

/// An idle bus with `endpoints` endpoints on `builder`'s transport, started and settled.
async fn idle(builder: bus_core::BusBuilder, endpoints: u64, prefix: &str) -> Result<Bus, BoxError> {
    let bus = (0..endpoints)
        .fold(builder, |builder, i| {
            builder
                .endpoint(Endpoint::new(format!("{prefix}-{i}")).handler(|_: ConsumeContext<Waiting>| async { Ok(()) }))
        })
        .build();
    bus.start().await?;
    // Let the runtime settle into its idle state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(bus)
}

/// Runs in the child: prints `rss_kib peak_kib`. `count` is the endpoints of an idle bus,
/// or the messages of a backlog.
pub(crate) fn child(mode: &str, count: u64) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let capacity = usize::try_from(count).unwrap_or(usize::MAX).max(1);
        let transport =
            InMemoryTransport::with_options(InMemoryOptions { queue_capacity: capacity, full_queue_wait: None });
        let mut bus = Bus::builder(transport.clone()).build();
        if mode == "idle" {
            bus = idle(Bus::builder(transport.clone()), count, "idle").await?;
        } else if mode == "idle-lapin" {
            // The baseline: raw lapin holding what the bus holds on RabbitMQ (a publishing and
            // a consuming connection, a channel and a consumer per endpoint), nothing else.
            return idle_lapin(count).await;
        } else if mode == "idle-rabbitmq" {
            let transport = bus_rabbitmq::RabbitMqTransport::connect(&crate::rabbitmq::address()).await?;
            let prefix = format!("bench-idle-{}", uuid::Uuid::now_v7().simple());
            let rabbit = idle(Bus::builder(transport.clone()), count, &prefix).await?;
            print_memory();
            rabbit.stop().await?;
            transport.close().await;
            let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
            crate::rabbitmq::delete_endpoints(&names).await?;
            return Ok(());
        } else {
            // A backlog: a declared endpoint nobody consumes, filled to its limit, then one more.
            use bus_core::Transport;
            let topology = bus_core::EndpointTopology {
                queue: "backlog".into(),
                message_types: vec![Waiting::message_type().into()],
                ..Default::default()
            };
            transport.declare(&topology).await?;
            for n in 0..count {
                bus.publish(Waiting { n, note: "x".repeat(180) }).await?;
            }
            let over = bus.publish(Waiting { n: count, note: String::new() }).await;
            if over.is_ok() {
                return Err("a full queue took one more message".into());
            }
        }
        print_memory();
        drop(bus);
        Ok::<_, BoxError>(())
    })
}

async fn idle_lapin(endpoints: u64) -> Result<(), BoxError> {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    let address = crate::rabbitmq::address();
    let properties = lapin::ConnectionProperties::default;
    let publishing = lapin::Connection::connect(&address, properties()).await?;
    let consuming = lapin::Connection::connect(&address, properties()).await?;
    let publisher = publishing.create_channel().await?;
    let mut consumers = Vec::new();
    for _ in 0..endpoints {
        let channel = consuming.create_channel().await?;
        let options = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
        let queue = channel.queue_declare("".into(), options, lapin::types::FieldTable::default()).await?;
        let consumer = channel
            .basic_consume(
                queue.name().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await?;
        consumers.push((channel, consumer));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    print_memory();
    drop(consumers);
    drop(publisher);
    let _ = consuming.close(200, "done".into()).await;
    let _ = publishing.close(200, "done".into()).await;
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_memory() {
    println!("{} {}", status_kib("VmRSS:"), status_kib("VmHWM:"));
}

fn spawn(mode: &str, count: u64) -> Result<(f64, f64), BoxError> {
    let output = Command::new(std::env::current_exe()?).args(["__memory", mode, &count.to_string()]).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text.split_whitespace().filter_map(|v| v.parse::<f64>().ok());
    match (fields.next(), fields.next()) {
        (Some(rss), Some(peak)) => Ok((rss / 1024.0, peak / 1024.0)),
        _ => Err(format!("memory child failed: {}", String::from_utf8_lossy(&output.stderr)).into()),
    }
}

pub(crate) fn run(scale: Scale) -> Result<(), BoxError> {
    for endpoints in [1, 10, 100] {
        let (memory, _) = spawn("idle", endpoints)?;
        figure(&format!("memory.idle_bus_{endpoints}_endpoints.inmemory.rss"), memory, "MiB");
        point("memory-endpoints", "in memory", endpoints as f64, memory);
        let (rabbit, _) = spawn("idle-rabbitmq", endpoints)?;
        figure(&format!("memory.idle_bus_{endpoints}_endpoints.rabbitmq.rss"), rabbit, "MiB");
        point("memory-endpoints", "RabbitMQ", endpoints as f64, rabbit);
        let (lapin, _) = spawn("idle-lapin", endpoints)?;
        figure(&format!("memory.idle_lapin_{endpoints}_consumers.rss"), lapin, "MiB");
        point("memory-endpoints", "raw lapin, same connections", endpoints as f64, lapin);
    }
    for backlog in [scale.inmemory / 100, scale.inmemory / 10, scale.inmemory] {
        let (_, peak) = spawn("backlog", backlog)?;
        figure(&format!("memory.backlog_{backlog}_messages.peak_rss"), peak, "MiB");
        figure(
            &format!("memory.backlog_{backlog}_messages.per_message"),
            peak * 1024.0 * 1024.0 / backlog as f64,
            "bytes/msg",
        );
        point("memory-backlog", "peak RSS", backlog as f64, peak);
    }
    Ok(())
}
