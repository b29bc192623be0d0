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
    /// Queue type of durable queues.
    pub queue_type: QueueType,
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

/// Adds the heartbeat to the URI unless it sets one.
pub(crate) fn with_heartbeat(address: &str, heartbeat: Duration) -> String {
    if address.contains("heartbeat=") {
        return address.to_owned();
    }
    let separator = if address.contains('?') { '&' } else { '?' };
    format!("{address}{separator}heartbeat={}", heartbeat.as_secs().max(1))
}
