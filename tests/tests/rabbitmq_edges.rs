//! Reliability at the edges, on the real broker: what the broker cannot take, moves that
//! cannot complete, refused publishes, and deliveries whose channel died. Each test states
//! what it breaks and checks that nothing was lost or doubled.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::testing::{Log, MessageLog};
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Fault, HealthStatus, Message, Permanent};
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::{require_broker, RabbitFixture};
use tests::rabbit_support::{rabbitmqctl, ThrowawayNode, Vhost};
use tests::{record, runtime, unique, Fixture, WAIT};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Edges:Probe")]
struct Probe {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Edges:Echo")]
struct Echo {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Edges:Held")]
struct Held {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Edges:Allowed")]
struct Allowed {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Edges:Forbidden")]
struct Forbidden {
    n: u32,
}

fn options() -> RabbitMqOptions {
    RabbitMqOptions {
        heartbeat: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_secs(1),
        publish_timeout: Duration::from_secs(20),
        ..RabbitMqOptions::default()
    }
}

/// A vhost of the test's own, for tests that count connections, cut them or change permissions.
async fn own_vhost(prefix: &'static str) -> Arc<Vhost> {
    require_broker();
    Arc::new(tokio::task::spawn_blocking(move || Vhost::create(prefix)).await.expect("vhost created"))
}

async fn ctl(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rabbitmqctl(&args)
    })
    .await
    .expect("rabbitmqctl runs")
}

/// Publishes a raw MassTransit envelope straight to `queue`, as a foreign producer would.
async fn publish_raw(channel: &lapin::Channel, queue: &str, body: String) {
    let properties = BasicProperties::default().with_content_type("application/vnd.masstransit+json".into());
    channel
        .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body.as_bytes(), properties)
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

/// Waits until the bus's health satisfies `condition`; returns the health that did.
async fn wait_health(bus: &Bus, what: &str, condition: impl Fn(&bus_core::BusHealth) -> bool) -> bus_core::BusHealth {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    loop {
        interval.tick().await;
        let health = bus.health().await;
        if condition(&health) {
            return health;
        }
        assert!(tokio::time::Instant::now() < deadline, "health never {what}: {health:?}");
    }
}

/// Breaks: a 200 KB header in a consumed envelope (copied onto what its consumer publishes)
/// and a 150 KB message type (copied into `MT-Fault-MessageType`), each of which would make
/// the broker close the connection (`FRAME_ERROR`). Proves: both end in `_error` with a
/// reason, the connection is never replaced, and another endpoint's messages in progress
/// meanwhile are each consumed once, never redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_too_large_for_a_frame_end_in_error_without_closing_the_connection() {
    let vhost = own_vhost("edge-frames").await;
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options()).await.expect("connects");
    let fixture = RabbitFixture::connect(&vhost.uri(5672)).await;
    let (big, held) = (unique("frames-big"), unique("frames-held"));
    const HELD: u32 = 20;
    let started = Log::<u32>::default();
    let finished = Log::<u32>::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let faults = Arc::new(MessageLog::default());
    let bus = Bus::builder(transport.clone())
        .stop_timeout(Duration::from_secs(10))
        .endpoint(Endpoint::new(&big).handler(|ctx: ConsumeContext<Probe>| async move {
            if ctx.message().n == 2 {
                return Err(Permanent::new(std::io::Error::other("probe 2 fails")).into());
            }
            // Copies the consumed envelope's headers (the 200 KB one among them).
            ctx.publish(Echo { n: ctx.message().n }).await?;
            Ok(())
        }))
        .endpoint(Endpoint::new(&held).prefetch(HELD as u16).handler_with_state(
            (started.clone(), finished.clone(), gate.clone()),
            |ctx: ConsumeContext<Held>, (started, finished, gate)| async move {
                started.push(ctx.message().n);
                gate.acquire().await?.forget();
                finished.push(ctx.message().n);
                Ok(())
            },
        ))
        .endpoint(record::<Fault<Probe>>(Endpoint::new(unique("frames-faults")), &faults))
        .build();
    bus.start().await.expect("bus starts");
    let connections = transport.connection_count();
    for n in 0..HELD {
        bus.send(&format!("queue:{held}"), Held { n }).await.expect("sent");
    }
    started.wait_until("every held message in progress", WAIT, |s| s.len() == HELD as usize).await.expect("held");

