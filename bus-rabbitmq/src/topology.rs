//! MassTransit's topology on RabbitMQ: declared with short-lived channels, so a refused
//! declaration never breaks the channels that publish and consume.

use bus_core::message::entity_name;
use bus_core::EndpointTopology;
use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::error::{Error, Result};
use crate::options::{QueueSettings, QueueType};
use crate::RabbitMqOptions;

fn refused(operation: impl Into<String>) -> impl FnOnce(lapin::Error) -> Error {
    let operation = operation.into();
    move |source| Error::Refused { operation, source: Box::new(source) }
}

/// `name` as an AMQP short string: an error, not lapin's panic, when it is over 255 bytes.
pub(crate) fn short(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        // The start of the name says which one it was; all of it would flood the logs.
        let start = name.char_indices().nth(64).map_or(name, |(end, _)| &name[..end]);
        Error::NameTooLong(start.to_owned())
    })
}

/// Name of the queue that holds messages waiting `delay` before redelivery to `queue`.
pub(crate) fn delay_queue(queue: &str, delay: std::time::Duration) -> String {
    format!("{queue}_delay_{}ms", delay.as_millis())
}

async fn with_channel<T>(connection: &Connection, f: impl AsyncFnOnce(&Channel) -> Result<T>) -> Result<T> {
    let channel = connection.create_channel().await.map_err(refused("channel.open"))?;
    let result = f(&channel).await;
    if channel.status().connected() {
        let _ = channel.close(200, "declared".into()).await;
    }
    result
}

async fn exchange(channel: &Channel, name: &str, kind: ExchangeKind, durable: bool, auto_delete: bool) -> Result<()> {
    let options = ExchangeDeclareOptions { durable, auto_delete, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(short(name)?, kind, options, FieldTable::default())
        .await
        .map_err(refused(format!("declaring exchange `{name}`")))
}

async fn queue(channel: &Channel, name: &str, durable: bool, auto_delete: bool, arguments: FieldTable) -> Result<()> {
    let options = QueueDeclareOptions { durable, auto_delete, ..QueueDeclareOptions::default() };
    channel
        .queue_declare(short(name)?, options, arguments)
        .await
        .map_err(refused(format!("declaring queue `{name}`")))?;
    Ok(())
}

async fn queue_with_exchange(
    channel: &Channel,
    name: &str,
    durable: bool,
    auto_delete: bool,
    arguments: FieldTable,
) -> Result<()> {
    queue(channel, name, durable, auto_delete, arguments).await?;
    exchange(channel, name, ExchangeKind::Fanout, durable, auto_delete).await?;
    channel
        .queue_bind(short(name)?, short(name)?, "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(refused(format!("binding queue `{name}`")))
}

/// Which of an endpoint's queues is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueRole {
    /// The endpoint's own queue.
    Endpoint,
    /// `_error` or `_skipped`.
    DeadLetters,
    /// A delay queue of delayed redelivery.
    Delay,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The arguments of one of `endpoint`'s queues, declared with `settings`.
fn queue_arguments(settings: QueueSettings, role: QueueRole, temporary: bool, endpoint: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    if settings.queue_type != QueueType::Quorum || temporary {
        return arguments;
    }
    arguments.insert("x-queue-type".into(), text("quorum"));
    if let Some(replicas) = settings.replicas {
        arguments.insert("x-quorum-initial-group-size".into(), AMQPValue::LongUInt(replicas));
    }
    // Past its limit a message is dropped unless dead-lettered: the endpoint's go to `_error`,
    // where the broker's `x-death` header says why.
    if let (Some(limit), QueueRole::Endpoint) = (settings.delivery_limit, role) {
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongUInt(limit));
        arguments.insert("x-dead-letter-exchange".into(), text(&format!("{endpoint}_error")));
    }
    let dead_letters = role == QueueRole::Delay || (role == QueueRole::Endpoint && settings.delivery_limit.is_some());
    if settings.at_least_once_dead_lettering && dead_letters {
        arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        arguments.insert("x-overflow".into(), text("reject-publish"));
    }
    arguments
}

/// Declares an endpoint: its queue and same-named fanout exchange bound to it; the exchange
/// of each consumed message type bound to the endpoint's exchange; `_error` and `_skipped`
/// (each a queue with its exchange) when asked; one TTL queue per redelivery delay that
/// dead-letters back to the endpoint's exchange.
pub(crate) async fn declare_endpoint(
    connection: &Connection,
    endpoint: &EndpointTopology,
    options: &RabbitMqOptions,
) -> Result<()> {
    let settings = options.queue_settings(&endpoint.queue);
    with_channel(connection, async |channel| {
        let name = endpoint.queue.as_str();
        let temporary = endpoint.temporary;
        let mut arguments = queue_arguments(settings, QueueRole::Endpoint, temporary, name);
        if endpoint.single_active_consumer {
            arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        if let Some(max) = endpoint.max_priority {
            arguments.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(max));
        }
        queue_with_exchange(channel, name, !temporary, temporary, arguments).await?;
        let consumed = endpoint.message_types.iter().map(|urn| (entity_name(urn), String::new()));
        let bound = endpoint.bindings.iter().map(|b| (b.exchange.clone(), b.routing_key.clone()));
        for (source, routing_key) in consumed.chain(bound) {
            exchange(channel, &source, options.exchange_kind(&source), true, false).await?;
            channel
                .exchange_bind(
                    short(name)?,
                    short(&source)?,
                    short(&routing_key)?,
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(refused(format!("binding exchange `{source}` to `{name}`")))?;
        }
        if endpoint.dead_letter_queues {
            dead_letter_queues(channel, endpoint, settings).await?;
        }
        if !temporary {
            for delay in &endpoint.redelivery_delays {
                let mut arguments = queue_arguments(settings, QueueRole::Delay, false, name);
                let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
                arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(name)));
                queue(channel, &delay_queue(name, *delay), true, false, arguments).await?;
            }
        }
        Ok(())
    })
    .await
}

