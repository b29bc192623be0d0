//! Endpoint options a .NET MassTransit system may already use, on RabbitMQ: temporary
//! endpoints, single active consumer, priority queues and explicit exchange binds.

use std::sync::Arc;

use bus_core::testing::MessageLog;
use bus_core::{Bus, Endpoint, Message};
use bus_rabbitmq::RabbitMqTransport;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::{rabbitmqctl, Vhost};
use tests::WAIT;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:EndpointOptions:Job")]
struct Job {
    n: u32,
}

/// A queue's `durable`, `auto_delete` and `arguments` as the broker lists them.
fn queue(vhost: &Vhost, name: &str) -> Option<(String, String, String)> {
    let listed = rabbitmqctl(&[
        "list_queues",
        "-p",
        &vhost.name,
        "name",
        "durable",
        "auto_delete",
        "arguments",
        "--quiet",
        "--no-table-headers",
    ]);
    listed.lines().find_map(|line| {
        let mut fields = line.split('\t');
        (fields.next() == Some(name)).then(|| {
            let mut next = || fields.next().unwrap_or("").to_owned();
            (next(), next(), next())
        })
    })
}

async fn bus(vhost: &Vhost, endpoint: Endpoint) -> Bus {
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("rabbitmq");
    let bus = Bus::builder(transport).endpoint(endpoint).build();
    bus.start().await.expect("bus starts");
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_endpoint_goes_with_its_bus() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let got = Arc::new(MessageLog::default());
    let bus = bus(&vhost, tests::record::<Job>(Endpoint::new("status-instance-1").temporary(), &got)).await;
    let (durable, auto_delete, _) = queue(&vhost, "status-instance-1").expect("declared");
    assert_eq!((durable.as_str(), auto_delete.as_str()), ("false", "true"));
    assert!(queue(&vhost, "status-instance-1_error").is_none(), "no error queue until one is needed");
    bus.publish(Job { n: 1 }).await.expect("publish");
    got.wait_for::<Job>(1, WAIT).await.expect("consumed");
    bus.stop().await.expect("stop");
    assert!(queue(&vhost, "status-instance-1").is_none(), "deleted with its consumer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_endpoint_has_one_consumer_at_a_time() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let (first_log, second_log) = (Arc::new(MessageLog::default()), Arc::new(MessageLog::default()));
    let endpoint = |log: &Arc<MessageLog>| tests::record::<Job>(Endpoint::new("ordered").single_active_consumer(), log);
    let first = bus(&vhost, endpoint(&first_log)).await;
    let second = bus(&vhost, endpoint(&second_log)).await;
    let (_, _, arguments) = queue(&vhost, "ordered").expect("declared");
    assert!(arguments.contains("x-single-active-consumer"), "{arguments}");
    for n in 0..20 {
        first.send("queue:ordered", Job { n }).await.expect("send");
    }
    first_log.wait_for::<Job>(20, WAIT).await.expect("the active consumer takes them all");
    assert!(second_log.is_empty(), "the other waits its turn");
    // The active one goes: the other takes over.
    first.stop().await.expect("stop");
    second.send("queue:ordered", Job { n: 20 }).await.expect("send");
    second_log.wait_for::<Job>(1, WAIT).await.expect("taken over");
    second.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_endpoint_declares_its_queue_with_a_maximum_priority() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let got = Arc::new(MessageLog::default());
    let bus = bus(&vhost, tests::record::<Job>(Endpoint::new("urgent-jobs").max_priority(10), &got)).await;
    let (_, _, arguments) = queue(&vhost, "urgent-jobs").expect("declared");
    assert!(arguments.contains("x-max-priority") && arguments.contains("10"), "{arguments}");
    bus.send("queue:urgent-jobs", Job { n: 1 }).await.expect("send");
    got.wait_for::<Job>(1, WAIT).await.expect("consumed");
    bus.stop().await.expect("stop");
}

/// What a .NET system publishes to an exchange of its own naming reaches an endpoint bound
/// to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_bound_to_an_exchange_receives_what_is_published_there() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let got = Arc::new(MessageLog::default());
    let bus = bus(&vhost, tests::record::<Job>(Endpoint::new("legacy-jobs").bind("Legacy.Jobs"), &got)).await;
    let connection = lapin::Connection::connect(&vhost.uri(5672), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = connection.create_channel().await.expect("channel");
    let body = format!(
        r#"{{"messageId":"{}","messageType":["urn:message:EndpointOptions:Job"],"message":{{"n":7}}}}"#,
        uuid::Uuid::now_v7()
    );
    let properties = BasicProperties::default().with_content_type("application/vnd.masstransit+json".into());
    channel
        .basic_publish("Legacy.Jobs".into(), "".into(), BasicPublishOptions::default(), body.as_bytes(), properties)
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    let jobs = got.wait_for::<Job>(1, WAIT).await.expect("routed through the bound exchange");
    assert_eq!(jobs[0].n, 7);
    bus.stop().await.expect("stop");
}

/// An endpoint connected to a running bus declares its topology, consumes what is
/// published to it, shows in the bus's health, and stops with the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_connected_to_a_running_bus_consumes_until_the_bus_stops() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("rabbitmq");
    let bus = Bus::builder(transport).build();
    bus.start().await.expect("bus starts");
    let got = Arc::new(MessageLog::default());
    bus.connect_endpoint(tests::record::<Job>(Endpoint::new("jobs-tenant-7"), &got)).await.expect("connected");
    bus.publish(Job { n: 7 }).await.expect("publish");
    assert_eq!(got.wait_for::<Job>(1, WAIT).await.expect("consumed")[0].n, 7);
    let health = bus.health().await;
    assert!(
        health.endpoints.iter().any(|e| e.endpoint == "jobs-tenant-7" && e.status == bus_core::HealthStatus::Healthy),
        "{health:?}"
    );
    let again = bus.connect_endpoint(Endpoint::new("jobs-tenant-7")).await;
    assert!(again.is_err_and(|e| e.to_string().contains("two endpoints are named")));
    bus.stop().await.expect("stop");
    assert!(bus.connect_endpoint(Endpoint::new("jobs-tenant-8")).await.is_err(), "not on a stopped bus");
}