    let channel = fixture.channel().await;
    let id = || uuid::Uuid::now_v7();
    let big_header = "h".repeat(200 * 1024);
    publish_raw(
        &channel,
        &big,
        format!(
            r#"{{"messageId":"{}","messageType":["urn:message:Edges:Probe"],"headers":{{"Big":"{big_header}"}},"message":{{"n":1}}}}"#,
            id()
        ),
    )
    .await;
    let long_type = format!("urn:message:Edges:{}", "T".repeat(150 * 1024));
    publish_raw(
        &channel,
        &big,
        format!(
            r#"{{"messageId":"{}","messageType":["{long_type}","urn:message:Edges:Probe"],"message":{{"n":2}}}}"#,
            id()
        ),
    )
    .await;
    let errors = fixture.take_messages(&format!("{big}_error"), 2, Duration::from_secs(30)).await;
    faults.wait_for::<Fault<Probe>>(2, WAIT).await.expect("one fault each");
    gate.add_permits(HELD as usize);
    finished.wait_until("every held message consumed", WAIT, |f| f.len() == HELD as usize).await.expect("consumed");
    bus.stop().await.expect("stop");

    let reasons: Vec<&str> = errors.iter().map(|m| m.headers.get_str("MT-Fault-Message").unwrap_or_default()).collect();
    assert_eq!(errors.len(), 2, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("frame") && r.contains("131072")), "{reasons:?}");
    assert!(reasons.contains(&"probe 2 fails"), "{reasons:?}");
    let fault_type = errors
        .iter()
        .find_map(|m| m.headers.get_str("MT-Fault-MessageType").filter(|t| t.starts_with("urn:message:Edges:T")))
        .expect("the long type is named");
    assert!(fault_type.len() <= 1030, "the fault header is bounded: {} bytes", fault_type.len());
    assert_eq!(transport.connection_count(), connections, "the broker never closed a connection");
    let mut consumed = finished.snapshot();
    consumed.sort_unstable();
    assert_eq!(consumed, (0..HELD).collect::<Vec<_>>(), "each held message consumed once");
    for fault in faults.envelopes::<Fault<Probe>>() {
        assert!(fault.headers.get("Big").is_none(), "the 200 KB header is not copied onto the fault");
    }
    transport.close().await;
}

/// A bus whose endpoint `queue` fails every message for good, counting its runs, with the
/// faults recorded.
struct Poisoned {
    bus: Bus,
    faults: Arc<MessageLog>,
    runs: Arc<AtomicU32>,
}

fn poisoned(fixture: &RabbitFixture, queue: &str) -> Poisoned {
    let faults = Arc::new(MessageLog::default());
    let runs = Arc::new(AtomicU32::new(0));
    let bus = {
        let runs = runs.clone();
        fixture
            .bus()
            .endpoint(Endpoint::new(queue).handler(move |_: ConsumeContext<Probe>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), BoxError>(Permanent::new(std::io::Error::other("poison")).into()) }
            }))
            .endpoint(record::<Fault<Probe>>(Endpoint::new(unique("poison-faults")), &faults))
            .build()
    };
    Poisoned { bus, faults, runs }
}

/// Breaks: the endpoint's `_error` queue is deleted by an operator. Proves: a poison message
/// still ends there (declared again) with exactly one fault.
#[test]
fn a_deleted_error_queue_is_declared_again_and_gets_the_message_with_one_fault() {
    runtime().block_on(async {
        let fixture = RabbitFixture::shared("edges").await;
        let queue = unique("deleted-error");
        let Poisoned { bus, faults, runs } = poisoned(&fixture, &queue);
        bus.start().await.expect("bus starts");
        let channel = fixture.channel().await;
        channel
            .queue_delete(format!("{queue}_error").as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("deleted");

        bus.send(&format!("queue:{queue}"), Probe { n: 1 }).await.expect("sent");
        let errors = fixture.take_messages(&format!("{queue}_error"), 1, Duration::from_secs(30)).await;
        faults.wait_for::<Fault<Probe>>(1, WAIT).await.expect("a fault");
        bus.stop().await.expect("stop");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].headers.get_str("MT-Fault-Message"), Some("poison"));
        assert_eq!(faults.count::<Fault<Probe>>(), 1, "one fault, not one per attempt to move");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "consumed once");
    });
}

