//! RabbitMQ topology, MassTransit interop and bad input from the wire, on the real broker.

use std::time::Duration;

use bus_core::testing::MessageLog;
use bus_core::{ConsumeContext, Endpoint, Message, SendOptions};
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::RabbitFixture;
use tests::rabbit_support::rabbitmqctl;
use tests::{runtime, unique, Fixture, WAIT};

async fn fixture() -> RabbitFixture {
    RabbitFixture::shared("wire").await
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaWithMasstransitShared:NewOrderEvent")]
struct NewOrderEvent {
    order_id: uuid::Uuid,
    user_email: String,
}

fn ctl_lines(args: &[&str]) -> Vec<Vec<String>> {
    rabbitmqctl(args).lines().map(|l| l.split('\t').map(str::to_owned).collect()).collect()
}

#[test]
fn endpoint_topology_matches_masstransit() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let queue = unique("OrderState");
        let bus = fixture
            .bus()
            .endpoint(
                Endpoint::new(&queue)
                    .redelivery(bus_core::RedeliveryPolicy::intervals([Duration::from_secs(5)]))
                    .handler(|_: ConsumeContext<NewOrderEvent>| async { Ok(()) }),
            )
            .build();
        bus.start().await.expect("bus starts");
        let vhost = fixture.vhost().to_owned();
        let (exchanges, queues, bindings) = tokio::task::spawn_blocking(move || {
            (
                ctl_lines(&[
                    "list_exchanges",
                    "-p",
                    &vhost,
                    "name",
                    "type",
                    "durable",
                    "--quiet",
                    "--no-table-headers",
                ]),
                ctl_lines(&[
                    "list_queues",
                    "-p",
                    &vhost,
                    "name",
                    "durable",
                    "arguments",
                    "--quiet",
                    "--no-table-headers",
                ]),
                ctl_lines(&[
                    "list_bindings",
                    "-p",
                    &vhost,
                    "source_name",
                    "destination_name",
                    "destination_kind",
                    "--quiet",
                    "--no-table-headers",
                ]),
            )
        })
        .await
        .expect("rabbitmqctl");
        bus.stop().await.expect("stop");

        let exchange = |name: &str| exchanges.iter().find(|e| e[0] == name).cloned();
        let type_exchange = "SagaWithMasstransitShared:NewOrderEvent";
        assert_eq!(exchange(type_exchange), Some(vec![type_exchange.into(), "fanout".into(), "true".into()]));
        for name in [queue.clone(), format!("{queue}_error"), format!("{queue}_skipped")] {
            assert_eq!(exchange(&name), Some(vec![name.clone(), "fanout".into(), "true".into()]), "exchange {name}");
            assert!(queues.iter().any(|q| q[0] == name && q[1] == "true"), "durable queue {name}");
            assert!(
                bindings.iter().any(|b| b[0] == name && b[1] == name && b[2] == "queue"),
                "exchange {name} bound to queue {name}"
            );
        }
        assert!(
            bindings.iter().any(|b| b[0] == type_exchange && b[1] == queue && b[2] == "exchange"),
            "message-type exchange bound to the endpoint exchange: {bindings:?}"
        );
        let delay = queues.iter().find(|q| q[0] == format!("{queue}_delay_5000ms")).expect("redelivery queue");
        assert!(delay[2].contains("x-message-ttl") && delay[2].contains("5000"), "{delay:?}");
        assert!(delay[2].contains("x-dead-letter-exchange") && delay[2].contains(&queue), "{delay:?}");
    });
}

const VECTOR: &[u8] = include_bytes!("../../bus-core/tests/vectors/new-order-event.envelope.json");