/// Messages sent with a priority to a priority queue are taken highest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_a_priority_are_taken_highest_first() {
    use bus_core::Transport as _;
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("rabbitmq");
    // Declared, not consumed yet: the messages wait in the queue.
    let topology = bus_core::EndpointTopology {
        queue: "prioritized".into(),
        max_priority: Some(10),
        ..bus_core::EndpointTopology::default()
    };
    transport.declare(&topology).await.expect("declared");
    let sender = Bus::builder(transport).build();
    for n in 0..10 {
        let priority = if n < 5 { 1 } else { 9 };
        let options = bus_core::SendOptions::new().priority(priority);
        sender.send_with("queue:prioritized", Job { n }, options).await.expect("send");
    }
    let (tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let consumer = Endpoint::new("prioritized").max_priority(10).prefetch(1).concurrency_limit(1).handler_with_state(
        tx,
        |ctx: bus_core::ConsumeContext<Job>, tx| async move {
            tx.send(ctx.message().n)?;
            Ok(())
        },
    );
    let bus = bus(&vhost, consumer).await;
    let mut order = Vec::new();
    while order.len() < 10 {
        order.push(tokio::time::timeout(WAIT, taken.recv()).await.expect("in time").expect("a job"));
    }
    bus.stop().await.expect("stop");
    assert_eq!(order[..5].iter().copied().collect::<std::collections::BTreeSet<_>>(), (5..10).collect());
    assert_eq!(order[5..].iter().copied().collect::<std::collections::BTreeSet<_>>(), (0..5).collect());
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:EndpointOptions:RegionOrder")]
struct RegionOrder {
    region: String,
    size: String,
    n: u32,
}

const REGION_ORDER: &str = "EndpointOptions:RegionOrder";

/// A bus whose `RegionOrder` exchange is of `kind`, published with `key`, and `endpoints`.
async fn routed_bus(
    vhost: &Vhost,
    kind: bus_rabbitmq::ExchangeType,
    key: fn(&RegionOrder) -> String,
    endpoints: Vec<Endpoint>,
) -> Bus {
    let options = bus_rabbitmq::RabbitMqOptions::default().exchange_type(REGION_ORDER, kind);
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options).await.expect("rabbitmq");
    let bus = endpoints.into_iter().fold(Bus::builder(transport).routing_key(key), |b, e| b.endpoint(e)).build();
    bus.start().await.expect("bus starts");
    bus
}

