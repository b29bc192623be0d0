//! Telemetry: trace context carried across every hop, spans, and metrics.
//!
//! - **Propagation.** Every outgoing message carries the current trace context as W3C
//!   `traceparent`/`tracestate` (and `baggage`), and as MassTransit's `MT-Activity-Id`
//!   (the same value). A received message continues its producer's trace: `traceparent`
//!   first, then `MT-Activity-Id`; with `MT-Activity-Propagation: Link` the consume spans
//!   link to it instead. Nothing is written without an active context; missing or malformed
//!   headers start a new trace.
//! - **Spans**, on the OpenTelemetry API (the tracer provider installed globally when the
//!   bus is built, or the one given to [`BusBuilder::tracer_provider`](crate::BusBuilder::tracer_provider)):
//!   `{destination} send` (producer), `{endpoint} receive` and `{endpoint} process`
//!   (consumer), with the OpenTelemetry messaging attributes and MassTransit's ids; errors,
//!   retries and redeliveries recorded on them; saga transitions add `saga.id`,
//!   `saga.begin_state`, `saga.end_state` to the process span. A consumer runs with its
//!   process span current, so its own spans (OpenTelemetry's, or `tracing`'s through
//!   `tracing-opentelemetry`) and the messages it produces are its children.
//! - **Metrics** through an OpenTelemetry meter ([`BusMetrics`]).

pub(crate) mod metrics;
mod propagation;
mod spans;

pub use metrics::{BusMetrics, SECONDS_BUCKETS};
pub(crate) use propagation::{extract_producer, inject};
pub(crate) use spans::{
    current_event, current_trace_id, process_span, receive_span, send_span, span_name, BusTracer, EndpointSpans,
    MessageSpan, SendDestination,
};
