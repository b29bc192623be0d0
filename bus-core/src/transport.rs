//! The contract every transport implements: declare, publish, send, consume, settle.
//!
//! A transport moves bytes with headers; it knows nothing of consumers or envelopes.
//! The bus drives it through [`Transport`]; the in-memory and RabbitMQ transports
//! implement it with the same semantics, held to them by one conformance suite.

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use uuid::Uuid;

use crate::{EndpointHealth, Headers, Result};

/// A message as it travels: the serialized body plus transport-level properties.
#[derive(Debug, Clone, Default)]
pub struct TransportMessage {
    /// The serialized message.
    pub body: Bytes,
    /// Content type of the body; it picks the deserializer on receive.
    pub content_type: Option<Cow<'static, str>>,
    /// Transport headers (AMQP headers on RabbitMQ).
    pub headers: Headers,
    /// The message id, mirrored into transport properties.
    pub message_id: Option<Uuid>,
    /// The correlation id, mirrored into transport properties.
    pub correlation_id: Option<Uuid>,
    /// How long the message may wait in a queue before it expires.
    pub time_to_live: Option<Duration>,
}

/// What a receive endpoint needs from the broker.
#[derive(Debug, Clone, Default)]
pub struct EndpointTopology {
    /// Queue name; also the name of the endpoint's exchange.
    pub queue: String,
    /// URNs of the message types consumed here: their exchanges are bound to the endpoint.
    pub message_types: Vec<String>,
    /// Delays of delayed redelivery; the transport prepares a way to deliver again after each.
    pub redelivery_delays: Vec<Duration>,
    /// A temporary endpoint (a bus's response queue): deleted when its consumer goes away.
    pub temporary: bool,
    /// How many deliveries may be unsettled at once.
    pub prefetch: u16,
}

impl EndpointTopology {
    /// `{queue}_error`: where failed and unreadable messages go.
    pub fn error_queue(&self) -> String {
        format!("{}_error", self.queue)
    }

    /// `{queue}_skipped`: where messages no consumer handles go.
    pub fn skipped_queue(&self) -> String {
        format!("{}_skipped", self.queue)
    }
}

/// How a delivery is settled: every transport handles each of these (the enum is exhaustive,
/// so a new way to settle is a change every transport must make, not one it could ignore).
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Done: remove it from the queue.
    Ack,
    /// Put it back at the head of its queue for another delivery now.
    Requeue,
    /// Move the original bytes, unchanged, to `queue`, adding `headers` to its transport headers.
    MoveTo {
        /// The target queue (`{queue}_error`, `{queue}_skipped`).
        queue: String,
        /// Headers added (replacing same-named ones) to the original transport headers.
        headers: Headers,
    },
    /// Deliver it to its own queue again after `delay`, adding `headers`.
    Redeliver {
        /// How long to wait; one of the endpoint's declared redelivery delays.
        delay: Duration,
        /// Headers added (replacing same-named ones), e.g. `MT-Redelivery-Count`.
        headers: Headers,
    },
}

/// Settles one delivery; implemented by each transport.
pub trait Settle: Send + Sync + 'static {
    /// Settles the delivery whose message is `message` (the transport's original bytes).
    fn settle(self: Box<Self>, message: TransportMessage, settlement: Settlement) -> BoxFuture<'static, Result<()>>;

    /// Whether the delivery can still be settled here. A RabbitMQ delivery whose channel has
    /// closed cannot: the broker has already put it back in its queue, and will deliver it
    /// again. The bus then neither moves it nor publishes a fault for it: its next delivery
    /// does what is needed, once.
    fn is_live(&self) -> bool {
        true
    }

    /// The delivery was dropped without being settled (a task was aborted or panicked):
    /// return the message to its queue, as AMQP does when a channel closes with
    /// unacknowledged messages.
    fn abandon(self: Box<Self>, message: TransportMessage);
}

/// One message handed to an endpoint, to be settled exactly once.
///
/// Dropped unsettled, it goes back to its queue ([`Settle::abandon`]).
pub struct Delivery {
    message: TransportMessage,
    redelivered: bool,
    /// `None` only once settled.
    settler: Option<Box<dyn Settle>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery of `message`, settled through `settler`.
    pub fn new(message: TransportMessage, redelivered: bool, settler: impl Settle) -> Self {
        Delivery { message, redelivered, settler: Some(Box::new(settler)) }
    }

    /// The message as it arrived.
    pub fn message(&self) -> &TransportMessage {
        &self.message
    }

    /// Whether the broker delivered this message before (AMQP's `redelivered` flag).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Whether the delivery can still be settled (see [`Settle::is_live`]).
    pub fn is_live(&self) -> bool {
        self.settler.as_ref().is_some_and(|settler| settler.is_live())
    }

