//! busctl against RabbitMQ, each test in a vhost of its own, with messages put there by the
//! bus: `_error` messages from a failing consumer, `_skipped` ones nobody consumes.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::testing::Log;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message};
use bus_rabbitmq::RabbitMqTransport;
use serde::{Deserialize, Serialize};
use tests::poll_until;
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::Vhost;
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Busctl:Order")]
struct Order {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Busctl:Unwanted")]
struct Unwanted;

/// What the `orders` consumer saw: each order, and whether it carried fault headers.
#[derive(Clone, Default)]
struct Seen {
    orders: Log<(u32, Option<i64>, bool)>,
}

/// A bus whose `orders` endpoint fails while `failing` is set (no retry, straight to `_error`).
fn bus(transport: RabbitMqTransport, failing: Arc<AtomicBool>, seen: &Seen) -> Bus {
    let seen = seen.clone();
    Bus::builder(transport)
        .endpoint(Endpoint::new("orders").prefetch(50).handler(move |ctx: ConsumeContext<Order>| {
            let (failing, seen) = (failing.load(Ordering::SeqCst), seen.clone());
            let redrives = ctx.headers().get_i64(busctl::REDRIVE_COUNT);
            let fault_headers = ctx.headers().iter().any(|(name, _)| name.starts_with("MT-Fault-"));
            let n = ctx.message().n;
            async move {
                if failing {
                    return Err::<(), BoxError>("warehouse offline".into());
                }
                seen.orders.push((n, redrives, fault_headers));
                Ok(())
            }
        }))
        .build()
}

/// Runs busctl on `vhost`; its output, and whether it succeeded.
async fn busctl(vhost: &Vhost, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_busctl"))
        .arg("--addr")
        .arg(vhost.uri(5672))
        .args(args)
        .output()
        .await
        .expect("busctl runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

async fn vhost(prefix: &'static str) -> Vhost {
    require_broker();
    tokio::task::spawn_blocking(move || Vhost::create(prefix)).await.expect("vhost")
}

/// Messages waiting in each of the vhost's queues.
async fn queue_sizes(vhost: &Arc<Vhost>) -> HashMap<String, u64> {
    let vhost = vhost.clone();
    tokio::task::spawn_blocking(move || vhost.list_queues()).await.expect("queues").into_iter().collect()
}

/// Waits until `queue` holds `n` messages.
async fn wait_queue(vhost: &Arc<Vhost>, queue: &str, n: u64) {
    poll_until(&format!("{queue} holds {n}"), WAIT, Duration::from_millis(100), || async {
        let sizes = queue_sizes(vhost).await;
        if sizes.get(queue).copied().unwrap_or(0) == n {
            Ok(())
        } else {
            Err(format!("{sizes:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_on_what_the_bus_put_there() {
    let vhost = Arc::new(vhost("busctl").await);
    let failing = Arc::new(AtomicBool::new(true));
    let seen = Seen::default();
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("connects");
    let bus = bus(transport, failing.clone(), &seen);
    bus.start().await.expect("bus starts");
    for n in 0..3 {
        bus.send("queue:orders", Order { n }).await.expect("send");
    }
    bus.send("queue:orders", Unwanted).await.expect("send");
    wait_queue(&vhost, "orders_error", 3).await;
    wait_queue(&vhost, "orders_skipped", 1).await;

    let (ok, text) = busctl(&vhost, &["endpoints", "orders"]).await;
    assert!(ok, "{text}");
    let row = text.lines().find(|l| l.starts_with("orders ")).unwrap_or_default();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        columns,
        ["orders", "0", "-", "1", "3", "1"],
        "ready, unacked (unknown), consumers, error, skipped:\n{text}"
    );
    let (ok, text) = busctl(&vhost, &["endpoints"]).await;
    assert!(!ok && text.contains("rabbitmq_management"), "listing them all needs the management API: {text}");
    let (ok, text) = busctl(&vhost, &["topology"]).await;
    assert!(!ok && text.contains("rabbitmq_management"), "{text}");

    let (ok, text) = busctl(&vhost, &["errors", "orders", "--json"]).await;
    assert!(ok, "{text}");
    let errors: serde_json::Value = serde_json::from_str(text.trim()).expect("JSON");
    let errors = errors.as_array().expect("an array").clone();
    assert_eq!(errors.len(), 3);
    for error in &errors {
        assert_eq!(error["reason"], "fault");
        assert_eq!(error["exceptionMessage"], "warehouse offline");
        assert_eq!(error["messageType"], "urn:message:Busctl:Order");
        assert!(!error["faultTimestamp"].as_str().unwrap_or_default().is_empty());
    }
    let (ok, text) = busctl(&vhost, &["errors", "orders"]).await;
    assert!(ok && text.contains("3 messages in orders_error") && text.contains("warehouse offline"), "{text}");
    let first = errors[0]["messageId"].as_str().expect("an id").to_owned();

    let (ok, text) = busctl(&vhost, &["show", "orders", &first]).await;
    assert!(ok, "{text}");
    assert!(text.contains("MT-Fault-Message: warehouse offline"), "{text}");
    assert!(text.contains("\"messageType\": ["), "the body, pretty-printed: {text}");

    let (ok, text) = busctl(&vhost, &["redrive", "orders", "--older-than", "1h"]).await;
    assert!(ok && text.contains("redrove 0 messages"), "none failed an hour ago: {text}");
    let (ok, text) = busctl(&vhost, &["redrive", "orders"]).await;
    assert!(!ok && text.contains("say which messages"), "{text}");
    let (ok, text) = busctl(&vhost, &["redrive", "orders", "--id", &first, "--dry-run"]).await;
    assert!(ok && text.contains("would redrive 1 messages"), "{text}");
    assert_eq!(queue_sizes(&vhost).await.get("orders_error").copied(), Some(3), "a dry run moves nothing");

    // The warehouse is back: one message, then the rest.
    failing.store(false, Ordering::SeqCst);
    let (ok, text) = busctl(&vhost, &["redrive", "orders", "--id", &first]).await;
    assert!(ok && text.contains("redrove 1 messages"), "{text}");
    seen.orders.wait_until("the redriven order", WAIT, |o| o.len() == 1).await.expect("consumed");
    let (_, redrives, fault_headers) = seen.orders.snapshot()[0];
    assert_eq!(redrives, Some(1), "the redrive is counted");
    assert!(!fault_headers, "the fault headers are stripped");
    let (ok, text) = busctl(&vhost, &["redrive", "orders", "--type", "urn:message:Busctl:Order"]).await;
    assert!(ok && text.contains("redrove 2 messages"), "{text}");
    seen.orders.wait_until("every order", WAIT, |o| o.len() == 3).await.expect("consumed");
    let consumed: HashSet<u32> = seen.orders.snapshot().iter().map(|(n, _, _)| *n).collect();
    assert_eq!(consumed, (0..3).collect());

    let file = std::env::temp_dir().join(format!("busctl-order-{}.json", std::process::id()));
    std::fs::write(&file, r#"{"n": 42}"#).expect("file");
    let (ok, text) =
        busctl(&vhost, &["publish", "urn:message:Busctl:Order", "--json", &file.display().to_string()]).await;
    assert!(ok && text.contains("published"), "{text}");
    seen.orders
        .wait_until("the published order", WAIT, |o| o.iter().any(|(n, _, _)| *n == 42))
        .await
        .expect("consumed");

    let (ok, text) = busctl(&vhost, &["purge", "orders_skipped", "--yes"]).await;
    assert!(ok && text.contains("purged 1 messages"), "{text}");
    let (ok, text) = busctl(&vhost, &["purge", "no_such_queue", "--yes"]).await;
    assert!(!ok && text.contains("does not exist"), "{text}");
    bus.stop().await.expect("stop");
    let sizes = queue_sizes(&vhost).await;
    assert_eq!(sizes.get("orders_error").copied(), Some(0));
    assert_eq!(sizes.get("orders_skipped").copied(), Some(0));
}

/// 1,000 messages in `_error`; a redrive killed (SIGKILL) half-way: every message is still
/// in `_error` or back in the queue, at most one in both. A second redrive takes the rest,
/// and the consumer then sees every message once (the one in both, twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_half_way_loses_nothing() {
    const MESSAGES: u32 = 1_000;
    let vhost = Arc::new(vhost("busctl-kill").await);
    let failing = Arc::new(AtomicBool::new(true));
    let seen = Seen::default();
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("connects");
    let failing_bus = bus(transport.clone(), failing.clone(), &seen);
    failing_bus.start().await.expect("bus starts");
    let sends = (0..MESSAGES).map(|n| failing_bus.send("queue:orders", Order { n }));
    futures::future::try_join_all(sends).await.expect("sent");
    wait_queue(&vhost, "orders_error", u64::from(MESSAGES)).await;
    failing_bus.stop().await.expect("stop");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_busctl"))
        .args(["--addr", &vhost.uri(5672), "redrive", "orders", "--all"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("busctl runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut redriven = 0;
    while redriven < MESSAGES / 2 {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("progress").expect("a line");
        if line.is_some_and(|l| l.starts_with("redriven ")) {
            redriven += 1;
        }
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("killed");

    // Where each message is now: read both queues without taking anything.
    let connection = lapin::Connection::connect(&vhost.uri(5672), Default::default()).await.expect("connects");
    let mut places: HashMap<u32, u32> = HashMap::new();
    for queue in ["orders", "orders_error"] {
        let channel = connection.create_channel().await.expect("channel");
        loop {
            let options = lapin::options::BasicGetOptions { no_ack: false };
            let Some(got) = channel.basic_get(queue.into(), options).await.expect("get") else { break };
            let envelope: serde_json::Value = serde_json::from_slice(&got.delivery.data).expect("an envelope");
            let n = u32::try_from(envelope["message"]["n"].as_u64().expect("n")).expect("n");
            *places.entry(n).or_default() += 1;
        }
        // Closed unacknowledged: every message goes back.
        channel.close(200, "counted".into()).await.expect("close");
    }
    let _ = connection.close(200, "counted".into()).await;
    let in_both: Vec<u32> = places.iter().filter(|(_, count)| **count > 1).map(|(n, _)| *n).collect();
    assert_eq!(places.len(), MESSAGES as usize, "every message is somewhere");
    assert!(in_both.len() <= 1, "at most the one in hand is in both: {in_both:?}");

    let (ok, text) = busctl(&vhost, &["redrive", "orders", "--all"]).await;
    assert!(ok, "{text}");
    failing.store(false, Ordering::SeqCst);
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("connects");
    let consuming = bus(transport, failing, &seen);
    consuming.start().await.expect("bus starts");
    let expected = MESSAGES as usize + in_both.len();
    seen.orders.wait_until("every message", WAIT, |o| o.len() >= expected).await.expect("all consumed");
    consuming.stop().await.expect("stop");
    let mut times: HashMap<u32, u32> = HashMap::new();
    for (n, _, _) in seen.orders.snapshot() {
        *times.entry(n).or_default() += 1;
    }
    assert_eq!(times.len(), MESSAGES as usize, "every message consumed");
    for (n, count) in times {
        let once_more = u32::from(in_both.contains(&n));
        assert_eq!(count, 1 + once_more, "message {n}");
    }
}

/// With the management plugin (on a throwaway node): every endpoint listed without naming
/// it, with its unacknowledged count; the topology as a tree; `--watch` refreshing; and the
/// error queue read and redriven as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_management_api_endpoints_are_listed_and_the_topology_drawn() {
    require_broker();
    let (node, management) = tests::rabbit_support::ThrowawayNode::start_with_management().await;
    let addr = node.uri();
    let run = |args: Vec<String>| {
        let addr = addr.clone();
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_busctl"))
                .args(["--addr", &addr, "--management", &format!("http://127.0.0.1:{management}")])
                .args(&args)
                .output()
                .await
                .expect("busctl runs");
            let text =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            (output.status.success(), text)
        }
    };
    let failing = Arc::new(AtomicBool::new(true));
    let seen = Seen::default();
    let transport = RabbitMqTransport::connect(&addr).await.expect("connects");
    let bus = bus(transport, failing.clone(), &seen);
    bus.start().await.expect("bus starts");
    bus.publish(Order { n: 1 }).await.expect("publish");
    bus.publish(Order { n: 2 }).await.expect("publish");
    // The management API's counts lag a few seconds behind the queues.
    let text = poll_until("two in orders_error", WAIT, Duration::from_millis(500), || {
        let run = &run;
        async move {
            let (ok, text) = run(vec!["endpoints".into()]).await;
            assert!(ok, "{text}");
            let row = text.lines().find(|l| l.starts_with("orders ")).unwrap_or_default().to_owned();
            if row.split_whitespace().nth(4) == Some("2") {
                Ok(text)
            } else {
                Err(text)
            }
        }
    })
    .await;
    let row: Vec<&str> =
        text.lines().find(|l| l.starts_with("orders ")).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row, ["orders", "0", "0", "1", "2", "0"], "ready, unacked, consumers, error, skipped:\n{text}");
    assert!(!text.lines().any(|l| l.starts_with("orders_error")), "dead-letter queues are not endpoints:\n{text}");

    let (ok, text) = run(vec!["topology".into()]).await;
    assert!(ok, "{text}");
    assert!(text.contains("Busctl:Order (fanout)"), "the message type's exchange is a root:\n{text}");
    assert!(text.contains("  -> orders (fanout)"), "bound to the endpoint's exchange:\n{text}");
    assert!(text.contains("    -> queue orders"), "which routes to its queue:\n{text}");

    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_busctl"))
        .args(["--addr", &addr, "--management", &format!("http://127.0.0.1:{management}")])
        .args(["endpoints", "--watch", "--interval", "200ms"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("busctl runs");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let mut tables = 0;
    while tables < 2 {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("refreshed").expect("a line");
        if line.is_some_and(|l| l.contains("endpoint") && l.contains("unacked")) {
            tables += 1;
        }
    }
    watch.start_kill().expect("stop watching");
    let _ = watch.wait().await;

    // The commands that read and change queues work the same with the API.
    let (ok, text) = run(vec!["errors".into(), "orders".into(), "--json".into()]).await;
    let listed: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
    assert!(ok && listed.as_array().is_some_and(|a| a.len() == 2), "{text}");
    let id = listed[0]["messageId"].as_str().unwrap_or_default().to_owned();
    let (ok, text) = run(vec!["show".into(), "orders".into(), id]).await;
    assert!(ok && text.contains("MT-Fault-Message: warehouse offline"), "{text}");
    let (ok, text) = run(vec!["purge".into(), "orders_skipped".into(), "--yes".into()]).await;
    assert!(ok && text.contains("purged 0 messages"), "{text}");
    failing.store(false, Ordering::SeqCst);
    let file = std::env::temp_dir().join(format!("busctl-management-{}.json", std::process::id()));
    std::fs::write(&file, r#"{"n": 7}"#).expect("file");
    let (ok, text) =
        run(vec!["publish".into(), "urn:message:Busctl:Order".into(), "--json".into(), file.display().to_string()])
            .await;
    assert!(ok && text.contains("published"), "{text}");
    seen.orders.wait_until("the published order", WAIT, |o| o.len() == 1).await.expect("consumed");
    let (ok, text) = run(vec!["redrive".into(), "orders".into(), "--all".into()]).await;
    assert!(ok && text.contains("redrove 2 messages"), "{text}");
    seen.orders.wait_until("both orders", WAIT, |o| o.len() == 3).await.expect("consumed");
    bus.stop().await.expect("stop");
}
