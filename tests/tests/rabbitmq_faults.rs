//! Fault tests of the RabbitMQ transport: cut connections, a restarted broker node, a silent
//! network stall. Each uses its own vhost, throwaway node or proxy; the shared broker is
//! never stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::testing::MessageLog;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Error, HealthStatus, Message};
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::{shared_addr, TcpProxy, ThrowawayNode, Vhost};
use tests::unique;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Faults:Numbered")]
struct Numbered {
    n: u32,
}

/// Counts every delivery of every number, so a run can report loss and duplicates.
#[derive(Debug, Default, Clone)]
struct Tally {
    seen: Arc<Mutex<HashMap<u32, u32>>>,
    log: Arc<MessageLog>,
}

impl Tally {
    fn record(&self, ctx: &ConsumeContext<Numbered>) -> Result<(), BoxError> {
        *self.seen.lock().map_err(|e| e.to_string())?.entry(ctx.message().n).or_default() += 1;
        self.log.record(ctx.envelope());
        Ok(())
    }

    fn distinct(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or_default()
    }

    fn duplicates(&self) -> u32 {
        self.seen.lock().map(|s| s.values().map(|c| c - 1).sum()).unwrap_or_default()
    }

    /// Waits until every number below `count` was consumed, for at most `timeout`.
    async fn wait_all(&self, count: u32, timeout: Duration) -> Result<(), String> {
        let wait = async {
            loop {
                if self.distinct() >= count as usize {
                    return;
                }
                let next = self.log.len() + 1;
                let _ = self.log.wait_for::<Numbered>(next, Duration::from_secs(1)).await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| format!("only {} of {count} distinct messages consumed", self.distinct()))
    }
}

fn consuming_bus(transport: RabbitMqTransport, queue: &str, tally: &Tally) -> Bus {
    let tally = tally.clone();
    Bus::builder(transport)
        .stop_timeout(Duration::from_secs(10))
        .endpoint(Endpoint::new(queue).prefetch(100).handler(move |ctx: ConsumeContext<Numbered>| {
            let result = tally.record(&ctx);
            async move { result }
        }))
        .build()
}

fn options() -> RabbitMqOptions {
    RabbitMqOptions {
        heartbeat: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_secs(1),
        publish_timeout: Duration::from_secs(60),
        ..RabbitMqOptions::default()
    }
}

/// Sends `count` numbered messages from `tasks` concurrent publishers; returns how many were
/// confirmed. Each publish resolves only once the broker confirmed it.
async fn send_all(bus: &Bus, queue: &str, count: u32, tasks: u32) -> Result<u32, Error> {
    let sent = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut handles = Vec::new();
    for task in 0..tasks {
        let bus = bus.clone();
        let address = format!("queue:{queue}");
        let sent = sent.clone();
        handles.push(tokio::spawn(async move {
            let mut n = task;
            while n < count {
                bus.send(&address, Numbered { n }).await?;
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                n += tasks;
            }
            Ok::<_, Error>(())
        }));
    }
    for handle in handles {
        handle.await.map_err(|e| Error::Configuration(e.to_string()))??;
    }
    Ok(sent.load(std::sync::atomic::Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_three_connection_cuts_with_confirms() {
    require_broker();
    const COUNT: u32 = 20_000;
    let vhost = tokio::task::spawn_blocking(|| Vhost::create("fault-cuts")).await.expect("vhost");
    let vhost = Arc::new(vhost);
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options()).await.expect("connects");
    let queue = unique("cuts");
    let tally = Tally::default();
    let bus = consuming_bus(transport.clone(), &queue, &tally);
    bus.start().await.expect("bus starts");

    let cutter = {
        let vhost = vhost.clone();
        let log = tally.log.clone();
        tokio::spawn(async move {
            for cut in 1..=3u32 {
                let _ = log.wait_for::<Numbered>((COUNT / 4 * cut) as usize, Duration::from_secs(120)).await;
                let vhost = vhost.clone();
                tokio::task::spawn_blocking(move || vhost.close_all_connections()).await.expect("rabbitmqctl");
            }
        })
    };
    let confirmed = send_all(&bus, &queue, COUNT, 16).await.expect("every publish confirmed despite the cuts");
    cutter.await.expect("three cuts made");
    tally.wait_all(COUNT, Duration::from_secs(120)).await.expect("nothing lost");
    let health = bus.health().await;
    bus.stop().await.expect("stop");
    println!(
        "connection cuts: {COUNT} published ({confirmed} confirmed), {} consumed distinct, {} duplicates",
        tally.distinct(),
        tally.duplicates()
    );
    assert_eq!(confirmed, COUNT);
    assert_eq!(tally.distinct(), COUNT as usize);
    assert!(transport.connection_count() >= 4, "reconnected after each cut: {}", transport.connection_count());
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_resume_after_the_broker_node_restarts() {
    const COUNT: u32 = 3_000;
    let node = ThrowawayNode::start().await;
    let transport = RabbitMqTransport::connect_with(&node.uri(), options()).await.expect("connects to the node");
    let queue = unique("restart");
    let tally = Tally::default();
    let bus = consuming_bus(transport.clone(), &queue, &tally);
    bus.start().await.expect("bus starts");

    let first = send_all(&bus, &queue, COUNT / 2, 8).await.expect("first half confirmed");
    tally.log.wait_for::<Numbered>(COUNT as usize / 3, Duration::from_secs(60)).await.expect("a third consumed");
    // The second half is published while the node restarts: those publishes wait it out.
    let second = {
        let bus = bus.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            for n in COUNT / 2..COUNT {
                bus.send(&format!("queue:{queue}"), Numbered { n }).await?;
                sent += 1;
            }
            Ok::<_, Error>(sent)
        })
    };
    node.restart_app().await;
    let confirmed = first + second.await.expect("sender task").expect("publishes wait out the restart");
    tally.wait_all(COUNT, Duration::from_secs(120)).await.expect("consumers resumed without a bus restart");
    let health = bus.health().await;
    bus.stop().await.expect("stop");
    transport.close().await;
    println!("node restart: {COUNT} published, {} duplicates", tally.duplicates());
    assert_eq!(confirmed, COUNT);
    assert!(transport.connection_count() >= 2, "the bus reconnected to the restarted node");
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
}

/// Waits until the bus's health satisfies `check`, for at most `timeout`; returns the last status.
async fn wait_health(bus: &Bus, timeout: Duration, check: impl Fn(HealthStatus) -> bool) -> HealthStatus {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = bus.health().await.status;
        if check(status) || tokio::time::Instant::now() >= deadline {
            return status;
        }
        // Health is a snapshot with no change notification: sample it within the deadline.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_stall_is_detected_and_recovered() {
    require_broker();
    let vhost = tokio::task::spawn_blocking(|| Vhost::create("fault-stall")).await.expect("vhost");
    let proxy = TcpProxy::start(shared_addr()).await;
    let heartbeat = Duration::from_secs(1);
    let options = RabbitMqOptions {
        heartbeat,
        connect_timeout: Duration::from_secs(2),
        publish_timeout: Duration::from_secs(30),
        ..options()
    };
    let transport =
        RabbitMqTransport::connect_with(&vhost.uri(proxy.port()), options).await.expect("connects through the proxy");
    let queue = unique("stall");
    let tally = Tally::default();
    let bus = consuming_bus(transport, &queue, &tally);
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{queue}"), Numbered { n: 0 }).await.expect("send before the stall");
    tally.wait_all(1, Duration::from_secs(10)).await.expect("consumed before the stall");
    assert_eq!(wait_health(&bus, Duration::from_secs(5), |s| s == HealthStatus::Healthy).await, HealthStatus::Healthy);

    proxy.stall();
    let stalled_at = tokio::time::Instant::now();
    let in_flight = {
        let bus = bus.clone();
        let queue = queue.clone();
        tokio::spawn(async move { bus.send(&format!("queue:{queue}"), Numbered { n: 1 }).await })
    };
    let status = wait_health(&bus, Duration::from_secs(10), |s| s != HealthStatus::Healthy).await;
    let noticed_after = stalled_at.elapsed();
    assert_ne!(status, HealthStatus::Healthy, "the stall was noticed");
    assert!(noticed_after <= heartbeat * 4, "noticed within about two heartbeat intervals: {noticed_after:?}");

    proxy.resume();
    assert_eq!(
        wait_health(&bus, Duration::from_secs(20), |s| s == HealthStatus::Healthy).await,
        HealthStatus::Healthy,
        "healthy again after recovery"
    );
    let published =
        tokio::time::timeout(Duration::from_secs(40), in_flight).await.expect("the in-flight publish did not hang");
    published.expect("task").expect("the in-flight publish was retried on the new connection");
    tally.wait_all(2, Duration::from_secs(20)).await.expect("the in-flight message arrived");
    bus.stop().await.expect("stop");
    println!("stall noticed after {noticed_after:?} (heartbeat {heartbeat:?})");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Faults:NeverPublished")]
struct NeverPublished {
    n: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_during_an_outage_fail_clearly_after_the_bound() {
    require_broker();
    let vhost = tokio::task::spawn_blocking(|| Vhost::create("fault-outage")).await.expect("vhost");
    let proxy = TcpProxy::start(shared_addr()).await;
    let options = RabbitMqOptions {
        heartbeat: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        publish_timeout: Duration::from_secs(2),
        ..options()
    };
    let transport = RabbitMqTransport::connect_with(&vhost.uri(proxy.port()), options).await.expect("connects");
    let bus = Bus::builder(transport.clone()).build();
    bus.publish(Numbered { n: 0 }).await.expect("publishes while connected");
    proxy.stall();
    assert!(transport.wait_for_connection(false, Duration::from_secs(10)).await, "the stall is noticed");
    let started = tokio::time::Instant::now();
    let result = bus.publish(Numbered { n: 1 }).await;
    let waited = started.elapsed();
    // First publishes of a type declare its exchange one at a time; waiting for that turn
    // counts against each publish's own bound, so twenty of them fail together, not in turn.
    let started = tokio::time::Instant::now();
    let firsts = futures::future::join_all((0..20).map(|n| bus.publish(NeverPublished { n }))).await;
    let firsts_waited = started.elapsed();
    proxy.resume();
    assert!(firsts.iter().all(Result::is_err), "no broker: every first publish fails");
    assert!(firsts_waited < Duration::from_secs(6), "the first publishes waited {firsts_waited:?}, not in turn");
    let error = result.expect_err("no broker: the publish fails");
    assert!(error.is_transient(), "an outage may heal: {error}");
    assert!(error.to_string().contains("unavailable"), "{error}");
    assert!(!error.to_string().contains("guest:guest"), "no credentials in errors: {error}");
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(6), "waited about the bound: {waited:?}");
    assert!(transport.wait_for_connection(true, Duration::from_secs(20)).await, "reconnects after the outage");
    bus.publish(Numbered { n: 2 }).await.expect("publishes again");
    transport.close().await;
}

/// A queue recreated during an outage with other arguments cannot be declared again: that is
/// logged, and the transport still comes back for everything else (it used to retry the
/// whole session for ever, and every publish failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_refused_on_reconnect_does_not_keep_the_transport_down() {
    require_broker();
    let vhost = Arc::new(tokio::task::spawn_blocking(|| Vhost::create("fault-redeclare")).await.expect("vhost"));
    let options = RabbitMqOptions { publish_timeout: Duration::from_secs(10), ..options() };
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options).await.expect("connects");
    let (good, doomed) = (unique("good"), unique("doomed"));
    let tally = Tally::default();
    let bus = consuming_bus(transport.clone(), &good, &tally);
    let doomed_topology = bus_core::EndpointTopology { queue: doomed.clone(), ..Default::default() };
    bus_core::Transport::declare(&transport, &doomed_topology).await.expect("declared");
    bus.start().await.expect("bus starts");

    // Behind the transport's back: the queue is recreated with an argument it does not declare.
    let side =
        lapin::Connection::connect(&vhost.uri(5672), lapin::ConnectionProperties::default()).await.expect("side");
    let channel = side.create_channel().await.expect("channel");
    channel.queue_delete(doomed.as_str().into(), Default::default()).await.expect("deleted");
    let mut arguments = lapin::types::FieldTable::default();
    arguments.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(10));
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(doomed.as_str().into(), durable, arguments).await.expect("recreated");
    let connections_before = transport.connection_count();
    let cut = vhost.clone();
    tokio::task::spawn_blocking(move || cut.close_all_connections()).await.expect("rabbitmqctl");
    bus.send(&format!("queue:{good}"), Numbered { n: 1 }).await.expect("the transport is back");
    tally.wait_all(1, Duration::from_secs(30)).await.expect("and the good endpoint consumes");
    assert!(transport.connection_count() > connections_before, "it reconnected");
    bus.stop().await.expect("stop");
}

