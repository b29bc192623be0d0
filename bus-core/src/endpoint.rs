//! Receive endpoints: a queue with its consumers and settings.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::BatchCollector;
use crate::consumer::{ErasedConsumer, FnConsumer, TypedConsumer};
use crate::flow::partitioner::{typed_key, PartitionerSettings};
use crate::middleware::{CircuitBreaker, Middleware, RetryPolicy};
use crate::{
    Batch, BatchOptions, BoxError, ConsumeContext, Consumer, Envelope, KillSwitch, Message, RateLimit, RedeliveryPolicy,
};

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
    /// See [`Endpoint::partition_by`].
    pub(crate) partitioner: PartitionerSettings,
    /// See [`Endpoint::rate_limit`].
    pub(crate) rate_limit: Option<RateLimit>,
    /// See [`Endpoint::kill_switch`].
    pub(crate) kill_switch: Option<KillSwitch>,
    /// See [`Endpoint::circuit_breaker`]: asked for health.
    pub(crate) circuit_breakers: Vec<CircuitBreaker>,
    /// How many messages its batch consumers need at once: the prefetch and concurrency
    /// are raised to it.
    pub(crate) batch_in_flight: usize,
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
            partitioner: PartitionerSettings::default(),
            rate_limit: None,
            kill_switch: None,
            circuit_breakers: Vec::new(),
            batch_in_flight: 0,
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

    /// Adds a batch consumer of `T`: it receives up to `options`' message limit of them at
    /// once, or as many as arrived within its time limit (MassTransit's `Batch<T>`
    /// consumers). Every message of a batch is acknowledged once the batch succeeds; a batch
    /// that fails is retried as a batch by the options' retry policy, then each of its
    /// messages takes the endpoint's failure path (redelivery, `_error`, one fault each). The
    /// endpoint's prefetch and concurrency limit are raised to
    /// [`BatchOptions::in_flight`] (of all its batch consumers together) when lower, so that
    /// a batch can fill. A batch still collecting when the bus stops and cancels its
    /// consumers gives its messages back to the queue.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus_core::{Batch, BatchOptions, ConsumeContext, Consumer, BoxError, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Metrics:Reading")] struct Reading { value: f64 }
    /// struct SaveReadings;
    /// impl Consumer<Batch<Reading>> for SaveReadings {
    ///     async fn consume(&self, ctx: ConsumeContext<Batch<Reading>>) -> Result<(), BoxError> {
    ///         println!("saving {} readings in one insert", ctx.message().len());
    ///         Ok(())
    ///     }
    /// }
    /// let readings = Endpoint::new("readings")
    ///     .batch_consumer(SaveReadings, BatchOptions::new().message_limit(100).time_limit(Duration::from_millis(200)));
    /// # drop(readings);
    /// ```
    #[doc(alias = "Batch")]
    pub fn batch_consumer<T: Message, C: Consumer<Batch<T>>>(mut self, consumer: C, options: BatchOptions) -> Self {
        self.settings.batch_in_flight = self.settings.batch_in_flight.saturating_add(options.in_flight());
        // Retried as a batch, by the batch's policy, not message by message.
        let per_message = ConsumerOptions::new().retry(RetryPolicy::none());
        self.register(
            std::any::type_name::<C>(),
            BatchCollector::<T, C>::erased(consumer, options),
            T::message_type(),
            per_message,
        )
    }

    /// Runs messages of type `M` with the same key one at a time, in the order they were
    /// delivered, while messages of different keys run concurrently up to the endpoint's
    /// limit (MassTransit's `UsePartitioner`). Keys are hashed into `partitions` partitions
    /// (two keys may share one, and then wait for each other): more partitions, fewer such
    /// waits. Call it once per message type to partition; other types are not partitioned.
    /// The endpoint has one set of partitions, of the count given last.
    ///
    /// Order holds among the messages of one endpoint's delivery stream: a message that fails
    /// and is redelivered later comes back after the others of its key, and two instances
    /// of a service each order only what they receive.
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Bank:Deposit")] struct Deposit { account: String, amount: i64 }
    /// let ledger = Endpoint::new("ledger")
    ///     .concurrency_limit(32)
    ///     .partition_by(|deposit: &Deposit| deposit.account.clone(), 64)
    ///     .handler(|_: ConsumeContext<Deposit>| async { Ok(()) });
    /// # drop(ledger);
    /// ```
    #[doc(alias = "UsePartitioner")]
    pub fn partition_by<M, K>(self, key: impl Fn(&M) -> K + Send + Sync + 'static, partitions: usize) -> Self
    where
        M: Message,
        K: std::hash::Hash,
    {
        self.partition_by_envelope(move |message: &M, _: &Envelope| Some(key(message)), partitions)
    }

    /// As [`partition_by`](Self::partition_by), with a key read from the message and its
    /// envelope (its correlation id, a header); `None` leaves a message unpartitioned.
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, Envelope, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:OrderEvent")] struct OrderEvent;
    /// let orders = Endpoint::new("order-events")
    ///     .partition_by_envelope(|_: &OrderEvent, envelope: &Envelope| envelope.correlation_id, 64)
    ///     .handler(|_: ConsumeContext<OrderEvent>| async { Ok(()) });
    /// # drop(orders);
    /// ```
    pub fn partition_by_envelope<M, K>(
        mut self,
        key: impl Fn(&M, &Envelope) -> Option<K> + Send + Sync + 'static,
        partitions: usize,
    ) -> Self
    where
        M: Message,
        K: std::hash::Hash,
    {
        self.settings.partitioner.add::<M>(partitions, typed_key(key));
        self
    }

    /// How many partitions the endpoint has, if it partitions any message type.
    pub fn partitions(&self) -> Option<usize> {
        (!self.settings.partitioner.keys.is_empty()).then_some(self.settings.partitioner.partitions)
    }

    /// Partitions nothing: undoes [`partition_by`](Self::partition_by), and the partitioning
    /// by instance a saga puts on its endpoint.
    pub fn unpartitioned(mut self) -> Self {
        self.settings.partitioner = PartitionerSettings::default();
        self
    }

    /// At most `limit.limit` messages per interval through this endpoint (MassTransit's
    /// `UseRateLimit`; see [`RateLimit`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus_core::{ConsumeContext, Endpoint, Message, RateLimit};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Mail:SendEmail")] struct SendEmail;
    /// // The mail provider takes 10 a second.
    /// let mail = Endpoint::new("mail")
    ///     .rate_limit(RateLimit::new(10, Duration::from_secs(1)))
    ///     .handler(|_: ConsumeContext<SendEmail>| async { Ok(()) });
    /// # drop(mail);
    /// ```
    #[doc(alias = "UseRateLimit")]
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.settings.rate_limit = Some(limit);
        self
    }

    /// Stops consuming this endpoint for a while when too many of its messages fail (see
    /// [`KillSwitch`]).
    #[doc(alias = "UseKillSwitch")]
    pub fn kill_switch(mut self, kill_switch: KillSwitch) -> Self {
        self.settings.kill_switch = Some(kill_switch);
        self
    }

    /// Fails messages fast while too many fail (see [`CircuitBreaker`]): around every
    /// consumer here, outside the retry policy, so that a delivery counts once. Its state
    /// shows in the endpoint's health.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus_core::{ConsumeContext, Endpoint, Message};
    /// use bus_core::middleware::CircuitBreaker;
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:ReserveStock")] struct ReserveStock;
    /// let breaker = CircuitBreaker::new().reset_interval(Duration::from_secs(30));
    /// let stock = Endpoint::new("stock")
    ///     .circuit_breaker(breaker.clone())
    ///     .handler(|_: ConsumeContext<ReserveStock>| async { Ok(()) });
    /// # drop(stock);
    /// ```
    #[doc(alias = "UseCircuitBreaker")]
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.settings.circuit_breakers.push(breaker.clone());
        self.middleware(breaker)
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
