use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{request, Bus, BusInner, CREATED};
use crate::endpoint::{ConsumerOptions, Endpoint, EndpointName};
use crate::instrumentation::Instrumentation;
use crate::middleware::SendMiddleware;
use crate::observer::BusObserver;
use crate::receive::{EndpointRuntime, Registration};
use crate::scheduling::MessageScheduler;
use crate::serializer::Serializers;
use crate::telemetry::BusMetrics;
use crate::Message;
use crate::{DefaultEndpointNameFormatter, EndpointNameFormatter, Error, HostInfo, Result, Transport};

/// The instrumentation scope of the bus's spans.
const TRACER_NAME: &str = "rust-bus";

/// Configures a [`Bus`]: its endpoints, serializers, observers and timeouts.
pub struct BusBuilder {
    transport: Arc<dyn Transport>,
    endpoints: Vec<Endpoint>,
    serializers: Serializers,
    observers: Vec<Arc<dyn BusObserver>>,
    send_middleware: Vec<Arc<dyn SendMiddleware>>,
    scheduler: Option<Arc<dyn MessageScheduler>>,
    metrics: Option<BusMetrics>,
    tracer: Option<crate::telemetry::BusTracer>,
    formatter: Arc<dyn EndpointNameFormatter>,
    request_timeout: Duration,
    stop_timeout: Duration,
    routing_keys: RoutingKeys,
    concurrency_limit: Option<usize>,
}

impl fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusBuilder")
            .field("transport", &self.transport.system())
            .field("endpoints", &self.endpoints)
            .field("serializers", &self.serializers)
            .field("request_timeout", &self.request_timeout)
            .field("stop_timeout", &self.stop_timeout)
            .finish_non_exhaustive()
    }
}

impl BusBuilder {
    pub(super) fn new(transport: Arc<dyn Transport>) -> Self {
        BusBuilder {
            transport,
            endpoints: Vec::new(),
            serializers: Serializers::default(),
            observers: Vec::new(),
            send_middleware: Vec::new(),
            scheduler: None,
            metrics: None,
            tracer: None,
            formatter: Arc::new(DefaultEndpointNameFormatter),
            request_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(30),
            routing_keys: RoutingKeys::default(),
            concurrency_limit: None,
        }
    }

    /// At most `n` messages consumed at once across all of this bus's endpoints, besides
    /// each endpoint's own limit: one pool for a service whose endpoints share one scarce
    /// resource (a connection pool, memory). (MassTransit's bus-level
    /// `ConcurrentMessageLimit` is a default for each endpoint instead; that is
    /// [`Endpoint::concurrency_limit`](crate::Endpoint::concurrency_limit) here.) The bus's
    /// response endpoint is not counted, so that consumers waiting for responses cannot
    /// starve it; but a consumer that waits on a request another endpoint of this bus
    /// answers holds its place meanwhile, and enough of them can hold every place until
    /// their requests time out. A batch consumer needs its batch's messages at once: a
    /// bus-wide limit below that ends its batches by time.
    ///
    /// ```
    /// use bus_core::{Bus, ConsumeContext, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:A")] struct A;
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:B")] struct B;
    /// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .concurrency_limit(16)
    ///     .endpoint(Endpoint::new("a").concurrency_limit(12).handler(|_: ConsumeContext<A>| async { Ok(()) }))
    ///     .endpoint(Endpoint::new("b").concurrency_limit(12).handler(|_: ConsumeContext<B>| async { Ok(()) }))
    ///     .build();
    /// # drop(bus);
    /// ```
    pub fn concurrency_limit(mut self, n: usize) -> Self {
        self.concurrency_limit = Some(n);
        self
    }

    /// Adds a receive endpoint (see [`Endpoint`]). An endpoint made with
    /// [`Endpoint::for_consumer`] is named here by the
    /// [endpoint name formatter](Self::endpoint_name_formatter). Two endpoints of one name
    /// are a configuration error: [`try_build`](Self::try_build) refuses them.
    ///
    /// ```
    /// use bus_core::{Bus, Endpoint};
    /// let refused = Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .endpoint(Endpoint::new("orders"))
    ///     .endpoint(Endpoint::new("orders"))
    ///     .try_build();
    /// assert!(refused.expect_err("refused").to_string().contains("two endpoints are named `orders`"));
    /// ```
    pub fn endpoint(mut self, mut endpoint: Endpoint) -> Self {
        if let EndpointName::FromConsumer(consumer_type) = endpoint.name {
            endpoint.name = EndpointName::Given(self.formatter.consumer(consumer_type));
        }
        self.endpoints.push(endpoint);
        self
    }