/// Breaks: `_error` refuses every message (`max-length` 0 with `reject-publish`). Proves: the
/// poison message stays in its queue, its consumer runs once and one fault goes out (not one
/// per lap), health says which move fails and why, and once the queue takes messages again
/// the message ends there.
#[test]
fn a_move_the_error_queue_refuses_waits_in_its_queue_and_degrades_health() {
    runtime().block_on(async {
        let fixture = RabbitFixture::shared("edges").await;
        let queue = unique("full-error");
        let Poisoned { bus, faults, runs } = poisoned(&fixture, &queue);
        bus.start().await.expect("bus starts");
        let (vhost, policy) = (fixture.vhost().to_owned(), unique("cap"));
        let args = |extra: &[&str]| -> Vec<String> {
            let mut args: Vec<String> = ["-p", &vhost].iter().map(|s| s.to_string()).collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };
        let pattern = format!("^{queue}_error$");
        let mut set = vec!["set_policy".to_owned()];
        set.extend(args(&[
            &policy,
            &pattern,
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
            "--apply-to",
            "queues",
        ]));
        ctl(set).await;

        bus.send(&format!("queue:{queue}"), Probe { n: 1 }).await.expect("sent");
        let health = wait_health(&bus, "degraded by the failed move", |h| h.status == HealthStatus::Degraded).await;
        let reason = health.endpoints.iter().find_map(|e| e.reason.clone()).unwrap_or_default();
        assert!(reason.contains(&format!("`{queue}_error`")), "health names the target: {reason}");
        assert!(reason.contains("did not accept"), "health says why: {reason}");
        faults.wait_for::<Fault<Probe>>(1, WAIT).await.expect("a fault");

        let mut clear = vec!["clear_policy".to_owned()];
        clear.extend(args(&[&policy]));
        ctl(clear).await;
        let errors = fixture.take_messages(&format!("{queue}_error"), 1, Duration::from_secs(60)).await;
        wait_health(&bus, "healthy again", |h| h.status == HealthStatus::Healthy).await;
        bus.stop().await.expect("stop");
        assert_eq!(errors.len(), 1, "the message ends in `_error` once it takes messages");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the consumer ran once, however many times the move was tried");
        assert_eq!(faults.count::<Fault<Probe>>(), 1, "one fault for the message");
        assert!(fixture.take_messages(&queue, 0, Duration::ZERO).await.is_empty(), "nothing left in its queue");
    });
}

/// Breaks: one publish among 200 goes to an exchange the user may not write to; the broker
/// refuses it by closing the channel all of them share. Proves: exactly that one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_publish_fails_alone() {
    let vhost = own_vhost("edge-refused").await;
    let name = vhost.name.clone();
    ctl(["set_permissions", "-p", &name, "guest", ".*", "^(?!Edges:Forbidden).*", ".*"].map(str::to_owned).to_vec())
        .await;
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options()).await.expect("connects");
    let bus = Bus::builder(transport.clone()).build();
    bus.start().await.expect("bus starts");
    // The exchanges exist before the race: the refusal comes from the publish itself.
    bus.publish(Allowed { n: 0 }).await.expect("allowed");
    assert!(bus.publish(Forbidden { n: 0 }).await.is_err(), "the user may not write there");

    let allowed = (1..=200).map(|n| {
        let bus = bus.clone();
        tokio::spawn(async move { bus.publish(Allowed { n }).await })
    });
    let allowed: Vec<_> = allowed.collect();
    let forbidden = bus.publish(Forbidden { n: 1 });
    let forbidden = forbidden.await;
    let mut failed = 0;
    for handle in allowed {
        if let Err(error) = handle.await.expect("joined") {
            failed += 1;
            eprintln!("an allowed publish failed: {error}");
        }
    }
    bus.stop().await.expect("stop");
    transport.close().await;
    let error = forbidden.expect_err("the forbidden publish fails");
    assert!(!error.is_transient(), "a refusal is not transient: {error}");
    let why = bus_core::logged::chain(&error).to_string();
    assert!(why.contains("ACCESS_REFUSED") || why.contains("403"), "{why}");
    assert_eq!(failed, 0, "no allowed publish failed with it");
}

