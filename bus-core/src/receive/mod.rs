//! The receive path of one endpoint: deliveries taken, each on its own task, read and
//! dispatched to its consumers ([`dispatch`]), the outcome turned into a settlement
//! ([`failure`]), and the settlement handed to the transport.

mod dispatch;
mod failure;
mod run;

use crate::logged::chain;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{FutureExt as _, StreamExt};
use opentelemetry::trace::FutureExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumer::ErasedConsumer;
use crate::endpoint::{ConsumerOptions, Endpoint, EndpointInfo, EndpointSettings};
use crate::flow::kill_switch::KillSwitchState;
use crate::flow::partitioner::{Partitioner, Ticket, MAX_PARTITIONS};
use crate::flow::rate_limit::RateLimiter;
use crate::instrumentation::EndpointInstruments;
use crate::middleware::{panic_message, ConcurrencyLimit, Middleware, Pipeline, Retry, Timeout};
use crate::stalled_moves::{MoveRetry, StalledMoves};
use crate::sync::MutexExt;
use crate::telemetry::metrics::ConsumerAttributes;
use crate::{Bus, Delivery, EndpointTopology, Error, Settlement, TracePropagation};
use crate::{EndpointHealth, Envelope, HealthStatus, Subscription};
use dispatch::ConsumerEntry;
use run::Delivering;
pub(crate) use run::EndpointRun;

/// A configured endpoint, ready to consume.
#[derive(Debug)]
pub(crate) struct EndpointRuntime {
    pub(crate) topology: EndpointTopology,
    info: EndpointInfo,
    settings: EndpointSettings,
    consumers: Vec<ConsumerEntry>,
    /// foldhash: looked up for every delivery; a fixed table, so keys from the wire cannot
    /// grow it.
    by_type: foldhash::HashMap<&'static str, Vec<usize>>,
    /// Consumers of every message type.
    catch_all: Vec<usize>,
    instruments: EndpointInstruments,
    /// Moves to `_error`, `_skipped` or a delay queue that failed, to try again.
    stalled: StalledMoves,
    /// A temporary endpoint's dead-letter queues are declared when a message first needs
    /// one; set once they are.
    dead_letters_declared: AtomicBool,
    /// Its kill switch at work, if it has one.
    kill_switch: Option<KillSwitchState>,
    /// Whether the bus-wide concurrency limit applies (not to the response endpoint: the
    /// consumers holding the bus's permits may be waiting for its responses).
    bus_limited: bool,
    /// How its current subscription reports its health.
    subscription_health: HealthSlot,
}

/// The health probe of an endpoint's current subscription.
#[derive(Default)]
struct HealthSlot(std::sync::Mutex<Option<HealthProbe>>);

impl std::fmt::Debug for HealthSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthSlot").finish_non_exhaustive()
    }
}

/// How a subscription reports its endpoint's health.
pub(crate) type HealthProbe = Box<dyn Fn() -> EndpointHealth + Send + Sync>;

/// A consumer to put on an endpoint.
pub(crate) struct Registration {
    pub(crate) consumer_type: &'static str,
    pub(crate) message_type: Option<&'static str>,
    pub(crate) consumer: Arc<dyn ErasedConsumer>,
    pub(crate) options: ConsumerOptions,
}

impl EndpointRuntime {
    pub(crate) fn new(name: String, endpoint: Endpoint, address: String) -> Self {
        let Endpoint { settings, middleware, attempt_middleware, consumers, .. } = endpoint;
        let registrations = consumers.into_iter().map(|c| Registration {
            consumer_type: c.consumer_type,
            message_type: Some(c.message_type),
            consumer: c.consumer,
            options: c.options,
        });
        let temporary = settings.temporary;
        Self::with(name, address, settings, [&middleware, &attempt_middleware], registrations, temporary, true)
    }

    /// The bus's own endpoint, where responses arrive: temporary, and its one consumer
    /// takes every message.
    pub(crate) fn responses(name: String, address: String, consumer: Registration) -> Self {
        let settings = EndpointSettings { prefetch: 256, ..EndpointSettings::default() };
        Self::with(name, address, settings, [&[], &[]], std::iter::once(consumer), true, false)
    }

