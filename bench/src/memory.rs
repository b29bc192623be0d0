//! Resident memory: an idle bus with 10 endpoints, and the peak while 1,000,000 messages wait
//! in the in-memory transport. Each is measured in a fresh child process.

use std::process::Command;
use std::time::Duration;

use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::{InMemoryOptions, InMemoryTransport};
use serde::{Deserialize, Serialize};

use crate::report::figure;
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

/// Runs in the child: prints `rss_kib peak_kib`.
pub(crate) fn child(mode: &str, messages: u64) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let capacity = usize::try_from(messages).unwrap_or(usize::MAX).max(1);
        let transport =
            InMemoryTransport::with_options(InMemoryOptions { queue_capacity: capacity, full_queue_wait: None });
        let mut builder = Bus::builder(transport.clone());
        for i in 0..10 {
            builder = builder
                .endpoint(Endpoint::new(format!("idle-{i}")).handler(|_: ConsumeContext<Waiting>| async { Ok(()) }));
        }
        let bus = builder.build();
        if mode == "idle" {
            bus.start().await?;
            // Let the runtime settle into its idle state.
            tokio::time::sleep(Duration::from_millis(500)).await;
        } else {
            // A backlog: a declared endpoint nobody consumes, filled to its limit, then one more.
            use bus_core::Transport;
            let topology = bus_core::EndpointTopology {
                queue: "backlog".into(),
                message_types: vec![Waiting::message_type().into()],
                ..Default::default()
            };
            transport.declare(&topology).await?;
            for n in 0..messages {
                bus.publish(Waiting { n, note: "x".repeat(180) }).await?;
            }
            let over = bus.publish(Waiting { n: messages, note: String::new() }).await;
            if over.is_ok() {
                return Err("a full queue took one more message".into());
            }
        }
        #[allow(clippy::print_stdout)]
        {
            println!("{} {}", status_kib("VmRSS:"), status_kib("VmHWM:"));
        }
        Ok::<_, BoxError>(())
    })
}

fn spawn(mode: &str, messages: u64) -> Result<(f64, f64), BoxError> {
    let output = Command::new(std::env::current_exe()?).args(["__memory", mode, &messages.to_string()]).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text.split_whitespace().filter_map(|v| v.parse::<f64>().ok());
    match (fields.next(), fields.next()) {
        (Some(rss), Some(peak)) => Ok((rss / 1024.0, peak / 1024.0)),
        _ => Err(format!("memory child failed: {}", String::from_utf8_lossy(&output.stderr)).into()),
    }
}

pub(crate) fn run(scale: Scale) -> Result<(), BoxError> {
    let (idle, _) = spawn("idle", 0)?;
    figure("memory.idle_bus_10_endpoints.rss", idle, "MiB");
    let backlog = scale.inmemory;
    let (_, peak) = spawn("backlog", backlog)?;
    figure(&format!("memory.backlog_{backlog}_messages.peak_rss"), peak, "MiB");
    figure("memory.backlog.per_message", peak * 1024.0 * 1024.0 / backlog as f64, "bytes/msg");
    Ok(())
}