#[test]
fn masstransit_envelope_published_raw_is_consumed_with_ids_intact() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let got = std::sync::Arc::new(MessageLog::default());
        let bus =
            fixture.bus().endpoint(tests::record::<NewOrderEvent>(Endpoint::new(unique("interop-in")), &got)).build();
        bus.start().await.expect("bus starts");
        // As a .NET MassTransit service publishes it: to the type exchange, with its properties.
        let channel = fixture.channel().await;
        let mut headers = FieldTable::default();
        headers.insert(
            "MT-Activity-Id".into(),
            AMQPValue::LongString(LongString::from("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_message_id("0a790000-5d3a-0015-4ccf-08dd5f3c2a41".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        channel
            .basic_publish(
                "SagaWithMasstransitShared:NewOrderEvent".into(),
                "".into(),
                BasicPublishOptions::default(),
                VECTOR,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let messages = got.wait_for::<NewOrderEvent>(1, WAIT).await.expect("consumed");
        bus.stop().await.expect("stop");
        let envelope = &got.all()[0];
        assert_eq!(envelope.message_id.map(|u| u.to_string()).as_deref(), Some("0a790000-5d3a-0015-4ccf-08dd5f3c2a41"));
        assert_eq!(
            envelope.conversation_id.map(|u| u.to_string()).as_deref(),
            Some("0a790000-5d3a-0015-8e4c-08dd5f3c2a42")
        );
        assert!(envelope.source_address.as_deref().is_some_and(|a| a.contains("SagaWithMasstransitWebsite")));
        assert_eq!(
            envelope.headers.get_str("MT-Activity-Id"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(messages[0].user_email, "customer@example.com");
        assert_eq!(messages[0].order_id.to_string(), "3f2a9d41-1c7b-4e0a-9a55-2d8c6e1b7f03");
    });
}

#[test]
fn published_message_read_back_raw_is_a_masstransit_envelope() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let bus = fixture.bus().build();
        bus.start().await.expect("bus starts");
        // A plain queue bound to the type exchange, as any other subscriber would have.
        let channel = fixture.channel().await;
        let tap = unique("tap");
        channel
            .queue_declare(tap.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .expect("tap");
        let message = NewOrderEvent { order_id: uuid::Uuid::now_v7(), user_email: "ann@example.com".into() };
        bus.publish_with(message.clone(), SendOptions::new().header("Tenant", "acme"))
            .await
            .expect("declares the exchange");
        channel
            .queue_bind(
                tap.as_str().into(),
                "SagaWithMasstransitShared:NewOrderEvent".into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        bus.publish_with(message.clone(), SendOptions::new().header("Tenant", "acme")).await.expect("publish");
        let raw = fixture.take_messages(&tap, 1, WAIT).await;
        bus.stop().await.expect("stop");
        assert_eq!(raw.len(), 1);
        let wire = &raw[0];
        assert_eq!(wire.content_type.as_deref(), Some("application/vnd.masstransit+json"));
        assert_eq!(wire.headers.get_str("Tenant"), Some("acme"), "envelope headers copied to AMQP headers");
        let json: serde_json::Value = serde_json::from_slice(&wire.body).expect("JSON body");
        for field in bus_core::envelope::FIELDS {
            assert!(json.get(field).is_some(), "envelope field {field}");
        }
        assert_eq!(json["messageType"][0], "urn:message:SagaWithMasstransitShared:NewOrderEvent");
        assert_eq!(json["message"]["userEmail"], "ann@example.com");
        assert_eq!(
            json["destinationAddress"],
            "rabbitmq://127.0.0.1/".to_owned() + fixture.vhost() + "/SagaWithMasstransitShared:NewOrderEvent"
        );
        assert_eq!(
            wire.message_id.map(|u| u.to_string()),
            json["messageId"].as_str().map(str::to_owned),
            "message_id property"
        );
        assert_eq!(json["headers"]["Tenant"], "acme");
    });
}

#[test]
fn delivery_properties_are_persistent_with_ids() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let queue = unique("props");
        let bus = fixture
            .bus()
            .endpoint(Endpoint::new(&queue).handler(|_: ConsumeContext<NewOrderEvent>| async { Ok(()) }))
            .build();
        // Declared but not consuming: the message stays for inspection.
        use bus_core::Transport;
        let topology = bus_core::EndpointTopology { queue: queue.clone(), ..Default::default() };
        fixture.transport().declare(&topology).await.expect("declare");
        bus.send_with(
            &format!("queue:{queue}"),
            NewOrderEvent { order_id: uuid::Uuid::nil(), user_email: "x".into() },
            SendOptions::new().correlation_id(uuid::Uuid::nil()).time_to_live(Duration::from_secs(60)),
        )
        .await
        .expect("send");
        let channel = fixture.channel().await;
        let got = channel
            .basic_get(queue.as_str().into(), lapin::options::BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        let properties = &got.delivery.properties;
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        assert!(properties.message_id().is_some());
        assert_eq!(
            properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()),
            Some(uuid::Uuid::nil().to_string())
        );
        let expiration: u64 = properties.expiration().as_ref().expect("expiration").as_str().parse().expect("ms");
        assert!(expiration > 50_000 && expiration <= 60_000, "{expiration}");
    });
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Wire:Probe")]
struct Probe {
    n: u32,
}