    /// Settles the delivery. Resolves when the transport has done it, except that an ack
    /// may be left to go out with others (RabbitMQ coalesces acks): a failed ack means the
    /// message is delivered again, never lost.
    pub async fn settle(mut self, settlement: Settlement) -> Result<()> {
        let message = std::mem::take(&mut self.message);
        match self.settler.take() {
            Some(settler) => settler.settle(message, settlement).await,
            None => Ok(()),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(settler) = self.settler.take() {
            settler.abandon(std::mem::take(&mut self.message));
        }
    }
}

/// Deliveries of one endpoint; the stream ends when consuming stops for good.
pub type DeliveryStream = BoxStream<'static, Delivery>;

/// A message transport (RabbitMQ, in memory).
///
/// Every method is safe to call from many tasks at once.
pub trait Transport: Send + Sync + 'static {
    /// The transport's name for telemetry (`messaging.system`): `rabbitmq`, `in-memory`.
    fn system(&self) -> &'static str;

    /// The address of an endpoint (queue) named `name`, e.g. `rabbitmq://localhost/orders`.
    fn address(&self, name: &str) -> String;

    /// Declares, idempotently, the endpoint's queue and exchange, the exchanges of the message
    /// types it consumes bound to it, its `_error` and `_skipped` queues and its redelivery delays.
    fn declare_endpoint(&self, topology: &EndpointTopology) -> impl Future<Output = Result<()>> + Send;

    /// Publishes to the exchange of `message_types[0]`, declaring it (bound to the exchanges
    /// of the other, contract types) when needed. Resolves when the broker has taken the message.
    fn publish(&self, message_types: &[&str], message: TransportMessage) -> impl Future<Output = Result<()>> + Send;

    /// Sends to the endpoint named `destination`. Fails when nothing would receive it.
    /// Resolves when the broker has taken the message.
    fn send(&self, destination: &str, message: TransportMessage) -> impl Future<Output = Result<()>> + Send;

    /// Declares, idempotently, the `_error` and `_skipped` queues of a temporary endpoint,
    /// which [`declare_endpoint`](Self::declare_endpoint) leaves out. The bus declares them
    /// when a message on its response endpoint first needs one (one that cannot be read, a
    /// response nobody waits for), so they exist only when something went there, as with
    /// MassTransit's bus endpoint. They are declared like their endpoint (on RabbitMQ: not
    /// durable, auto-delete), but outlive the bus, so that what went there can be read (with
    /// `basic.get`; a consumer that subscribes and leaves deletes one, as auto-delete does).
    fn declare_dead_letter_queues(&self, topology: &EndpointTopology) -> impl Future<Output = Result<()>> + Send;

    /// Starts consuming a declared endpoint with at most `topology.prefetch` unsettled deliveries.
    fn consume(&self, topology: &EndpointTopology) -> impl Future<Output = Result<DeliveryStream>> + Send;

    /// Whether the endpoint's consumer is really running now. The default trusts that a
    /// stream returned by [`consume`](Self::consume) keeps delivering.
    fn endpoint_health(&self, queue: &str) -> EndpointHealth {
        EndpointHealth::healthy(queue)
    }

    /// Deletes a temporary endpoint (a response queue) when its bus stops.
    fn delete_endpoint(&self, topology: &EndpointTopology) -> impl Future<Output = Result<()>> + Send {
        let _ = topology;
        async { Ok(()) }
    }
}

/// The one type-erasure point over [`Transport`], so the bus is not generic over it.
pub(crate) trait DynTransport: Send + Sync + 'static {
    fn system(&self) -> &'static str;
    fn address(&self, name: &str) -> String;
    fn declare_endpoint<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>>;
    fn publish<'a>(&'a self, types: &'a [&'a str], message: TransportMessage) -> BoxFuture<'a, Result<()>>;
    fn send<'a>(&'a self, destination: &'a str, message: TransportMessage) -> BoxFuture<'a, Result<()>>;
    fn consume<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<DeliveryStream>>;
    fn declare_dead_letter_queues<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>>;
    fn delete_endpoint<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>>;
    fn endpoint_health(&self, queue: &str) -> EndpointHealth;
}

impl<T: Transport> DynTransport for T {
    fn system(&self) -> &'static str {
        Transport::system(self)
    }
    fn address(&self, name: &str) -> String {
        Transport::address(self, name)
    }
    fn declare_endpoint<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>> {
        Box::pin(Transport::declare_endpoint(self, topology))
    }
    fn publish<'a>(&'a self, types: &'a [&'a str], message: TransportMessage) -> BoxFuture<'a, Result<()>> {
        Box::pin(Transport::publish(self, types, message))
    }
    fn send<'a>(&'a self, destination: &'a str, message: TransportMessage) -> BoxFuture<'a, Result<()>> {
        Box::pin(Transport::send(self, destination, message))
    }
    fn consume<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<DeliveryStream>> {
        Box::pin(Transport::consume(self, topology))
    }
    fn declare_dead_letter_queues<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>> {
        Box::pin(Transport::declare_dead_letter_queues(self, topology))
    }
    fn delete_endpoint<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>> {
        Box::pin(Transport::delete_endpoint(self, topology))
    }
    fn endpoint_health(&self, queue: &str) -> EndpointHealth {
        Transport::endpoint_health(self, queue)
    }
}