    fn with(
        name: String,
        address: String,
        mut settings: EndpointSettings,
        [middleware, attempt_middleware]: [&[Arc<dyn Middleware>]; 2],
        registrations: impl Iterator<Item = Registration>,
        temporary: bool,
        bus_limited: bool,
    ) -> Self {
        if settings.batch_in_flight > 0 {
            // Room for whole batches (of each consumer, each running at once), or they only
            // ever end by time.
            let needed = u16::try_from(settings.batch_in_flight).unwrap_or(u16::MAX);
            settings.prefetch = settings.prefetch.max(needed);
            settings.concurrency = settings.concurrency.map(|limit| limit.max(usize::from(needed)));
        }
        let mut consumers = Vec::new();
        let mut by_type: foldhash::HashMap<&'static str, Vec<usize>> = foldhash::HashMap::default();
        let mut catch_all = Vec::new();
        let mut message_types = Vec::new();
        for (index, registration) in registrations.enumerate() {
            let options = registration.options;
            let mut stack: Vec<Arc<dyn Middleware>> = Vec::new();
            if let Some(limit) = options.concurrency_limit {
                stack.push(Arc::new(ConcurrencyLimit::new(limit)));
            }
            stack.extend(middleware.iter().cloned());
            stack.extend(options.middleware);
            let retry = options.retry.unwrap_or_else(|| settings.retry.clone());
            // A policy that never retries would only cost every message a future and a copy
            // of its context: without retries, the attempt and retry count stay 0, and the
            // dispatch discards a failed consumer's outbox itself.
            if retry.retry_limit() > 0 {
                stack.push(Arc::new(Retry(retry)));
            }
            if let Some(timeout) = options.timeout {
                stack.push(Arc::new(Timeout(timeout)));
            }
            stack.extend(attempt_middleware.iter().cloned());
            let message_type = registration.message_type;
            consumers.push(ConsumerEntry {
                consumer_type: registration.consumer_type,
                concurrency_limit: options.concurrency_limit,
                message_type,
                pipeline: Pipeline::new(stack, registration.consumer),
                attributes: ConsumerAttributes::new(
                    &name,
                    message_type.unwrap_or_default(),
                    registration.consumer_type,
                ),
            });
            match message_type {
                Some(urn) => {
                    by_type.entry(urn).or_default().push(index);
                    if !message_types.iter().any(|t| t == urn) {
                        message_types.push(urn.to_owned());
                    }
                }
                None => catch_all.push(index),
            }
        }
        let topology = EndpointTopology {
            queue: name.clone(),
            message_types,
            redelivery_delays: settings.redelivery.delays().to_vec(),
            temporary,
            dead_letter_queues: !temporary,
            single_active_consumer: settings.single_active_consumer,
            max_priority: settings.max_priority,
            bindings: settings.bindings.clone(),
        };
        EndpointRuntime {
            instruments: EndpointInstruments::new(&name, temporary),
            topology,
            info: EndpointInfo { name, address },
            consumers,
            by_type,
            catch_all,
            stalled: StalledMoves::default(),
            dead_letters_declared: AtomicBool::new(false),
            kill_switch: settings.kill_switch.map(KillSwitchState::new),
            bus_limited,
            subscription_health: HealthSlot::default(),
            settings,
        }
    }

    /// Its name and address.
    pub(crate) fn info(&self) -> &EndpointInfo {
        &self.info
    }