#[test]
fn bad_input_from_the_wire_ends_in_error_queue_without_panic() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let queue = unique("bad-wire");
        let got = std::sync::Arc::new(MessageLog::default());
        let bus = fixture.bus().endpoint(tests::record::<Probe>(Endpoint::new(&queue), &got)).build();
        bus.start().await.expect("bus starts");
        let channel = fixture.channel().await;
        let publish = |body: Vec<u8>, content_type: &str, headers: FieldTable| {
            let channel = channel.clone();
            let queue = queue.clone();
            let properties = BasicProperties::default().with_content_type(content_type.into()).with_headers(headers);
            async move {
                channel
                    .basic_publish(queue.as_str().into(), "".into(), BasicPublishOptions::default(), &body, properties)
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
            }
        };
        let envelope = |n: u32| {
            format!(
                r#"{{"messageId":"{}","messageType":["urn:message:Wire:Probe"],"message":{{"n":{n}}}}}"#,
                uuid::Uuid::now_v7()
            )
        };
        let mut garbage_id = FieldTable::default();
        garbage_id.insert("MessageId".into(), AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, 0x00, 0x41])));
        garbage_id.insert("MT-MessageType".into(), AMQPValue::LongString(LongString::from("urn:message:Wire:Probe")));
        publish(br#"{"n":1}"#.to_vec(), "application/json", garbage_id).await;
        let full = envelope(2).into_bytes();
        publish(full[..full.len() / 2].to_vec(), "application/vnd.masstransit+json", FieldTable::default()).await;
        publish(envelope(3).into_bytes(), "text/plain", FieldTable::default()).await;
        let mut huge = envelope(4).into_bytes();
        huge.extend(std::iter::repeat_n(b' ', 10 * 1024 * 1024));
        publish(huge, "application/vnd.masstransit+json", FieldTable::default()).await;
        // A good message with a header that is not UTF-8: read lossily and consumed.
        let mut odd_header = FieldTable::default();
        odd_header.insert("Odd".into(), AMQPValue::LongString(LongString::from(vec![0xc3, 0x28])));
        publish(envelope(5).into_bytes(), "application/vnd.masstransit+json", odd_header).await;

        let errors = fixture.take_messages(&format!("{queue}_error"), 4, Duration::from_secs(20)).await;
        got.wait_for::<Probe>(1, WAIT).await.expect("the good message is consumed");
        bus.stop().await.expect("stop");
        let reasons: Vec<String> =
            errors.iter().map(|m| m.headers.get_str("MT-Fault-Message").unwrap_or_default().to_owned()).collect();
        assert_eq!(errors.len(), 4, "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("MessageId is not a GUID")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("not valid JSON")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("unsupported content type `text/plain`")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("exceeds the limit of 4194304 bytes")), "{reasons:?}");
        assert_eq!(got.messages::<Probe>().iter().map(|p| p.n).collect::<Vec<_>>(), [5]);
        assert_eq!(got.all()[0].headers.get_str("Odd"), None, "transport-only headers stay out of the envelope");
    });
}

#[test]
fn send_to_a_missing_endpoint_is_an_error_and_the_bus_keeps_publishing() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let bus = fixture.bus().build();
        bus.start().await.expect("bus starts");
        let missing = bus.send(&format!("queue:{}", unique("nowhere")), Probe { n: 1 }).await;
        match &missing {
            Err(error) => {
                assert!(!error.is_transient(), "a missing endpoint stays missing: {error}");
                assert!(error.to_string().contains("no queue receives"), "{error}");
            }
            Ok(()) => panic!("an unroutable send must fail"),
        }
        // The failure did not break the publishing channels.
        bus.publish(Probe { n: 2 }).await.expect("publishing still works");
        bus.stop().await.expect("stop");
    });
}

#[test]
fn quorum_queue_type_is_declared_when_chosen() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let options =
            bus_rabbitmq::RabbitMqOptions { queue_type: bus_rabbitmq::QueueType::Quorum, ..Default::default() };
        let transport = bus_rabbitmq::RabbitMqTransport::connect_with(fixture.uri(), options).await.expect("connects");
        let queue = unique("quorum");
        use bus_core::Transport;
        let topology = bus_core::EndpointTopology { queue: queue.clone(), ..Default::default() };
        transport.declare(&topology).await.expect("declared");
        transport.close().await;
        let vhost = fixture.vhost().to_owned();
        let queues = tokio::task::spawn_blocking(move || {
            ctl_lines(&["list_queues", "-p", &vhost, "name", "type", "--quiet", "--no-table-headers"])
        })
        .await
        .expect("rabbitmqctl");
        for name in [queue.clone(), format!("{queue}_error"), format!("{queue}_skipped")] {
            assert!(queues.iter().any(|q| q[0] == name && q[1] == "quorum"), "{name} is a quorum queue: {queues:?}");
        }
    });
}

