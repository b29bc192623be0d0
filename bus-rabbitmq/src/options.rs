//! Settings of the RabbitMQ transport.

use std::time::Duration;

/// The queue type of durable endpoint queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Classic queues (RabbitMQ's and MassTransit's default).
    #[default]
    Classic,
    /// Quorum queues: replicated, for clusters. Temporary queues stay classic.
    Quorum,
}

/// How one endpoint's queues are declared, over the transport-wide
/// [`queue_type`](RabbitMqOptions::queue_type) (MassTransit's `SetQuorumQueue(replicas)` and
/// `SetQueueArgument` on one endpoint).
///
/// The settings apply to the endpoint's queue, its delay queues (delayed redelivery) and its
/// `_error` and `_skipped` queues; a temporary endpoint (a response queue) stays classic.
/// Replicas, a delivery limit and at-least-once dead-lettering need quorum queues:
/// [`RabbitMqOptions::endpoint_queue`] refuses them on classic ones.
///
/// ```
/// use bus_rabbitmq::{QueueSettings, QueueType, RabbitMqOptions};
/// let options = RabbitMqOptions::default()
///     .endpoint_queue("orders", QueueSettings::quorum().replicas(3).delivery_limit(10).at_least_once_dead_lettering());
/// assert_eq!(options.endpoint_queues["orders"].queue_type, QueueType::Quorum);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueSettings {
    /// The queue type.
    pub queue_type: QueueType,
    /// How many nodes hold a replica of a new quorum queue (`x-quorum-initial-group-size`);
    /// `None`: as many as the cluster has, up to the broker's default.
    pub replicas: Option<u32>,
    /// How many times a message may be given back to a quorum queue (a consumer lost before
    /// acknowledging, or a requeue) before it is dead-lettered to the endpoint's `_error`
    /// queue (`x-delivery-limit`): a message that crashes every consumer stops going round.
    /// The endpoint's queue then dead-letters to `_error` for every reason: a message whose
    /// time to live runs out there goes to `_error` too (its `x-death` header says why).
    pub delivery_limit: Option<u32>,
    /// Dead-lettering that loses nothing (`x-dead-letter-strategy: at-least-once`, with
    /// `x-overflow: reject-publish`, which it requires): a message leaving a delay queue for
    /// the endpoint, or the endpoint for `_error` past its delivery limit, stays where it was
    /// until the target queue has confirmed it. The broker's default drops it if the target
    /// is unavailable at that moment (a node down).
    pub at_least_once_dead_lettering: bool,
}

impl QueueSettings {
    /// Classic queues.
    pub fn classic() -> Self {
        QueueSettings::default()
    }

    /// Quorum queues: replicated over the cluster's nodes.
    pub fn quorum() -> Self {
        QueueSettings { queue_type: QueueType::Quorum, ..QueueSettings::default() }
    }

    /// Replicas of a new quorum queue.
    #[must_use]
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Deliveries of one message before it is dead-lettered to `_error`.
    #[must_use]
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// At-least-once dead-lettering (see the field).
    #[must_use]
    pub fn at_least_once_dead_lettering(mut self) -> Self {
        self.at_least_once_dead_lettering = true;
        self
    }

    /// What these settings need of the queue type, as an error.
    fn validate(&self, endpoint: &str) -> Result<(), String> {
        if self.queue_type == QueueType::Quorum {
            return match self.replicas {
                Some(0) => Err(format!("endpoint `{endpoint}`: a quorum queue needs at least one replica")),
                _ => Ok(()),
            };
        }
        let quorum_only = [
            (self.replicas.is_some(), "replicas"),
            (self.delivery_limit.is_some(), "a delivery limit"),
            (self.at_least_once_dead_lettering, "at-least-once dead-lettering"),
        ];
        match quorum_only.iter().find(|(set, _)| *set) {
            Some((_, what)) => {
                Err(format!("endpoint `{endpoint}`: {what} needs quorum queues (QueueSettings::quorum())"))
            }
            None => Ok(()),
        }
    }
}