    /// Takes deliveries until `stop_taking` fires; each runs on its own task, at most
    /// `concurrency` at once (and within the bus-wide limit), tracked by `tracker` so that
    /// stop can wait for them. The rate limit, partitions and kill switch act here, where
    /// deliveries are taken in order.
    pub(crate) async fn run(
        self: Arc<Self>,
        bus: Bus,
        subscription: Subscription,
        stop_taking: CancellationToken,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let (stream, probe) = subscription.into_parts();
        *self.subscription_health.0.locked() = Some(probe);
        let mut deliveries = Some(stream);
        let bus_limit = bus.inner.concurrency_limit.clone().filter(|_| self.bus_limited);
        let concurrency = self.settings.concurrency();
        let mut rate = self.settings.rate_limit.map(RateLimiter::new);
        let mut partitioner = Partitioner::new(&self.settings.partitioner);
        let tripped = self.tripped();
        tokio::pin!(tripped);
        // Made once: each `cancelled()` future registers with the token anew.
        let stopped = stop_taking.cancelled();
        tokio::pin!(stopped);
        let run = Arc::new(EndpointRun::new(self.clone(), bus, concurrency, bus_limit, cancel, stop_taking.clone()));
        loop {
            if self.kill_switch.as_ref().is_some_and(KillSwitchState::is_tripped) {
                // What the transport holds goes back to the queue with the subscription.
                drop(deliveries.take());
                *self.subscription_health.0.locked() = None;
                match self.restart_after_trip(&run.bus, &stop_taking).await {
                    Some(stream) => deliveries = Some(stream),
                    None => break,
                }
                tripped.set(self.tripped());
            }
            let Some(stream) = deliveries.as_mut() else { break };
            let taken = async {
                let mut delivering = Delivering::new(run.clone());
                // Unpartitioned, a place in the endpoint's limit comes before a delivery is
                // taken, so that the transport keeps what cannot run yet. Partitioned, the
                // place is taken once the delivery's turn has come, so that the waiting
                // deliveries of one busy key do not hold the places of the other keys; the
                // prefetch bounds how many wait.
                if partitioner.is_none() && !delivering.take_endpoint_place().await {
                    return None;
                }
                if let Some(rate) = rate.as_mut() {
                    rate.ready().await;
                }
                Some((delivering, stream.next().await))
            };
            let (mut delivering, delivery) = tokio::select! {
                biased;
                () = &mut stopped => break,
                () = &mut tripped => continue,
                taken = taken => match taken {
                    // Boxed: it moves through several futures on its way to settlement.
                    Some((delivering, Some(delivery))) => (delivering, Box::new(delivery)),
                    Some((_, None)) => {
                        tracing::warn!(endpoint = %self.info.name, "delivery stream ended; endpoint no longer consuming");
                        break;
                    }
                    None => break,
                },
            };
            // Partitioned: read here, in delivery order, to take the message's place in line.
            let (read, mut ticket) = match partitioner.as_mut() {
                Some(partitioner) => {
                    let read = self.read(&run.bus, &delivery);
                    let key = read.as_ref().ok().and_then(|envelope| partitioner.key(envelope));
                    // Boxed: only partitioned endpoints read here, and every delivery's future
                    // would otherwise carry (and copy) room for an envelope.
                    (Some(Box::new(read)), key.map(|key| partitioner.ticket(key)))
                }
                None => (None, None),
            };
            let epoch = self.kill_switch.as_ref().map_or(0, KillSwitchState::epoch);
            // Boxed: the consume future is large, and a task moves its future several times
            // (into the task, out when it finishes); a box is moved instead.
            tracker.spawn(Box::pin(async move {
                let delivery = match ticket.as_mut() {
                    Some(turn) => {
                        turn.wait_turn().await;
                        let run = &delivering.run;
                        match run.endpoint.still_to_consume(delivery, epoch, &run.cancel).await {
                            Some(delivery) => delivery,
                            None => return drop::<Option<Ticket>>(ticket),
                        }
                    }
                    // Taken just now: checked once, below.
                    None => delivery,
                };
                delivering.take_places().await;
                let run = &delivering.run;
                if let Some(delivery) = run.endpoint.still_to_consume(delivery, epoch, &run.cancel).await {
                    run.endpoint.handle(run, delivery, read, epoch).await;
                }
                drop::<Option<Ticket>>(ticket);
                drop(delivering);
            }));
        }
    }