/// Runs the publishes all at once and expects every one to succeed.
async fn all_succeed(publishes: impl Iterator<Item = impl std::future::Future<Output = bus_core::Result<()>>>) {
    let results = tokio::time::timeout(WAIT * 3, futures::future::join_all(publishes)).await.expect("they finish");
    let total = results.len();
    let failed: Vec<String> = results.into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect();
    assert!(failed.is_empty(), "{} of {total} publishes failed, first: {:?}", failed.len(), failed.first());
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:FirstPublishHerd")]
struct FirstPublishHerd {
    n: u32,
}

/// Thousands of publishes of a type nobody published yet, all at once: its exchange is
/// declared once while the others wait. (Each once declared it on a channel of its own,
/// which broke past the broker's 2,047 channels per connection.)
#[test]
fn many_concurrent_first_publishes_of_a_type_all_succeed() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let bus = fixture.bus().build();
        all_succeed((0..3_000).map(|n| bus.publish(FirstPublishHerd { n }))).await;
    });
}

/// A type of its own: endpoints of other tests here consume `Probe`.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:AfterReopen")]
struct AfterReopen {
    n: u32,
}

/// A publish channel closed by the broker (here: a send to an exchange deleted behind the
/// bus's back) is reopened once for all the publishes that find it closed, not once each.
#[test]
fn a_closed_publish_channel_is_reopened_once_for_many_publishes() {
    runtime().block_on(async {
        let fixture = fixture().await;
        // A transport of its own: closing its publish channel must not disturb other tests.
        let transport = bus_rabbitmq::RabbitMqTransport::connect(fixture.uri()).await.expect("connect");
        let bus = bus_core::Bus::builder(transport.clone()).build();
        let exchange = unique("deleted-later");
        let channel = fixture.channel().await;
        let fanout = lapin::options::ExchangeDeclareOptions::default();
        channel
            .exchange_declare(exchange.as_str().into(), lapin::ExchangeKind::Fanout, fanout, FieldTable::default())
            .await
            .expect("declare");
        let address = format!("exchange:{exchange}");
        // Known to exist now (the send itself is unroutable: nothing is bound).
        let _ = bus.send(&address, AfterReopen { n: 0 }).await;
        channel
            .exchange_delete(exchange.as_str().into(), lapin::options::ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        // Publishing to the deleted exchange closes the publish channel (404).
        assert!(bus.send(&address, AfterReopen { n: 1 }).await.is_err());
        all_succeed((0..3_000).map(|n| bus.publish(AfterReopen { n }))).await;
        transport.close().await;
    });
}

/// A type of its own, sent to one endpoint only.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:AckedAround")]
struct AckedAround {
    n: u32,
}

/// The queue's ready and unacknowledged counts, once they are `expected` (polling the
/// broker, at most 30 s).
async fn wait_for_queue_counts(vhost: &str, queue: &str, expected: (u64, u64)) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let (vhost, queue) = (vhost.to_owned(), queue.to_owned());
        let row = tokio::task::spawn_blocking(move || {
            ctl_lines(&[
                "list_queues",
                "-p",
                &vhost,
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "--quiet",
                "--no-table-headers",
            ])
            .into_iter()
            .find(|row| row[0] == queue)
        })
        .await
        .map_err(|e| e.to_string())?;
        if let Some(row) = row {
            let count = |i: usize| row.get(i).and_then(|c| c.parse::<u64>().ok());
            if (count(1), count(2)) == (Some(expected.0), Some(expected.1)) {
                return Ok(());
            }
            last = format!("ready {:?}, unacknowledged {:?}", row.get(1), row.get(2));
        }
    }
    Err(format!("{queue}: expected ready {}, unacknowledged {}; last seen {last}", expected.0, expected.1))
}

/// Acks are coalesced into `multiple` acks, but never past a delivery still in progress:
/// while one message in the middle is held by its consumer, the forty around it are acked
/// and it alone stays unacknowledged (a multiple ack covering it would have lost it).
#[test]
fn coalesced_acks_never_cover_a_delivery_in_progress() {
    runtime().block_on(async {
        const HELD: u32 = 10;
        let fixture = fixture().await;
        let queue = unique("acks");
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let got = std::sync::Arc::new(MessageLog::default());
        let bus = fixture
            .bus()
            .endpoint(Endpoint::new(&queue).prefetch(50).concurrency_limit(8).handler_with_state(
                (gate.clone(), got.clone()),
                |ctx: ConsumeContext<AckedAround>, (g, log)| async move {
                    if ctx.message().n == HELD {
                        let _permit = g.acquire().await?;
                    }
                    log.record(ctx.envelope());
                    Ok(())
                },
            ))
            .build();
        // Queued before consuming starts, so that deliveries come in bursts and their acks
        // coalesce.
        let sender = fixture.bus().build();
        let topology = bus_core::EndpointTopology { queue: queue.clone(), ..Default::default() };
        bus_core::Transport::declare(&fixture.transport(), &topology).await.expect("declared");
        let address = format!("queue:{queue}");
        for n in 0..41 {
            sender.send(&address, AckedAround { n }).await.expect("send");
        }
        bus.start().await.expect("bus starts");
        got.wait_for::<AckedAround>(40, WAIT).await.expect("all but the held one are consumed");
        let vhost = fixture.vhost().to_owned();
        wait_for_queue_counts(&vhost, &queue, (0, 1)).await.expect("only the held message is unacknowledged");
        gate.add_permits(1);
        got.wait_for::<AckedAround>(41, WAIT).await.expect("the held one is consumed once released");
        wait_for_queue_counts(&vhost, &queue, (0, 0)).await.expect("everything is acknowledged");
        bus.stop().await.expect("stop");
    });
}