/// Client certificate and trusted roots for `amqps://`.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// Extra trusted root certificates, PEM (the system's roots are always trusted).
    pub ca_pem: Option<String>,
    /// Client certificate chain, PEM, for mutual TLS.
    pub client_cert_pem: Option<String>,
    /// The client certificate's private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub client_key_pem: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client_cert_pem", &self.client_cert_pem.is_some())
            .field("client_key_pem", &"<redacted>")
            .finish()
    }
}

/// Settings of a [`RabbitMqTransport`](crate::RabbitMqTransport).
#[derive(Debug, Clone)]
pub struct RabbitMqOptions {
    /// Name shown for the connection in the broker (`rabbitmqctl list_connections client_properties`).
    pub connection_name: String,
    /// Heartbeat interval asked of the broker; a silent connection is declared dead after
    /// about two intervals (default 10 s). An explicit `heartbeat=` in the URI wins.
    pub heartbeat: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// First pause between reconnection attempts; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest pause between reconnection attempts.
    pub reconnect_max: Duration,
    /// How long a publish (or declaration) waits for a connection during an outage, and for
    /// its confirm, before it fails.
    pub publish_timeout: Duration,
    /// Queue type of durable queues, unless [`endpoint_queues`](Self::endpoint_queues) says
    /// otherwise for an endpoint.
    pub queue_type: QueueType,
    /// How the queues of particular endpoints are declared, by endpoint name (see
    /// [`endpoint_queue`](Self::endpoint_queue)).
    pub endpoint_queues: std::collections::HashMap<String, QueueSettings>,
    /// Number of confirm channels publishes are spread over (default 1: on a small machine
    /// one channel pipelines best; more can help with many cores).
    pub publish_channels: usize,
    /// How often each consuming endpoint checks that its queue and exchanges still exist
    /// (an operator or a policy may delete them under a running bus; the broker tells a
    /// consumer only of a deleted queue). What is missing is declared again.
    pub topology_check_interval: Duration,
    /// TLS settings for `amqps://`.
    pub tls: TlsOptions,
    /// Exchanges declared as another type than fanout, by name (see
    /// [`exchange_type`](Self::exchange_type)).
    pub exchange_types: std::collections::HashMap<String, ExchangeType>,
}

/// The type of a message type's exchange (MassTransit's `ExchangeType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExchangeType {
    /// To every bound exchange and queue (MassTransit's default).
    #[default]
    Fanout,
    /// To those bound with the message's routing key.
    Direct,
    /// To those bound with a pattern the routing key matches (`*` one word, `#` any).
    Topic,
}

impl Default for RabbitMqOptions {
    fn default() -> Self {
        let process = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "rust-bus".to_owned());
        RabbitMqOptions {
            connection_name: process,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(30),
            queue_type: QueueType::Classic,
            endpoint_queues: std::collections::HashMap::new(),
            publish_channels: 1,
            topology_check_interval: Duration::from_secs(10),
            tls: TlsOptions::default(),
            exchange_types: std::collections::HashMap::new(),
        }
    }
}

/// The longest timeout taken: longer ones are surely a mistake, and past some length adding
/// them to the time now overflows.
const LONGEST_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

impl RabbitMqOptions {
    /// Declares exchange `name` (a message type's, `Ns:Type`, or one endpoints bind to) as
    /// `kind` rather than fanout, as MassTransit's `Publish<T>(x => x.ExchangeType = ..)`:
    /// with a direct or topic exchange, messages published with a routing key
    /// (`BusBuilder::routing_key`) reach the endpoints bound with a matching one
    /// (`Endpoint::bind_with_routing_key`). Every service declaring the exchange must agree on
    /// its type: the broker refuses a second declaration of another type.
    ///
    /// ```
    /// use bus_rabbitmq::{ExchangeType, RabbitMqOptions};
    /// let options = RabbitMqOptions::default().exchange_type("Shop:OrderPlaced", ExchangeType::Direct);
    /// assert_eq!(options.exchange_types["Shop:OrderPlaced"], ExchangeType::Direct);
    /// ```
    #[doc(alias = "ExchangeType")]
    pub fn exchange_type(mut self, name: impl Into<String>, kind: ExchangeType) -> Self {
        self.exchange_types.insert(name.into(), kind);
        self
    }