/// Consumes batches of `Numbered`: records each, and holds the first until `gate` opens.
struct HeldBatches {
    batches: bus_core::testing::Log<Vec<u32>>,
    gate: Arc<tokio::sync::Semaphore>,
    first: std::sync::atomic::AtomicBool,
}

impl bus_core::Consumer<bus_core::Batch<Numbered>> for HeldBatches {
    async fn consume(&self, ctx: ConsumeContext<bus_core::Batch<Numbered>>) -> Result<(), BoxError> {
        self.batches.push(ctx.message().iter().map(|m| m.n).collect());
        if !self.first.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let _permit = tokio::time::timeout(Duration::from_secs(30), self.gate.acquire()).await?;
        }
        Ok(())
    }
}

/// The connection is cut while a batch of 10 is being consumed: the broker takes back all
/// ten (none was acknowledged), and they come again, as one whole batch, consumed once more;
/// nothing is left in the queue or in `_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_interrupted_by_a_connection_cut_is_delivered_again_whole() {
    require_broker();
    let vhost = Arc::new(tokio::task::spawn_blocking(|| Vhost::create("fault-batch")).await.expect("vhost"));
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options()).await.expect("connects");
    let queue = unique("batch-cut");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let batches = bus_core::testing::Log::default();
    let consumer = HeldBatches { batches: batches.clone(), gate: gate.clone(), first: Default::default() };
    let options = bus_core::BatchOptions::new().message_limit(10).time_limit(Duration::from_secs(5));
    let bus = Bus::builder(transport.clone())
        .stop_timeout(Duration::from_secs(10))
        .endpoint(Endpoint::new(&queue).batch_consumer(consumer, options))
        .build();
    bus.start().await.expect("bus starts");
    assert_eq!(send_all(&bus, &queue, 10, 1).await.expect("sent"), 10);
    batches.wait_until("the first batch", Duration::from_secs(10), |b| !b.is_empty()).await.expect("first batch");

    // Cut while the batch is in its consumer: the broker requeues its ten at once.
    let cut = vhost.clone();
    tokio::task::spawn_blocking(move || cut.close_all_connections()).await.expect("cut");
    gate.add_permits(1);
    batches.wait_until("the batch again", Duration::from_secs(30), |b| b.len() >= 2).await.expect("delivered again");
    assert!(transport.wait_for_connection(true, Duration::from_secs(10)).await, "reconnected");
    bus.stop().await.expect("stop");
    let listed = vhost.clone();
    let queues = tokio::task::spawn_blocking(move || listed.list_queues()).await.expect("queues");

    let batches = batches.snapshot();
    let mut first = batches[0].clone();
    let mut again = batches[1].clone();
    first.sort_unstable();
    again.sort_unstable();
    assert_eq!(first, (0..10).collect::<Vec<_>>(), "one batch of ten");
    assert_eq!(again, first, "delivered again whole, as one batch");
    assert_eq!(batches.len(), 2, "consumed once more, not more");
    for (name, messages) in queues {
        assert_eq!(messages, 0, "{name} is empty: acknowledged after the second batch, nothing in _error");
    }
}
