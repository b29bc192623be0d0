//! Receive endpoints: a queue with its consumers and settings.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::consumer::{ErasedConsumer, FnConsumer, TypedConsumer};
use crate::middleware::{Middleware, RetryPolicy};
use crate::{BoxError, ConsumeContext, Consumer, Message, RedeliveryPolicy};

/// Default size limit of a message body: 4 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// MassTransit's default prefetch: twice the cores, at least 16.
pub fn default_prefetch() -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    u16::try_from((cores * 2).max(16)).unwrap_or(u16::MAX)
}

/// Name and address of a running endpoint.
#[derive(Debug)]
pub(crate) struct EndpointInfo {
    pub(crate) name: String,
    pub(crate) address: String,
}

/// Settings of one receive endpoint.
#[derive(Debug, Clone)]
pub(crate) struct EndpointSettings {
    pub(crate) prefetch: u16,
    /// `None`: as many as the prefetch.
    pub(crate) concurrency: Option<usize>,
    pub(crate) retry: RetryPolicy,
    pub(crate) redelivery: RedeliveryPolicy,
    pub(crate) max_message_size: usize,
    pub(crate) outbox: bool,
    pub(crate) trace_propagation: TracePropagation,
    /// How a message without a content type is read (`None`: as the bus's default).
    pub(crate) default_content_type: Option<String>,
    /// See [`Endpoint::temporary`].
    pub(crate) temporary: bool,
    /// See [`Endpoint::single_active_consumer`].
    pub(crate) single_active_consumer: bool,
    /// See [`Endpoint::max_priority`].
    pub(crate) max_priority: Option<u8>,
    /// See [`Endpoint::bind`].
    pub(crate) bindings: Vec<crate::ExchangeBinding>,
}

/// How a received message's spans continue its producer's trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TracePropagation {
    /// The receive span is a child of the producer's span, in the producer's trace, unless
    /// the message asks for a link with MassTransit's `MT-Activity-Propagation: Link`
    /// header (a sender sets it with `SendOptions::header`).
    #[default]
    Child,
    /// Every message starts a trace of its own whose receive span links to the producer's
    /// span, as MassTransit's `MT-Activity-Propagation: Link` asks (baggage still flows):
    /// for messages from other systems, or long fan-outs that would make one huge trace.
    Link,
}

impl EndpointSettings {
    /// Messages consumed at once: the limit set, else the prefetch.
    pub(crate) fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(usize::from(self.prefetch))
    }
}

impl Default for EndpointSettings {
    fn default() -> Self {
        let prefetch = default_prefetch();
        EndpointSettings {
            prefetch,
            concurrency: None,
            retry: RetryPolicy::none(),
            redelivery: RedeliveryPolicy::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            outbox: true,
            trace_propagation: TracePropagation::Child,
            default_content_type: None,
            temporary: false,
            single_active_consumer: false,
            max_priority: None,
            bindings: Vec::new(),
        }
    }
}

/// Settings of one consumer on an endpoint, given with
/// [`Endpoint::consumer_with`] or [`Endpoint::handler_with`].
///
/// ```
/// use std::time::Duration;
/// use bus_core::ConsumerOptions;
/// use bus_core::middleware::RetryPolicy;
/// let options = ConsumerOptions::new()
///     .retry(RetryPolicy::immediate(3))
///     .timeout(Duration::from_secs(10))
///     .concurrency_limit(4);
/// # drop(options);
/// ```
#[derive(Default, Clone)]
pub struct ConsumerOptions {
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) concurrency_limit: Option<usize>,
    pub(crate) middleware: Vec<Arc<dyn Middleware>>,
}

impl fmt::Debug for ConsumerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerOptions")
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("concurrency_limit", &self.concurrency_limit)
            .field("middleware", &self.middleware.len())
            .finish()
    }
}

impl ConsumerOptions {
    /// The endpoint's settings, unchanged.
    pub fn new() -> Self {
        Self::default()
    }

    /// This consumer's retry policy, instead of the endpoint's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Fails an attempt that runs longer than `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// At most `n` messages in this consumer at once.
    pub fn concurrency_limit(mut self, n: usize) -> Self {
        self.concurrency_limit = Some(n);
        self
    }

    /// Adds middleware around this consumer (inside the endpoint's).
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }
}

