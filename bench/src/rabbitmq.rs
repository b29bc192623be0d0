//! RabbitMQ: end to end (publish with confirms + consume with ack) and publish-only, bus
//! versus raw lapin with identical settings: same body size, persistent, 1,000 publishes in
//! flight, prefetch 100. Raw lapin end to end runs twice: acking each message and awaiting
//! the ack (as lapin's examples do), and acking 50 deliveries at a time with `multiple`, as
//! the bus coalesces its acks (the best a raw client does). Each side's best of three
//! alternating rounds.

use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus, Endpoint, EndpointTopology, Message, Transport};
use bus_rabbitmq::RabbitMqTransport;
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};

use crate::report::{compare, figure};
use crate::Scale;

const IN_FLIGHT: usize = 1_000;
const PREFETCH: u16 = 100;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:Shipment")]
pub(crate) struct Shipment {
    pub(crate) order_id: uuid::Uuid,
    pub(crate) note: String,
}

/// A shipment whose note is `note` bytes long.
pub(crate) fn shipment_of(note: usize) -> Shipment {
    Shipment { order_id: uuid::Uuid::now_v7(), note: "x".repeat(note) }
}

/// CPU time this process has used (user + system), from `/proc/self/stat`; the broker
/// shares the machine's two cores with it, so every client microsecond is taken from it.
pub(crate) fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name; 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

pub(crate) fn address() -> String {
    bus_rabbitmq::default_address()
}

/// Publishes `count` bodies to `queue` with confirms, `IN_FLIGHT` at a time.
/// The AMQP properties the raw baseline publishes with.
#[derive(Debug, Clone, Copy)]
enum Properties {
    /// Persistent and a content type, nothing else: the setup the raw figures use.
    Bare,
    /// What the bus writes for a publish: persistent, MassTransit's content type and a
    /// message id per message. The broker handles a message with a message id markedly
    /// slower, so this is the baseline the bus's own cost is judged against.
    SameAsBus,
}

impl Properties {
    fn make(self) -> BasicProperties {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        match self {
            Properties::Bare => persistent.with_content_type("application/json".into()),
            Properties::SameAsBus => persistent
                .with_content_type("application/vnd.masstransit+json".into())
                .with_message_id(uuid::Uuid::now_v7().hyphenated().to_string().into()),
        }
    }
}

/// Publishes `count` bodies to the queue, confirms `IN_FLIGHT` deep.
async fn raw_publish(
    connection: &Connection,
    queue: &str,
    count: u64,
    body: &[u8],
    properties: Properties,
) -> Result<(), BoxError> {
    raw_publish_round_robin(connection, &[queue], count, body, properties).await
}

/// Publishes `count` bodies over the queues in turn, confirms `IN_FLIGHT` deep.
async fn raw_publish_round_robin(
    connection: &Connection,
    queues: &[&str],
    count: u64,
    body: &[u8],
    properties: Properties,
) -> Result<(), BoxError> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = FuturesUnordered::new();
    for n in 0..count {
        if pending.len() >= IN_FLIGHT {
            if let Some(confirm) = pending.next().await {
                let _: lapin::Confirmation = confirm?;
            }
        }
        let queue = queues[n as usize % queues.len()];
        let confirm = channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties.make())
            .await?;
        pending.push(confirm);
    }
    while let Some(confirm) = pending.next().await {
        confirm?;
    }
    Ok(())
}

/// One round's figures of one side: messages per second and client CPU microseconds per
/// message.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    end_to_end: f64,
    end_to_end_cpu: f64,
    /// Raw only: end to end, acking 50 deliveries at a time.
    coalesced: f64,
    coalesced_cpu: f64,
    publish_only: f64,
    publish_only_cpu: f64,
    /// Raw only: publish-only with the bus's AMQP properties.
    same_properties: f64,
    /// Bus only: sends (mandatory publishes) to one endpoint.
    send_only: f64,
}

impl Round {
    /// Each figure's best across rounds (highest rate, least CPU).
    fn best(self, other: Round) -> Round {
        let least = |a: f64, b: f64| if a == 0.0 { b } else { a.min(b) };
        Round {
            end_to_end: self.end_to_end.max(other.end_to_end),
            end_to_end_cpu: least(self.end_to_end_cpu, other.end_to_end_cpu),
            coalesced: self.coalesced.max(other.coalesced),
            coalesced_cpu: least(self.coalesced_cpu, other.coalesced_cpu),
            publish_only: self.publish_only.max(other.publish_only),
            publish_only_cpu: least(self.publish_only_cpu, other.publish_only_cpu),
            same_properties: self.same_properties.max(other.same_properties),
            send_only: self.send_only.max(other.send_only),
        }
    }
}

