//! [`RabbitMqTransport`]: bus-core's transport contract on RabbitMQ.

use bus_core::logged::chain;
use bus_core::sync::{MutexExt, RwLockExt};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bus_core::message::entity_name;
use bus_core::{EndpointHealth, EndpointTopology, HealthStatus, Subscription, Transport, TransportMessage};
use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::connection::{Link, Role, Session, Shared};
use crate::consumer::{self, ConsumerState};
use crate::error::{is_not_found, Error, Result};
use crate::headers::properties;
use crate::options::{default_address, RabbitMqOptions};
use crate::publisher::publish;
use crate::topology;

/// The longest `connection_name`: consumer tags add 33 characters, and AMQP names stop at 255.
const MAX_CONNECTION_NAME: usize = 200;
/// The RabbitMQ transport: MassTransit's topology, confirmed publishing, and a connection
/// that recovers by itself.
///
/// Clones share two connections, one that publishes and one that consumes (so that a broker
/// alarm that blocks publishing does not stop consumers and their acknowledgements). Dropping
/// every clone does not close them; call [`close`](Self::close).
///
/// ```no_run
/// use bus_core::Bus;
/// use bus_rabbitmq::RabbitMqTransport;
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = RabbitMqTransport::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let bus = Bus::builder(transport.clone()).build();
/// bus.start().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RabbitMqTransport {
    /// The publishing connection: publishes, sends, moves and declarations.
    shared: Arc<Shared>,
    /// The consuming connection.
    consuming: Arc<Shared>,
    state: Arc<TransportState>,
}

#[derive(Debug, Default)]
struct TransportState {
    /// Exchanges known to exist (declared for publishing, or seen by a send).
    known_exchanges: Mutex<HashSet<String>>,
    /// Message type URN -> its declared exchange, looked up on every publish without allocating.
    publish_exchanges: std::sync::RwLock<HashMap<String, Arc<str>>>,
    /// Held while an exchange is declared or checked, so that the first publishes (or
    /// sends) of a type, when many start at once, wait for one declaration rather than each
    /// opening a channel of its own: a thousand of them once left lapin's channel table a
    /// thousand wide, and every frame written afterwards walked it.
    declaring: tokio::sync::Mutex<()>,
    /// Exchanges deleted behind the bus's back: whoever declares one again binds again what
    /// this bus had bound to it, before it is used.
    needs_rebind: Mutex<HashSet<String>>,
}

impl RabbitMqTransport {
    /// Connects with default options to `address` (`amqp://` or `amqps://`).
    pub async fn connect(address: &str) -> Result<Self> {
        Self::connect_with(address, RabbitMqOptions::default()).await
    }

    /// Connects to `AMQP_ADDR`, or to the local broker when it is not set.
    pub async fn from_env() -> Result<Self> {
        Self::connect(&default_address()).await
    }

    /// Connects with options. Fails when the first connection cannot be made (or the options
    /// cannot work: a `connection_name` over 200 bytes, say); after that,
    /// lost connections are re-established in the background.
    ///
    /// The address may name the nodes of a cluster, `amqp://user:pass@host1:5672,host2:5672/vhost`
    /// ([`nodes`](crate::nodes)): the transport connects to the first that answers and, when
    /// it loses that node, to the next (each of the two connections on its own). Health names
    /// the node each endpoint is connected to.
    pub async fn connect_with(address: &str, options: RabbitMqOptions) -> Result<Self> {
        if !(address.starts_with("amqp://") || address.starts_with("amqps://")) {
            return Err(Error::Configuration(format!(
                "address must start with amqp:// or amqps://: {}",
                crate::options::redact(address)
            )));
        }
        options.validate().map_err(Error::Configuration)?;
        // It names the connection and starts every consumer tag (followed by 33 characters);
        // both are AMQP short strings.
        if options.connection_name.len() > MAX_CONNECTION_NAME {
            return Err(Error::Configuration(format!(
                "connection_name is {} bytes; at most {MAX_CONNECTION_NAME}",
                options.connection_name.len()
            )));
        }
        let nodes = crate::options::nodes(address);
        let redacted = crate::options::redact(address);
        let shared = Shared::new(&nodes, redacted.clone(), options.clone(), Role::Publishing);
        let consuming = Shared::new(&nodes, redacted, options, Role::Consuming);
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(shared.clone().supervise(first_tx));
        first_rx.await.map_err(|_| Error::Closed)??;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(consuming.clone().supervise(first_tx));
        if let Err(error) = first_rx.await.map_err(|_| Error::Closed).and_then(|r| r) {
            shared.closed.cancel();
            return Err(error);
        }
        Ok(RabbitMqTransport { shared, consuming, state: Arc::new(TransportState::default()) })
    }

