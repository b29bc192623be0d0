//! Telemetry: trace context carried across every hop, spans, and metrics.
//!
//! - **Propagation.** Every outgoing message carries the current trace context as W3C
//!   `traceparent`/`tracestate` (and `baggage`), and as MassTransit's `MT-Activity-Id`
//!   (the same value). A received message continues its producer's trace: `traceparent`
//!   first, then `MT-Activity-Id`; with `MT-Activity-Propagation: Link` the consume spans
//!   link to it instead. Nothing is written without an active context; missing or malformed
//!   headers start a new trace.
//! - **Spans**, through `tracing` (export them with `tracing-opentelemetry`): `{destination}
//!   send` (producer), `{endpoint} receive` and `{endpoint} process` (consumer), with the
//!   OpenTelemetry messaging attributes and MassTransit's ids; errors, retries and
//!   redeliveries recorded on them; saga transitions add `saga.id`, `saga.begin_state`,
//!   `saga.end_state` to the process span.
//! - **Metrics** through an OpenTelemetry meter ([`BusMetrics`]).

pub(crate) mod metrics;
mod propagation;
mod spans;

pub use metrics::BusMetrics;
pub(crate) use propagation::{extract, inject};
pub(crate) use spans::{process_span, receive_span, record_error, send_span};
