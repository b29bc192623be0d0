//! Many instances of one service on one endpoint (the `bus-worker` process, three of them,
//! on the shared broker in a vhost of their own): they share the work, each message is
//! consumed once; one killed with SIGKILL mid-run leaves its unacknowledged messages to the
//! others; requests from two instances each get their own responses.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bus_core::Bus;
use bus_rabbitmq::RabbitMqTransport;
use futures::StreamExt;
use tests::instances::{Quote, Quoted, Work};
use tests::poll_until;
use tests::rabbit_support::{Vhost, SHARED_PORT};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const QUEUE: &str = "instances_work";
const MESSAGES: u32 = 30_000;

/// One `bus-worker` process and the file it records what it consumed in.
struct Worker {
    child: Child,
    record: PathBuf,
}

impl Worker {
    /// Starts one and waits until it consumes.
    async fn start(address: &str, name: &str) -> Worker {
        let record = std::env::temp_dir().join(tests::unique(name));
        let mut child = Command::new(env!("CARGO_BIN_EXE_bus-worker"))
            .args([address, QUEUE, &record.to_string_lossy()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the worker starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let first = tokio::time::timeout(Duration::from_secs(30), BufReader::new(stdout).lines().next_line()).await;
        assert!(matches!(first, Ok(Ok(Some(ref line))) if line == "ready"), "the worker is ready: {first:?}");
        Worker { child, record }
    }

    /// What it consumed: each number with whether the broker had delivered it before.
    fn consumed(&self) -> Vec<(u32, bool)> {
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (n, redelivered) = line.split_once(' ')?;
                Some((n.parse().ok()?, redelivered == "1"))
            })
            .collect()
    }

    /// Closes its standard input: it stops consuming and exits.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let exited = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        assert!(matches!(exited, Ok(Ok(status)) if status.success()), "the worker stopped cleanly: {exited:?}");
        let _ = std::fs::remove_file(&self.record);
    }
}

async fn publish_work(bus: &Bus) {
    futures::stream::iter(0..MESSAGES)
        .for_each_concurrent(64, |n| async move { bus.publish(Work { n }).await.expect("published") })
        .await;
}

/// Waits until the workers together consumed every number; returns how often each was.
async fn every_message_consumed(workers: &[&Worker]) -> HashMap<u32, u32> {
    poll_until("every message consumed", Duration::from_secs(180), Duration::from_millis(50), || async {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for worker in workers {
            for (n, _) in worker.consumed() {
                *counts.entry(n).or_default() += 1;
            }
        }
        if counts.len() == MESSAGES as usize {
            Ok(counts)
        } else {
            Err(format!("{} of {MESSAGES} consumed", counts.len()))
        }
    })
    .await
}

async fn bus_on(address: &str) -> Bus {
    let bus = Bus::builder(RabbitMqTransport::connect(address).await.expect("connects")).build();
    bus.start().await.expect("bus starts");
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_an_endpoint_and_consume_each_message_once() {
    let vhost = Vhost::create("instances");
    let address = vhost.uri(SHARED_PORT);
    let workers = [
        Worker::start(&address, "worker-a").await,
        Worker::start(&address, "worker-b").await,
        Worker::start(&address, "worker-c").await,
    ];
    let bus = bus_on(&address).await;
    publish_work(&bus).await;
    let counts = every_message_consumed(&workers.iter().collect::<Vec<_>>()).await;
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    assert!(twice.is_empty(), "consumed more than once: {:?}", &twice[..twice.len().min(10)]);
    let shares: Vec<usize> = workers.iter().map(|w| w.consumed().len()).collect();
    println!("{MESSAGES} messages over three processes: {shares:?}");
    assert!(shares.iter().all(|share| *share > 0), "every process took part: {shares:?}");
    bus.stop().await.expect("stop");
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_run_leaves_its_unacknowledged_messages_to_the_others() {
    let vhost = Vhost::create("instances");
    let address = vhost.uri(SHARED_PORT);
    // The queue fills first, so that each worker holds a full prefetch from its start.
    let declaring = Worker::start(&address, "declaring").await;
    declaring.stop().await;
    let bus = bus_on(&address).await;
    publish_work(&bus).await;
    let mut victim = Worker::start(&address, "victim").await;
    let survivors = [Worker::start(&address, "survivor-a").await, Worker::start(&address, "survivor-b").await];
    poll_until("the victim busy", Duration::from_secs(60), Duration::from_millis(5), || async {
        let done = victim.consumed().len();
        if done >= 1_000 {
            Ok(())
        } else {
            Err(format!("{done} consumed"))
        }
    })
    .await;
    victim.child.kill().await.expect("killed with SIGKILL");
    let by_victim: HashSet<u32> = victim.consumed().into_iter().map(|(n, _)| n).collect();
    let everyone = [&victim, &survivors[0], &survivors[1]];
    let counts = every_message_consumed(&everyone).await;
    // A number consumed twice was recorded by the victim, which died before acknowledging it.
    let twice: Vec<u32> = counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    assert!(counts.values().all(|c| *c <= 2), "none consumed three times");
    assert!(twice.iter().all(|n| by_victim.contains(n)), "only the victim's unacknowledged ones came twice");
    let redelivered: Vec<u32> =
        survivors.iter().flat_map(Worker::consumed).filter(|(_, again)| *again).map(|(n, _)| n).collect();
    println!(
        "killed after {} consumed: {} redelivered to the others ({} of them recorded by it before it died)",
        by_victim.len(),
        redelivered.len(),
        twice.len()
    );
    assert!(!redelivered.is_empty(), "the others consumed the victim's unacknowledged messages");
    let _ = std::fs::remove_file(&victim.record);
    bus.stop().await.expect("stop");
    for worker in survivors {
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_two_instances_each_get_their_own_responses() {
    let vhost = Vhost::create("instances");
    let address = vhost.uri(SHARED_PORT);
    let workers = [Worker::start(&address, "responder-a").await, Worker::start(&address, "responder-b").await];
    let requesters = [bus_on(&address).await, bus_on(&address).await];
    let answered = futures::future::join_all(requesters.iter().enumerate().map(|(who, bus)| async move {
        let base = u32::try_from(who).expect("two") * 1_000;
        futures::stream::iter(base..base + 200)
            .map(|n| async move {
                let response = bus.request::<Quote, Quoted>(Quote { n }).await.expect("answered");
                assert_eq!(response.message().n, n, "the answer to this request, at this instance");
                response.message().process
            })
            .buffer_unordered(32)
            .collect::<Vec<u32>>()
            .await
    }))
    .await;
    for processes in &answered {
        assert_eq!(processes.len(), 200, "every request answered");
    }
    let responders: HashSet<u32> = answered.iter().flatten().copied().collect();
    assert_eq!(responders.len(), 2, "both responder processes answered");
    for bus in requesters {
        bus.stop().await.expect("stop");
    }
    for worker in workers {
        worker.stop().await;
    }
}