    /// A delivery that waited (for its partition's turn, for a place in a limit) and may
    /// have gone stale meanwhile: returned if it is still to be consumed, else given back.
    /// Its channel closed: the broker has requeued it already. The bus is cancelling its
    /// consumers, or the kill switch tripped or restarted since it was taken: it goes back
    /// to its queue, to wait there with the rest.
    async fn still_to_consume(
        &self,
        delivery: Box<Delivery>,
        epoch: u64,
        cancel: &CancellationToken,
    ) -> Option<Box<Delivery>> {
        if !delivery.is_live() {
            return None;
        }
        let stopped = self.kill_switch.as_ref().is_some_and(|k| k.is_tripped() || k.epoch() != epoch);
        if !stopped && !cancel.is_cancelled() {
            return Some(delivery);
        }
        if let Err(error) = delivery.settle(Settlement::Requeue).await {
            tracing::debug!(endpoint = %self.info.name, error = %chain(&error), "could not requeue a delivery; the broker delivers it again");
        }
        None
    }

    /// Resolves when the kill switch trips; never without one.
    async fn tripped(&self) {
        match &self.kill_switch {
            Some(kill_switch) => kill_switch.wait_tripped().await,
            None => std::future::pending().await,
        }
    }

    /// Waits out a tripped kill switch's pause, then subscribes again (until that works, or
    /// the endpoint stops: `None`).
    async fn restart_after_trip(&self, bus: &Bus, stop_taking: &CancellationToken) -> Option<crate::DeliveryStream> {
        let kill_switch = self.kill_switch.as_ref()?;
        tokio::select! {
            () = stop_taking.cancelled() => return None,
            () = tokio::time::sleep(kill_switch.settings().restart_delay()) => {}
        }
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            match bus.inner.transport.subscribe(&self.topology, self.prefetch()).await {
                Ok(subscription) => {
                    let (stream, probe) = subscription.into_parts();
                    *self.subscription_health.0.locked() = Some(probe);
                    kill_switch.restart();
                    tracing::info!(endpoint = %self.info.name, "kill switch restarting the endpoint");
                    return Some(stream);
                }
                Err(error) => {
                    tracing::warn!(endpoint = %self.info.name, error = %chain(&error), "could not consume again after the kill switch's pause; trying again");
                    tokio::select! {
                        () = stop_taking.cancelled() => return None,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause =
                        (pause * 2).min(kill_switch.settings().restart_delay().max(std::time::Duration::from_secs(1)));
                }
            }
        }
    }

    /// One delivery, from arrival to settlement: the task boundary, where a panic anywhere
    /// on the way (middleware, send middleware writing a fault) is caught, once. Dropped
    /// unsettled, the delivery would come straight back and panic again, for ever; instead
    /// it goes to `_error` with the panic's message. (A consumer's own panic is a failed
    /// attempt, retried like any other: see [`Pipeline`].)
    async fn handle(
        &self,
        run: &Arc<EndpointRun>,
        delivery: Box<Delivery>,
        read: Option<Box<Result<Envelope, Error>>>,
        epoch: u64,
    ) {
        let (bus, stopping) = (&run.bus, &run.stopping);
        // Only a delivery that came back (requeued when its move failed) can owe a move: the
        // same message sent anew (moved back from `_error`, say) is consumed as usual.
        if delivery.redelivered() {
            if let Some(retry) = self.stalled.find(delivery.message()) {
                return self.move_again(bus, delivery, retry, &run.cancel, stopping).await;
            }
        }
        let settlement = match AssertUnwindSafe(self.process(run, &delivery, read, epoch)).catch_unwind().await {
            Ok(settlement) => settlement,
            Err(panic) => {
                let reason = format!("the bus panicked handling the message: {}", panic_message(&*panic));
                self.unreadable(bus, delivery.message(), "Panic", &Error::Configuration(reason))
            }
        };
        self.settle(bus, delivery, settlement, stopping).await;
    }

