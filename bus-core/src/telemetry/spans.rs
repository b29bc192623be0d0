//! The spans of the message path, named and attributed as OpenTelemetry's messaging
//! conventions and MassTransit's tracing say.
//!
//! They are built on the OpenTelemetry API directly, not through `tracing`: three spans per
//! message through `tracing-opentelemetry` cost more than the message itself. Attributes are
//! only computed for spans that record (a no-op tracer builds nothing but the context).
//! Running a future under a span's [`Context`] makes it current, so `tracing` spans that user
//! code opens there (with `tracing-opentelemetry`'s context activation, its default) become
//! its children.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::trace::{Link, Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue, StringValue};
use uuid::Uuid;

use super::propagation::Producer;
use crate::{ConsumeError, Envelope};

/// A span of the message path, with the context that makes it current.
#[derive(Debug, Clone)]
pub(crate) struct MessageSpan {
    cx: Context,
}

impl MessageSpan {
    /// The context to run under (and to inject into outgoing headers).
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    /// Whether the span is part of a trace (a tracer is installed or the producer sent one):
    /// only then are trace headers written.
    pub(crate) fn is_traced(&self) -> bool {
        self.cx.has_active_span() && self.cx.span().span_context().is_valid()
    }

    /// Marks the span failed and records the error as an `exception` event.
    pub(crate) fn record_error(&self, error: &ConsumeError) {
        self.record_exception(error.exception_type(), error.message());
    }

    /// Marks the span failed with an `exception` event of this type and message.
    pub(crate) fn record_exception(&self, exception_type: &str, message: &str) {
        let span = self.cx.span();
        if !span.is_recording() {
            return;
        }
        span.set_status(Status::error(message.to_owned()));
        span.add_event(
            "exception",
            vec![
                KeyValue::new("exception.type", exception_type.to_owned()),
                KeyValue::new("exception.message", message.to_owned()),
            ],
        );
    }

    /// Ends the span now (not when the last clone of its context drops).
    pub(crate) fn end(&self) {
        self.cx.span().end();
    }
}

/// The bus's tracer, and whether its spans were recorded lately.
///
/// Attributes handed to the span builder cost less than setting them one by one on a
/// started span, but only a recording span wants them. The hint says which to expect:
/// when it is wrong the attributes are built in vain (or set afterwards) once, and it flips.
pub(crate) struct BusTracer {
    tracer: BoxedTracer,
    recording: AtomicBool,
}

impl BusTracer {
    pub(crate) fn new(tracer: BoxedTracer) -> Self {
        BusTracer { tracer, recording: AtomicBool::new(true) }
    }

    fn start(
        &self,
        kind: SpanKind,
        parent: &Context,
        links: Vec<Link>,
        name: impl FnOnce() -> String,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> BoxedSpan {
        if self.recording.load(Ordering::Relaxed) {
            let builder =
                SpanBuilder::from_name(name()).with_kind(kind).with_links(links).with_attributes(attributes());
            let span = self.tracer.build_with_context(builder, parent);
            if !span.is_recording() {
                self.recording.store(false, Ordering::Relaxed);
            }
            return span;
        }
        let builder = SpanBuilder::from_name("message").with_kind(kind).with_links(links);
        let mut span = self.tracer.build_with_context(builder, parent);
        if span.is_recording() {
            self.recording.store(true, Ordering::Relaxed);
            span.update_name(Cow::Owned(name()));
            span.set_attributes(attributes());
        }
        span
    }
}

impl std::fmt::Debug for BusTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusTracer").field("recording", &self.recording).finish_non_exhaustive()
    }
}

fn in_context(parent: &Context, span: BoxedSpan) -> MessageSpan {
    MessageSpan { cx: parent.with_span(span) }
}

fn id(id: Option<Uuid>) -> Option<StringValue> {
    // Encoded straight into a buffer: `to_string` goes through the formatting machinery.
    id.map(|u| StringValue::from(u.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned()))
}

/// The ids every span of one message carries.
fn message_attributes(envelope: &Envelope, attributes: &mut Vec<KeyValue>) {
    let ids = [
        ("messaging.message.id", envelope.message_id),
        ("messaging.message.conversation_id", envelope.conversation_id),
        ("messaging.masstransit.correlation_id", envelope.correlation_id),
        ("messaging.masstransit.request_id", envelope.request_id),
        ("messaging.masstransit.initiator_id", envelope.initiator_id),
    ];
    for (key, value) in ids {
        if let Some(value) = id(value) {
            attributes.push(KeyValue::new(key, value));
        }
    }
    let types = match envelope.message_type.as_slice() {
        [one] => one.clone(),
        many => many.join(","),
    };
    attributes.push(KeyValue::new("messaging.masstransit.message_types", types));
}

fn common(system: &'static str, destination: &Arc<str>, operation: &'static str) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(10);
    attributes.push(KeyValue::new("messaging.system", system));
    attributes.push(KeyValue::new("messaging.destination.name", StringValue::from(destination.clone())));
    attributes.push(KeyValue::new("messaging.operation", operation));
    attributes
}

/// `{destination} send`: a message leaving (publish or send), child of the current context.
pub(crate) fn send_span(
    tracer: &BusTracer,
    system: &'static str,
    destination: &Arc<str>,
    operation: &'static str,
    envelope: &Envelope,
) -> MessageSpan {
    let parent = Context::current();
    let span = tracer.start(
        SpanKind::Producer,
        &parent,
        Vec::new(),
        || [&**destination, " send"].concat(),
        || {
            let mut attributes = common(system, destination, operation);
            message_attributes(envelope, &mut attributes);
            attributes
        },
    );
    in_context(&parent, span)
}

/// `{endpoint} receive`: a delivery arriving, child of (or linked to) its producer's span.
pub(crate) fn receive_span(
    tracer: &BusTracer,
    system: &'static str,
    endpoint: &Arc<str>,
    envelope: &Envelope,
    producer: Producer,
) -> MessageSpan {
    let Producer { parent, link } = producer;
    let links = link.map(|remote| vec![Link::with_context(remote)]).unwrap_or_default();
    let span = tracer.start(
        SpanKind::Consumer,
        &parent,
        links,
        || [&**endpoint, " receive"].concat(),
        || {
            let mut attributes = common(system, endpoint, "receive");
            message_attributes(envelope, &mut attributes);
            attributes
        },
    );
    in_context(&parent, span)
}

/// `{endpoint} process`: one consumer handling the message, child of the receive span;
/// sagas add `saga.id`, `saga.begin_state` and `saga.end_state` to it.
pub(crate) fn process_span(
    tracer: &BusTracer,
    receive: &MessageSpan,
    system: &'static str,
    endpoint: &Arc<str>,
    consumer: &'static str,
) -> MessageSpan {
    let span = tracer.start(
        SpanKind::Consumer,
        &receive.cx,
        Vec::new(),
        || [&**endpoint, " process"].concat(),
        || {
            let mut attributes = common(system, endpoint, "process");
            attributes.push(KeyValue::new("messaging.masstransit.consumer_type", consumer));
            attributes
        },
    );
    in_context(&receive.cx, span)
}

/// Adds an event to the current span (the process span while a consumer runs).
pub(crate) fn current_event(name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
    let cx = Context::current();
    let span = cx.span();
    if span.is_recording() {
        span.add_event(name, attributes());
    }
}

/// The current trace id, for logs; `None` outside a trace.
pub(crate) fn current_trace_id() -> Option<String> {
    let cx = Context::current();
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| context.trace_id().to_string())
}
