//! The spans of the message path, named and attributed as OpenTelemetry's messaging
//! conventions and MassTransit's tracing say.

use opentelemetry::trace::TraceContextExt;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{ConsumeError, Envelope};

fn id(id: Option<uuid::Uuid>) -> String {
    id.map(|u| u.to_string()).unwrap_or_default()
}

/// `{destination} send`: a message leaving (publish or send).
pub(crate) fn send_span(system: &'static str, destination: &str, operation: &'static str, envelope: &Envelope) -> Span {
    tracing::info_span!(
        "send",
        otel.name = format!("{destination} send"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = system,
        messaging.destination.name = destination,
        messaging.operation = operation,
        messaging.message.id = id(envelope.message_id),
        messaging.message.conversation_id = id(envelope.conversation_id),
        messaging.masstransit.correlation_id = id(envelope.correlation_id),
        messaging.masstransit.request_id = id(envelope.request_id),
        messaging.masstransit.initiator_id = id(envelope.initiator_id),
        messaging.masstransit.message_types = envelope.message_type.join(","),
    )
}

/// `{endpoint} receive`: a delivery arriving, child of (or linked to) its producer's span.
pub(crate) fn receive_span(system: &'static str, endpoint: &str, envelope: &Envelope) -> Span {
    let span = tracing::info_span!(
        "receive",
        otel.name = format!("{endpoint} receive"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = system,
        messaging.destination.name = endpoint,
        messaging.operation = "receive",
        messaging.message.id = id(envelope.message_id),
        messaging.message.conversation_id = id(envelope.conversation_id),
        messaging.masstransit.correlation_id = id(envelope.correlation_id),
        messaging.masstransit.request_id = id(envelope.request_id),
        messaging.masstransit.initiator_id = id(envelope.initiator_id),
        messaging.masstransit.message_types = envelope.message_type.join(","),
    );
    if span.is_disabled() {
        // No subscriber wants it: skip reading the trace headers too.
        return span;
    }
    let producer = super::extract(&envelope.headers);
    let producer_span = producer.span();
    let context = producer_span.span_context();
    if context.is_valid() {
        let link = envelope.headers.get_str("MT-Activity-Propagation").is_some_and(|p| p.eq_ignore_ascii_case("link"));
        if link {
            span.add_link(context.clone());
        } else {
            let _ = span.set_parent(producer.clone());
        }
    }
    span
}

/// `{endpoint} process`: one consumer handling the message; saga fields are filled by sagas.
pub(crate) fn process_span(parent: &Span, system: &'static str, endpoint: &str, consumer: &str) -> Span {
    tracing::info_span!(
        parent: parent,
        "process",
        otel.name = format!("{endpoint} process"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = system,
        messaging.destination.name = endpoint,
        messaging.operation = "process",
        messaging.masstransit.consumer_type = consumer,
        saga.id = Empty,
        saga.begin_state = Empty,
        saga.end_state = Empty,
    )
}

/// Marks a span failed and records the error as an exception event.
pub(crate) fn record_error(span: &Span, error: &ConsumeError) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", error.message());
    tracing::error!(
        parent: span,
        exception.r#type = error.exception_type(),
        exception.message = error.message(),
        "exception"
    );
}