    /// Reads the delivery, dispatches it and decides its settlement, under its receive span.
    async fn process(
        &self,
        run: &Arc<EndpointRun>,
        delivery: &Delivery,
        read: Option<Box<Result<Envelope, Error>>>,
        epoch: u64,
    ) -> Settlement {
        let bus = &run.bus;
        let instruments = &bus.inner.instruments;
        let envelope = match read.map_or_else(|| self.read(bus, delivery), |read| *read) {
            Ok(envelope) => envelope,
            Err(error) => return self.settlement_for(bus, delivery, dispatch::Outcome::Unreadable(error), epoch).await,
        };
        let state = self.receive_state(run, delivery, envelope);
        let link = self.settings.trace_propagation == TracePropagation::Link;
        let span = instruments.received(&self.instruments, &state.envelope, link, || self.known_type(&state.envelope));
        let context = span.as_ref().map_or_else(opentelemetry::Context::current, |s| s.context().clone());
        let settlement = async {
            let outcome = self.dispatch(bus, state, span.as_ref()).await;
            self.settlement_for(bus, delivery, outcome, epoch).await
        }
        .with_context(context)
        .await;
        instruments.receive_done(span);
        settlement
    }

    /// Settles `delivery`; a move that fails is remembered, so that the message is moved
    /// again (not consumed again) when it comes back.
    async fn settle(&self, bus: &Bus, delivery: Box<Delivery>, settlement: Settlement, stopping: &CancellationToken) {
        if !delivery.is_live() {
            // Its channel closed: the broker has requeued it already and delivers it again.
            tracing::debug!(endpoint = %self.info.name, "delivery's channel closed before it was settled; the broker delivers it again");
            return;
        }
        let moving = matches!(settlement, Settlement::MoveTo { .. } | Settlement::Redeliver { .. });
        if moving {
            if let Err(instead) = self.dead_letter_queues_ready(bus, stopping).await {
                // Left unsettled when there is nothing else to do: back to its queue.
                if let Some(instead) = instead {
                    let _ = delivery.settle(instead).await;
                }
                return;
            }
        }
        let key = moving.then(|| StalledMoves::key(delivery.message()));
        if let Some(key) = key {
            self.stalled.moving(key, settlement.clone());
        }
        match (delivery.settle(settlement).await, key) {
            (Ok(()), Some(key)) => self.stalled.done(key),
            (Ok(()), None) => {}
            (Err(error), Some(key)) => {
                // Back in its queue: when it returns, the same move is tried after a pause
                // (and a temporary endpoint declares its dead-letter queues again first).
                tracing::warn!(endpoint = %self.info.name, error = %chain(&error), "could not move a message; it went back to its queue and the move is tried again later");
                self.dead_letters_declared.store(false, Ordering::Release);
                self.stalled.failed(key, chain(&error).to_string());
            }
            (Err(error), None) => {
                // The transport keeps the delivery unacknowledged; the broker delivers it again.
                tracing::warn!(endpoint = %self.info.name, error = %chain(&error), "could not settle a delivery");
            }
        }
    }

    /// Whether a move may go ahead, else how to settle instead (`None`: not at all). A
    /// temporary endpoint (the bus's response endpoint) has
    /// `_error` and `_skipped` queues only once something went there, as MassTransit's bus
    /// endpoint has: they are declared before the first move. When they cannot be, for now
    /// (the broker is out of reach), the message goes back to its queue; refused for good (a
    /// queue of that name exists with other arguments) it is dropped with an error, since a
    /// move would fail and requeue it round and round, on an endpoint whose messages go with
    /// it when the bus stops anyway.
    async fn dead_letter_queues_ready(
        &self,
        bus: &Bus,
        stopping: &CancellationToken,
    ) -> Result<(), Option<Settlement>> {
        if !self.topology.temporary || self.dead_letters_declared.load(Ordering::Acquire) {
            return Ok(());
        }
        let with_dead_letters = EndpointTopology { dead_letter_queues: true, ..self.topology.clone() };
        match bus.inner.transport.declare(&with_dead_letters).await {
            Ok(()) => {
                self.dead_letters_declared.store(true, Ordering::Release);
                Ok(())
            }
            // Stopping (the transport may be closing): left unsettled.
            Err(_) if stopping.is_cancelled() => Err(None),
            Err(error) if error.is_transient() => {
                tracing::warn!(endpoint = %self.info.name, error = %chain(&error), "could not declare the dead-letter queues; message requeued");
                Err(Some(Settlement::Requeue))
            }
            Err(error) => {
                tracing::error!(endpoint = %self.info.name, error = %chain(&error), "the dead-letter queues are refused; message dropped");
                Err(Some(Settlement::Ack))
            }
        }
    }

