//! bus-bench: every path of the bus measured against its raw baseline in the same run.
//!
//! ```text
//! cargo run --release -p bus-bench                 # everything
//! cargo run --release -p bus-bench -- inmemory saga outbox
//! cargo run --release -p bus-bench -- instances   # 1, 2, 3 processes; one node and a cluster
//! cargo run --release -p bus-bench -- --smoke      # a few hundred messages each (CI)
//! cargo run --release -p bus-bench -- all --chart docs/performance.svg   # and every chart
//! cargo run --release -p bus-bench -- scaling --curves docs                # the curves of some
//! ```
//!
//! Prints one `name value unit` line per figure, then a table of ratios.

mod counting;
mod flow;
mod inmemory;
mod instances;
mod latency;
mod memory;
mod outbox;
mod peers;
mod rabbitmq;
mod report;
mod saga;
mod scaling;
mod scheduler;
mod serializers;
mod telemetry;

use std::time::Duration;

/// Every scenario, bus and baseline alike, runs on mimalloc: with glibc's allocator the
/// threads of a run spend much of their time waiting on its arena locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale {
    pub(crate) inmemory: u64,
    pub(crate) rabbitmq: u64,
    pub(crate) saga_events: u64,
    /// Saga instances stored, for the curve of transitions against them.
    pub(crate) saga_instances: [u64; 3],
    pub(crate) serializer_rounds: u64,
    pub(crate) outbox: u64,
    /// Messages per round of the peer comparison.
    pub(crate) peers: u64,
    pub(crate) scheduled: u64,
    pub(crate) duration: Duration,
}

impl Scale {
    fn full() -> Self {
        Scale {
            inmemory: std::env::var("BENCH_INMEMORY").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000_000),
            rabbitmq: std::env::var("BENCH_RABBITMQ").ok().and_then(|n| n.parse().ok()).unwrap_or(50_000),
            saga_events: 20_000,
            saga_instances: [1_000, 100_000, 1_000_000],
            serializer_rounds: 500_000,
            outbox: 5_000,
            peers: 20_000,
            scheduled: 100_000,
            duration: Duration::from_secs(5),
        }
    }

    fn smoke() -> Self {
        Scale {
            inmemory: 500,
            rabbitmq: 300,
            saga_events: 200,
            saga_instances: [100, 1_000, 10_000],
            serializer_rounds: 500,
            outbox: 100,
            peers: 300,
            scheduled: 300,
            duration: Duration::from_millis(300),
        }
    }
}

#[allow(clippy::print_stdout)]
fn main() -> Result<(), bus_core::BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__memory") {
        let mode = args.get(1).map(String::as_str).unwrap_or("idle");
        let messages = args.get(2).and_then(|m| m.parse().ok()).unwrap_or(0);
        return memory::child(mode, messages);
    }
    if args.first().map(String::as_str) == Some("__worker") {
        return instances::worker(&args[1..]);
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let value_of = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str);
    let (chart_path, curves_dir) = (value_of("--chart"), value_of("--curves"));
    let mut chosen: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--") && Some(*a) != chart_path && Some(*a) != curves_dir)
        .collect();
    if chosen.is_empty() || chosen.contains(&"all") {
        chosen = vec![
            "serializers",
            "inmemory",
            "tracing",
            "rabbitmq",
            "peers",
            "latency",
            "saga",
            "outbox",
            "scheduler",
            "flow",
            "scaling",
            "instances",
            "memory",
        ];
    }
    let scale = if smoke { Scale::smoke() } else { Scale::full() };
    if cfg!(debug_assertions) && !smoke {
        println!("warning: a debug build; run with --release for real figures");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for scenario in chosen {
        match scenario {
            "serializers" => serializers::run(scale),
            "inmemory" => runtime.block_on(inmemory::run(scale))?,
            // Runs its own single-thread runtimes, with and without a subscriber.
            "tracing" => telemetry::run(scale, &runtime)?,
            "rabbitmq" => runtime.block_on(rabbitmq::run(scale))?,
            "peers" => runtime.block_on(peers::run_peers(scale))?,
            "saga" => runtime.block_on(saga::run(scale))?,
            "latency" => runtime.block_on(latency::run(scale))?,
            "outbox" => runtime.block_on(outbox::run(scale))?,
            "scheduler" => runtime.block_on(scheduler::run(scale))?,
            "flow" => runtime.block_on(flow::run(scale))?,
            "instances" => runtime.block_on(instances::run(scale))?,
            "scaling" => runtime.block_on(scaling::run(scale))?,
            "memory" => memory::run(scale)?,
            other => {
                return Err(format!(
                    "unknown scenario `{other}`: serializers, inmemory, tracing, rabbitmq, peers, latency, saga, outbox, scheduler, flow, scaling, instances, memory, all"
                )
                .into())
            }
        }
    }
    report::table();
    if let Some(path) = chart_path {
        let path = std::path::Path::new(path);
        report::chart(path)?;
        println!("chart written to {}", path.display());
        for curve in report::curves(path.parent().unwrap_or(std::path::Path::new(".")))? {
            println!("chart written to {curve}");
        }
    } else if let Some(dir) = curves_dir {
        for curve in report::curves(std::path::Path::new(dir))? {
            println!("chart written to {curve}");
        }
    }
    Ok(())
}
