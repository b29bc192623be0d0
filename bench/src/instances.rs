//! Many instances: one, two and three bus processes (this binary, as `__worker`) draining one
//! endpoint's backlog, on the single local node (classic queue) and on a three-node cluster
//! of throwaway nodes (quorum queue, the workers connected to different nodes). Each figure
//! is beside one process's from the same run.
//!
//! This machine has two cores, shared by the broker (or the cluster's three nodes) and the
//! workers: more processes cannot add cores, so the figures show what sharing costs or
//! gains here, not how a real cluster scales.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus, ConsumeContext, Endpoint};
use bus_rabbitmq::{QueueSettings, RabbitMqOptions, RabbitMqTransport};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::rabbitmq::{address, bus_publish, delete_endpoints, Shipment};
use crate::report::{compare, figure};
use crate::Scale;

/// Transport options with `queue` declared as `kind` (`classic` or `quorum`).
fn options(queue: &str, kind: &str) -> RabbitMqOptions {
    match kind {
        "quorum" => RabbitMqOptions::default().endpoint_queue(queue, QueueSettings::quorum()),
        _ => RabbitMqOptions::default(),
    }
}

/// One worker process: `__worker <address> <queue> <classic|quorum>`. It connects, prints
/// `ready`, starts consuming on the line `go`, prints how many it consumed whenever that
/// changed (every 20 ms), and stops when its standard input closes.
#[allow(clippy::print_stdout)]
pub(crate) fn worker(args: &[String]) -> Result<(), BoxError> {
    let [address, queue, kind] = args else {
        return Err("usage: __worker <address> <queue> <classic|quorum>".into());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let transport = RabbitMqTransport::connect_with(address, options(queue, kind)).await?;
        let consumed = Arc::new(AtomicU64::new(0));
        let counter = consumed.clone();
        let bus = Bus::builder(transport)
            .endpoint(Endpoint::new(queue.as_str()).handler(move |_: ConsumeContext<Shipment>| {
                counter.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            }))
            .build();
        println!("ready");
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        if lines.next_line().await?.as_deref() != Some("go") {
            return Ok(());
        }
        bus.start().await?;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut reported = u64::MAX;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = consumed.load(Ordering::Relaxed);
                    if now != reported {
                        println!("{now}");
                        reported = now;
                    }
                }
                line = lines.next_line() => if !matches!(line, Ok(Some(_))) { break },
            }
        }
        bus.stop().await?;
        Ok(())
    })
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    consumed: Arc<AtomicU64>,
}

async fn spawn(address: &str, queue: &str, kind: &str) -> Result<Worker, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["__worker", address, queue, kind])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    if !matches!(ready, Ok(Ok(Some(ref line))) if line == "ready") {
        return Err(format!("a worker did not start: {ready:?}").into());
    }
    let consumed = Arc::new(AtomicU64::new(0));
    let count = consumed.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(n) = line.parse() {
                count.store(n, Ordering::Relaxed);
            }
        }
    });
    Ok(Worker { child, stdin, consumed })
}

/// Fills `queue` with `count` messages, then lets `processes` workers drain it; returns
/// messages per second from `go` until they have consumed them all.
async fn drain(addresses: &[String], queue: &str, kind: &str, processes: usize, count: u64) -> Result<f64, BoxError> {
    // A worker declares the endpoint; the backlog goes in before any consumes.
    let declaring = spawn(&addresses[0], queue, kind).await?;
    let publisher = Bus::builder(RabbitMqTransport::connect_with(&addresses[0], options(queue, kind)).await?).build();
    publisher.start().await?;
    {
        let Worker { mut stdin, mut child, .. } = declaring;
        stdin.write_all(b"go\n").await?;
        drop(stdin);
        child.wait().await?;
    }
    bus_publish(&publisher, count, Some(&format!("queue:{queue}"))).await?;
    publisher.stop().await?;
    let mut workers = Vec::new();
    for i in 0..processes {
        workers.push(spawn(&addresses[i % addresses.len()], queue, kind).await?);
    }
    let started = Instant::now();
    for worker in &mut workers {
        worker.stdin.write_all(b"go\n").await?;
    }
    let deadline = started + Duration::from_secs(300);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while workers.iter().map(|w| w.consumed.load(Ordering::Relaxed)).sum::<u64>() < count {
        if Instant::now() > deadline {
            return Err(format!("{processes} workers did not drain {count} messages in 300 s").into());
        }
        tick.tick().await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    for Worker { stdin, mut child, .. } in workers {
        drop(stdin);
        child.wait().await?;
    }
    Ok(rate)
}

/// One, two and three processes on `addresses` (a node, or a cluster's nodes).
async fn scale_out(place: &str, addresses: &[String], kind: &str, count: u64) -> Result<(), BoxError> {
    let mut one = 0.0;
    for processes in 1..=3 {
        let queue = format!("bench_instances_{place}_{processes}_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        let rate = drain(addresses, &queue, kind, processes, count).await?;
        if place == "single_node" {
            delete_endpoints(std::slice::from_ref(&queue)).await?;
        }
        figure(&format!("instances.{place}.{processes}_processes"), rate, "msg/s");
        if processes == 1 {
            one = rate;
        } else {
            compare(&format!("instances.{place}.{processes}_vs_1_process"), rate, one, "msg/s", None);
        }
    }
    Ok(())
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    let count = scale.rabbitmq;
    scale_out("single_node", &[address()], "classic", count).await?;
    let cluster = tests::rabbit_support::RabbitCluster::start(3).await;
    let addresses: Vec<String> = (0..3).map(|first| cluster.uri_from(first)).collect();
    scale_out("cluster", &addresses, "quorum", count).await?;
    Ok(())
}