    /// Declares endpoint `endpoint`'s queues with `settings` rather than the transport-wide
    /// [`queue_type`](Self::queue_type): quorum queues for one endpoint, their replicas,
    /// delivery limit and dead-lettering (see [`QueueSettings`]). Settings that need quorum
    /// queues on a classic one make the transport refuse to connect.
    ///
    /// A queue that exists already keeps the arguments it was declared with: the broker
    /// refuses a declaration with others (logged), so changing a queue's type means moving
    /// its messages to a new queue (a shovel, or `busctl`).
    pub fn endpoint_queue(mut self, endpoint: impl Into<String>, settings: QueueSettings) -> Self {
        self.endpoint_queues.insert(endpoint.into(), settings);
        self
    }

    /// How endpoint `endpoint`'s queues are declared.
    pub(crate) fn queue_settings(&self, endpoint: &str) -> QueueSettings {
        self.endpoint_queues
            .get(endpoint)
            .copied()
            .unwrap_or(QueueSettings { queue_type: self.queue_type, ..QueueSettings::default() })
    }

    /// The type exchange `name` is declared as.
    pub(crate) fn exchange_kind(&self, name: &str) -> lapin::ExchangeKind {
        match self.exchange_types.get(name).copied().unwrap_or_default() {
            ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeType::Direct => lapin::ExchangeKind::Direct,
            ExchangeType::Topic => lapin::ExchangeKind::Topic,
        }
    }

    /// Refuses settings that cannot work: a zero or overlong timeout, a reconnection pause of
    /// zero (failed reconnections would follow each other without pause), a heartbeat AMQP
    /// cannot carry, no publish channel, a zero topology check interval.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let bounded = [
            ("publish_timeout", self.publish_timeout),
            ("connect_timeout", self.connect_timeout),
            ("reconnect_min", self.reconnect_min),
            ("reconnect_max", self.reconnect_max),
            ("topology_check_interval", self.topology_check_interval),
        ];
        for (name, value) in bounded {
            if value.is_zero() || value > LONGEST_TIMEOUT {
                return Err(format!("{name} is {value:?}; it must be above zero and at most {LONGEST_TIMEOUT:?}"));
            }
        }
        if self.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(format!("heartbeat is {:?}; AMQP carries at most {} s", self.heartbeat, u16::MAX));
        }
        for (endpoint, settings) in &self.endpoint_queues {
            settings.validate(endpoint)?;
        }
        if self.publish_channels == 0 || self.publish_channels > 1024 {
            return Err(format!("publish_channels is {}; it must be from 1 to 1024", self.publish_channels));
        }
        Ok(())
    }
}

