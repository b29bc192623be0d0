//! The bus on a three-node RabbitMQ cluster of the test's own, with quorum queues: the node
//! the bus is connected to, which leads the endpoint's queue, is killed (`kill -9`) under
//! load and later restarted. Nothing confirmed is lost; the bus fails over to another node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{Bus, ConsumeContext, Endpoint, HealthStatus, Message, RedeliveryPolicy};
use bus_rabbitmq::{QueueSettings, RabbitMqOptions, RabbitMqTransport};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tests::poll_until;
use tests::rabbit_support::RabbitCluster;

/// One three-node RabbitMQ cluster at a time: two of them side by side on two cores time out each other's
/// heartbeats and elections.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:ClusterTests:Work")]
struct Work {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:ClusterTests:Retried")]
struct Retried {
    n: u32,
}

/// How many times each number was consumed.
type Counts = Arc<Mutex<HashMap<u32, u32>>>;

fn count(counts: &Counts, n: u32) {
    *counts.lock().expect("counts").entry(n).or_default() += 1;
}

/// The node the bus's endpoint `queue` is connected to, as its health names it.
async fn node_in_use(bus: &Bus, queue: &str) -> Result<String, String> {
    let health = bus.health().await;
    let endpoint = health.endpoints.iter().find(|e| e.endpoint == queue).ok_or("no such endpoint")?;
    match (&endpoint.node, endpoint.status) {
        (Some(node), HealthStatus::Healthy) => Ok(node.clone()),
        _ => Err(format!("{endpoint:?}")),
    }
}

const MESSAGES: u32 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_the_leading_node_killed_under_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = RabbitCluster::start(3).await;
    let queue = "cluster_work";
    let options = RabbitMqOptions::default()
        .endpoint_queue(queue, QueueSettings::quorum().replicas(3).at_least_once_dead_lettering());
    let transport = RabbitMqTransport::connect_with(&cluster.uri_from(0), options).await.expect("connects");
    let counts: Counts = Arc::default();
    let consumed = counts.clone();
    let bus = Bus::builder(transport)
        .endpoint(Endpoint::new(queue).prefetch(200).handler(move |ctx: ConsumeContext<Work>| {
            count(&consumed, ctx.message().n);
            async { Ok(()) }
        }))
        .build();
    bus.start().await.expect("bus starts");
    let first = cluster.node(0);
    let first_node = format!("127.0.0.1:{}", first.port());
    let connected =
        poll_until("the endpoint's node in its health", Duration::from_secs(10), Duration::from_millis(20), || {
            node_in_use(&bus, queue)
        })
        .await;
    assert_eq!(connected, first_node, "connected to the first node listed");
    assert_eq!(cluster.leader(queue).await.as_deref(), Some(first.node_name()), "the queue's leader is that node");