/// `Debug` output ends up in logs: the transport's shows its address without the password.
#[test]
fn the_transport_debug_output_hides_the_password() {
    runtime().block_on(async {
        let fixture = fixture().await;
        assert!(fixture.uri().contains("guest:guest@"), "the fixture connects with a password");
        let shown = format!("{:?}", fixture.transport());
        assert!(!shown.contains("guest:guest"), "{shown}");
        assert!(shown.contains("guest:***@"), "{shown}");
    });
}

/// A connection name too long to start consumer tags with is refused when connecting,
/// with the reason, instead of panicking in the first consume.
#[test]
fn a_connection_name_over_the_limit_is_refused_up_front() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let options = bus_rabbitmq::RabbitMqOptions { connection_name: "n".repeat(201), ..Default::default() };
        match bus_rabbitmq::RabbitMqTransport::connect_with(fixture.uri(), options).await {
            Err(bus_rabbitmq::Error::Configuration(reason)) => assert!(reason.contains("at most 200"), "{reason}"),
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("a 201-byte connection name was accepted"),
        }
    });
}

/// A type of its own for the mixed sends below.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:MixedSend")]
struct MixedSend {
    n: u32,
}

/// Unroutable and routable sends at once: each unroutable one fails, each routable one
/// succeeds and arrives. (The broker coalesces confirms, and lapin hands a returned message
/// to whichever confirm of its channel resolves next: sharing channels, a routable send
/// could fail and an unroutable one pass as delivered.)
#[test]
fn concurrent_unroutable_and_routable_sends_each_get_their_own_outcome() {
    runtime().block_on(async {
        const EACH: u32 = 300;
        let fixture = fixture().await;
        let bus = fixture.bus().build();
        let nowhere = unique("bound-to-nothing");
        let channel = fixture.channel().await;
        let fanout = lapin::options::ExchangeDeclareOptions::default();
        channel
            .exchange_declare(nowhere.as_str().into(), lapin::ExchangeKind::Fanout, fanout, FieldTable::default())
            .await
            .expect("declare");
        let queue = unique("mixed-sends");
        let topology = bus_core::EndpointTopology { queue: queue.clone(), ..Default::default() };
        bus_core::Transport::declare(&fixture.transport(), &topology).await.expect("declared");
        let (to_nowhere, to_queue) = (format!("exchange:{nowhere}"), format!("queue:{queue}"));
        let sends = (0..EACH * 2).map(|n| {
            let (bus, address) = (bus.clone(), if n % 2 == 0 { to_nowhere.clone() } else { to_queue.clone() });
            async move { (n % 2 == 0, bus.send(&address, MixedSend { n }).await) }
        });
        let results = tokio::time::timeout(WAIT * 3, futures::future::join_all(sends)).await.expect("they finish");
        let wrong: Vec<String> = results
            .iter()
            .filter(|(unroutable, result)| *unroutable == result.is_ok())
            .map(|(unroutable, result)| format!("unroutable {unroutable}: {result:?}"))
            .collect();
        let arrived = fixture.take_messages(&queue, EACH as usize, WAIT).await;
        assert!(wrong.is_empty(), "{} of {} sends had the other's outcome: {:?}", wrong.len(), EACH * 2, wrong.first());
        assert_eq!(arrived.len(), EACH as usize, "every routable send arrived");
    });
}