/// Declares an endpoint's `_error` and `_skipped` queues, each with its exchange.
pub(crate) async fn declare_dead_letter_queues(
    connection: &Connection,
    endpoint: &EndpointTopology,
    options: &RabbitMqOptions,
) -> Result<()> {
    let settings = options.queue_settings(&endpoint.queue);
    with_channel(connection, async |channel| dead_letter_queues(channel, endpoint, settings).await).await
}

async fn dead_letter_queues(channel: &Channel, endpoint: &EndpointTopology, settings: QueueSettings) -> Result<()> {
    // As MassTransit declares them: like their endpoint. A temporary endpoint's are not
    // durable and auto-delete, so they go with the broker's next restart, not with the bus
    // (having had no consumer, auto-delete never fires): what went there stays to be read.
    let temporary = endpoint.temporary;
    for dead_letters in [endpoint.error_queue(), endpoint.skipped_queue()] {
        let arguments = queue_arguments(settings, QueueRole::DeadLetters, temporary, &endpoint.queue);
        queue_with_exchange(channel, &dead_letters, !temporary, temporary, arguments).await?;
    }
    Ok(())
}

/// Declares a message type's exchange and binds it to the exchanges of the contracts it lists.
pub(crate) async fn declare_publish_exchange(
    connection: &Connection,
    exchange_name: &str,
    contracts: &[String],
    options: &RabbitMqOptions,
) -> Result<()> {
    with_channel(connection, async |channel| {
        exchange(channel, exchange_name, options.exchange_kind(exchange_name), true, false).await?;
        for contract in contracts {
            exchange(channel, contract, options.exchange_kind(contract), true, false).await?;
            channel
                .exchange_bind(
                    short(contract)?,
                    short(exchange_name)?,
                    "".into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(refused(format!("binding exchange `{exchange_name}` to `{contract}`")))?;
        }
        Ok(())
    })
    .await
}

/// Whether an exchange exists (a passive declaration, on its own channel).
pub(crate) async fn exchange_exists(connection: &Connection, name: &str) -> Result<bool> {
    let checked = short(name)?;
    let channel = connection.create_channel().await.map_err(refused("channel.open"))?;
    let options = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    match channel.exchange_declare(checked, ExchangeKind::Fanout, options, FieldTable::default()).await {
        Ok(()) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404) => Ok(false),
        Err(error) => Err(Error::Refused { operation: format!("checking exchange `{name}`"), source: Box::new(error) }),
    }
}

/// What of an endpoint's topology is missing (deleted behind the bus's back): its queue, its
/// exchange, or the exchange of a message type it consumes. Passive declarations, stopping
/// at the first refusal (which closes their channel).
pub(crate) async fn missing_from_endpoint(
    connection: &Connection,
    endpoint: &EndpointTopology,
) -> Result<Option<String>> {
    let channel = connection.create_channel().await.map_err(refused("channel.open"))?;
    let passive_queue = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let passive_exchange = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    let name = endpoint.queue.as_str();
    let mut checks = vec![(format!("queue `{name}`"), None), (format!("exchange `{name}`"), Some(name.to_owned()))];
    let sources = endpoint.message_types.iter().map(|urn| entity_name(urn));
    checks.extend(
        sources
            .chain(endpoint.bindings.iter().map(|b| b.exchange.clone()))
            .map(|exchange| (format!("exchange `{exchange}`"), Some(exchange))),
    );
    for (what, exchange) in checks {
        let checked = match exchange {
            None => channel.queue_declare(short(name)?, passive_queue, FieldTable::default()).await.map(|_| ()),
            Some(exchange) => {
                channel
                    .exchange_declare(short(&exchange)?, ExchangeKind::Fanout, passive_exchange, FieldTable::default())
                    .await
            }
        };
        match checked {
            Ok(()) => {}
            Err(error) if crate::error::is_not_found(&error) => return Ok(Some(what)),
            Err(error) => {
                return Err(Error::Refused { operation: format!("checking {what}"), source: Box::new(error) })
            }
        }
    }
    let _ = channel.close(200, "checked".into()).await;
    Ok(None)
}

/// Deletes a temporary endpoint's queue and exchange.
pub(crate) async fn delete_endpoint(connection: &Connection, endpoint: &EndpointTopology) -> Result<()> {
    with_channel(connection, async |channel| {
        let name = endpoint.queue.as_str();
        channel
            .queue_delete(short(name)?, lapin::options::QueueDeleteOptions::default())
            .await
            .map_err(refused(format!("deleting queue `{name}`")))?;
        channel
            .exchange_delete(short(name)?, lapin::options::ExchangeDeleteOptions::default())
            .await
            .map_err(refused(format!("deleting exchange `{name}`")))
    })
    .await
}