    /// A message whose move failed before is back: the move is tried again once its pause is
    /// over, without consuming the message again (its consumers ran, its fault went out).
    async fn move_again(
        &self,
        bus: &Bus,
        delivery: Box<Delivery>,
        retry: MoveRetry,
        cancel: &CancellationToken,
        stopping: &CancellationToken,
    ) {
        tokio::select! {
            () = tokio::time::sleep_until(retry.retry_at) => {}
            // Stopping: dropped unsettled, it goes back to its queue.
            () = cancel.cancelled() => return,
        }
        tracing::debug!(endpoint = %self.info.name, key = retry.key, "trying a failed move again");
        self.settle(bus, delivery, retry.settlement, stopping).await;
    }

    /// What in this endpoint's settings cannot work, if anything.
    pub(crate) fn configuration_error(&self, serializers: &crate::serializer::Serializers) -> Option<String> {
        if self.topology.temporary && !self.topology.redelivery_delays.is_empty() {
            // Its messages would wait in delay queues that outlive it, for a queue gone by then.
            return Some(format!("endpoint `{}`: a temporary endpoint has no delayed redelivery", self.info.name));
        }
        if let Some(content_type) = &self.settings.default_content_type {
            if serializers.for_content_type(Some(content_type)).is_err() {
                return Some(format!(
                    "endpoint `{}`: no serializer reads its default content type `{content_type}`",
                    self.info.name
                ));
            }
        }
        if self.settings.partitioner.partitions > MAX_PARTITIONS {
            return Some(format!(
                "endpoint `{}`: {} partitions, more than {MAX_PARTITIONS}",
                self.info.name, self.settings.partitioner.partitions
            ));
        }
        let limits = std::iter::once(("the endpoint", self.settings.concurrency))
            .chain(self.consumers.iter().map(|c| (c.consumer_type, c.concurrency_limit)));
        for (what, limit) in limits {
            match limit {
                Some(0) => return Some(format!("endpoint `{}`: {what}'s concurrency limit is 0", self.info.name)),
                Some(n) if n > Semaphore::MAX_PERMITS => {
                    return Some(format!(
                        "endpoint `{}`: {what}'s concurrency limit {n} is over the most that can be counted ({})",
                        self.info.name,
                        Semaphore::MAX_PERMITS
                    ))
                }
                _ => {}
            }
        }
        None
    }

    /// How many deliveries may be unsettled at once.
    pub(crate) fn prefetch(&self) -> u16 {
        self.settings.prefetch
    }

    /// The endpoint's health: its subscription's, unless the bus stopped consuming it (a
    /// tripped kill switch), or it is degraded from the bus's side (an open circuit
    /// breaker, moves it cannot complete).
    pub(crate) fn health(&self) -> EndpointHealth {
        let queue = &self.topology.queue;
        // Tripped, the endpoint has no subscription to ask: it stopped on purpose.
        if let Some(reason) = self.kill_switch.as_ref().and_then(KillSwitchState::reason) {
            return EndpointHealth::new(queue, HealthStatus::Degraded, format!("kill switch tripped: {reason}"));
        }
        let health = self
            .subscription_health
            .0
            .locked()
            .as_ref()
            .map_or_else(|| EndpointHealth::healthy(queue), |probe| probe());
        let own = || {
            self.settings
                .circuit_breakers
                .iter()
                .find_map(crate::middleware::CircuitBreaker::open_reason)
                .or_else(|| self.stalled.health_reason())
        };
        match health.status {
            HealthStatus::Healthy => match own() {
                Some(reason) => EndpointHealth::new(queue, HealthStatus::Degraded, reason),
                None => health,
            },
            _ => health,
        }
    }

    /// The kill switch's verdict on a failed message, if the endpoint has one.
    pub(super) fn kill_switch(&self) -> Option<&KillSwitchState> {
        self.kill_switch.as_ref()
    }
}