    /// Publishes `M` with the routing key `key` makes of each message (MassTransit's
    /// `UseRoutingKeyFormatter`), for a message type whose exchange is a direct or topic
    /// exchange (on RabbitMQ: `RabbitMqOptions::exchange_type`); endpoints receive it through
    /// binds with a routing key ([`Endpoint::bind_with_routing_key`]). The in-memory
    /// transport ignores routing keys.
    ///
    /// ```
    /// use bus_core::{Bus, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:OrderPlaced")] struct OrderPlaced { region: String }
    /// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .routing_key(|order: &OrderPlaced| order.region.clone())
    ///     .build();
    /// let prepared = bus.prepare_publish(OrderPlaced { region: "east".into() }, Default::default()).unwrap();
    /// assert_eq!(prepared.message.routing_key.as_deref(), Some("east"));
    /// ```
    #[doc(alias = "UseRoutingKeyFormatter")]
    pub fn routing_key<M: Message>(mut self, key: impl Fn(&M) -> String + Send + Sync + 'static) -> Self {
        let key: RoutingKey<M> = Arc::new(key);
        self.routing_keys.insert(M::message_type(), Arc::new(key));
        self
    }

    /// How endpoints made with [`Endpoint::for_consumer`] are named; set it before adding them.
    pub fn endpoint_name_formatter(mut self, formatter: impl EndpointNameFormatter) -> Self {
        self.formatter = Arc::new(formatter);
        self
    }

    /// The serializers to write and read with (default: MassTransit JSON, also reading raw JSON).
    pub fn serializers(mut self, serializers: Serializers) -> Self {
        self.serializers = serializers;
        self
    }

