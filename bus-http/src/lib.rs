//! bus-http: a bus's Kubernetes probes and Prometheus metrics over HTTP, added in one call.
//!
//! | path | answers |
//! | --- | --- |
//! | `/health/live` | `200` while the bus is started; `503` before it starts and once it stops |
//! | `/health/ready` | `200` while every endpoint is healthy; `503` while one is degraded (reconnecting to the broker, a kill switch tripped) or unhealthy |
//! | `/metrics` | the bus's OpenTelemetry metrics in Prometheus text format |
//!
//! Both probes answer with the bus's health as JSON, each endpoint with its status and
//! reason. The metrics are those recorded on [`Metrics::meter`]: give it to the bus with
//! [`BusBuilder::meter`](bus_core::BusBuilder::meter).
//!
//! ```
//! use bus_core::Bus;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let metrics = bus_http::Metrics::new()?;
//! let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).meter(&metrics.meter()).build();
//! bus.start().await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = tokio::spawn(bus_http::serve(listener, bus_http::router(bus.clone(), Some(metrics))));
//! # server.abort();
//! # Ok(()) }
//! ```

mod error;
mod metrics;
mod probes;

pub use error::Error;
pub use metrics::Metrics;
pub use probes::{router, serve};
