//! The counters and histograms an operator graphs.

use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use opentelemetry::KeyValue;

/// The bus's instruments, made from one meter (the global `rust-bus` meter unless the
/// builder is given another).
///
/// | instrument | kind | attributes |
/// | --- | --- | --- |
/// | `messaging.bus.published` | counter | `message_type` |
/// | `messaging.bus.sent` | counter | `message_type` |
/// | `messaging.bus.consumed` | counter | `endpoint`, `message_type`, `consumer` |
/// | `messaging.bus.failed` | counter | `endpoint`, `message_type`, `consumer` |
/// | `messaging.bus.retries` | counter | `endpoint`, `consumer` |
/// | `messaging.bus.redeliveries` | counter | `endpoint` |
/// | `messaging.bus.consume.duration` | histogram (s) | `endpoint`, `message_type`, `consumer` |
/// | `messaging.bus.delivery.latency` | histogram (s), sent time to consume | `endpoint` |
/// | `messaging.bus.in_flight` | up-down counter | `endpoint` |
///
/// Extensions make theirs on the same meter ([`Bus::meter`](crate::Bus::meter)): sagas count
/// `messaging.saga.conflicts` by `saga`.
#[derive(Debug, Clone)]
pub struct BusMetrics {
    pub(crate) meter: Meter,
    pub(crate) published: Counter<u64>,
    pub(crate) sent: Counter<u64>,
    pub(crate) consumed: Counter<u64>,
    pub(crate) failed: Counter<u64>,
    pub(crate) retries: Counter<u64>,
    pub(crate) redeliveries: Counter<u64>,
    pub(crate) consume_duration: Histogram<f64>,
    pub(crate) delivery_latency: Histogram<f64>,
    pub(crate) in_flight: UpDownCounter<i64>,
}

/// Bucket boundaries of the duration histograms, in seconds: those OpenTelemetry's
/// messaging conventions recommend. The SDK's defaults (0 to 10,000) suit milliseconds, and
/// would put every consume of a healthy bus in their first bucket.
pub const SECONDS_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

impl BusMetrics {
    /// The instruments, from `meter`.
    pub fn new(meter: &Meter) -> Self {
        BusMetrics {
            meter: meter.clone(),
            published: meter.u64_counter("messaging.bus.published").with_description("messages published").build(),
            sent: meter.u64_counter("messaging.bus.sent").with_description("messages sent").build(),
            consumed: meter.u64_counter("messaging.bus.consumed").with_description("messages consumed").build(),
            failed: meter.u64_counter("messaging.bus.failed").with_description("consumes that failed for good").build(),
            retries: meter.u64_counter("messaging.bus.retries").with_description("in-process retries").build(),
            redeliveries: meter
                .u64_counter("messaging.bus.redeliveries")
                .with_description("delayed redeliveries")
                .build(),
            consume_duration: meter
                .f64_histogram("messaging.bus.consume.duration")
                .with_unit("s")
                .with_description("time a consumer took")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            delivery_latency: meter
                .f64_histogram("messaging.bus.delivery.latency")
                .with_unit("s")
                .with_description("time from sent to consumed")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            in_flight: meter
                .i64_up_down_counter("messaging.bus.in_flight")
                .with_description("messages being consumed")
                .build(),
        }
    }

    /// The instruments of the global meter provider's `rust-bus` meter.
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter("rust-bus"))
    }
}

/// Attributes of one consumer on one endpoint, made once.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerAttributes {
    pub(crate) consumer_type: &'static str,
    pub(crate) full: Vec<KeyValue>,
}

impl ConsumerAttributes {
    pub(crate) fn new(endpoint: &str, message_type: &str, consumer: &'static str) -> Self {
        ConsumerAttributes {
            consumer_type: consumer,
            full: vec![
                KeyValue::new("endpoint", endpoint.to_owned()),
                KeyValue::new("message_type", message_type.to_owned()),
                KeyValue::new("consumer", consumer.to_owned()),
            ],
        }
    }
}