/// A consumer registered on an endpoint.
pub(crate) struct ConsumerRegistration {
    pub(crate) consumer_type: &'static str,
    pub(crate) message_type: &'static str,
    pub(crate) consumer: Arc<dyn ErasedConsumer>,
    pub(crate) options: ConsumerOptions,
}

/// How an endpoint is named: as given, or from its consumer's type by the bus's
/// [`EndpointNameFormatter`](crate::EndpointNameFormatter).
#[derive(Debug, Clone)]
pub(crate) enum EndpointName {
    Given(String),
    FromConsumer(&'static str),
}

/// A receive endpoint (MassTransit's `ReceiveEndpoint`): a queue with its consumers and
/// settings, built as a value and added to a bus with [`BusBuilder::endpoint`](crate::BusBuilder::endpoint).
///
/// ```
/// use std::time::Duration;
/// use bus_core::{Bus, ConsumeContext, Endpoint, Message, RedeliveryPolicy};
/// use bus_core::middleware::RetryPolicy;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:OrderPlaced")]
/// # struct OrderPlaced { order_id: u32 }
///
/// let orders = Endpoint::new("orders")
///     .prefetch(32)
///     .concurrency_limit(8)
///     .retry(RetryPolicy::intervals([Duration::from_millis(100), Duration::from_secs(1)]))
///     .redelivery(RedeliveryPolicy::intervals([Duration::from_secs(5), Duration::from_secs(30)]))
///     .handler(|ctx: ConsumeContext<OrderPlaced>| async move {
///         println!("order {}", ctx.message().order_id);
///         Ok(())
///     });
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).endpoint(orders).build();
/// # drop(bus);
/// ```
#[doc(alias = "ReceiveEndpoint")]
pub struct Endpoint {
    pub(crate) name: EndpointName,
    pub(crate) settings: EndpointSettings,
    pub(crate) middleware: Vec<Arc<dyn Middleware>>,
    pub(crate) attempt_middleware: Vec<Arc<dyn Middleware>>,
    pub(crate) consumers: Vec<ConsumerRegistration>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("consumers", &self.consumers.iter().map(|c| c.consumer_type).collect::<Vec<_>>())
            .finish()
    }
}

