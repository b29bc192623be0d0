//! The in-memory broker: fanout exchanges, bindings and queues, as on RabbitMQ.

use bus_core::sync::RwLockExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bus_core::message::entity_name;
use bus_core::testing::WaitTimeout;
use bus_core::{Delivery, EndpointTopology, Settle, Settlement, Subscription, Transport, TransportMessage};
use futures::future::BoxFuture;
use futures::stream;
use tokio::sync::Semaphore;

use crate::error::Error;
use crate::queue::{Queue, QueueRef};

/// Settings of the in-memory transport.
#[derive(Debug, Clone)]
pub struct InMemoryOptions {
    /// Most messages one queue holds, delivered-but-unsettled included (default 100,000).
    pub queue_capacity: usize,
    /// How long a publish waits for room in a full queue before failing; `None` fails at once
    /// (default 30 s).
    pub full_queue_wait: Option<Duration>,
}

impl Default for InMemoryOptions {
    fn default() -> Self {
        InMemoryOptions { queue_capacity: 100_000, full_queue_wait: Some(Duration::from_secs(30)) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Binding {
    Exchange(String),
    Queue(String),
}

#[derive(Debug, Default)]
struct Topology {
    exchanges: HashMap<String, HashSet<Binding>>,
    queues: HashMap<String, QueueRef>,
    /// Queues each exchange reaches, computed on first use; cleared when bindings change.
    /// (foldhash for this map and the next: both are looked up on every publish.)
    routes: foldhash::HashMap<String, Arc<[QueueRef]>>,
    /// Message types published at least once (their contract bindings are made), with
    /// their exchange's name.
    published: foldhash::HashMap<String, Arc<str>>,
}

impl Topology {
    fn exchange(&mut self, name: &str) -> &mut HashSet<Binding> {
        self.routes.clear();
        self.exchanges.entry(name.to_owned()).or_default()
    }

    fn route(&mut self, exchange: &str) -> Option<Arc<[QueueRef]>> {
        if let Some(route) = self.routes.get(exchange) {
            return Some(route.clone());
        }
        self.exchanges.get(exchange)?;
        let mut seen_exchanges = HashSet::new();
        let mut seen_queues = HashSet::new();
        let mut found = Vec::new();
        let mut stack = vec![exchange.to_owned()];
        while let Some(name) = stack.pop() {
            if !seen_exchanges.insert(name.clone()) {
                continue;
            }
            for binding in self.exchanges.get(&name).into_iter().flatten() {
                match binding {
                    Binding::Exchange(next) => stack.push(next.clone()),
                    Binding::Queue(queue) => {
                        if let Some(q) = self.queues.get(queue) {
                            if seen_queues.insert(queue.clone()) {
                                found.push(q.clone());
                            }
                        }
                    }
                }
            }
        }
        let route: Arc<[QueueRef]> = found.into();
        self.routes.insert(exchange.to_owned(), route.clone());
        Some(route)
    }
}

#[derive(Debug)]
struct Broker {
    options: InMemoryOptions,
    topology: RwLock<Topology>,
    /// Wakes those waiting for a queue to be declared.
    declared: tokio::sync::Notify,
}

/// A transport inside the process, with RabbitMQ's semantics: a fanout exchange per message
/// type bound to the exchanges of the endpoints that consume it, each endpoint exchange bound
/// to its queue; competing consumers share a queue; prefetch bounds unsettled deliveries; a
/// requeued message goes back to the head; messages travel as bytes.
///
/// Queues are bounded: a publish into a full queue waits for room (up to
/// [`InMemoryOptions::full_queue_wait`]), so a fast producer is slowed, not buffered without limit.
///
/// Clones share the same broker, so several buses can talk through one.
///
/// ```
/// use bus_inmemory::InMemoryTransport;
/// use bus_core::{Bus, Message};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:Ping")]
/// # struct Ping;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = InMemoryTransport::new();
/// let bus = Bus::builder(transport.clone()).build();
/// // Nobody consumes Ping: a publish succeeds and reaches no queue, as on RabbitMQ.
/// bus.publish(Ping).await?;
/// // A send to an endpoint nobody declared fails.
/// assert!(bus.send("queue:nowhere", Ping).await.is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct InMemoryTransport {
    broker: Arc<Broker>,
}

impl Default for InMemoryTransport {
    fn default() -> Self {
        Self::with_options(InMemoryOptions::default())
    }
}

impl InMemoryTransport {
    /// A new, empty broker with default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty broker.
    pub fn with_options(options: InMemoryOptions) -> Self {
        InMemoryTransport {
            broker: Arc::new(Broker {
                options,
                topology: RwLock::new(Topology::default()),
                declared: tokio::sync::Notify::new(),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Topology> {
        self.broker.topology.read_locked()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Topology> {
        self.broker.topology.write_locked()
    }

    fn queue(&self, name: &str) -> Option<QueueRef> {
        self.read().queues.get(name).cloned()
    }

    fn declare_dead_letters(&self, topology: &mut Topology, endpoint: &EndpointTopology) {
        self.declare_queue(topology, &endpoint.error_queue(), false);
        self.declare_queue(topology, &endpoint.skipped_queue(), false);
    }

    fn declare_queue(&self, topology: &mut Topology, name: &str, temporary: bool) {
        if !topology.queues.contains_key(name) {
            let queue = Arc::new(Queue::new(name.to_owned(), self.broker.options.queue_capacity, temporary));
            topology.queues.insert(name.to_owned(), queue);
            self.broker.declared.notify_waiters();
        }
        topology.exchange(name).insert(Binding::Queue(name.to_owned()));
    }

    fn route(&self, exchange: &str) -> Option<Arc<[QueueRef]>> {
        if let Some(route) = self.read().routes.get(exchange) {
            return Some(route.clone());
        }
        self.write().route(exchange)
    }

    async fn deliver(&self, route: &[QueueRef], mut message: TransportMessage) -> bus_core::Result<()> {
        times_as_text(&mut message.headers);
        let wait = self.broker.options.full_queue_wait;
        if let [only] = route {
            return Ok(only.push(message, wait).await?);
        }
        // A place in every queue first: failing for one full queue, the message enters none,
        // so that the publish can be tried again without doubling it in the others.
        let deadline = wait.map(|wait| tokio::time::Instant::now() + wait.min(Duration::from_secs(365 * 24 * 3600)));
        // In order of name, so that two publishes waiting for room never each hold a place
        // the other waits for.
        let mut ordered: Vec<&QueueRef> = route.iter().collect();
        ordered.sort_by(|a, b| a.name.cmp(&b.name));
        let mut places = Vec::with_capacity(ordered.len());
        for queue in &ordered {
            let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            places.push(queue.reserve(left).await?);
        }
        for (queue, place) in ordered.into_iter().zip(places) {
            queue.fill(place, message.clone());
        }
        Ok(())
    }

    /// Number of messages waiting (not delivered) in a queue; 0 when it does not exist.
    pub fn queue_len(&self, name: &str) -> usize {
        self.queue(name).map_or(0, |q| q.len())
    }

    /// Copies of the messages waiting in a queue, oldest first.
    pub fn peek(&self, name: &str) -> Vec<TransportMessage> {
        self.queue(name).map_or_else(Vec::new, |q| q.peek())
    }

    /// Takes every waiting message out of a queue.
    pub fn drain(&self, name: &str) -> Vec<TransportMessage> {
        self.queue(name).map_or_else(Vec::new, |q| q.drain())
    }

    /// Whether a queue exists.
    pub fn has_queue(&self, name: &str) -> bool {
        self.read().queues.contains_key(name)
    }

    /// Whether an exchange exists.
    pub fn has_exchange(&self, name: &str) -> bool {
        self.read().exchanges.contains_key(name)
    }

    /// Whether `source` is bound to `destination` (an exchange or, with `to_queue`, a queue).
    pub fn is_bound(&self, source: &str, destination: &str, to_queue: bool) -> bool {
        let binding =
            if to_queue { Binding::Queue(destination.to_owned()) } else { Binding::Exchange(destination.to_owned()) };
        self.read().exchanges.get(source).is_some_and(|b| b.contains(&binding))
    }

    /// Waits until a queue holds at least `n` waiting messages.
    pub async fn wait_for_queue_len(&self, name: &str, n: usize, timeout: Duration) -> Result<(), WaitTimeout> {
        let what = format!("{n} messages in queue `{name}`");
        let wait = async {
            loop {
                // Registered before looking, so a declaration in between is not missed.
                let declared = self.broker.declared.notified();
                tokio::pin!(declared);
                declared.as_mut().enable();
                let Some(queue) = self.queue(name) else {
                    declared.await;
                    continue;
                };
                return queue.wait_for_len(n).await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| WaitTimeout { what, timeout })
    }
}

impl Transport for InMemoryTransport {
    fn system(&self) -> &'static str {
        "in-memory"
    }

    fn address(&self, name: &str) -> String {
        format!("loopback://localhost/{name}")
    }

    fn declare<'a>(&'a self, endpoint: &'a EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        let mut topology = self.write();
        let name = endpoint.queue.as_str();
        self.declare_queue(&mut topology, name, endpoint.temporary);
        if endpoint.dead_letter_queues {
            self.declare_dead_letters(&mut topology, endpoint);
        }
        for urn in &endpoint.message_types {
            topology.exchange(&entity_name(urn)).insert(Binding::Exchange(name.to_owned()));
        }
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(
        &'a self,
        message_types: &'a [&'a str],
        message: TransportMessage,
    ) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(async move {
            let Some((first, contracts)) = message_types.split_first() else {
                return Err(bus_core::Error::Configuration("a published message needs a message type".into()));
            };
            let known = self.read().published.get(*first).cloned();
            let exchange = match known {
                Some(exchange) => exchange,
                None => {
                    // The type's exchange may exist already (an endpoint consuming the type
                    // declared it); its bindings to the contracts it lists are made on its
                    // first publish all the same.
                    let exchange: Arc<str> = entity_name(first).into();
                    let mut topology = self.write();
                    topology.exchange(&exchange);
                    for contract in contracts {
                        let contract = entity_name(contract);
                        topology.exchange(&contract);
                        topology.exchange(&exchange).insert(Binding::Exchange(contract));
                    }
                    topology.published.insert((*first).to_owned(), exchange.clone());
                    exchange
                }
            };
            let route = self.route(&exchange).unwrap_or_else(|| Arc::from(Vec::new()));
            self.deliver(&route, message).await
        })
    }

    fn send<'a>(&'a self, destination: &'a str, message: TransportMessage) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(async move {
            match self.route(destination) {
                Some(route) if !route.is_empty() => self.deliver(&route, message).await,
                _ => Err(Error::Unroutable { destination: destination.to_owned() }.into()),
            }
        })
    }

    fn subscribe<'a>(
        &'a self,
        endpoint: &'a EndpointTopology,
        prefetch: u16,
    ) -> BoxFuture<'a, bus_core::Result<Subscription>> {
        Box::pin(async move {
            let queue = self.queue(&endpoint.queue).ok_or_else(|| Error::QueueNotFound(endpoint.queue.clone()))?;
            let transport = self.clone();
            let prefetch = Arc::new(Semaphore::new(usize::from(prefetch.max(1))));
            let deliveries = stream::unfold((queue, prefetch, transport), |(queue, prefetch, transport)| async move {
                // The semaphore is never closed; acquiring only waits for a settled delivery.
                // Tried first without waiting: cheaper than an acquire future when there is room.
                let permit = match prefetch.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => prefetch.clone().acquire_owned().await.ok()?,
                };
                let stored = queue.pop().await;
                let settle = InMemorySettle {
                    queue: queue.clone(),
                    transport: transport.clone(),
                    position: stored.position,
                    _permit: permit,
                };
                let delivery = Delivery::new(stored.message, stored.redelivered, settle);
                Some((delivery, (queue, prefetch, transport)))
            });
            Ok(Subscription::new(endpoint.queue.clone(), Box::pin(deliveries)))
        })
    }

    fn delete<'a>(&'a self, endpoint: &'a EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        let mut topology = self.write();
        if topology.queues.get(&endpoint.queue).is_some_and(|q| q.temporary) {
            topology.queues.remove(&endpoint.queue);
            topology.exchanges.remove(&endpoint.queue);
            topology.routes.clear();
        }
        Box::pin(async { Ok(()) })
    }
}

