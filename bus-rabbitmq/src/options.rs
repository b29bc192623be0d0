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
        }
    }
}

/// The address used when none is given: `AMQP_ADDR`, else the local broker.
pub fn default_address() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The address with its password replaced by `***`, safe for logs and errors.
///
/// ```
/// assert_eq!(bus_rabbitmq::redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
/// assert_eq!(bus_rabbitmq::redact("amqp://host"), "amqp://host");
/// ```
pub fn redact(address: &str) -> String {
    let Some((scheme, rest)) = address.split_once("://") else {
        return address.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => address.to_owned(),
    }
}

/// Adds the heartbeat to the URI unless it sets one.
pub(crate) fn with_heartbeat(address: &str, heartbeat: Duration) -> String {
    if address.contains("heartbeat=") {
        return address.to_owned();
    }
    let separator = if address.contains('?') { '&' } else { '?' };
    format!("{address}{separator}heartbeat={}", heartbeat.as_secs().max(1))
}