impl Endpoint {
    /// An endpoint named `name` (its queue), with no consumers yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self::named(EndpointName::Given(name.into()))
    }

    /// An endpoint for one consumer, named when it is added to a bus by the bus's
    /// [`EndpointNameFormatter`](crate::EndpointNameFormatter) from the consumer's type
    /// (`SubmitOrderConsumer` -> `SubmitOrder`, or `submit-order` in kebab case), as
    /// MassTransit's `ConfigureEndpoints` names them.
    ///
    /// ```
    /// use bus_core::{Bus, BoxError, ConsumeContext, Consumer, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:SubmitOrder")]
    /// # struct SubmitOrder;
    /// struct SubmitOrderConsumer;
    /// impl Consumer<SubmitOrder> for SubmitOrderConsumer {
    ///     async fn consume(&self, _: ConsumeContext<SubmitOrder>) -> Result<(), BoxError> { Ok(()) }
    /// }
    /// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .endpoint(Endpoint::for_consumer(SubmitOrderConsumer).prefetch(8))
    ///     .build();
    /// assert!(bus.endpoint_address("SubmitOrder").ends_with("/SubmitOrder"));
    /// ```
    #[doc(alias = "ConfigureEndpoints")]
    pub fn for_consumer<M: Message, C: Consumer<M>>(consumer: C) -> Self {
        Self::named(EndpointName::FromConsumer(std::any::type_name::<C>())).consumer(consumer)
    }

    fn named(name: EndpointName) -> Self {
        Endpoint {
            name,
            settings: EndpointSettings::default(),
            middleware: Vec::new(),
            attempt_middleware: Vec::new(),
            consumers: Vec::new(),
        }
    }

    /// The endpoint's name (its queue), unless it is to be named from its consumer's type
    /// when added to a bus.
    pub fn name(&self) -> Option<&str> {
        match &self.name {
            EndpointName::Given(name) => Some(name),
            EndpointName::FromConsumer(_) => None,
        }
    }

    /// Adds a consumer of `M`. A type that consumes several messages is added once per
    /// message type (`.consumer::<OrderPlaced, _>(c.clone())`).
    pub fn consumer<M: Message, C: Consumer<M>>(self, consumer: C) -> Self {
        self.consumer_with(consumer, ConsumerOptions::default())
    }

    /// Adds a consumer of `M` with its own settings (retry, timeout, concurrency, middleware).
    pub fn consumer_with<M: Message, C: Consumer<M>>(self, consumer: C, options: ConsumerOptions) -> Self {
        self.register(std::any::type_name::<C>(), TypedConsumer::<M, C>::erased(consumer), M::message_type(), options)
    }

    /// Adds an async function as a consumer of `M` (MassTransit's `Handler<T>`).
    #[doc(alias = "Handler")]
    pub fn handler<M, F, Fut>(self, handler: F) -> Self
    where
        M: Message,
        F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.handler_with(handler, ConsumerOptions::default())
    }

    /// Adds an async function as a consumer of `M`, with its own settings.
    pub fn handler_with<M, F, Fut>(self, handler: F, options: ConsumerOptions) -> Self
    where
        M: Message,
        F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        // The closure's own type name says what it is to a reader of `_error` headers.
        let consumer = TypedConsumer::<M, _>::erased(FnConsumer::new(handler));
        self.register(std::any::type_name::<F>(), consumer, M::message_type(), options)
    }

    /// Adds an async function as a consumer of `M` that gets its own clone of `state` with
    /// each message, so that the closure itself needs no clones.
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:OrderPlaced")]
    /// # struct OrderPlaced { order_id: u32 }
    /// let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    /// let billing = Endpoint::new("billing").handler_with_state(tx, |ctx: ConsumeContext<OrderPlaced>, tx| async move {
    ///     tx.send(ctx.message().order_id)?;
    ///     Ok(())
    /// });
    /// # drop(billing);
    /// ```
    pub fn handler_with_state<M, S, F, Fut>(self, state: S, handler: F) -> Self
    where
        M: Message,
        S: Clone + Send + Sync + 'static,
        F: Fn(ConsumeContext<M>, S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let consumer =
            TypedConsumer::<M, _>::erased(FnConsumer::new(move |ctx: ConsumeContext<M>| handler(ctx, state.clone())));
        self.register(std::any::type_name::<F>(), consumer, M::message_type(), ConsumerOptions::default())
    }

    fn register(
        mut self,
        consumer_type: &'static str,
        consumer: Arc<dyn ErasedConsumer>,
        message_type: &'static str,
        options: ConsumerOptions,
    ) -> Self {
        self.consumers.push(ConsumerRegistration { consumer_type, message_type, consumer, options });
        self
    }

    /// How many deliveries may be unsettled at once (default: max(2 x cores, 16)).
    #[doc(alias = "PrefetchCount")]
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.settings.prefetch = prefetch.max(1);
        self
    }

    /// How many messages are consumed at once (default: the prefetch).
    #[doc(alias = "ConcurrentMessageLimit")]
    pub fn concurrency_limit(mut self, n: usize) -> Self {
        self.settings.concurrency = Some(n.max(1));
        self
    }

    /// The in-process retry policy of every consumer here that has none of its own.
    #[doc(alias = "UseMessageRetry")]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.settings.retry = policy;
        self
    }

    /// Delayed redelivery after the in-process retries are spent.
    #[doc(alias = "UseDelayedRedelivery")]
    pub fn redelivery(mut self, policy: RedeliveryPolicy) -> Self {
        self.settings.redelivery = policy;
        self
    }

    /// How a message that comes without a content type (some clients send no AMQP
    /// properties) is read on this endpoint: with the bus's serializer for `content_type`
    /// (`application/json` for raw JSON), as MassTransit reads such a message with the
    /// endpoint's default deserializer. By default, as the bus's default serializer writes
    /// (MassTransit's envelope). A content type the bus has no serializer for is refused
    /// when the bus is built.
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Legacy:Reading")] struct Reading { value: f64 }
    /// let legacy = Endpoint::new("legacy-readings")
    ///     .default_content_type("application/json")
    ///     .handler(|_: ConsumeContext<Reading>| async { Ok(()) });
    /// # drop(legacy);
    /// ```
    #[doc(alias = "DefaultContentType")]
    pub fn default_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.settings.default_content_type = Some(content_type.into());
        self
    }

    /// A temporary endpoint: its queue lives as long as its consumer (on RabbitMQ, not
    /// durable and deleted when the bus stops), and it has no `_error` or `_skipped` queue
    /// until a message first needs one, as MassTransit's temporary endpoints. For an
    /// endpoint per running instance (MassTransit's instance endpoints), name it after the
    /// instance: `Endpoint::new(format!("status-{instance}")).temporary()`. It has no delayed
    /// redelivery (`try_build` refuses one), and is deleted when the bus stops.
    pub fn temporary(mut self) -> Self {
        self.settings.temporary = true;
        self
    }

    /// Only one consumer of the queue at a time gets its messages, the others waiting to take
    /// over (RabbitMQ's `x-single-active-consumer`, MassTransit's `SingleActiveConsumer`): one
    /// instance of a service processes in order while the others stand by.
    #[doc(alias = "SingleActiveConsumer")]
    pub fn single_active_consumer(mut self) -> Self {
        self.settings.single_active_consumer = true;
        self
    }

    /// A priority queue with priorities from 0 to `max` (RabbitMQ's `x-max-priority`, as
    /// MassTransit's `SetQueueArgument("x-max-priority", max)` declares it). An existing
    /// queue declared without it is refused by the broker: a queue's arguments are fixed. On
    /// RabbitMQ, classic queues only (a quorum queue has no priorities).
    pub fn max_priority(mut self, max: u8) -> Self {
        self.settings.max_priority = Some(max);
        self
    }

    /// Also receives what is published to exchange `exchange` (a fanout exchange, declared
    /// if missing), as MassTransit's `Bind("exchange")` on an endpoint: for messages a
    /// .NET system publishes to an exchange of its own naming.
    #[doc(alias = "Bind")]
    pub fn bind(self, exchange: impl Into<String>) -> Self {
        self.bind_with_routing_key(exchange, "")
    }

    /// Also receives what is published to exchange `exchange` with a routing key matching
    /// `routing_key` (for a direct exchange the key itself, for a topic exchange a pattern:
    /// `orders.*.eu`, `orders.#`), as MassTransit's `Bind<T>(x => x.RoutingKey = ..)`. The
    /// exchange's type is the transport's to know (on RabbitMQ:
    /// `RabbitMqOptions::exchange_type`); the in-memory transport ignores routing keys.
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:OrderPlaced")] struct OrderPlaced { region: String }
    /// let east = Endpoint::new("orders-east")
    ///     .bind_with_routing_key("Shop:OrderPlaced", "east")
    ///     .handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) });
    /// # drop(east);
    /// ```
    pub fn bind_with_routing_key(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.settings
            .bindings
            .push(crate::ExchangeBinding { exchange: exchange.into(), routing_key: routing_key.into() });
        self
    }

    /// The largest body accepted; larger ones go to `_error` unread (default 4 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.settings.max_message_size = bytes;
        self
    }

    /// Whether messages produced while consuming are held until the consume succeeds (default on).
    #[doc(alias = "UseInMemoryOutbox")]
    pub fn outbox(mut self, enabled: bool) -> Self {
        self.settings.outbox = enabled;
        self
    }

    /// How received messages continue their producer's trace (default
    /// [`TracePropagation::Child`]).
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, Message, TracePropagation};
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:Webhook")]
    /// # struct Webhook;
    /// // Messages from outside start traces of their own here, linked to their sender's.
    /// let webhooks = Endpoint::new("webhooks")
    ///     .trace_propagation(TracePropagation::Link)
    ///     .handler(|_: ConsumeContext<Webhook>| async { Ok(()) });
    /// # drop(webhooks);
    /// ```
    pub fn trace_propagation(mut self, propagation: TracePropagation) -> Self {
        self.settings.trace_propagation = propagation;
        self
    }

    /// Adds middleware around every consumer of this endpoint, outside the retry policy: it
    /// runs once per delivery.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// Adds middleware around every attempt of every consumer of this endpoint, inside the
    /// retry policy (and its timeout): it runs again for each retry. For what must begin and
    /// end with one attempt, such as a database transaction.
    pub fn attempt_middleware(mut self, middleware: impl Middleware) -> Self {
        self.attempt_middleware.push(Arc::new(middleware));
        self
    }
}