    /// Adds an observer.
    pub fn observer(mut self, observer: impl BusObserver) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Adds a shared observer.
    pub fn observer_arc(mut self, observer: Arc<dyn BusObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Adds a step every outgoing message goes through (see [`SendMiddleware`]).
    pub fn send_middleware(mut self, middleware: impl SendMiddleware) -> Self {
        self.send_middleware.push(Arc::new(middleware));
        self
    }

    /// Where scheduled messages wait until they are due ([`Bus::schedule_send`]); the bus runs
    /// it from [`Bus::start`] to [`Bus::stop`].
    pub fn scheduler(mut self, scheduler: impl MessageScheduler) -> Self {
        self.scheduler = Some(Arc::new(scheduler));
        self
    }

    /// Records metrics with `meter` instead of the global meter provider's.
    pub fn meter(mut self, meter: &opentelemetry::metrics::Meter) -> Self {
        self.metrics = Some(BusMetrics::new(meter));
        self
    }

    /// Records spans with `provider`'s tracer instead of the global tracer provider's (the
    /// one installed when the bus is built).
    ///
    /// ```
    /// use opentelemetry_sdk::trace::SdkTracerProvider;
    /// let provider = SdkTracerProvider::builder().build();
    /// let bus = bus_core::Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .tracer_provider(&provider)
    ///     .build();
    /// # drop(bus);
    /// ```
    pub fn tracer_provider<P>(mut self, provider: &P) -> Self
    where
        P: opentelemetry::trace::TracerProvider,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
    {
        self.tracer = Some(crate::telemetry::BusTracer::new(provider.tracer(TRACER_NAME)));
        self
    }

    /// Default timeout of requests (30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long `stop()` lets in-flight consumers finish before cancelling them (30 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Builds the bus, first checking that its configuration can work: two endpoints of one
    /// name, or a concurrency limit of zero or past what can be counted, are refused with the
    /// reason. Nothing touches the
    /// transport until [`Bus::start`].
    ///
    /// ```
    /// use bus_core::{Bus, ConsumeContext, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:OrderPlaced")]
    /// # struct OrderPlaced { order_id: u32 }
    /// let refused = Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .endpoint(
    ///         Endpoint::new("billing")
    ///             .concurrency_limit(usize::MAX)
    ///             .handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) }),
    ///     )
    ///     .try_build();
    /// let error = refused.expect_err("refused");
    /// assert!(error.to_string().contains("concurrency limit"), "{error}");
    /// ```
    pub fn try_build(self) -> Result<Bus> {
        let bus = self.build();
        match &bus.inner.configuration_error {
            Some(error) => Err(Error::Configuration(error.clone())),
            None => Ok(bus),
        }
    }

    /// Builds the bus without refusing it: a configuration that cannot work (see
    /// [`try_build`](Self::try_build)) makes [`Bus::start`] fail with the reason instead.
    /// Nothing touches the transport until [`Bus::start`].
    pub fn build(self) -> Bus {
        let system = self.transport.system();
        let host = HostInfo::current();
        let process = host.process_name.as_deref().unwrap_or("bus");
        let machine = host.machine_name.as_deref().unwrap_or("host");
        let id = uuid::Uuid::now_v7().simple().to_string();
        let response_queue = format!("{machine}_{process}_bus_{}", &id[id.len() - 12..]);
        let address = format!("{}?temporary=true", self.transport.address(&response_queue));
        let pending_requests = Registration {
            consumer_type: std::any::type_name::<request::PendingRequests>(),
            message_type: None,
            consumer: Arc::new(request::PendingRequests),
            options: ConsumerOptions::default(),
        };
        let responses = Arc::new(EndpointRuntime::responses(response_queue, address.clone(), pending_requests));
        let endpoints = self
            .endpoints
            .into_iter()
            .map(|e| {
                let name = match &e.name {
                    EndpointName::Given(name) => name.clone(),
                    EndpointName::FromConsumer(consumer_type) => self.formatter.consumer(consumer_type),
                };
                let address = self.transport.address(&name);
                Arc::new(EndpointRuntime::new(name, e, address))
            })
            .collect::<Vec<Arc<EndpointRuntime>>>();
        let duplicate = endpoints.iter().enumerate().find_map(|(index, e)| {
            let name = &e.topology.queue;
            endpoints[..index]
                .iter()
                .any(|other| &other.topology.queue == name)
                .then(|| format!("two endpoints are named `{name}`"))
        });
        let bus_limit = match self.concurrency_limit {
            Some(0) => Some("the bus's concurrency limit is 0".to_owned()),
            Some(n) if n > tokio::sync::Semaphore::MAX_PERMITS => {
                Some(format!("the bus's concurrency limit {n} is over the most that can be counted"))
            }
            _ => None,
        };
        let configuration_error =
            bus_limit.or(duplicate).or_else(|| endpoints.iter().find_map(|e| e.configuration_error(&self.serializers)));
        Bus {
            inner: Arc::new(BusInner {
                configuration_error,
                transport: self.transport,
                serializers: self.serializers,
                host,
                instruments: Instrumentation::new(
                    self.metrics.unwrap_or_else(BusMetrics::global),
                    self.tracer.unwrap_or_else(|| {
                        crate::telemetry::BusTracer::new(opentelemetry::global::tracer(TRACER_NAME))
                    }),
                    self.observers,
                    system,
                ),
                send_middleware: self.send_middleware,
                scheduler: self.scheduler,
                destinations: std::sync::RwLock::default(),
                address,
                responses,
                endpoints,
                state: AtomicU8::new(CREATED),
                pending: Mutex::new(HashMap::new()),
                running: tokio::sync::Mutex::new(None),
                request_timeout: self.request_timeout,
                stop_timeout: self.stop_timeout,
                formatter: self.formatter,
                routing_keys: self.routing_keys,
                concurrency_limit: self
                    .concurrency_limit
                    .map(|n| Arc::new(tokio::sync::Semaphore::new(n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)))),
            }),
        }
    }
}

/// How a published message of type `M` makes its routing key.
pub(crate) type RoutingKey<M> = Arc<dyn Fn(&M) -> String + Send + Sync>;

/// Routing-key makers by message type (each a [`RoutingKey`] of its type).
pub(crate) type RoutingKeys = HashMap<&'static str, Arc<dyn std::any::Any + Send + Sync>>;