/// Breaks: the connection is closed while a consumer works on a message that then fails for
/// good; the broker has requeued the message by then and delivers it again. Proves: exactly
/// one copy in `_error` and one fault, from the delivery that is still live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_channel_closed_moves_and_faults_only_once() {
    let vhost = own_vhost("edge-gone").await;
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options()).await.expect("connects");
    let queue = unique("gone");
    let faults = Arc::new(MessageLog::default());
    let runs = Log::<bool>::default();
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let bus = Bus::builder(transport.clone())
        .stop_timeout(Duration::from_secs(10))
        .endpoint(Endpoint::new(&queue).handler_with_state(
            (runs.clone(), reconnected.clone()),
            |ctx: ConsumeContext<Probe>, (runs, reconnected)| async move {
                let first = ctx.envelope().message_id.is_some() && runs.is_empty();
                runs.push(first);
                if first {
                    // Works on until the connection it came on is gone and replaced.
                    reconnected.notified().await;
                }
                Err::<(), BoxError>(Permanent::new(std::io::Error::other("fails for good")).into())
            },
        ))
        .endpoint(record::<Fault<Probe>>(Endpoint::new(unique("gone-faults")), &faults))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{queue}"), Probe { n: 1 }).await.expect("sent");
    runs.wait_until("the first delivery in progress", WAIT, |r| r.len() == 1).await.expect("started");
    let cut = vhost.clone();
    tokio::task::spawn_blocking(move || cut.close_all_connections()).await.expect("rabbitmqctl");
    runs.wait_until("the message delivered again", Duration::from_secs(30), |r| r.len() == 2).await.expect("again");
    faults.wait_for::<Fault<Probe>>(1, WAIT).await.expect("a fault");
    reconnected.notify_one();
    // Opened after the cut, which closes every connection to the vhost.
    let fixture = RabbitFixture::connect(&vhost.uri(5672)).await;
    let errors = fixture.take_messages(&format!("{queue}_error"), 1, Duration::from_secs(30)).await;
    bus.stop().await.expect("stop: the first consume has finished");
    let more = fixture.take_messages(&format!("{queue}_error"), 0, Duration::ZERO).await;
    transport.close().await;
    assert_eq!(errors.len() + more.len(), 1, "one copy in `_error`");
    assert_eq!(faults.count::<Fault<Probe>>(), 1, "one fault");
    assert_eq!(runs.len(), 2, "consumed by the dead delivery and by its redelivery");
}