/// Raw lapin: end to end, publish-only, and publish-only with the bus's properties.
async fn raw(count: u64, body_size: usize) -> Result<Round, BoxError> {
    let connection = Connection::connect(&address(), ConnectionProperties::default()).await?;
    let (setup, queue) = fresh_queue(&connection).await?;
    let body = vec![b'x'; body_size];

    let started = Instant::now();
    let cpu = cpu_seconds();
    raw_publish(&connection, &queue, count, &body, Properties::Bare).await?;
    let publish_only = count as f64 / started.elapsed().as_secs_f64();
    let publish_only_cpu = (cpu_seconds() - cpu) * 1e6 / count as f64;
    setup.queue_purge(queue.as_str().into(), lapin::options::QueuePurgeOptions::default()).await?;
    let started = Instant::now();
    raw_publish(&connection, &queue, count, &body, Properties::SameAsBus).await?;
    let same_properties = count as f64 / started.elapsed().as_secs_f64();
    setup.queue_purge(queue.as_str().into(), lapin::options::QueuePurgeOptions::default()).await?;

    let (end_to_end, end_to_end_cpu) = raw_end_to_end(&connection, &queue, count, &body, Acks::EachAwaited).await?;
    let (coalesced, coalesced_cpu) = raw_end_to_end(&connection, &queue, count, &body, Acks::Coalesced).await?;
    setup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(Round {
        end_to_end,
        end_to_end_cpu,
        coalesced,
        coalesced_cpu,
        publish_only,
        publish_only_cpu,
        same_properties,
        send_only: 0.0,
    })
}

/// A new durable queue, and the channel that declared it.
async fn fresh_queue(connection: &Connection) -> Result<(lapin::Channel, String), BoxError> {
    let setup = connection.create_channel().await?;
    let queue = format!("bench-raw-{}", uuid::Uuid::now_v7().simple());
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    setup.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await?;
    Ok((setup, queue))
}

/// Raw lapin end to end with coalesced acks on a fresh queue, bodies of `body_size` bytes.
pub(crate) async fn raw_coalesced(count: u64, body_size: usize) -> Result<f64, BoxError> {
    let connection = Connection::connect(&address(), ConnectionProperties::default()).await?;
    let (setup, queue) = fresh_queue(&connection).await?;
    let (rate, _) = raw_end_to_end(&connection, &queue, count, &vec![b'x'; body_size], Acks::Coalesced).await?;
    setup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(rate)
}

/// How the raw consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acks {
    /// One ack per delivery, awaited before the next delivery is taken.
    EachAwaited,
    /// One `multiple` ack per `ACK_BATCH` deliveries (and one for the rest at the end).
    Coalesced,
}

/// Deliveries per coalesced ack: half the prefetch, so the broker never waits for one.
const ACK_BATCH: u64 = 50;

/// Raw lapin end to end on an empty queue: one consumer (prefetch 100) and a publisher
/// (confirms, `IN_FLIGHT` deep) of `count` bare-property bodies. Messages per second and
/// client CPU microseconds per message.
pub(crate) async fn raw_end_to_end(
    connection: &Connection,
    queue: &str,
    count: u64,
    body: &[u8],
    acks: Acks,
) -> Result<(f64, f64), BoxError> {
    let (consumer_channel, consume) = raw_consume(connection, queue, count, acks).await?;
    let started = Instant::now();
    let cpu = cpu_seconds();
    raw_publish(connection, queue, count, body, Properties::Bare).await?;
    let consumed = consume.await??;
    let rate = consumed as f64 / started.elapsed().as_secs_f64();
    let cpu = (cpu_seconds() - cpu) * 1e6 / count as f64;
    let _ = consumer_channel.close(200, "bench done".into()).await;
    Ok((rate, cpu))
}

/// A consumer (prefetch 100, on a channel of its own) taking `count` messages from `queue`.
async fn raw_consume(
    connection: &Connection,
    queue: &str,
    count: u64,
    acks: Acks,
) -> Result<(lapin::Channel, tokio::task::JoinHandle<Result<u64, lapin::Error>>), BoxError> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let consume = tokio::spawn(async move {
        let mut n = 0;
        while n < count {
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    n += 1;
                    match acks {
                        Acks::EachAwaited => {
                            delivery.ack(BasicAckOptions::default()).await?;
                        }
                        Acks::Coalesced if n % ACK_BATCH == 0 || n == count => {
                            delivery.ack(BasicAckOptions { multiple: true }).await?;
                        }
                        Acks::Coalesced => {}
                    }
                }
                _ => break,
            }
        }
        Ok::<_, lapin::Error>(n)
    });
    Ok((channel, consume))
}

