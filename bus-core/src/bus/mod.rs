//! The bus: a cheap handle that publishes, sends and requests, and runs the endpoints.

mod builder;
mod prepared;
mod request;
mod schedule;
mod send;

use crate::endpoint::EndpointName;
use crate::logged::chain;
use crate::sync::MutexExt;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use builder::BusBuilder;
pub use prepared::{PreparedDestination, PreparedMessage};
pub use request::{EitherResponse, RequestClient, Response};
pub use send::SendOptions;
pub(crate) use send::{is_flow_header, Parent};

use crate::instrumentation::Instrumentation;
use crate::middleware::SendMiddleware;
use crate::receive::EndpointRuntime;
use crate::serializer::Serializers;
use crate::{BusHealth, Endpoint, EndpointHealth, Envelope, Error, HealthStatus, HostInfo, Result, Transport};

const CREATED: u8 = 0;
const STARTED: u8 = 1;
const STOPPING: u8 = 2;
const STOPPED: u8 = 3;

/// A handle to a bus: publish, send, request; start and stop its endpoints.
///
/// Cheap to clone and safe to share between tasks.
///
/// ```
/// use bus_core::{Bus, ConsumeContext, Endpoint, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[message(urn = "urn:message:Shop:OrderPlaced")]
/// struct OrderPlaced { order_id: u32 }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
///     .endpoint(Endpoint::new("billing").handler_with_state(tx, |ctx: ConsumeContext<OrderPlaced>, tx| async move {
///         tx.send(ctx.message().order_id)?;
///         Ok(())
///     }))
///     .build();
/// bus.start().await?;
/// bus.publish(OrderPlaced { order_id: 42 }).await?;
/// assert_eq!(rx.recv().await, Some(42));
/// bus.stop().await?;
/// assert!(bus.publish(OrderPlaced { order_id: 43 }).await.is_err());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.inner.transport.system())
            .field("address", &self.inner.address)
            .field("endpoints", &self.inner.endpoints.len())
            .finish()
    }
}

pub(crate) struct BusInner {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) serializers: Serializers,
    pub(crate) host: Arc<HostInfo>,
    pub(crate) send_middleware: Vec<Arc<dyn SendMiddleware>>,
    /// Where scheduled messages wait, when the bus has one.
    pub(crate) scheduler: Option<Arc<dyn crate::scheduling::MessageScheduler>>,
    /// Spans, metrics, logs and observers.
    pub(crate) instruments: Instrumentation,
    /// Per published message type: the name it is published under, and its address. (foldhash: looked up on
    /// every publish, and SipHash was most of the lookup; the keys are our own types.)
    pub(crate) destinations: std::sync::RwLock<foldhash::HashMap<&'static str, Destination>>,
    /// Address of the bus's own (response) endpoint.
    pub(crate) address: String,
    /// The bus's own endpoint, where responses arrive.
    responses: Arc<EndpointRuntime>,
    endpoints: Vec<Arc<EndpointRuntime>>,
    state: AtomicU8,
    pub(crate) pending: Mutex<HashMap<Uuid, oneshot::Sender<Envelope>>>,
    running: tokio::sync::Mutex<Option<Running>>,
    pub(crate) request_timeout: Duration,
    stop_timeout: Duration,
    /// What in the configuration cannot work; `start()` refuses to run with it.
    pub(crate) configuration_error: Option<String>,
    /// Names endpoints made for a consumer, connected after the bus was built.
    formatter: Arc<dyn crate::EndpointNameFormatter>,
    /// Routing keys of published message types, by URN.
    pub(crate) routing_keys: builder::RoutingKeys,
    /// The bus-wide limit on concurrent consumes, if any.
    pub(crate) concurrency_limit: Option<Arc<tokio::sync::Semaphore>>,
}

