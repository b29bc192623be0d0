use std::fmt;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, Registry, TextEncoder};

use crate::Error;

/// A meter provider whose metrics are read by Prometheus at `/metrics` (through the
/// `opentelemetry-prometheus` exporter): give its [`meter`](Self::meter) to the bus, and
/// the metrics to [`router`](crate::router).
///
/// ```
/// use opentelemetry::metrics::MeterProvider as _;
/// let metrics = bus_http::Metrics::new()?;
/// metrics.meter().u64_counter("orders.placed").build().add(1, &[]);
/// assert!(metrics.render()?.contains("orders_placed_total"));
/// # Ok::<_, bus_http::Error>(())
/// ```
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    provider: SdkMeterProvider,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A provider with a Prometheus reader of its own.
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| Error::Prometheus(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Ok(Metrics { registry, provider })
    }

    /// The meter to record the bus's metrics on (`rust-bus`, as the bus names its own).
    pub fn meter(&self) -> Meter {
        self.provider.meter("rust-bus")
    }

    /// The provider, for other meters of the service.
    pub fn provider(&self) -> &SdkMeterProvider {
        &self.provider
    }

    /// Every metric, in Prometheus text format.
    pub fn render(&self) -> Result<String, Error> {
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text).map_err(|e| Error::Prometheus(e.to_string()))?;
        String::from_utf8(text).map_err(|e| Error::Prometheus(e.to_string()))
    }
}