/// A message moved to `_error` keeps its AMQP properties as they came: an id that is not a
/// GUID, header values of any AMQP type (bytes that are not UTF-8, decimals, timestamps),
/// its content type; the fault headers are added beside them.
#[test]
fn a_message_moved_to_error_keeps_its_original_properties() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let queue = unique("keeps-properties");
        let got = std::sync::Arc::new(MessageLog::default());
        let bus = fixture.bus().endpoint(tests::record::<Probe>(Endpoint::new(&queue), &got)).build();
        bus.start().await.expect("bus starts");
        let channel = fixture.channel().await;
        let mut headers = FieldTable::default();
        headers.insert("Raw".into(), AMQPValue::ByteArray(vec![0xff, 0x00, 0x80].into()));
        headers.insert("Price".into(), AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 2, value: 1999 }));
        headers.insert("At".into(), AMQPValue::Timestamp(1_700_000_000));
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_message_id("order-123".into())
            .with_correlation_id("not-a-guid-either".into())
            .with_app_id("legacy-billing".into())
            .with_expiration("600000".into())
            .with_user_id("guest".into())
            .with_headers(headers);
        channel
            .basic_publish(queue.as_str().into(), "".into(), BasicPublishOptions::default(), b"{ not json", properties)
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let error_queue = format!("{queue}_error");
        let deadline = tokio::time::Instant::now() + WAIT;
        let moved = loop {
            let got = channel
                .basic_get(error_queue.as_str().into(), lapin::options::BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            match got {
                Some(message) => break message,
                None if tokio::time::Instant::now() < deadline => tokio::task::yield_now().await,
                None => panic!("nothing reached {error_queue}"),
            }
        };
        bus.stop().await.expect("stop");
        let properties = &moved.delivery.properties;
        assert_eq!(moved.delivery.data, b"{ not json");
        assert_eq!(properties.message_id().as_ref().map(|s| s.as_str()), Some("order-123"));
        assert_eq!(properties.correlation_id().as_ref().map(|s| s.as_str()), Some("not-a-guid-either"));
        assert_eq!(properties.app_id().as_ref().map(|s| s.as_str()), Some("legacy-billing"));
        // As MassTransit's error transport: in `_error` it waits for someone to look.
        assert_eq!(properties.expiration().as_ref(), None, "no expiration in _error");
        // The sender's user is not claimed by the bus, which may connect as another.
        assert_eq!(properties.user_id().as_ref(), None);
        let headers = properties.headers().clone().unwrap_or_default();
        let header = |name: &str| headers.inner().get(name).cloned();
        assert_eq!(header("Raw"), Some(AMQPValue::ByteArray(vec![0xff, 0x00, 0x80].into())));
        assert_eq!(
            header("Price"),
            Some(AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 2, value: 1999 }))
        );
        assert_eq!(header("At"), Some(AMQPValue::Timestamp(1_700_000_000)));
        assert!(header("MT-Fault-Message").is_some(), "the reason is added: {headers:?}");
    });
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:ExchangeDeletedBehind")]
struct ExchangeDeletedBehind {
    n: u32,
}

/// Lists `ExchangeDeletedBehind` as a contract: its exchange is bound to that one.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:ListsDeletedBehind", implements("urn:message:Tests:ExchangeDeletedBehind"))]
struct ListsDeletedBehind {
    n: u32,
}