/// The address used when none is given: `AMQP_ADDR`, else the local broker.
pub fn default_address() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The address with its password replaced by `***`, safe for logs and errors, whatever its
/// form: `amqps://`, a password holding `@` or `/`, a query string, no user at all.
///
/// ```
/// use bus_rabbitmq::redact;
/// assert_eq!(redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
/// assert_eq!(redact("amqps://u:p@ss/w@host/vh?heartbeat=5"), "amqps://u:***@host/vh?heartbeat=5");
/// assert_eq!(redact("amqp://:secret@host"), "amqp://:***@host");
/// assert_eq!(redact("amqp://user@host"), "amqp://user:***@host");
/// assert_eq!(redact("amqp://host/vh?heartbeat=5"), "amqp://host/vh?heartbeat=5");
/// assert_eq!(redact("guest:secret@host"), "guest:***@host");
/// ```
pub fn redact(address: &str) -> String {
    let (scheme, rest) = address.split_once("://").map_or(("", address), |(scheme, rest)| (scheme, rest));
    let prefix = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    // The user information ends at the last `@` before the query, if any; else at the last `@`.
    let (main, query) = rest.split_once('?').map_or((rest, None), |(main, query)| (main, Some(query)));
    let (userinfo, host) = match main.rsplit_once('@') {
        Some((userinfo, host)) => (userinfo, format!("{host}{}", query.map(|q| format!("?{q}")).unwrap_or_default())),
        None => match rest.rsplit_once('@') {
            Some((userinfo, host)) => (userinfo, host.to_owned()),
            None => return address.to_owned(),
        },
    };
    let user = userinfo.split(':').next().unwrap_or("");
    format!("{prefix}{user}:***@{host}")
}

/// The nodes an address names, each as an address of its own: `amqp://u:p@h1:5672,h2:5673/vh`
/// names `amqp://u:p@h1:5672/vh` and `amqp://u:p@h2:5673/vh` (user, vhost and query shared).
///
/// ```
/// use bus_rabbitmq::nodes;
/// assert_eq!(
///     nodes("amqp://u:p@h1:5672,h2:5673/vh?heartbeat=5"),
///     ["amqp://u:p@h1:5672/vh?heartbeat=5", "amqp://u:p@h2:5673/vh?heartbeat=5"]
/// );
/// assert_eq!(nodes("amqp://h1"), ["amqp://h1"]);
/// assert_eq!(nodes("amqp://u:p?w@h1,h2/vh"), ["amqp://u:p?w@h1/vh", "amqp://u:p?w@h2/vh"]);
/// ```
pub fn nodes(address: &str) -> Vec<String> {
    let Some((scheme, rest)) = address.split_once("://") else {
        return vec![address.to_owned()];
    };
    // The user information ends at the last `@` before the query (a password may hold `@`).
    let (userinfo, after) = match userinfo_end(rest) {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let hosts_end = after.find(['/', '?']).unwrap_or(after.len());
    let (hosts, tail) = after.split_at(hosts_end);
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(|host| format!("{scheme}://{userinfo}{host}{tail}"))
        .collect();
    if nodes.is_empty() {
        vec![address.to_owned()]
    } else {
        nodes
    }
}

/// The `host:port` of an address, for health and logs (no user, no password).
pub(crate) fn node_name(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let after = userinfo_end(rest).map_or(rest, |at| &rest[at + 1..]);
    after.split(['/', '?']).next().unwrap_or(after).to_owned()
}

/// Where the user information of `rest` (an address after `scheme://`) ends: the last `@`
/// before the query, else the last `@` (a password may hold `@`, `/` or `?`).
fn userinfo_end(rest: &str) -> Option<usize> {
    let before_query = rest.split('?').next().unwrap_or(rest);
    before_query.rfind('@').or_else(|| rest.rfind('@'))
}

/// Adds the heartbeat to the URI unless it sets one.
pub(crate) fn with_heartbeat(address: &str, heartbeat: Duration) -> String {
    if address.contains("heartbeat=") {
        return address.to_owned();
    }
    let separator = if address.contains('?') { '&' } else { '?' };
    format!("{address}{separator}heartbeat={}", heartbeat.as_secs().max(1))
}

#[cfg(test)]
mod node_tests {
    use super::node_name;

    #[test]
    fn a_node_is_named_without_its_user_or_password() {
        assert_eq!(node_name("amqp://u:secret@h1:5672/vh?heartbeat=5"), "h1:5672");
        assert_eq!(node_name("amqp://u:se?cr/et@h2:5673/vh"), "h2:5673");
        assert_eq!(node_name("amqps://h3"), "h3");
    }
}