    /// The broker address, password redacted.
    pub fn address_redacted(&self) -> &str {
        &self.shared.redacted
    }

    /// Whether both connections (publishing and consuming) are up now.
    pub fn is_connected(&self) -> bool {
        self.links().iter().all(|shared| matches!(&*shared.link.borrow(), Link::Up(session) if session.is_alive()))
    }

    fn links(&self) -> [&Arc<Shared>; 2] {
        [&self.shared, &self.consuming]
    }

    /// Waits until both connections are up (`connected`), or until one is down
    /// (`!connected`), for at most `timeout`; returns whether it got there. Useful for
    /// readiness checks.
    pub async fn wait_for_connection(&self, connected: bool, timeout: std::time::Duration) -> bool {
        let mut links = self.links().map(|shared| shared.link.subscribe());
        let wait = async {
            loop {
                let up = links
                    .iter_mut()
                    .map(|link| matches!(&*link.borrow_and_update(), Link::Up(session) if session.is_alive()))
                    .collect::<Vec<_>>();
                let there = if connected { up.iter().all(|u| *u) } else { up.iter().any(|u| !*u) };
                if there {
                    return true;
                }
                // A session can die before the supervisor notices; check again shortly even
                // without a change of state.
                let [first, second] = &mut links;
                let changed = async {
                    tokio::select! {
                        changed = first.changed() => changed.is_err(),
                        changed = second.changed() => changed.is_err(),
                    }
                };
                if tokio::time::timeout(std::time::Duration::from_millis(100), changed).await.unwrap_or(false) {
                    return false;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// How many connections were opened so far: 2 (one publishing, one consuming), plus one
    /// per recovery of either.
    pub fn connection_count(&self) -> u64 {
        self.links().iter().map(|shared| shared.connections.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    /// Closes both connections; consumers stop, publishes fail with [`Error::Closed`].
    pub async fn close(&self) {
        for shared in self.links() {
            shared.closed.cancel();
        }
        for shared in self.links() {
            let mut link = shared.link.subscribe();
            let closed = async {
                while !matches!(&*link.borrow_and_update(), Link::Closed) {
                    if link.changed().await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(self.shared.options.connect_timeout, closed).await;
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.shared.options.publish_timeout
    }

    /// Runs `work` (a declaration or a check) alone among this transport's declarations,
    /// within `deadline`: waiting for the others counts against it, so during an outage a
    /// queue of first publishes each fails at its own deadline rather than one after another.
    async fn declaring<T>(&self, deadline: Instant, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let unavailable = || Error::Unavailable(self.shared.options.publish_timeout);
        let _one_at_a_time =
            tokio::time::timeout_at(deadline, self.state.declaring.lock()).await.map_err(|_| unavailable())?;
        tokio::time::timeout_at(deadline, work).await.map_err(|_| unavailable())?
    }

    fn knows(&self, exchange: &str) -> bool {
        self.state.known_exchanges.locked().contains(exchange)
    }

    fn remember(&self, exchange: &str) {
        self.state.known_exchanges.locked().insert(exchange.to_owned());
    }

    /// Binds again to `exchange`, declared again after it was deleted behind the bus's back,
    /// what this bus had bound to it: its endpoints that consume the type or bind to it, and the exchanges of
    /// the types that list it as a contract. A binding the broker refuses is logged and the
    /// others are made, as on reconnect. (Other services' bindings to it are gone until they
    /// declare their topology again, on their next start or reconnect: nothing here can tell
    /// them.)
    async fn bind_again(&self, session: &Session, exchange: &str) -> Result<()> {
        let (endpoints, sources): (Vec<EndpointTopology>, Vec<(String, Vec<String>)>) = {
            let declared = self.shared.declared();
            let endpoints = declared
                .endpoints
                .values()
                .filter(|e| {
                    e.message_types.iter().any(|t| entity_name(t) == exchange)
                        || e.bindings.iter().any(|b| b.exchange == exchange)
                })
                .cloned()
                .collect();
            let sources = declared
                .publish_exchanges
                .iter()
                .filter(|(_, contracts)| contracts.iter().any(|c| c == exchange))
                .map(|(source, contracts)| (source.clone(), contracts.clone()))
                .collect();
            (endpoints, sources)
        };
        let options = &self.shared.options;
        for endpoint in endpoints {
            match topology::declare_endpoint(&session.connection, &endpoint, options).await {
                Err(error @ Error::Refused { .. }) => {
                    tracing::warn!(error = %chain(&error), endpoint = %endpoint.queue, "could not bind an endpoint again");
                }
                other => other?,
            }
        }
        for (source, contracts) in sources {
            match topology::declare_publish_exchange(&session.connection, &source, &contracts, options).await {
                Err(error @ Error::Refused { .. }) => {
                    tracing::warn!(error = %chain(&error), %source, "could not bind a message type's exchange again");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Forgets that `exchange` exists (it was deleted behind the bus's back), as a
    /// destination and as any type's publish exchange, so that it is checked or declared again.
    fn forget(&self, exchange: &str) {
        self.state.known_exchanges.locked().remove(exchange);
        self.state.publish_exchanges.write_locked().retain(|_, known| &**known != exchange);
    }

    /// The exchange to publish `message_types` to, declared (with its bindings to the contract
    /// exchanges) unless known; one deleted behind the bus's back is bound again (see
    /// [`Self::bind_again`]) before any publish can use it.
    async fn ensure_publish_exchange(&self, message_types: &[&str], deadline: Instant) -> Result<Arc<str>> {
        let Some((first, contracts)) = message_types.split_first() else {
            return Err(Error::Configuration("a published message needs a message type".into()));
        };
        let known = |state: &TransportState| state.publish_exchanges.read_locked().get(*first).cloned();
        if let Some(exchange) = known(&self.state) {
            return Ok(exchange);
        }
        self.declaring(deadline, async {
            if let Some(exchange) = known(&self.state) {
                return Ok(exchange);
            }
            let exchange = entity_name(first);
            let contracts: Vec<String> = contracts.iter().map(|c| entity_name(c)).collect();
            let session = self.shared.session(deadline).await?;
            topology::declare_publish_exchange(&session.connection, &exchange, &contracts, &self.shared.options)
                .await?;
            if self.state.needs_rebind.locked().contains(&exchange) {
                // Cleared only once bound again: cut short, the next publish does it.
                self.bind_again(&session, &exchange).await?;
                self.state.needs_rebind.locked().remove(&exchange);
            }
            self.shared.declared().publish_exchanges.insert(exchange.clone(), contracts);
            self.remember(&exchange);
            let exchange: Arc<str> = exchange.into();
            self.state.publish_exchanges.write_locked().insert((*first).to_owned(), exchange.clone());
            Ok(exchange)
        })
        .await
    }
}

impl Transport for RabbitMqTransport {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    fn address(&self, name: &str) -> String {
        // MassTransit's form: rabbitmq://host/name, or rabbitmq://host/vhost/name off the default vhost.
        let host_and_vhost = self.shared.redacted.split_once("://").map(|(_, rest)| rest).unwrap_or("localhost");
        let host_and_vhost = host_and_vhost.rsplit_once('@').map_or(host_and_vhost, |(_, h)| h);
        let host_and_vhost = host_and_vhost.split('?').next().unwrap_or(host_and_vhost);
        let (host, vhost) = host_and_vhost.split_once('/').unwrap_or((host_and_vhost, ""));
        let host = host.split(':').next().unwrap_or(host);
        match vhost {
            "" | "%2f" | "%2F" => format!("rabbitmq://{host}/{name}"),
            vhost => format!("rabbitmq://{host}/{vhost}/{name}"),
        }
    }

    fn declare<'a>(&'a self, endpoint: &'a EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(async move {
            let session = self.shared.session(self.deadline()).await?;
            topology::declare_endpoint(&session.connection, endpoint, &self.shared.options).await?;
            self.shared.declared().endpoints.insert(endpoint.queue.clone(), endpoint.clone());
            self.remember(&endpoint.queue);
            Ok(())
        })
    }

    fn publish<'a>(
        &'a self,
        message_types: &'a [&'a str],
        message: TransportMessage,
    ) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(self.publish_to_types(message_types, message))
    }

    fn send<'a>(&'a self, destination: &'a str, message: TransportMessage) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(self.send_to(destination, message))
    }

    fn subscribe<'a>(
        &'a self,
        endpoint: &'a EndpointTopology,
        prefetch: u16,
    ) -> BoxFuture<'a, bus_core::Result<Subscription>> {
        let state = Arc::new(Mutex::new(ConsumerState::Starting));
        let deliveries =
            consumer::start(self.consuming.clone(), self.shared.clone(), endpoint.clone(), prefetch, state.clone());
        let transport = self.clone();
        let queue = endpoint.queue.clone();
        let subscription = Subscription::new(queue.clone(), deliveries)
            .with_health(move || transport.endpoint_health(&queue, &state.locked()));
        Box::pin(async { Ok(subscription) })
    }

    fn delete<'a>(&'a self, endpoint: &'a EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(async move {
            self.shared.declared().endpoints.remove(&endpoint.queue);
            if endpoint.temporary {
                if let Ok(session) = self.shared.session(self.deadline()).await {
                    topology::delete_endpoint(&session.connection, endpoint).await?;
                }
            }
            Ok(())
        })
    }
}

impl RabbitMqTransport {
    async fn publish_to_types(&self, message_types: &[&str], message: TransportMessage) -> bus_core::Result<()> {
        // One bound for the whole publish, declaration included.
        let deadline = self.deadline();
        let make_properties = || properties(&message, true);
        loop {
            let exchange = self.ensure_publish_exchange(message_types, deadline).await?;
            let routing_key = message.routing_key.as_deref().unwrap_or("");
            match publish(&self.shared, &exchange, routing_key, &message.body, make_properties, false, deadline).await {
                // The exchange of this type, or of another published on the same channel, was
                // deleted behind the bus's back: the broker closed the channel and dropped what
                // came after the refused publish, this message included. Declared again (the
                // cache would say it exists for ever) and bound again as this bus had bound it,
                // it is published again, until the deadline, as MassTransit declares its
                // topology again on a new channel. (A publish that read the cache before this
                // and reaches the broker between the declaration and the bindings is taken but
                // reaches no endpoint: a window of a few round trips.)
                Err(Error::Refused { source, .. }) if is_not_found(&source) && Instant::now() < deadline => {
                    // Marked first: a publish that finds it forgotten declares it and binds again.
                    self.state.needs_rebind.locked().insert(exchange.to_string());
                    self.forget(&exchange);
                }
                other => return Ok(other?),
            }
        }
    }

    async fn send_to(&self, destination: &str, message: TransportMessage) -> bus_core::Result<()> {
        let deadline = self.deadline();
        if !self.knows(destination) {
            self.declaring(deadline, async {
                if self.knows(destination) {
                    return Ok(());
                }
                // Publishing to a missing exchange would close the channel; check on the side first.
                let session = self.shared.session(deadline).await?;
                if !topology::exchange_exists(&session.connection, destination).await? {
                    return Err(Error::Unroutable(destination.to_owned()));
                }
                self.remember(destination);
                Ok(())
            })
            .await?;
        }
        let make_properties = || properties(&message, true);
        match publish(&self.shared, destination, "", &message.body, make_properties, true, deadline).await {
            Err(Error::Refused { source, .. }) if is_not_found(&source) => {
                // Deleted since we saw it (a requester's temporary endpoint, say).
                self.forget(destination);
                Err(Error::Unroutable(destination.to_owned()).into())
            }
            other => Ok(other?),
        }
    }

    /// The endpoint's health: its consumer's, then whether what it would publish, fault or
    /// move can leave.
    fn endpoint_health(&self, queue: &str, state: &ConsumerState) -> EndpointHealth {
        let node = match &*self.consuming.link.borrow() {
            Link::Up(session) if session.is_alive() => Some(session.node.clone()),
            _ => None,
        };
        let health = self.link_health(queue, state);
        match node {
            Some(node) => health.on_node(node),
            None => health,
        }
    }

    /// The endpoint's health as its connections make it.
    fn link_health(&self, queue: &str, state: &ConsumerState) -> EndpointHealth {
        let health = self.consumer_health(queue, state);
        if health.status != HealthStatus::Healthy {
            return health;
        }
        // Consuming, but what it would publish, fault or move cannot leave.
        let publishing = match &*self.shared.link.borrow() {
            Link::Up(session) if session.is_alive() => None,
            Link::Down { error: Some(error) } => Some(format!("publishing connection reconnecting: {error}")),
            _ => Some("publishing connection reconnecting".to_owned()),
        };
        if let Some(why) = publishing {
            return EndpointHealth::new(queue, HealthStatus::Degraded, why);
        }
        match &*self.shared.blocked.borrow() {
            Some(reason) => EndpointHealth::new(
                queue,
                HealthStatus::Degraded,
                format!("broker alarm: publishing blocked ({reason}); consuming goes on"),
            ),
            None => health,
        }
    }
}

impl RabbitMqTransport {
    /// What the endpoint's consumer says of itself.
    fn consumer_health(&self, queue: &str, state: &ConsumerState) -> EndpointHealth {
        let link = self.consuming.link.borrow().clone();
        let current = match &link {
            Link::Up(session) if session.is_alive() => Some(session.generation),
            Link::Closed => return EndpointHealth::new(queue, HealthStatus::Unhealthy, "transport closed"),
            _ => None,
        };
        match (state, current) {
            (ConsumerState::Consuming(generation), Some(live)) if *generation == live => EndpointHealth::healthy(queue),
            (ConsumerState::Repaired(generation, at, what), Some(live)) if *generation == live => {
                // Reported for a while: an operator should know that messages went nowhere.
                if at.elapsed() < self.shared.options.topology_check_interval * 3 {
                    EndpointHealth::new(queue, HealthStatus::Degraded, format!("{what} and declared again"))
                } else {
                    EndpointHealth::healthy(queue)
                }
            }
            (ConsumerState::Stopped, _) => EndpointHealth::new(queue, HealthStatus::Unhealthy, "consumer stopped"),
            (ConsumerState::Failing(error), Some(_)) => EndpointHealth::new(queue, HealthStatus::Unhealthy, error),
            (_, None) => {
                let why = match link {
                    Link::Down { error: Some(error), .. } => format!("reconnecting: {error}"),
                    _ => "reconnecting".to_owned(),
                };
                EndpointHealth::new(queue, HealthStatus::Degraded, why)
            }
            (state, Some(_)) => {
                EndpointHealth::new(queue, HealthStatus::Degraded, format!("resubscribing ({state:?})"))
            }
        }
    }
}