/// A message type's exchange deleted behind the bus's back (by an operator, say) is declared
/// again by the type's next publish, and bound again as the bus had bound it (to the endpoint
/// consuming it, from the exchange of a type listing it as a contract), so that publish and
/// the ones after it succeed and arrive; so do publishes of another type in flight on the same
/// channels, which the broker closes over the missing exchange.
#[test]
fn a_type_exchange_deleted_behind_the_bus_is_declared_again_by_its_next_publish() {
    use futures::FutureExt as _;
    runtime().block_on(async {
        let fixture = fixture().await;
        // A transport of its own: its publish channels are closed on purpose.
        let transport = bus_rabbitmq::RabbitMqTransport::connect(fixture.uri()).await.expect("connect");
        let received = MessageLog::default();
        let bus = bus_core::Bus::builder(transport.clone())
            .endpoint(tests::record::<ExchangeDeletedBehind>(Endpoint::new(unique("deleted-behind")), &received))
            .build();
        bus.start().await.expect("bus starts");
        bus.publish(ExchangeDeletedBehind { n: 0 }).await.expect("published while the exchange exists");
        bus.publish(AfterReopen { n: 0 }).await.expect("another type's exchange is declared");
        bus.publish(ListsDeletedBehind { n: 0 }).await.expect("a type listing it as a contract");
        received.wait_for::<ExchangeDeletedBehind>(2, WAIT).await.expect("the first two arrive");
        let exchange = bus_core::message::entity_name(ExchangeDeletedBehind::message_type());
        let channel = fixture.channel().await;
        channel
            .exchange_delete(exchange.as_str().into(), lapin::options::ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        // The first publish after the deletion meets it, among publishes of another type.
        let first = bus.publish(ExchangeDeletedBehind { n: 1 }).boxed();
        let other = (1..200).map(|n| bus.publish(AfterReopen { n }).boxed());
        all_succeed(std::iter::once(first).chain(other)).await;
        for n in 2..20 {
            bus.publish(ExchangeDeletedBehind { n }).await.expect("published after the exchange is back");
        }
        bus.publish(ListsDeletedBehind { n: 1 }).await.expect("the contract's binding is made again");
        received.wait_for::<ExchangeDeletedBehind>(21, WAIT).await.expect("every one arrives");
        let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
        channel
            .exchange_declare(exchange.as_str().into(), lapin::ExchangeKind::Fanout, passive, FieldTable::default())
            .await
            .expect("the exchange exists again");
        bus.stop().await.expect("stop");
        transport.close().await;
    });
}

/// The bus's response endpoint declares its `_skipped` queue again when a move there fails
/// because the queue was deleted meanwhile: the response nobody waits for still ends there.
#[test]
fn the_response_endpoints_dead_letter_queues_are_declared_again_after_a_failed_move() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let bus = fixture.bus().build();
        bus.start().await.expect("bus starts");
        let queue = bus.address().rsplit('/').next().and_then(|q| q.split('?').next()).expect("queue").to_owned();
        let late = |n: u32| {
            let body = format!(
                r#"{{"requestId":"{}","messageType":["{}"],"message":{{"n":{n}}}}}"#,
                uuid::Uuid::new_v4(),
                Probe::message_type()
            );
            bus_core::TransportMessage {
                body: body.into_bytes().into(),
                content_type: Some("application/vnd.masstransit+json".into()),
                ..Default::default()
            }
        };
        let transport = fixture.transport();
        let skipped = format!("{queue}_skipped");
        bus_core::Transport::send(&transport, &queue, late(1)).await.expect("send");
        assert_eq!(fixture.take_messages(&skipped, 1, WAIT).await.len(), 1, "the first is skipped");
        let channel = fixture.channel().await;
        channel
            .queue_delete(skipped.as_str().into(), lapin::options::QueueDeleteOptions::default())
            .await
            .expect("delete the skipped queue");
        bus_core::Transport::send(&transport, &queue, late(2)).await.expect("send");
        let again = fixture.take_messages(&skipped, 1, WAIT).await;
        bus.stop().await.expect("stop");
        assert_eq!(again.len(), 1, "the second is skipped too, in the queue declared again");
        assert!(String::from_utf8_lossy(&again[0].body).contains(r#""n":2"#));
    });
}

/// A message with no AMQP properties at all (no content type) is read with the endpoint's
/// default deserializer, as MassTransit reads it: the bus's envelope by default, raw JSON on
/// an endpoint that says so.
#[test]
fn a_message_without_a_content_type_is_read_with_the_endpoints_default() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let (enveloped, raw) = (unique("no-ct-envelope"), unique("no-ct-raw"));
        let (got_enveloped, got_raw) =
            (std::sync::Arc::new(MessageLog::default()), std::sync::Arc::new(MessageLog::default()));
        let bus = fixture
            .bus()
            .endpoint(tests::record::<Probe>(Endpoint::new(&enveloped), &got_enveloped))
            .endpoint(tests::record::<Probe>(Endpoint::new(&raw).default_content_type("application/json"), &got_raw))
            .build();
        bus.start().await.expect("bus starts");
        let channel = fixture.channel().await;
        let envelope = format!(
            r#"{{"messageId":"{}","messageType":["urn:message:Wire:Probe"],"message":{{"n":7}}}}"#,
            uuid::Uuid::now_v7()
        );
        for (queue, body) in [(&enveloped, envelope.into_bytes()), (&raw, br#"{"n":8}"#.to_vec())] {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
        }
        let enveloped_probe = got_enveloped.wait_for::<Probe>(1, WAIT).await.expect("the envelope is read");
        // Raw JSON has no type: it is offered to the endpoint's consumer, and recorded untyped.
        let raw_read = got_raw.wait_for_envelope("the raw JSON", WAIT, |_| true).await.expect("the raw JSON is read");
        bus.stop().await.expect("stop");
        let raw_probe: Probe = serde_json::from_str(raw_read.message.get()).expect("a probe");
        assert_eq!((enveloped_probe[0].n, raw_probe.n), (7, 8));
    });
}

