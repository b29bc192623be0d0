//! The contract every transport implements: declare an endpoint, publish, send, subscribe,
//! settle.
//!
//! A transport moves bytes with headers between named endpoints; it knows nothing of
//! consumers or envelopes. What to declare is data ([`EndpointTopology`]); a subscription is
//! a stream of [`Delivery`] values plus a health signal; each delivery is settled exactly
//! once with a [`Settlement`], an exhaustive enum every transport handles. `bus-inmemory` is
//! the reference implementation; the conformance suite in `tests/` holds every transport to
//! the same behaviour.

use std::borrow::Cow;
use std::fmt;
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
    /// Transport headers.
    pub headers: Headers,
    /// The message id, mirrored into transport properties.
    pub message_id: Option<Uuid>,
    /// The correlation id, mirrored into transport properties.
    pub correlation_id: Option<Uuid>,
    /// How long the message may wait in a queue before it expires.
    pub time_to_live: Option<Duration>,
    /// Its priority in a priority queue.
    pub priority: Option<u8>,
    /// The routing key it is published with (for direct and topic exchanges); `None`: empty.
    pub routing_key: Option<String>,
}

/// What a receive endpoint needs declared: its queue, what is routed to it, where its
/// failed and skipped messages go, and how it waits before a redelivery.
///
/// The default is a durable endpoint with its dead-letter queues, consuming nothing yet.
#[derive(Debug, Clone)]
pub struct EndpointTopology {
    /// The endpoint's name: its queue, and the name messages are sent to.
    pub queue: String,
    /// URNs of the message types consumed here: what is published under any of them is
    /// routed to this endpoint.
    pub message_types: Vec<String>,
    /// Delays of delayed redelivery; the transport prepares a way to deliver again after each.
    pub redelivery_delays: Vec<Duration>,
    /// A temporary endpoint (a bus's response endpoint): deleted with
    /// [`Transport::delete`], and gone with its consumer or the broker's restart.
    pub temporary: bool,
    /// Whether its `_error` and `_skipped` queues are declared with it. A temporary endpoint
    /// is declared without them, and again with them when a message first needs one, as
    /// MassTransit does with its bus endpoint; they are declared like their endpoint, but
    /// outlive it, so that what went there can be read.
    pub dead_letter_queues: bool,
    /// Only one consumer at a time gets the queue's messages.
    pub single_active_consumer: bool,
    /// A priority queue with priorities up to this.
    pub max_priority: Option<u8>,
    /// Exchanges whose messages are routed to this endpoint too, each with the routing key
    /// it is bound with.
    pub bindings: Vec<ExchangeBinding>,
}

/// An exchange bound to an endpoint, with a routing key (empty for a fanout exchange).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeBinding {
    /// The exchange's name.
    pub exchange: String,
    /// The routing key (a pattern for a topic exchange).
    pub routing_key: String,
}

impl Default for EndpointTopology {
    fn default() -> Self {
        EndpointTopology {
            queue: String::new(),
            message_types: Vec::new(),
            redelivery_delays: Vec::new(),
            temporary: false,
            dead_letter_queues: true,
            single_active_consumer: false,
            max_priority: None,
            bindings: Vec::new(),
        }
    }
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

/// An endpoint being consumed: its deliveries, and how its consumer is doing.
pub struct Subscription {
    deliveries: DeliveryStream,
    health: Box<dyn Fn() -> EndpointHealth + Send + Sync>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription to `deliveries` of the endpoint named `endpoint`, healthy as long as
    /// the stream delivers.
    pub fn new(endpoint: impl Into<String>, deliveries: DeliveryStream) -> Self {
        let endpoint = endpoint.into();
        Subscription { deliveries, health: Box::new(move || EndpointHealth::healthy(endpoint.clone())) }
    }

    /// Reports health with `probe`, asked whenever the bus's health is: whether the consumer
    /// is really subscribed now (a transport that reconnects is Degraded meanwhile).
    pub fn with_health(mut self, probe: impl Fn() -> EndpointHealth + Send + Sync + 'static) -> Self {
        self.health = Box::new(probe);
        self
    }

    /// The endpoint's health now.
    pub fn health(&self) -> EndpointHealth {
        (self.health)()
    }

    /// The deliveries and the health probe, apart.
    pub fn into_parts(self) -> (DeliveryStream, Box<dyn Fn() -> EndpointHealth + Send + Sync>) {
        (self.deliveries, self.health)
    }
}

/// A message transport: RabbitMQ, in memory, or another broker.
///
/// Seven methods: its name and address form, and five operations, each returning a boxed
/// future so that the bus holds any transport as `Arc<dyn Transport>`. Every method is safe
/// to call from many tasks at once. Errors say whether they are transient
/// ([`Error::is_transient`](crate::Error::is_transient)): the bus tries those again, and
/// gives up on the others.
pub trait Transport: Send + Sync + 'static {
    /// The transport's name for telemetry (`messaging.system`): `rabbitmq`, `in-memory`.
    fn system(&self) -> &'static str;

    /// The address of an endpoint named `name`, e.g. `rabbitmq://localhost/orders`.
    fn address(&self, name: &str) -> String;

    /// Declares, idempotently, what `endpoint` describes: its queue, the routes from the
    /// message types it consumes, its redelivery delays, and (when asked) its dead-letter
    /// queues.
    fn declare<'a>(&'a self, endpoint: &'a EndpointTopology) -> BoxFuture<'a, Result<()>>;

    /// Publishes to every endpoint that consumes `message_types[0]`, or one of the other
    /// (contract) types it lists, declaring what routes them when needed. Resolves when the
    /// transport has taken the message (on a broker: confirmed it).
    fn publish<'a>(&'a self, message_types: &'a [&'a str], message: TransportMessage) -> BoxFuture<'a, Result<()>>;

    /// Sends to the endpoint named `destination`. Fails when nothing would receive it.
    /// Resolves when the transport has taken the message.
    fn send<'a>(&'a self, destination: &'a str, message: TransportMessage) -> BoxFuture<'a, Result<()>>;

    /// Starts consuming a declared endpoint, with at most `prefetch` deliveries unsettled at
    /// once; a transport that reconnects subscribes again on its own.
    fn subscribe<'a>(&'a self, endpoint: &'a EndpointTopology, prefetch: u16) -> BoxFuture<'a, Result<Subscription>>;

    /// Deletes a temporary endpoint (a bus's response endpoint) when its bus stops; does
    /// nothing to a durable one.
    fn delete<'a>(&'a self, endpoint: &'a EndpointTopology) -> BoxFuture<'a, Result<()>>;
}