/// Breaks: an operator deletes the endpoint's queue, then its exchange, under the running
/// bus. Proves: each is declared again within a few seconds, health says what happened, and
/// messages published afterwards are consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_queue_and_exchange_deleted_mid_run_are_declared_again() {
    let vhost = own_vhost("edge-deleted").await;
    let options = RabbitMqOptions { topology_check_interval: Duration::from_secs(1), ..options() };
    let transport = RabbitMqTransport::connect_with(&vhost.uri(5672), options).await.expect("connects");
    let fixture = RabbitFixture::connect(&vhost.uri(5672)).await;
    let queue = unique("deleted");
    let got = Arc::new(MessageLog::default());
    let bus = Bus::builder(transport.clone()).endpoint(record::<Probe>(Endpoint::new(&queue), &got)).build();
    bus.start().await.expect("bus starts");
    bus.publish(Probe { n: 1 }).await.expect("published");
    got.wait_for::<Probe>(1, WAIT).await.expect("consumed before");

    let channel = fixture.channel().await;
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.expect("queue deleted");
    // Reported once declared again: what was published before that went nowhere.
    let health = wait_health(&bus, "reporting the deleted queue", |h| {
        h.endpoints.iter().any(|e| {
            e.reason.as_deref().is_some_and(|r| r.contains(&format!("queue `{queue}` was deleted and declared again")))
        })
    })
    .await;
    assert_eq!(health.status, HealthStatus::Degraded);
    bus.publish(Probe { n: 2 }).await.expect("published");
    got.wait_for::<Probe>(2, WAIT).await.expect("consumed after the queue was declared again");

    channel
        .exchange_delete(queue.as_str().into(), lapin::options::ExchangeDeleteOptions::default())
        .await
        .expect("exchange deleted");
    wait_health(&bus, "reporting the deleted exchange", |h| {
        h.endpoints.iter().any(|e| {
            e.reason
                .as_deref()
                .is_some_and(|r| r.contains(&format!("exchange `{queue}` was deleted and declared again")))
        })
    })
    .await;
    bus.publish(Probe { n: 3 }).await.expect("published");
    got.wait_for::<Probe>(3, WAIT).await.expect("consumed after the exchange was declared again");
    wait_health(&bus, "healthy again", |h| h.status == HealthStatus::Healthy).await;
    bus.stop().await.expect("stop");
    transport.close().await;
    let mut numbers: Vec<u32> = got.messages::<Probe>().iter().map(|p| p.n).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3]);
}