/// Raw lapin end to end over `queues` queues, a consumer each (coalesced acks), published
/// in turn: the broker's side of the bus's curve against endpoints. Messages per second.
pub(crate) async fn raw_fan_out(count: u64, queues: usize) -> Result<f64, BoxError> {
    let connection = Connection::connect(&address(), ConnectionProperties::default()).await?;
    let mut names = Vec::new();
    let mut consumers = Vec::new();
    let per_queue = count / queues as u64;
    for _ in 0..queues {
        let (_, queue) = fresh_queue(&connection).await?;
        consumers.push(raw_consume(&connection, &queue, per_queue, Acks::Coalesced).await?);
        names.push(queue);
    }
    let started = Instant::now();
    let targets: Vec<&str> = names.iter().map(String::as_str).collect();
    raw_publish_round_robin(&connection, &targets, per_queue * queues as u64, &[b'x'; 957], Properties::Bare).await?;
    let mut consumed = 0;
    for (_, consume) in consumers {
        consumed += consume.await??;
    }
    let rate = consumed as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "bench done".into()).await;
    delete_queues(&names).await?;
    Ok(rate)
}

/// Publishes `count` shipments (or sends them to `to`), `IN_FLIGHT` at a time.
pub(crate) async fn bus_publish(bus: &Bus, count: u64, to: Option<&str>) -> Result<(), BoxError> {
    bus_publish_sized(bus, count, to, 180).await
}