/// Envelope headers in the AMQP header table as MassTransit's `SetHeaders` writes them:
/// strings and numbers as they are, `true` as `"True"`, and `false`, arrays and objects left
/// out of the table; the envelope keeps every one.
#[test]
fn envelope_headers_go_into_the_amqp_table_as_masstransit_writes_them() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let queue = unique("header-table");
        use bus_core::Transport;
        let topology = bus_core::EndpointTopology { queue: queue.clone(), ..Default::default() };
        fixture.transport().declare(&topology).await.expect("declare");
        let bus = fixture.bus().build();
        let options = SendOptions::new()
            .header("Tenant", "acme")
            .header("Attempt", 3)
            .header("Urgent", true)
            .header("Quiet", false)
            .header("MT-Request-AcceptType", serde_json::json!(["urn:message:Wire:Probe"]))
            .header("Nested", serde_json::json!({ "a": 1 }))
            .header_time("Offer-Expires", chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("a time"));
        bus.send_with(&format!("queue:{queue}"), Probe { n: 1 }, options).await.expect("send");
        let channel = fixture.channel().await;
        let got = channel
            .basic_get(queue.as_str().into(), lapin::options::BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        let table = got.delivery.properties.headers().clone().unwrap_or_default();
        let value = |name: &str| table.inner().get(name).cloned();
        assert_eq!(value("Tenant"), Some(AMQPValue::LongString(LongString::from("acme"))));
        assert_eq!(value("Attempt"), Some(AMQPValue::LongLongInt(3)));
        assert_eq!(value("Urgent"), Some(AMQPValue::LongString(LongString::from("True"))));
        assert_eq!(value("Offer-Expires"), Some(AMQPValue::Timestamp(1_800_000_000)), "a time, in seconds");
        for absent in ["Quiet", "MT-Request-AcceptType", "Nested"] {
            assert_eq!(value(absent), None, "{absent} is not in the table");
        }
        let envelope: serde_json::Value = serde_json::from_slice(&got.delivery.data).expect("an envelope");
        assert_eq!(envelope["headers"]["Quiet"], false);
        assert_eq!(envelope["headers"]["MT-Request-AcceptType"][0], "urn:message:Wire:Probe");
        assert_eq!(envelope["headers"]["Nested"]["a"], 1);
        assert_eq!(envelope["headers"]["Offer-Expires"], "2027-01-15T08:00:00.0000000Z", "the envelope keeps its text");
    });
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Wire:SubmitOrder")]
struct SubmitOrder {
    total: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Wire:OrderAccepted")]
struct OrderAccepted {
    total: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Wire:OrderRejected")]
struct OrderRejected {
    reason: String,
}

/// A request whose responder answers one of two types: the client lists both in
/// `MT-Request-AcceptType`, gets whichever comes, and the request lives no longer than the
/// client waits (`expirationTime` and the AMQP expiration).
#[test]
fn a_request_accepts_either_of_two_response_types() {
    runtime().block_on(async {
        let fixture = fixture().await;
        let queue = unique("orders-either");
        let requests = std::sync::Arc::new(MessageLog::default());
        let responder = tests::record::<SubmitOrder>(Endpoint::new(&queue), &requests).handler(
            |ctx: ConsumeContext<SubmitOrder>| async move {
                let total = ctx.message().total;
                if total > 100 {
                    ctx.respond(OrderRejected { reason: format!("{total} is over the limit") }).await?;
                } else {
                    ctx.respond(OrderAccepted { total }).await?;
                }
                Ok(())
            },
        );
        let bus = fixture.bus().endpoint(responder).build();
        bus.start().await.expect("bus starts");
        let timeout = Duration::from_secs(8);
        let client =
            bus.request_client::<SubmitOrder>().with_destination(format!("queue:{queue}")).with_timeout(timeout);
        let sent_at = chrono::Utc::now();
        let small =
            client.request_either::<OrderAccepted, OrderRejected>(SubmitOrder { total: 10 }).await.expect("answered");
        let large =
            client.request_either::<OrderAccepted, OrderRejected>(SubmitOrder { total: 500 }).await.expect("answered");
        bus.stop().await.expect("stop");
        assert!(matches!(small, bus_core::EitherResponse::First(ref r) if r.message().total == 10), "{small:?}");
        assert!(
            matches!(large, bus_core::EitherResponse::Second(ref r) if r.message().reason.contains("500")),
            "{large:?}"
        );
        let request = &requests.all()[0];
        assert_eq!(
            request.headers.get("MT-Request-AcceptType"),
            Some(&serde_json::json!(["urn:message:Wire:OrderAccepted", "urn:message:Wire:OrderRejected"]))
        );
        let expires = request.expiration_time.expect("the request expires");
        let lives = (expires - sent_at).to_std().expect("in the future");
        assert!(lives <= timeout + Duration::from_secs(1) && lives >= timeout - Duration::from_secs(2), "{lives:?}");
    });
}
