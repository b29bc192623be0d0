//! `bus-http` against real parts: the readiness probe follows a stalled broker connection
//! and its recovery (RabbitMQ through a proxy, in a vhost of its own), and `/metrics`
//! exposes the bus's counters with their labels.

use std::time::Duration;

use bus_core::{Bus, ConsumeContext, Endpoint, Message};
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::{shared_addr, TcpProxy, Vhost};
use tests::{poll_until, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:HttpTests:Ping")]
struct Ping {
    n: u32,
}

/// Serves the bus's routes on a port of its own; returns the address.
async fn serve(bus: &Bus, metrics: Option<bus_http::Metrics>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let address = listener.local_addr().expect("address");
    tokio::spawn(bus_http::serve(listener, bus_http::router(bus.clone(), metrics)));
    address
}

/// `GET path`: the status code and the body.
async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// Asks `path` until it answers `status` (health has no change notification), for at most
/// `timeout`; returns the body.
async fn wait_status(address: std::net::SocketAddr, path: &str, status: u16, timeout: Duration) -> String {
    let what = format!("{path} answers {status}");
    poll_until(&what, timeout, Duration::from_millis(50), || async {
        let (got, body) = get(address, path).await;
        if got == status {
            Ok(body)
        } else {
            Err(format!("it answers {got}: {body}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_follow_a_stalled_broker_connection_and_its_recovery() {
    require_broker();
    let vhost = tokio::task::spawn_blocking(|| Vhost::create("http-probes")).await.expect("vhost");
    let proxy = TcpProxy::start(shared_addr()).await;
    let options = RabbitMqOptions {
        heartbeat: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_secs(1),
        ..RabbitMqOptions::default()
    };
    let transport = RabbitMqTransport::connect_with(&vhost.uri(proxy.port()), options).await.expect("connects");
    let queue = unique("probed");
    let bus = Bus::builder(transport)
        .endpoint(Endpoint::new(&queue).handler(|_: ConsumeContext<Ping>| async { Ok(()) }))
        .build();
    bus.start().await.expect("bus starts");
    let address = serve(&bus, None).await;

    let body = wait_status(address, "/health/ready", 200, Duration::from_secs(10)).await;
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["endpoints"][0]["endpoint"], queue.as_str());
    assert_eq!(get(address, "/health/live").await.0, 200);

    proxy.stall();
    let body = wait_status(address, "/health/ready", 503, Duration::from_secs(15)).await;
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_ne!(health["status"], "healthy");
    let reason = health["endpoints"][0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(!reason.is_empty(), "the reason is in the body: {body}");
    assert_eq!(get(address, "/health/live").await.0, 200, "a broker outage is no reason to restart the process");

    proxy.resume();
    wait_status(address, "/health/ready", 200, Duration::from_secs(30)).await;
    bus.stop().await.expect("stop");
    assert_eq!(get(address, "/health/live").await.0, 503, "a stopped bus is not live");
}

#[tokio::test]
async fn metrics_expose_the_bus_counters_with_their_labels() {
    let metrics = bus_http::Metrics::new().expect("metrics");
    let consumed = bus_core::testing::MessageLog::default();
    let log = consumed.clone();
    let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
        .meter(&metrics.meter())
        .endpoint(Endpoint::new("pings").handler(move |ctx: ConsumeContext<Ping>| {
            log.record(ctx.envelope());
            async { Ok(()) }
        }))
        .build();
    bus.start().await.expect("bus starts");
    for n in 0..3 {
        bus.publish(Ping { n }).await.expect("publish");
    }
    consumed.wait_for::<Ping>(3, Duration::from_secs(10)).await.expect("consumed");
    let address = serve(&bus, Some(metrics)).await;
    let (status, text) = get(address, "/metrics").await;
    bus.stop().await.expect("stop");

    assert_eq!(status, 200);
    let consumed_line = text
        .lines()
        .find(|l| l.starts_with("messaging_bus_consumed_total{") && l.contains("endpoint=\"pings\""))
        .unwrap_or_else(|| panic!("no consumed counter for the endpoint:\n{text}"));
    assert!(consumed_line.contains("message_type=\"urn:message:HttpTests:Ping\""), "{consumed_line}");
    assert!(consumed_line.contains("consumer=\""), "{consumed_line}");
    assert!(consumed_line.ends_with(" 3"), "three consumed: {consumed_line}");
    assert!(text.contains("messaging_bus_published_total{"), "published counted");
    assert!(text.contains("# TYPE messaging_bus_consume_duration_seconds histogram"), "durations:\n{text}");
}