/// Where a message type is published: the name it is published under, its address, and the
/// name of its send spans.
pub(crate) type Destination = (Arc<str>, Arc<str>, &'static str);

struct Running {
    stop_taking: CancellationToken,
    /// Stops the response endpoint: last, so that consumers finishing during a stop still
    /// get the responses to their requests.
    stop_responses: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
    loops: Vec<JoinHandle<()>>,
    /// The scheduler's delivery task, and what stops it.
    scheduler: Option<(CancellationToken, JoinHandle<()>)>,
    /// Endpoints connected while running ([`Bus::connect_endpoint`]), with their consume
    /// loops and health; they stop with the bus.
    connected: Vec<(Arc<EndpointRuntime>, JoinHandle<()>)>,
}

impl Running {
    /// Stops taking deliveries, lets consumers finish within the stop timeout (then cancels
    /// them, and waits one more timeout at most), and only then stops the response endpoint,
    /// so that consumers finishing meanwhile still get the responses to their requests.
    async fn shut_down(mut self, inner: &BusInner) {
        if let Some((stop, task)) = self.scheduler.take() {
            stop.cancel();
            let _ = task.await;
        }
        self.stop_taking.cancel();
        // loops[0] is the response endpoint: it runs until the consumers are done.
        let endpoints = self.loops.split_off(1.min(self.loops.len()));
        let (connected, connected_loops): (Vec<_>, Vec<_>) = self.connected.drain(..).unzip();
        for handle in endpoints.into_iter().chain(connected_loops) {
            let _ = handle.await;
        }
        self.tracker.close();
        if tokio::time::timeout(inner.stop_timeout, self.tracker.wait()).await.is_err() {
            tracing::warn!(timeout = ?inner.stop_timeout, "consumers still running at stop timeout; cancelling them");
            self.cancel.cancel();
            // Consumers that honour the token end promptly; the bound keeps stop() finite
            // even for one that does not (it settles its message whenever it finishes).
            let _ = tokio::time::timeout(inner.stop_timeout, self.tracker.wait()).await;
        }
        self.stop_responses.cancel();
        for handle in self.loops {
            let _ = handle.await;
        }
        inner.pending.locked().clear();
        // Temporary endpoints go with the bus (their queues would not be consumed again).
        let temporary = std::iter::once(&inner.responses)
            .chain(inner.endpoints.iter().filter(|e| e.topology.temporary))
            .chain(connected.iter().filter(|e| e.topology.temporary));
        for endpoint in temporary {
            if let Err(error) = inner.transport.delete(&endpoint.topology).await {
                tracing::warn!(endpoint = %endpoint.topology.queue, error = %chain(&error), "could not delete a temporary endpoint");
            }
        }
    }
}

impl BusInner {
    /// Publishing and sending work until the bus has stopped: consumers that finish while
    /// it stops still produce their messages (they were failed, and dead-lettered, before).
    pub(crate) fn ensure_not_stopped(&self) -> Result<()> {
        match self.state.load(Ordering::Acquire) {
            STOPPED => Err(Error::Stopped),
            _ => Ok(()),
        }
    }

    /// Requests need the response endpoint: from start until the bus has stopped.
    pub(crate) fn ensure_answerable(&self) -> Result<()> {
        match self.state.load(Ordering::Acquire) {
            STARTED | STOPPING => Ok(()),
            _ => Err(Error::Stopped),
        }
    }
}

impl Bus {
    /// Starts configuring a bus on `transport`.
    pub fn builder(transport: impl Transport) -> BusBuilder {
        BusBuilder::new(Arc::new(transport))
    }

    /// The meter the bus records its metrics with (see [`BusMetrics`](crate::telemetry::BusMetrics)),
    /// for extensions to make their instruments on, so that they reach the same exporter.
    ///
    /// ```
    /// use opentelemetry::metrics::MeterProvider;
    /// let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
    /// let bus = bus_core::Bus::builder(bus_inmemory::InMemoryTransport::new())
    ///     .meter(&provider.meter("orders"))
    ///     .build();
    /// let conflicts = bus.meter().u64_counter("orders.conflicts").build();
    /// conflicts.add(1, &[]);
    /// ```
    pub fn meter(&self) -> &opentelemetry::metrics::Meter {
        &self.inner.instruments.metrics.meter
    }

    /// The address of this bus's own endpoint, where responses to its requests arrive.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The address of an endpoint named `name` on this bus's transport.
    pub fn endpoint_address(&self, name: &str) -> String {
        self.inner.transport.address(name)
    }

    /// Declares every endpoint's topology and starts consuming. Starting a started bus does nothing;
    /// a stopped bus can be started again. A configuration that cannot work (see
    /// [`BusBuilder::try_build`]) is refused here with the reason.
    pub async fn start(&self) -> Result<()> {
        let inner = &self.inner;
        if let Some(error) = &inner.configuration_error {
            return Err(Error::Configuration(error.clone()));
        }
        let mut running = inner.running.lock().await;
        if running.is_some() {
            return Ok(());
        }
        let stop_taking = CancellationToken::new();
        let stop_responses = CancellationToken::new();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut loops = Vec::with_capacity(inner.endpoints.len() + 1);

        let transport = &inner.transport;
        transport.declare(&inner.responses.topology).await?;
        let responses = transport.subscribe(&inner.responses.topology, inner.responses.prefetch()).await?;
        // Its own tracker and no cancellation: it answers requests until everything else stopped.
        let run = inner.responses.clone().run(
            self.clone(),
            responses,
            stop_responses.clone(),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        loops.push(tokio::spawn(run));
        // Started as soon as responses can be received: a backlog on the first endpoint is
        // consumed while the next ones are declared, and its consumers may publish and request.
        let before = inner.state.swap(STARTED, Ordering::AcqRel);

        for endpoint in &inner.endpoints {
            let started = async {
                transport.declare(&endpoint.topology).await?;
                transport.subscribe(&endpoint.topology, endpoint.prefetch()).await
            };
            let subscription = match started.await {
                Ok(subscription) => subscription,
                Err(error) => {
                    let running = Running {
                        stop_taking,
                        stop_responses,
                        cancel,
                        tracker,
                        loops,
                        scheduler: None,
                        connected: Vec::new(),
                    };
                    running.shut_down(inner).await;
                    inner.state.store(before, Ordering::Release);
                    return Err(error);
                }
            };
            let run =
                endpoint.clone().run(self.clone(), subscription, stop_taking.clone(), cancel.clone(), tracker.clone());
            loops.push(tokio::spawn(run));
        }
        let scheduler = inner.scheduler.as_ref().map(|scheduler| {
            let stop = CancellationToken::new();
            (stop.clone(), tokio::spawn(scheduler.run(self.clone(), stop)))
        });
        *running =
            Some(Running { stop_taking, stop_responses, cancel, tracker, loops, scheduler, connected: Vec::new() });
        tracing::info!(address = %inner.address, endpoints = inner.endpoints.len(), "bus started");
        Ok(())
    }

    /// Adds a receive endpoint to the running bus and starts consuming on it (MassTransit's
    /// `ConnectReceiveEndpoint`): for endpoints known only once running, such as one per
    /// tenant. It runs until the bus stops, and is not started again with it. A name already
    /// in use, or a configuration that cannot work, is refused; so is a bus not started.
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, Message};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Tenants:Invoice")] struct Invoice { tenant: String }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), bus_core::BoxError> {
    /// let harness = bus_inmemory::InMemoryTestHarness::start(|bus| bus).await?;
    /// harness.bus().connect_endpoint(Endpoint::new("invoices-acme").handler(|_: ConsumeContext<Invoice>| async { Ok(()) })).await?;
    /// harness.bus().send("queue:invoices-acme", Invoice { tenant: "acme".into() }).await?;
    /// harness.consumed().wait_for::<Invoice>(1, std::time::Duration::from_secs(5)).await?;
    /// let again = harness.bus().connect_endpoint(Endpoint::new("invoices-acme")).await;
    /// assert!(again.is_err(), "one endpoint of a name");
    /// # Ok(()) }
    /// ```
    #[doc(alias = "ConnectReceiveEndpoint")]
    pub async fn connect_endpoint(&self, mut endpoint: Endpoint) -> Result<()> {
        let inner = &self.inner;
        let mut running = inner.running.lock().await;
        let Some(run) = running.as_mut().filter(|_| inner.state.load(Ordering::Acquire) == STARTED) else {
            return Err(Error::Stopped);
        };
        if let EndpointName::FromConsumer(consumer_type) = endpoint.name {
            endpoint.name = EndpointName::Given(inner.formatter.consumer(consumer_type));
        }
        let EndpointName::Given(name) = endpoint.name.clone() else {
            return Err(Error::Configuration("an endpoint without a name".to_owned()));
        };
        let taken = std::iter::once(&inner.responses)
            .chain(&inner.endpoints)
            .chain(run.connected.iter().map(|(e, _)| e))
            .any(|e| e.topology.queue == name);
        if taken {
            return Err(Error::Configuration(format!("two endpoints are named `{name}`")));
        }
        let address = inner.transport.address(&name);
        let runtime = Arc::new(EndpointRuntime::new(name, endpoint, address));
        if let Some(error) = runtime.configuration_error(&inner.serializers) {
            return Err(Error::Configuration(error));
        }
        inner.transport.declare(&runtime.topology).await?;
        let subscription = inner.transport.subscribe(&runtime.topology, runtime.prefetch()).await?;
        let loop_ = runtime.clone().run(
            self.clone(),
            subscription,
            run.stop_taking.clone(),
            run.cancel.clone(),
            run.tracker.clone(),
        );
        tracing::info!(endpoint = %runtime.topology.queue, "endpoint connected");
        run.connected.push((runtime, tokio::spawn(loop_)));
        Ok(())
    }

    /// Stops the bus: takes no new deliveries, lets in-flight consumers finish within the stop
    /// timeout, then cancels them through their cancellation token; a consume cut short this
    /// way returns its message to its queue. A consumer that ignores its token is waited for
    /// one more stop timeout, then left to finish on its own (its message is settled when it
    /// does). Until then, consumers finishing can still publish, send and make requests (the
    /// response endpoint stops last); afterwards publishing fails with [`Error::Stopped`].
    pub async fn stop(&self) -> Result<()> {
        let inner = &self.inner;
        let mut running = inner.running.lock().await;
        inner.state.store(STOPPING, Ordering::Release);
        if let Some(run) = running.take() {
            run.shut_down(inner).await;
        }
        inner.state.store(STOPPED, Ordering::Release);
        tracing::info!(address = %inner.address, "bus stopped");
        Ok(())
    }

    /// The health of every endpoint: unhealthy when the bus is not started or an endpoint's
    /// consume loop has ended, else what the transport says of its consumer.
    pub async fn health(&self) -> BusHealth {
        let inner = &self.inner;
        let running = inner.running.lock().await;
        let endpoints: Vec<EndpointHealth> = inner
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, endpoint)| {
                let queue = &endpoint.topology.queue;
                match running.as_ref() {
                    None => EndpointHealth::new(queue, HealthStatus::Unhealthy, "bus not started"),
                    // loops[0] is the response endpoint; endpoint i runs in loops[i + 1].
                    Some(run) if run.loops.get(index + 1).is_none_or(JoinHandle::is_finished) => {
                        EndpointHealth::new(queue, HealthStatus::Unhealthy, "consume loop ended")
                    }
                    Some(_) => endpoint.health(),
                }
            })
            .chain(running.iter().flat_map(|run| run.connected.iter()).map(|(endpoint, handle)| {
                let queue = &endpoint.topology.queue;
                if handle.is_finished() {
                    return EndpointHealth::new(queue, HealthStatus::Unhealthy, "consume loop ended");
                }
                endpoint.health()
            }))
            .collect();
        let status = endpoints.iter().map(|e| e.status).max().unwrap_or(if running.is_some() {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        });
        BusHealth { status, endpoints }
    }

    /// Whether the bus is started and not stopping.
    pub fn is_started(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == STARTED
    }
}
