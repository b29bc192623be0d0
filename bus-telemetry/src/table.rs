//! A metric exporter that prints the bus's metrics as a short table a person reads.

use bus_core::sync::MutexExt;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;

/// Prints every export as a table: one line per instrument and set of attributes, with the
/// total of a counter or the count, mean and maximum of a histogram. Only the last export
/// (at shutdown) is printed when exports come closer than a minute.
///
/// ```
/// use opentelemetry::metrics::MeterProvider as _;
/// let table = bus_telemetry::MetricsTable::default();
/// let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
///     .with_periodic_exporter(table.clone())
///     .build();
/// let consumed = provider.meter("orders").u64_counter("messaging.bus.consumed").build();
/// consumed.add(3, &[opentelemetry::KeyValue::new("endpoint", "orders")]);
/// provider.force_flush().expect("exported");
/// assert!(table.rendered().contains("messaging.bus.consumed  endpoint=orders  3"), "{}", table.rendered());
/// ```
#[derive(Debug, Clone, Default)]
pub struct MetricsTable {
    /// The latest table, printed at shutdown.
    latest: Arc<Mutex<String>>,
}

impl MetricsTable {
    /// The table of the latest export.
    pub fn rendered(&self) -> String {
        self.latest.locked().clone()
    }
}

/// `key=value` pairs in the order of their keys.
fn attributes<'a>(pairs: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> String {
    let mut pairs: Vec<String> = pairs.map(|kv| format!("{}={}", kv.key, kv.value)).collect();
    pairs.sort();
    pairs.join(" ")
}

/// The table's lines for one export, sorted.
fn render(metrics: &ResourceMetrics) -> String {
    let mut lines = Vec::new();
    for metric in metrics.scope_metrics().flat_map(|s| s.metrics()) {
        let name = metric.name();
        let mut sums = |points: Vec<(String, String)>| {
            for (attributes, value) in points {
                lines.push(format!("{name}  {attributes}  {value}"));
            }
        };
        match metric.data() {
            AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                sums(sum.data_points().map(|p| (attributes(p.attributes()), p.value().to_string())).collect())
            }
            AggregatedMetrics::I64(MetricData::Sum(sum)) => {
                sums(sum.data_points().map(|p| (attributes(p.attributes()), p.value().to_string())).collect())
            }
            AggregatedMetrics::F64(MetricData::Sum(sum)) => {
                sums(sum.data_points().map(|p| (attributes(p.attributes()), format!("{:.3}", p.value()))).collect())
            }
            AggregatedMetrics::F64(MetricData::Histogram(histogram)) => sums(
                histogram
                    .data_points()
                    .map(|p| {
                        let mean = if p.count() == 0 { 0.0 } else { p.sum() / p.count() as f64 };
                        let max = p.max().map_or(String::from("-"), |m| format!("{:.2} ms", m * 1000.0));
                        let summary = format!("count {}, mean {:.2} ms, max {max}", p.count(), mean * 1000.0);
                        (attributes(p.attributes()), summary)
                    })
                    .collect(),
            ),
            _ => {}
        }
    }
    lines.sort();
    let mut table = String::from("metrics (instrument  attributes  value)\n");
    for line in lines {
        let _ = writeln!(table, "  {line}");
    }
    table
}

impl PushMetricExporter for MetricsTable {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        *self.latest.locked() = render(metrics);
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        let table = self.rendered();
        if !table.is_empty() {
            #[allow(clippy::print_stdout)]
            {
                println!("\n{table}");
            }
        }
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}
