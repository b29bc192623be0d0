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
        }
    }
}

/// Settings of one consumer on an endpoint; see [`ReceiveEndpointBuilder::consumer_with`].
#[derive(Default)]
pub struct ConsumerConfig {
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) concurrency_limit: Option<usize>,
    pub(crate) middleware: Vec<Arc<dyn Middleware>>,
}

impl fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("concurrency_limit", &self.concurrency_limit)
            .field("middleware", &self.middleware.len())
            .finish()
    }
}

impl ConsumerConfig {
    /// This consumer's retry policy, instead of the endpoint's.
    pub fn retry(&mut self, policy: RetryPolicy) -> &mut Self {
        self.retry = Some(policy);
        self
    }

    /// Fails an attempt that runs longer than `timeout`.
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = Some(timeout);
        self
    }

    /// At most `n` messages in this consumer at once.
    pub fn concurrency_limit(&mut self, n: usize) -> &mut Self {
        self.concurrency_limit = Some(n);
        self
    }

    /// Adds middleware around this consumer (inside the endpoint's).
    pub fn middleware(&mut self, middleware: impl Middleware) -> &mut Self {
        self.middleware.push(Arc::new(middleware));
        self
    }
}

/// A consumer registered on an endpoint.
pub(crate) struct ConsumerRegistration {
    pub(crate) consumer_type: &'static str,
    pub(crate) message_type: &'static str,
    pub(crate) consumer: Arc<dyn ErasedConsumer>,
    pub(crate) config: ConsumerConfig,
}

/// Configures one receive endpoint: its consumers and settings.
///
/// ```
/// use std::time::Duration;
/// use bus_core::{Bus, ConsumeContext, BoxError, Message, RedeliveryPolicy};
/// use bus_core::middleware::RetryPolicy;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:OrderPlaced")]
/// # struct OrderPlaced { order_id: u32 }
///
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
///     .receive_endpoint("orders", |e| {
///         e.prefetch(32)
///             .concurrency_limit(8)
///             .retry(RetryPolicy::intervals([Duration::from_millis(100), Duration::from_secs(1)]))
///             .redelivery(RedeliveryPolicy::intervals([Duration::from_secs(5), Duration::from_secs(30)]))
///             .handler(|ctx: ConsumeContext<OrderPlaced>| async move {
///                 println!("order {}", ctx.message().order_id);
///                 Ok::<_, BoxError>(())
///             });
///     })
///     .build();
/// # drop(bus);
/// ```
pub struct ReceiveEndpointBuilder {
    pub(crate) name: String,
    pub(crate) settings: EndpointSettings,
    pub(crate) middleware: Vec<Arc<dyn Middleware>>,
    pub(crate) consumers: Vec<ConsumerRegistration>,
}

impl fmt::Debug for ReceiveEndpointBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiveEndpointBuilder")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("consumers", &self.consumers.iter().map(|c| c.consumer_type).collect::<Vec<_>>())
            .finish()
    }
}

impl ReceiveEndpointBuilder {
    pub(crate) fn new(name: String) -> Self {
        ReceiveEndpointBuilder {
            name,
            settings: EndpointSettings::default(),
            middleware: Vec::new(),
            consumers: Vec::new(),
        }
    }

    /// The endpoint's name (its queue).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a consumer of `M`.
    pub fn consumer<M: Message, C: Consumer<M>>(&mut self, consumer: C) -> &mut Self {
        self.consumer_with(consumer, |_| {})
    }

    /// Adds a consumer of `M` with its own settings (retry, timeout, concurrency, middleware).
    pub fn consumer_with<M: Message, C: Consumer<M>>(
        &mut self,
        consumer: C,
        configure: impl FnOnce(&mut ConsumerConfig),
    ) -> &mut Self {
        let mut config = ConsumerConfig::default();
        configure(&mut config);
        self.consumers.push(ConsumerRegistration {
            consumer_type: std::any::type_name::<C>(),
            message_type: M::message_type(),
            consumer: TypedConsumer::<M, C>::erased(consumer),
            config,
        });
        self
    }

    /// Adds an async function as a consumer of `M`.
    pub fn handler<M, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        M: Message,
        F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.handler_with(handler, |_| {})
    }

    /// Adds an async function as a consumer of `M`, with its own settings.
    pub fn handler_with<M, F, Fut>(&mut self, handler: F, configure: impl FnOnce(&mut ConsumerConfig)) -> &mut Self
    where
        M: Message,
        F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let index = self.consumers.len();
        self.consumer_with(FnConsumer::new(handler), configure);
        // The closure's own type name says nothing to a reader of `_error` headers.
        self.consumers[index].consumer_type = std::any::type_name::<F>();
        self
    }

    /// How many deliveries may be unsettled at once (default: max(2 x cores, 16)).
    pub fn prefetch(&mut self, prefetch: u16) -> &mut Self {
        self.settings.prefetch = prefetch.max(1);
        self
    }

    /// How many messages are consumed at once (default: the prefetch).
    pub fn concurrency_limit(&mut self, n: usize) -> &mut Self {
        self.settings.concurrency = Some(n.max(1));
        self
    }

    /// The in-process retry policy of every consumer here that has none of its own.
    pub fn retry(&mut self, policy: RetryPolicy) -> &mut Self {
        self.settings.retry = policy;
        self
    }

    /// Delayed redelivery after the in-process retries are spent.
    pub fn redelivery(&mut self, policy: RedeliveryPolicy) -> &mut Self {
        self.settings.redelivery = policy;
        self
    }

    /// The largest body accepted; larger ones go to `_error` unread (default 4 MiB).
    pub fn max_message_size(&mut self, bytes: usize) -> &mut Self {
        self.settings.max_message_size = bytes;
        self
    }

    /// Whether messages produced while consuming are held until the consume succeeds (default on).
    pub fn outbox(&mut self, enabled: bool) -> &mut Self {
        self.settings.outbox = enabled;
        self
    }

    /// How received messages continue their producer's trace (default
    /// [`TracePropagation::Child`]).
    ///
    /// ```
    /// use bus_core::{BoxError, Bus, ConsumeContext, Message, TracePropagation};
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:Webhook")]
    /// # struct Webhook;
    /// // Messages from outside start traces of their own here, linked to their sender's.
    /// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .receive_endpoint("webhooks", |e| {
    ///         e.trace_propagation(TracePropagation::Link)
    ///             .handler(|_: ConsumeContext<Webhook>| async { Ok::<_, BoxError>(()) });
    ///     })
    ///     .build();
    /// # drop(bus);
    /// ```
    pub fn trace_propagation(&mut self, propagation: TracePropagation) -> &mut Self {
        self.settings.trace_propagation = propagation;
        self
    }

    /// Adds middleware around every consumer of this endpoint.
    pub fn middleware(&mut self, middleware: impl Middleware) -> &mut Self {
        self.middleware.push(Arc::new(middleware));
        self
    }
}