/// Publishes `count` shipments with notes of `note` bytes (or sends them to `to`),
/// `IN_FLIGHT` at a time.
pub(crate) async fn bus_publish_sized(bus: &Bus, count: u64, to: Option<&str>, note: usize) -> Result<(), BoxError> {
    let mut pending = FuturesUnordered::new();
    for _ in 0..count {
        if pending.len() >= IN_FLIGHT {
            if let Some(result) = pending.next().await {
                result?;
            }
        }
        let bus = bus.clone();
        let to = to.map(str::to_owned);
        pending.push(async move {
            match to {
                Some(address) => bus.send(&address, shipment_of(note)).await,
                None => bus.publish(shipment_of(note)).await,
            }
        });
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    Ok(())
}

async fn bus(count: u64) -> Result<(Round, usize), BoxError> {
    let transport = RabbitMqTransport::connect(&address()).await?;
    let queue = format!("bench-bus-{}", uuid::Uuid::now_v7().simple());
    // Publish-only: a queue bound to the message type, with nobody consuming it.
    let tap = EndpointTopology {
        queue: queue.clone(),
        message_types: vec![Shipment::message_type().into()],
        ..Default::default()
    };
    transport.declare(&tap).await?;
    let publisher = Bus::builder(transport.clone()).build();
    let started = Instant::now();
    let cpu = cpu_seconds();
    bus_publish(&publisher, count, None).await?;
    let publish_only = count as f64 / started.elapsed().as_secs_f64();
    let publish_only_cpu = (cpu_seconds() - cpu) * 1e6 / count as f64;

    let connection = Connection::connect(&address(), ConnectionProperties::default()).await?;
    let admin = connection.create_channel().await?;
    let sample = admin.basic_get(queue.as_str().into(), lapin::options::BasicGetOptions { no_ack: true }).await?;
    let body_size = sample.map(|m| m.delivery.data.len()).unwrap_or_default();
    // Send-only to the same queue: sends are mandatory (they fail when nothing receives
    // them), and go one at a time per sender channel.
    admin_purge(&queue).await?;
    let started = Instant::now();
    bus_publish(&publisher, count, Some(&format!("queue:{queue}"))).await?;
    let send_only = count as f64 / started.elapsed().as_secs_f64();
    delete_endpoints(std::slice::from_ref(&queue)).await?;

    let cpu = cpu_seconds();
    let end_to_end = bus_end_to_end(&transport, &publisher, count, 180, None).await?;
    let end_to_end_cpu = (cpu_seconds() - cpu) * 1e6 / count as f64;
    transport.close().await;
    let _ = connection.close(200, "bench done".into()).await;
    Ok((Round { end_to_end, end_to_end_cpu, publish_only, publish_only_cpu, send_only, ..Round::default() }, body_size))
}

/// The bus end to end: an endpoint consuming (prefetch 100, consumers doing nothing) what
/// `publisher` publishes, `count` shipments with notes of `note` bytes; messages per second.
/// With `tracer`, the consuming bus records its spans with it (give the publisher the same).
pub(crate) async fn bus_end_to_end(
    transport: &RabbitMqTransport,
    publisher: &Bus,
    count: u64,
    note: usize,
    tracer: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) -> Result<f64, BoxError> {
    let endpoint = format!("bench-consume-{}", uuid::Uuid::now_v7().simple());
    let mut builder = Bus::builder(transport.clone());
    if let Some(tracer) = tracer {
        builder = builder.tracer_provider(tracer);
    }
    let (consumer, done) = crate::counting::counting::<Shipment>(Endpoint::new(&endpoint).prefetch(PREFETCH), count);
    let bus = builder.endpoint(consumer).build();
    bus.start().await?;
    let finished = done.notified();
    let started = Instant::now();
    bus_publish_sized(publisher, count, None, note).await?;
    tokio::time::timeout(Duration::from_secs(600), finished).await?;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    bus.stop().await?;
    delete_endpoints(&[endpoint]).await?;
    Ok(rate)
}

/// The size of the body the bus writes for a shipment with a note of `note` bytes.
pub(crate) fn bus_body_size(bus: &Bus, note: usize) -> Result<usize, BoxError> {
    Ok(bus.prepare_publish(shipment_of(note), bus_core::SendOptions::default())?.message.body.len())
}

/// Deletes queues.
pub(crate) async fn delete_queues(names: &[String]) -> Result<(), BoxError> {
    let connection = Connection::connect(&address(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for name in names {
        channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await?;
    }
    let _ = connection.close(200, "cleaned up".into()).await;
    Ok(())
}

/// Empties a queue.
async fn admin_purge(queue: &str) -> Result<(), BoxError> {
    let connection = Connection::connect(&address(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default()).await?;
    let _ = connection.close(200, "purged".into()).await;
    Ok(())
}

/// Deletes the endpoints a run declared (queue and exchange, with `_error` and `_skipped`),
/// so runs leave nothing behind: a leftover endpoint exchange stays bound to the message
/// type and would slow every later publish.
pub(crate) async fn delete_endpoints(names: &[String]) -> Result<(), BoxError> {
    let connection = Connection::connect(&address(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for endpoint in names {
        for name in [endpoint.clone(), format!("{endpoint}_error"), format!("{endpoint}_skipped")] {
            channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await?;
            channel.exchange_delete(name.as_str().into(), lapin::options::ExchangeDeleteOptions::default()).await?;
        }
    }
    let _ = connection.close(200, "cleaned up".into()).await;
    Ok(())
}

/// Rounds of bus and raw runs, alternating: the broker's speed drifts by a tenth or more
/// within minutes on this shared machine, so each side keeps its best round.
const ROUNDS: usize = 3;

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    let (mut bus_best, mut raw_best, mut body_size) = (Round::default(), Round::default(), 0);
    for _ in 0..ROUNDS {
        let (round, size) = bus(scale.rabbitmq).await?;
        (bus_best, body_size) = (bus_best.best(round), size);
        raw_best = raw_best.best(raw(scale.rabbitmq, body_size).await?);
    }
    figure("rabbitmq.bus.body_size", body_size as f64, "bytes");
    figure("rabbitmq.baseline.lapin_end_to_end", raw_best.end_to_end, "msg/s");
    figure("rabbitmq.baseline.lapin_end_to_end.cpu", raw_best.end_to_end_cpu, "us/msg");
    figure("rabbitmq.baseline.lapin_end_to_end_coalesced_acks", raw_best.coalesced, "msg/s");
    figure("rabbitmq.baseline.lapin_end_to_end_coalesced_acks.cpu", raw_best.coalesced_cpu, "us/msg");
    figure("rabbitmq.baseline.lapin_publish_only", raw_best.publish_only, "msg/s");
    figure("rabbitmq.baseline.lapin_publish_only.cpu", raw_best.publish_only_cpu, "us/msg");
    figure("rabbitmq.baseline.lapin_publish_only_same_properties", raw_best.same_properties, "msg/s");
    figure("rabbitmq.bus.end_to_end", bus_best.end_to_end, "msg/s");
    figure("rabbitmq.bus.end_to_end.cpu", bus_best.end_to_end_cpu, "us/msg");
    figure("rabbitmq.bus.publish_only", bus_best.publish_only, "msg/s");
    figure("rabbitmq.bus.publish_only.cpu", bus_best.publish_only_cpu, "us/msg");
    figure("rabbitmq.bus.send_only", bus_best.send_only, "msg/s");
    compare(
        "rabbitmq end to end vs raw lapin acking 50 at a time",
        bus_best.end_to_end,
        raw_best.coalesced,
        "msg/s",
        Some(0.95),
    );
    compare(
        "rabbitmq end to end vs raw lapin acking each message (awaited)",
        bus_best.end_to_end,
        raw_best.end_to_end,
        "msg/s",
        Some(0.9),
    );
    compare(
        "rabbitmq publish-only vs raw lapin (bare properties)",
        bus_best.publish_only,
        raw_best.publish_only,
        "msg/s",
        None,
    );
    compare(
        "rabbitmq send-only (mandatory) vs raw lapin publish-only (same properties)",
        bus_best.send_only,
        raw_best.same_properties,
        "msg/s",
        None,
    );
    compare(
        "rabbitmq publish-only vs raw lapin (same properties)",
        bus_best.publish_only,
        raw_best.same_properties,
        "msg/s",
        Some(0.9),
    );
    Ok(())
}