/// Breaks: a memory alarm on a throwaway node (`set_vm_memory_high_watermark 0`), which blocks
/// the connections that publish. Proves: consuming and acknowledging go on (they have a
/// connection of their own), health says "broker alarm", a publish waits instead of failing,
/// and it completes, and is consumed, once the alarm clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_alarm_blocks_publishing_but_not_consuming() {
    let node = ThrowawayNode::start().await;
    let transport = RabbitMqTransport::connect_with(&node.uri(), options()).await.expect("connects");
    let queue = unique("alarm");
    const BEFORE: u32 = 10;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let consumed = Log::<u32>::default();
    let bus = Bus::builder(transport.clone())
        .endpoint(Endpoint::new(&queue).prefetch(32).handler_with_state(
            (gate.clone(), consumed.clone()),
            |ctx: ConsumeContext<Probe>, (gate, consumed)| async move {
                if ctx.message().n < BEFORE {
                    gate.acquire().await?.forget();
                }
                consumed.push(ctx.message().n);
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    for n in 0..BEFORE {
        bus.send(&format!("queue:{queue}"), Probe { n }).await.expect("sent before the alarm");
    }
    node.ctl(&["set_vm_memory_high_watermark", "0"]).await;
    let during = {
        let (bus, queue) = (bus.clone(), queue.clone());
        tokio::spawn(async move { bus.send(&format!("queue:{queue}"), Probe { n: BEFORE }).await })
    };
    let health = wait_health(&bus, "reporting the alarm", |h| {
        h.endpoints.iter().any(|e| e.reason.as_deref().is_some_and(|r| r.contains("broker alarm")))
    })
    .await;
    assert_eq!(health.status, HealthStatus::Degraded);

    // Consumed and acknowledged while publishing is blocked: the queue empties.
    gate.add_permits(BEFORE as usize);
    consumed.wait_until("the messages sent before", WAIT, |c| c.len() == BEFORE as usize).await.expect("consumed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        let waiting = node.list_queues().await.into_iter().find(|(name, _)| *name == queue).map_or(0, |(_, n)| n);
        if waiting == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{waiting} deliveries still unacknowledged during the alarm");
    }
    assert!(!during.is_finished(), "the publish waits while the broker blocks it");

    node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    during.await.expect("joined").expect("the publish completes once the alarm clears");
    consumed.wait_until("the message sent during the alarm", WAIT, |c| c.contains(&BEFORE)).await.expect("consumed");
    wait_health(&bus, "healthy again", |h| h.status == HealthStatus::Healthy).await;
    bus.stop().await.expect("stop");
    transport.close().await;
    assert_eq!(consumed.len(), BEFORE as usize + 1, "each message consumed once");
}

/// Settings that would panic or loop hot (an overflowing deadline, failed reconnections with no
/// pause between them) are refused before anything connects, naming the setting.
#[tokio::test]
async fn options_that_cannot_work_are_refused_before_connecting() {
    let defaults = RabbitMqOptions::default;
    let cases = [
        (RabbitMqOptions { publish_timeout: Duration::MAX, ..defaults() }, "publish_timeout"),
        (RabbitMqOptions { connect_timeout: Duration::ZERO, ..defaults() }, "connect_timeout"),
        (RabbitMqOptions { reconnect_min: Duration::ZERO, ..defaults() }, "reconnect_min"),
        (RabbitMqOptions { topology_check_interval: Duration::ZERO, ..defaults() }, "topology_check_interval"),
        (RabbitMqOptions { heartbeat: Duration::from_secs(100_000), ..defaults() }, "heartbeat"),
        (RabbitMqOptions { publish_channels: 0, ..defaults() }, "publish_channels"),
    ];
    for (options, setting) in cases {
        // Port 1: nothing listens there, so only the check can answer.
        let error = RabbitMqTransport::connect_with("amqps://guest:s3cret@127.0.0.1:1/%2f", options)
            .await
            .expect_err("refused");
        let text = error.to_string();
        assert!(text.contains(setting) && text.contains("invalid rabbitmq configuration"), "{text}");
        assert!(!error.is_transient(), "{text}");
    }
    let error = RabbitMqTransport::connect("http://guest:s3cret@host/vh?x=1").await.expect_err("refused");
    assert!(!error.to_string().contains("s3cret"), "the password never shows: {error}");
}

/// The vhost's channels, as (connection, channel number).
async fn channels(vhost: &str) -> HashSet<(String, String)> {
    let out = ctl(["list_channels", "-p", vhost, "connection", "number", "--quiet", "--no-table-headers"]
        .map(str::to_owned)
        .to_vec())
    .await;
    out.lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(connection, number)| (connection.trim().to_owned(), number.trim().to_owned()))
        .collect()
}

/// Breaks: the network stalls while a send waits for its confirm, so the send times out with
/// its confirm still pending. Proves: that channel is closed, not handed to the next send
/// (whose confirm, or a returned message, could be taken for the late one's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_confirm_timed_out_is_not_used_again() {
    let vhost = own_vhost("edge-confirm").await;
    let proxy = tests::rabbit_support::TcpProxy::start(tests::rabbit_support::shared_addr()).await;
    let options = RabbitMqOptions { publish_timeout: Duration::from_secs(1), ..options() };
    let transport = RabbitMqTransport::connect_with(&vhost.uri(proxy.port()), options).await.expect("connects");
    let queue = unique("confirms");
    // An endpoint nobody consumes: its queue, and its exchange bound to it.
    let bus = Bus::builder(transport.clone())
        .endpoint(record::<Probe>(Endpoint::new(&queue), &MessageLog::default()))
        .build();
    bus.start().await.expect("declares the endpoint");
    bus.stop().await.expect("and stops consuming it");
    let bus = Bus::builder(transport.clone()).build();
    bus.start().await.expect("bus starts");
    let address = format!("queue:{queue}");
    let idle = channels(&vhost.name).await;
    bus.send(&address, Probe { n: 1 }).await.expect("a first send opens the send channel");
    let sending: HashSet<_> = channels(&vhost.name).await.difference(&idle).cloned().collect();
    assert!(!sending.is_empty(), "the send channel is listed");

    proxy.stall();
    let timed_out = bus.send(&address, Probe { n: 2 }).await;
    assert!(timed_out.is_err_and(|e| e.is_transient()), "no confirm within the timeout");
    proxy.resume();
    bus.send(&address, Probe { n: 3 }).await.expect("sent on a fresh channel");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        let now = channels(&vhost.name).await;
        if sending.iter().all(|channel| !now.contains(channel)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the timed-out channel is still open: {sending:?} in {now:?}");
    }
    bus.stop().await.expect("stop");
    transport.close().await;
}