/// Publishes the orders, then one marker per queue (`n` 99): whatever the queue was to get
/// came before its marker.
async fn publish_then_mark(bus: &Bus, orders: &[(&str, &str)], markers: &[(&str, &str)]) {
    for (n, (region, size)) in orders.iter().enumerate() {
        let order = RegionOrder { region: (*region).into(), size: (*size).into(), n: n as u32 };
        bus.publish(order).await.expect("publish");
    }
    for (region, size) in markers {
        bus.publish(RegionOrder { region: (*region).into(), size: (*size).into(), n: 99 }).await.expect("publish");
    }
}

/// What a log got before its marker: the orders' numbers. (Its endpoint takes one message at
/// a time, so what came before the marker was consumed before it.)
async fn until_marker(log: &MessageLog) -> Vec<u32> {
    log.wait_for_envelope("the marker", WAIT, |e| e.message.get().contains(r#""n":99"#)).await.expect("marker");
    log.messages::<RegionOrder>().iter().map(|o| o.n).filter(|n| *n != 99).collect()
}

/// A direct exchange: each endpoint gets the orders published with its routing key only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_exchange_routes_by_routing_key() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let (east, west) = (Arc::new(MessageLog::default()), Arc::new(MessageLog::default()));
    let endpoints = vec![
        tests::record::<RegionOrder>(
            Endpoint::new("orders-east").concurrency_limit(1).bind_with_routing_key(REGION_ORDER, "east"),
            &east,
        ),
        tests::record::<RegionOrder>(
            Endpoint::new("orders-west").concurrency_limit(1).bind_with_routing_key(REGION_ORDER, "west"),
            &west,
        ),
    ];
    let bus = routed_bus(&vhost, bus_rabbitmq::ExchangeType::Direct, |o| o.region.clone(), endpoints).await;
    let kinds = rabbitmqctl(&["list_exchanges", "-p", &vhost.name, "name", "type", "--quiet", "--no-table-headers"]);
    assert!(kinds.lines().any(|l| l == format!("{REGION_ORDER}\tdirect")), "{kinds}");
    publish_then_mark(
        &bus,
        &[("east", "s"), ("west", "s"), ("east", "l"), ("north", "s")],
        &[("east", ""), ("west", "")],
    )
    .await;
    let (east, west) = (until_marker(&east).await, until_marker(&west).await);
    bus.stop().await.expect("stop");
    assert_eq!(east, [0, 2], "east's orders only");
    assert_eq!(west, [1], "west's orders only; north's reached no one");
}

/// A topic exchange: endpoints bound with patterns get the orders whose keys match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_exchange_routes_by_pattern() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let (europe, large) = (Arc::new(MessageLog::default()), Arc::new(MessageLog::default()));
    let endpoints = vec![
        tests::record::<RegionOrder>(
            Endpoint::new("orders-eu").concurrency_limit(1).bind_with_routing_key(REGION_ORDER, "orders.eu.*"),
            &europe,
        ),
        tests::record::<RegionOrder>(
            Endpoint::new("orders-large").concurrency_limit(1).bind_with_routing_key(REGION_ORDER, "orders.*.large"),
            &large,
        ),
    ];
    let key = |o: &RegionOrder| format!("orders.{}.{}", o.region, o.size);
    let bus = routed_bus(&vhost, bus_rabbitmq::ExchangeType::Topic, key, endpoints).await;
    publish_then_mark(&bus, &[("eu", "small"), ("us", "large"), ("eu", "large"), ("us", "small")], &[("eu", "large")])
        .await;
    let (europe, large) = (until_marker(&europe).await, until_marker(&large).await);
    bus.stop().await.expect("stop");
    assert_eq!(europe, [0, 2]);
    assert_eq!(large, [1, 2]);
}