    // Publishes with confirms, 64 at a time; one that fails (its node died under it) is
    // published again, as a producer that must not lose it does.
    let confirmed = Arc::new(AtomicU64::new(0));
    let republished = Arc::new(AtomicU64::new(0));
    let publishing = {
        let (bus, confirmed, republished) = (bus.clone(), confirmed.clone(), republished.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..MESSAGES)
                .for_each_concurrent(64, |n| {
                    let (bus, confirmed, republished) = (bus.clone(), confirmed.clone(), republished.clone());
                    async move {
                        while let Err(error) = bus.publish(Work { n }).await {
                            if republished.fetch_add(1, Ordering::Relaxed) % 100 == 0 {
                                eprintln!("publish failed, trying again: {error}");
                            }
                            // A pause before trying again, not a wait for something.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        confirmed.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
        })
    };
    let at_least = |target: u64| {
        let confirmed = confirmed.clone();
        poll_until("publishes confirmed", Duration::from_secs(180), Duration::from_millis(10), move || {
            let done = confirmed.load(Ordering::Relaxed);
            async move {
                if done >= target {
                    Ok(())
                } else {
                    Err(format!("{done} confirmed"))
                }
            }
        })
    };
    at_least(5_000).await;
    first.kill().await;
    println!("killed {} after {} confirms", first.node_name(), confirmed.load(Ordering::Relaxed));
    let failed_over =
        poll_until("the bus on another node", Duration::from_secs(60), Duration::from_millis(100), || async {
            node_in_use(&bus, queue).await.and_then(|node| if node == first_node { Err(node) } else { Ok(node) })
        })
        .await;
    // On RabbitMQ 3.10.8 here, publishes routed to the queue are nacked while the killed
    // member is down (the queue has a new leader and consumers go on): the producer
    // publishes them again, and they are confirmed once the node is back.
    let refused_while_down = republished.load(Ordering::Relaxed);
    first.relaunch().await;
    publishing.await.expect("every message published");
    let consumed =
        poll_until("every message consumed", Duration::from_secs(180), Duration::from_millis(50), || async {
            let counts = counts.lock().expect("counts");
            let missing = (0..MESSAGES).filter(|n| !counts.contains_key(n)).count();
            if missing == 0 {
                Ok(counts.values().map(|c| u64::from(*c)).sum::<u64>())
            } else {
                Err(format!("{missing} missing"))
            }
        })
        .await;
    println!(
        "quorum queue on 3 nodes, leader and connected node killed and restarted: {MESSAGES} confirmed, 0 lost, \
         {} consumed twice or more ({} deliveries in all), {} publishes tried again ({refused_while_down} before its restart \
         began); the bus moved to {failed_over}",
        consumed - u64::from(MESSAGES),
        consumed,
        republished.load(Ordering::Relaxed)
    );
    bus.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_redelivery_comes_back_while_the_leading_node_dies() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RabbitCluster::start(3).await;
    let queue = "cluster_delayed";
    let delay = Duration::from_secs(10);
    let options =
        RabbitMqOptions::default().endpoint_queue(queue, QueueSettings::quorum().at_least_once_dead_lettering());
    let transport = RabbitMqTransport::connect_with(&cluster.uri_from(0), options).await.expect("connects");
    let first_attempts: Counts = Arc::default();
    let second_attempts: Counts = Arc::default();
    let (firsts, seconds) = (first_attempts.clone(), second_attempts.clone());
    let bus = Bus::builder(transport)
        .endpoint(Endpoint::new(queue).redelivery(RedeliveryPolicy::intervals([delay])).handler(
            move |ctx: ConsumeContext<Retried>| {
                let n = ctx.message().n;
                let first = ctx.redelivery_count() == 0;
                count(if first { &firsts } else { &seconds }, n);
                async move {
                    if first {
                        Err("fails the first time".into())
                    } else {
                        Ok(())
                    }
                }
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    let delay_queue = format!("{queue}_delay_{}ms", delay.as_millis());
    let arguments = cluster.node(1).ctl(&["list_queues", "-p", "/", "name", "arguments", "--quiet"]).await;
    let declared = arguments.lines().find(|l| l.starts_with(&delay_queue)).unwrap_or_default();
    assert!(
        declared.contains("at-least-once") && declared.contains("reject-publish") && declared.contains("quorum"),
        "the delay queue dead-letters at least once: {declared}"
    );
    for n in 0..20 {
        bus.publish(Retried { n }).await.expect("published");
    }
    poll_until(
        "every message waiting in the delay queue",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            match cluster.messages(&delay_queue).await {
                Some(20) => Ok(()),
                other => Err(format!(
                    "{other:?} waiting, {} failed once, {} back",
                    first_attempts.lock().expect("counts").len(),
                    second_attempts.lock().expect("counts").len()
                )),
            }
        },
    )
    .await;
    assert_eq!(first_attempts.lock().expect("counts").len(), 20, "each failed once");
    // The node that leads the delay queue and the endpoint's queue, and that the bus is on,
    // dies while the messages wait.
    assert_eq!(cluster.leader(&delay_queue).await.as_deref(), Some(cluster.node(0).node_name()));
    cluster.node(0).kill().await;
    poll_until("every message back and consumed", Duration::from_secs(90), Duration::from_millis(50), || async {
        let seconds = second_attempts.lock().expect("counts");
        if seconds.len() == 20 {
            Ok(())
        } else {
            Err(format!("{} of 20 back", seconds.len()))
        }
    })
    .await;
    bus.stop().await.expect("stop");
}
