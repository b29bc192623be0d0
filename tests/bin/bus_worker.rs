//! One instance of a service that shares an endpoint with others: the worker of the
//! many-instances tests (`tests/tests/many_instances.rs`) and of `bus-bench -- instances`.
//!
//! Usage: `bus-worker <amqp address> <queue> <record file>`. It consumes `Work` on `queue`,
//! appending `n redelivered` to the record file before the message is acknowledged (so a
//! line may outlive an acknowledgement that never happened, never the reverse), and answers
//! `Quote` requests with its process id. It prints `ready` once it consumes, and stops
//! gracefully when its standard input closes.

use std::io::Write;
use std::sync::{Arc, Mutex};

use bus_core::{Bus, ConsumeContext, Endpoint};
use bus_rabbitmq::RabbitMqTransport;
use tests::instances::{Quote, Quoted, Work};

/// A unit of work (the tests' `Work`).

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), bus_core::BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [address, queue, record] = args.as_slice() else {
        return Err("usage: bus-worker <amqp address> <queue> <record file>".into());
    };
    let file = std::fs::OpenOptions::new().create(true).append(true).open(record)?;
    // Unbuffered: each line is one write, in the file before the message is acknowledged.
    let file = Arc::new(Mutex::new(file));
    let transport = RabbitMqTransport::connect(address).await?;
    let endpoint = Endpoint::new(queue)
        .handler(move |ctx: ConsumeContext<Work>| {
            let line = format!("{} {}\n", ctx.message().n, u8::from(ctx.redelivered()));
            let written = file
                .lock()
                .map_err(|_| "record file lock poisoned")
                .and_then(|mut file| file.write_all(line.as_bytes()).map_err(|_| "cannot write the record file"));
            async move { written.map_err(Into::into) }
        })
        .handler(|ctx: ConsumeContext<Quote>| async move {
            ctx.respond(Quoted { n: ctx.message().n, process: std::process::id() }).await?;
            Ok(())
        });
    let bus = Bus::builder(transport).endpoint(endpoint).build();
    bus.start().await?;
    println!("ready");
    // Until the test (or the benchmark) closes standard input.
    let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await;
    bus.stop().await?;
    Ok(())
}