/// A quorum endpoint with a delivery limit: a message given back more often than that goes
/// to the endpoint's `_error` queue (dead-lettered by the broker), not into the void.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_its_delivery_limit_goes_to_the_error_queue() {
    require_broker();
    let vhost = Vhost::create("endpoint-options");
    let settings = bus_rabbitmq::QueueSettings::quorum().delivery_limit(2).at_least_once_dead_lettering();
    let options = bus_rabbitmq::RabbitMqOptions::default().endpoint_queue("limited", settings);
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options).await.expect("rabbitmq");
    let bus = Bus::builder(transport).endpoint(tests::record::<Job>(Endpoint::new("limited"), &Arc::default())).build();
    bus.start().await.expect("bus starts");
    bus.stop().await.expect("stop");
    let (_, _, arguments) = queue(&vhost, "limited").expect("declared");
    for argument in
        ["quorum", "x-delivery-limit", "x-dead-letter-exchange", "limited_error", "at-least-once", "reject-publish"]
    {
        assert!(arguments.contains(argument), "`{argument}` missing from {arguments}");
    }
    let (_, _, error_arguments) = queue(&vhost, "limited_error").expect("declared");
    assert!(error_arguments.contains("quorum"), "the error queue is a quorum queue too: {error_arguments}");

    // A consumer that gives the message back every time (as one that crashes would).
    let connection = lapin::Connection::connect(&vhost.uri(5672), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_publish("".into(), "limited".into(), BasicPublishOptions::default(), b"{}", BasicProperties::default())
        .await
        .expect("published");
    // Each pass gives back what it gets, then looks in `limited_error` (a requeue takes a
    // moment to show: a get right after one may find the queue empty).
    let given_back = std::sync::atomic::AtomicU32::new(0);
    let (channel, given, vhost_name) = (&channel, &given_back, vhost.name.as_str());
    tests::poll_until("the message in limited_error", WAIT, std::time::Duration::from_millis(20), || async move {
        let got = channel.basic_get("limited".into(), lapin::options::BasicGetOptions::default()).await;
        if let Some(message) = got.map_err(|e| e.to_string())? {
            let requeue = lapin::options::BasicNackOptions { requeue: true, ..Default::default() };
            message.delivery.nack(requeue).await.map_err(|e| e.to_string())?;
            given.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let listed =
            rabbitmqctl(&["list_queues", "-p", vhost_name, "name", "messages", "--quiet", "--no-table-headers"]);
        let errors = listed.lines().find_map(|l| l.strip_prefix("limited_error\t")).map(str::trim).map(str::to_owned);
        if errors.as_deref() == Some("1") {
            Ok(())
        } else {
            Err(format!("limited_error holds {errors:?}"))
        }
    })
    .await;
    let given_back = given_back.into_inner();
    assert_eq!(given_back, 3, "delivered three times: twice given back within the limit, once past it");
    let _ = connection.close(200, "done".into()).await;
}

/// Settings that need quorum queues, on a classic one, are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_settings_on_a_classic_queue_are_refused() {
    require_broker();
    let settings = bus_rabbitmq::QueueSettings { delivery_limit: Some(3), ..bus_rabbitmq::QueueSettings::classic() };
    let options = bus_rabbitmq::RabbitMqOptions::default().endpoint_queue("orders", settings);
    let error =
        RabbitMqTransport::connect_with("amqp://guest:guest@127.0.0.1:5672/%2f", options).await.expect_err("refused");
    assert!(error.to_string().contains("endpoint `orders`: a delivery limit needs quorum queues"), "{error}");
}