/// A delivered message that goes back to its queue when dropped, unless taken out first.
struct RequeueOnDrop {
    queue: QueueRef,
    message: Option<TransportMessage>,
    position: u64,
}

impl Drop for RequeueOnDrop {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            self.queue.requeue(message, self.position);
        }
    }
}

/// Settles one in-memory delivery; holds its prefetch place until then.
struct InMemorySettle {
    queue: QueueRef,
    transport: InMemoryTransport,
    /// Its place in its queue's order, to go back to when requeued.
    position: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Settle for InMemorySettle {
    fn abandon(self: Box<Self>, message: TransportMessage) {
        self.queue.requeue(message, self.position);
    }

    fn settle(
        self: Box<Self>,
        message: TransportMessage,
        settlement: Settlement,
    ) -> BoxFuture<'static, bus_core::Result<()>> {
        // Done here and now, but for a move, which may wait for room in its target: most
        // settlements are acks, and they need no future carrying the moves.
        match settlement {
            Settlement::Ack => self.queue.release(),
            Settlement::Requeue => self.queue.requeue(message, self.position),
            Settlement::MoveTo { queue, headers } => return Box::pin(self.move_to(message, queue, headers)),
            Settlement::Redeliver { delay, headers } => {
                let mut again = message;
                again.headers.extend(headers);
                // The message keeps its place in the queue while it waits, so it can always return.
                let queue = self.queue.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    queue.enqueue_reserved(again);
                });
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

impl InMemorySettle {
    /// Moves `message` to the queue `queue` with `headers` added.
    async fn move_to(
        self: Box<Self>,
        message: TransportMessage,
        queue: String,
        headers: bus_core::Headers,
    ) -> bus_core::Result<()> {
        let Some(target) = self.transport.queue(&queue) else {
            // Nothing may be lost: the original goes back to its own queue.
            self.queue.requeue(message, self.position);
            return Err(Error::QueueNotFound(queue).into());
        };
        let mut moved = message.clone();
        moved.headers.extend(headers);
        if target.name == self.queue.name {
            // To the back of its own queue: it keeps the place it has.
            self.queue.move_to_back(moved);
            return Ok(());
        }
        // Nothing may be lost: until the copy is in the target, the original goes back to its
        // own queue if the move fails or this future is dropped (waiting for room in a full
        // `_error`, say).
        let mut original = RequeueOnDrop { queue: self.queue.clone(), message: Some(message), position: self.position };
        target.push(moved, self.transport.broker.options.full_queue_wait).await?;
        original.message = None;
        self.queue.release();
        Ok(())
    }
}

/// Times marked for a transport's own time type (`SendOptions::header_time`): this one has
/// none, so they travel as the text the envelope carries for them.
fn times_as_text(headers: &mut bus_core::Headers) {
    let marked: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(name, value)| {
            let text = bus_core::wire::time_text(bus_core::wire::time_header_seconds(value)?)?;
            Some((name.clone(), text))
        })
        .collect();
    for (name, text) in marked {
        headers.insert(name, text);
    }
}
