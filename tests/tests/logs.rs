//! Logs that help at 3 a.m.: a failure's log lines say which message, of which type, on
//! which endpoint and in which trace, and never hold the message's body or a password.

use bus_core::sync::MutexExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::InMemoryTransport;
use serde::{Deserialize, Serialize};
use tests::unique;

const WAIT: Duration = Duration::from_secs(10);

/// Everything logged at info and above in this test binary, as the default format writes it.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.locked().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged() -> String {
    String::from_utf8_lossy(&logs().locked()).into_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Logs:ChargeCard")]
struct ChargeCard {
    card_number: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_logs_its_message_type_endpoint_and_trace_but_not_its_body() {
    logs();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let marker = unique("payments");
    let transport = InMemoryTransport::new();
    let bus = Bus::builder(transport.clone())
        .tracer_provider(&provider)
        .endpoint(
            Endpoint::new(&marker)
                .retry(RetryPolicy::immediate(1))
                .handler(|_: ConsumeContext<ChargeCard>| async { Err::<(), BoxError>("card declined".into()) }),
        )
        .build();
    bus.start().await.expect("bus starts");
    let secret = "4111-1111-1111-SECRET";
    bus.send(&format!("queue:{marker}"), ChargeCard { card_number: secret.into() }).await.expect("send");
    transport.wait_for_queue_len(&format!("{marker}_error"), 1, WAIT).await.expect("failed for good");
    // A message that does not match its type: serde's reason would quote the value.
    let mismatched = format!(
        r#"{{"messageId":"{}","messageType":["urn:message:Logs:ChargeCard"],"message":{{"card_number":987654321987}}}}"#,
        uuid::Uuid::now_v7()
    );
    let mismatched = bus_core::TransportMessage {
        body: mismatched.into_bytes().into(),
        content_type: Some("application/vnd.masstransit+json".into()),
        ..Default::default()
    };
    bus_core::Transport::send(&transport, &marker, mismatched).await.expect("send");
    transport.wait_for_queue_len(&format!("{marker}_error"), 2, WAIT).await.expect("unreadable as its type");
    // And one that is no envelope at all: the transport's message id names it.
    let garbled_id = uuid::Uuid::now_v7();
    let garbled = bus_core::TransportMessage {
        body: b"{not json".to_vec().into(),
        content_type: Some("application/vnd.masstransit+json".into()),
        message_id: Some(garbled_id),
        ..Default::default()
    };
    bus_core::Transport::send(&transport, &marker, garbled).await.expect("send");
    transport.wait_for_queue_len(&format!("{marker}_error"), 3, WAIT).await.expect("unreadable");
    bus.stop().await.expect("stop");
    let failed = transport.peek(&format!("{marker}_error")).into_iter().next().expect("the failed message");
    let logged_so_far = logged();
    let mismatch = logged_so_far.lines().find(|l| l.contains(&marker) && l.contains("does not match"));
    let mismatch = mismatch.expect("the mismatched message's failure is logged");
    assert!(mismatch.contains("invalid type: integer, expected a string"), "{mismatch}");
    assert!(!logged_so_far.contains("987654321987"), "a value from a message reached the logs:\n{logged_so_far}");
    let unreadable = logged_so_far.lines().find(|l| l.contains(&marker) && l.contains("unreadable message"));
    let unreadable = unreadable.expect("the unreadable message is logged");
    assert!(unreadable.contains("ERROR") && unreadable.contains(&format!("message_id={garbled_id}")), "{unreadable}");
    let envelope = bus_core::Envelope::from_json(&failed.body).expect("envelope");
    let message_id = envelope.message_id.expect("message id").to_string();
    let trace_id = envelope.headers.get_str("traceparent").and_then(|t| t.split('-').nth(1)).expect("trace id");

    let logged = logged();
    let ours: Vec<&str> = logged.lines().filter(|l| l.contains(&marker)).collect();
    for (what, level) in [("consume failed; retrying", "INFO"), ("moved to the error queue", "ERROR")] {
        let line = ours.iter().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no `{what}` line in {ours:#?}"));
        assert!(line.contains(level), "{line}");
        for field in [
            format!("endpoint={marker}"),
            format!("message_id={message_id}"),
            "message_type=\"urn:message:Logs:ChargeCard\"".to_owned(),
            format!("trace_id=\"{trace_id}\""),
            "consumer=".to_owned(),
            "card declined".to_owned(),
        ] {
            assert!(line.contains(&field), "`{field}` missing from {line}");
        }
    }
    assert!(!logged.contains(secret), "a message body reached the logs:\n{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_logs_name_the_broker_without_its_password() {
    tests::rabbit_fixture::require_broker();
    logs();
    let transport =
        bus_rabbitmq::RabbitMqTransport::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await.expect("rabbitmq");
    transport.close().await;
    let logged = logged();
    let connected = logged.lines().find(|l| l.contains("connected to rabbitmq")).expect("the connection is logged");
    assert!(connected.contains("amqp://guest:***@127.0.0.1:5672"), "{connected}");
    assert!(!logged.contains("guest:guest"), "a password reached the logs:\n{logged}");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Logs:SlowJob")]
struct SlowJob {
    n: u32,
}

/// Breaks: a consumer holds a delivery past the broker's `consumer_timeout` (2 s on a
/// throwaway node that checks every half second). Proves: the bus logs a warning that names
/// the setting and the endpoint, subscribes again, and the message is delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_consumer_timeout_is_logged_with_the_setting_and_the_endpoint() {
    logs();
    let node = tests::rabbit_support::ThrowawayNode::start_with_configs(
        "consumer_timeout = 2000",
        "[{rabbit, [{channel_tick_interval, 500}]}].",
    )
    .await;
    let transport = bus_rabbitmq::RabbitMqTransport::connect(&node.uri()).await.expect("connects");
    let endpoint = unique("slow-jobs");
    let deliveries = bus_core::testing::Log::<bool>::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let bus = Bus::builder(transport.clone())
        .stop_timeout(Duration::from_secs(5))
        .endpoint(Endpoint::new(&endpoint).handler_with_state(
            (deliveries.clone(), release.clone()),
            |ctx: ConsumeContext<SlowJob>, (deliveries, release)| async move {
                let first = deliveries.is_empty();
                deliveries.push(first);
                if first {
                    // Holds the delivery past the broker's timeout.
                    release.notified().await;
                }
                let _ = ctx.message().n;
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{endpoint}"), SlowJob { n: 1 }).await.expect("sent");
    deliveries
        .wait_until("delivered again after the timeout", Duration::from_secs(30), |d| d.len() >= 2)
        .await
        .expect("again");
    release.notify_one();
    bus.stop().await.expect("stop");
    transport.close().await;
    let warning = logged()
        .lines()
        .find(|line| line.contains("consumer_timeout") && line.contains(&endpoint))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no warning names consumer_timeout and {endpoint}:\n{}", logged()));
    assert!(warning.contains("WARN"), "{warning}");
}
