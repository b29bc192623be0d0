//! Health: is each endpoint really consuming?

use std::fmt;

/// How healthy a part of the bus is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HealthStatus {
    /// Working.
    Healthy,
    /// Recovering on its own (e.g. reconnecting to the broker).
    Degraded,
    /// Not working.
    Unhealthy,
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        })
    }
}

/// The health of one endpoint, as its transport reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointHealth {
    /// Endpoint (queue) name.
    pub endpoint: String,
    /// Its status.
    pub status: HealthStatus,
    /// Why it is not healthy.
    pub reason: Option<String>,
    /// The broker node the endpoint is connected to, when the transport knows of several
    /// (a RabbitMQ cluster: `host:port`).
    pub node: Option<String>,
}

impl EndpointHealth {
    /// A healthy endpoint.
    pub fn healthy(endpoint: impl Into<String>) -> Self {
        EndpointHealth { endpoint: endpoint.into(), status: HealthStatus::Healthy, reason: None, node: None }
    }

    /// An endpoint in `status` for `reason`.
    pub fn new(endpoint: impl Into<String>, status: HealthStatus, reason: impl Into<String>) -> Self {
        EndpointHealth { endpoint: endpoint.into(), status, reason: Some(reason.into()), node: None }
    }

    /// The same, naming the broker node it is connected to.
    ///
    /// ```
    /// use bus_core::EndpointHealth;
    /// let health = EndpointHealth::healthy("orders").on_node("rabbit-2:5672");
    /// assert_eq!(health.node.as_deref(), Some("rabbit-2:5672"));
    /// ```
    #[must_use]
    pub fn on_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }
}

/// The health of a bus: the worst of its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusHealth {
    /// The overall status.
    pub status: HealthStatus,
    /// Each endpoint's.
    pub endpoints: Vec<EndpointHealth>,
}
