//! The spans of the message path, named and attributed as OpenTelemetry's messaging
//! conventions and MassTransit's tracing say.
//!
//! They are built on the OpenTelemetry API directly, not through `tracing`: three spans per
//! message through `tracing-opentelemetry` cost more than the message itself. Each span is
//! created with its name, kind and the attributes samplers may use: those the messaging
//! conventions call sampling-relevant (`messaging.system`, `messaging.destination.name`,
//! `messaging.operation`), the message's types, and a process span's consumer type. The
//! message's ids are added only when the sampler records the span, so a message sampled out
//! costs little more than the trace context its headers carry on. Under a no-op tracer no
//! span is built at all (see [`BusTracer`]).
//! Running a future under a span's [`Context`] makes it current, so `tracing` spans that user
//! code opens there (with `tracing-opentelemetry`'s context activation, its default) become
//! its children.

use crate::sync::MutexExt;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use opentelemetry::trace::{Link, Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, StringValue};
use uuid::Uuid;

use super::propagation::Producer;
use crate::{ConsumeError, Envelope};

/// A span of the message path, with the context that makes it current.
#[derive(Debug, Clone)]
pub(crate) struct MessageSpan {
    cx: Context,
    /// Whether the bus built the span. Without one (a no-op tracer) the context is the
    /// parent's, whose span belongs to someone else (the caller's own, say, made current by
    /// a `tracing` layer with a provider of its own): it is neither marked nor ended here.
    own: bool,
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
        if !self.own || !span.is_recording() {
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

    /// Ends the span now (not when the last clone of its context drops). A span that was
    /// sampled out is left alone: it records nothing, and ending it still reads the clock.
    pub(crate) fn end(&self) {
        let span = self.cx.span();
        if self.own && span.is_recording() {
            span.end();
        }
    }
}

/// Builds spans with one tracer and puts each straight into its context.
///
/// This is the bus's type erasure of the user's tracer. `BoxedTracer` would box each span
/// for the erasure, and the context would box it again: one allocation more per span, three
/// per message.
trait SpanStarter: Send + Sync {
    /// The context holding the new span, and what the span turned out to be.
    fn start(&self, builder: SpanBuilder, parent: &Context) -> (Context, Started);
}

/// What a new span turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Started {
    /// It records: the sampler kept it.
    Recording,
    /// It was sampled out: it has an id of its own (carried on in the trace headers, with
    /// the decision) but records nothing.
    SampledOut,
    /// A no-op tracer's: neither records nor has an id of its own.
    Noop,
}

impl<T> SpanStarter for T
where
    T: Tracer + Send + Sync,
    T::Span: Send + Sync + 'static,
{
    fn start(&self, builder: SpanBuilder, parent: &Context) -> (Context, Started) {
        let span = self.build_with_context(builder, parent);
        let started = if span.is_recording() {
            Started::Recording
        } else {
            // An SDK span that is sampled out still gets an id of its own; a no-op tracer's
            // span has none (it repeats its parent's, or is empty).
            let context = span.span_context();
            let no_id_of_its_own = !context.is_valid()
                || parent.has_active_span() && parent.span().span_context().span_id() == context.span_id();
            if no_id_of_its_own {
                Started::Noop
            } else {
                Started::SampledOut
            }
        };
        (parent.with_span(span), started)
    }
}

/// The bus's tracer, and whether it turned out to be a no-op one.
///
/// Spans are built with their name and sampling-relevant attributes, so that samplers see
/// them. Without a tracer provider that work is wasted on every message, so a tracer
/// whose spans neither record nor get ids of their own is marked no-op, and then no spans
/// are built: the parent context carries the producer's trace on just as a no-op span would.
/// Every 1,024th span is built whole again, in case that was only a passing state (a
/// suppressed context, say).
pub(crate) struct BusTracer {
    tracer: Box<dyn SpanStarter>,
    noop: AtomicBool,
    bare: AtomicU32,
}

impl BusTracer {
    pub(crate) fn new<T>(tracer: T) -> Self
    where
        T: Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        BusTracer { tracer: Box::new(tracer), noop: AtomicBool::new(false), bare: AtomicU32::new(0) }
    }

    /// The context of a new span under `parent`; `None` under a no-op tracer, whose span
    /// would only repeat its parent's context (the parent carries it on as well).
    ///
    /// `sampling` gives the attributes the span is created with, which samplers see;
    /// `details` adds the rest, and runs only when the span records.
    fn start(
        &self,
        kind: SpanKind,
        parent: &Context,
        links: Vec<Link>,
        name: impl FnOnce() -> Cow<'static, str>,
        sampling: impl FnOnce() -> Vec<KeyValue>,
        details: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Context> {
        if self.noop.load(Ordering::Relaxed) && self.bare.fetch_add(1, Ordering::Relaxed) % 1024 != 1023 {
            return None;
        }
        let builder = SpanBuilder::from_name(name()).with_kind(kind).with_links(links).with_attributes(sampling());
        let (cx, started) = self.tracer.start(builder, parent);
        self.noop.store(started == Started::Noop, Ordering::Relaxed);
        if started == Started::Recording {
            cx.span().set_attributes(details());
        }
        Some(cx)
    }
}

impl std::fmt::Debug for BusTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusTracer").field("noop", &self.noop).finish_non_exhaustive()
    }
}

/// The span name `{entity} {operation}`, made once per distinct name and kept for the life
/// of the process, so that spans share it instead of each copying it.
///
/// Only for names from a bounded set: the bus's endpoints and its message types' exchanges
/// (a send's destination can be any address, such as a requester's temporary queue, and is
/// not interned).
pub(crate) fn span_name(entity: &str, operation: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Option<foldhash::HashSet<&'static str>>> = std::sync::Mutex::new(None);
    let name = [entity, " ", operation].concat();
    let mut names = NAMES.locked();
    let names = names.get_or_insert_with(Default::default);
    if let Some(known) = names.get(name.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.insert(leaked);
    leaked
}

fn in_context(parent: &Context, span: Option<Context>) -> MessageSpan {
    match span {
        Some(cx) => MessageSpan { cx, own: true },
        None => MessageSpan { cx: parent.clone(), own: false },
    }
}

fn id(id: Option<Uuid>) -> Option<StringValue> {
    // Encoded straight into a buffer: `to_string` goes through the formatting machinery.
    id.map(|u| StringValue::from(u.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned()))
}

/// How many ids [`message_ids`] can give.
const MESSAGE_IDS: usize = 5;

/// The ids every recorded span of one message carries.
fn message_ids(envelope: &Envelope) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(MESSAGE_IDS);
    let ids: [_; MESSAGE_IDS] = [
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
    attributes
}

/// The attributes a span is created with, which samplers see: those the messaging
/// conventions call sampling-relevant, and the message's types (a sampler may drop
/// heartbeats by type): `types` when they are known as the bus's own (static) names, else
/// the envelope's.
fn sampling_attributes(
    system: &'static str,
    destination: StringValue,
    operation: &'static str,
    envelope: &Envelope,
    types: Option<&[&'static str]>,
) -> Vec<KeyValue> {
    // Room for the types and the message's ids too: a span that records gets the ids added,
    // and growing the list then would copy it.
    let mut attributes = common(system, destination, operation, COMMON + 1 + MESSAGE_IDS);
    let types = match (types, envelope.message_type.as_slice()) {
        // A static name is shared, not copied.
        (Some([one]), _) => StringValue::from(*one),
        (Some(many), _) => StringValue::from(many.join(",")),
        (None, [one]) => StringValue::from(one.clone()),
        (None, many) => StringValue::from(many.join(",")),
    };
    attributes.push(KeyValue::new("messaging.masstransit.message_types", types));
    attributes
}

/// How many attributes [`common`] gives.
const COMMON: usize = 3;

/// The attributes of every span: system, destination and operation, in a list with room for
/// `capacity`.
fn common(system: &'static str, destination: StringValue, operation: &'static str, capacity: usize) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(capacity);
    attributes.push(KeyValue::new("messaging.system", system));
    attributes.push(KeyValue::new("messaging.destination.name", destination));
    attributes.push(KeyValue::new("messaging.operation", operation));
    attributes
}

/// Where a message goes, for its send span.
pub(crate) struct SendDestination<'a> {
    /// The destination's name.
    pub(crate) entity: &'a str,
    /// For a destination of a bounded set (see [`span_name`]): its span name, and its name
    /// shared as the span's attribute.
    pub(crate) shared: Option<(&'static str, &'a Arc<str>)>,
}

/// `{destination} send`: a message leaving (publish or send), child of the current context.
pub(crate) fn send_span(
    tracer: &BusTracer,
    system: &'static str,
    destination: SendDestination<'_>,
    operation: &'static str,
    envelope: &Envelope,
    types: &'static [&'static str],
) -> MessageSpan {
    let parent = Context::current();
    let SendDestination { entity, shared } = destination;
    let span = tracer.start(
        SpanKind::Producer,
        &parent,
        Vec::new(),
        || shared.map_or_else(|| Cow::Owned([entity, " send"].concat()), |(name, _)| Cow::Borrowed(name)),
        || {
            let value =
                shared.map_or_else(|| StringValue::from(entity.to_owned()), |(_, v)| StringValue::from(v.clone()));
            sampling_attributes(system, value, operation, envelope, Some(types))
        },
        || message_ids(envelope),
    );
    in_context(&parent, span)
}

/// What an endpoint's spans are named and attributed with, made once per endpoint.
#[derive(Debug)]
pub(crate) struct EndpointSpans {
    destination: Arc<str>,
    receive: &'static str,
    process: &'static str,
}

impl EndpointSpans {
    pub(crate) fn new(endpoint: &str) -> Self {
        EndpointSpans {
            destination: Arc::from(endpoint),
            receive: span_name(endpoint, "receive"),
            process: span_name(endpoint, "process"),
        }
    }
}

/// `{endpoint} receive`: a delivery arriving, child of (or linked to) its producer's span.
/// `known_type` gives the envelope's one message type as the endpoint's own name for it,
/// when the endpoint consumes it: shared instead of copied.
pub(crate) fn receive_span(
    tracer: &BusTracer,
    system: &'static str,
    endpoint: &EndpointSpans,
    envelope: &Envelope,
    known_type: impl FnOnce() -> Option<&'static str>,
    producer: Producer,
) -> MessageSpan {
    let Producer { parent, link } = producer;
    let links = link.map(|remote| vec![Link::with_context(remote)]).unwrap_or_default();
    let span = tracer.start(
        SpanKind::Consumer,
        &parent,
        links,
        || Cow::Borrowed(endpoint.receive),
        || {
            let destination = StringValue::from(endpoint.destination.clone());
            sampling_attributes(
                system,
                destination,
                "receive",
                envelope,
                known_type().as_ref().map(std::slice::from_ref),
            )
        },
        || message_ids(envelope),
    );
    in_context(&parent, span)
}

/// `{endpoint} process`: one consumer handling the message, child of the receive span;
/// sagas add `saga.id`, `saga.begin_state` and `saga.end_state` to it.
///
/// Under a receive span that was sampled out, none is built: every sampler the standard
/// `OTEL_TRACES_SAMPLER` settings name decides a child as its parent (parent-based) or as
/// its trace id (ratio) was decided, so it would be sampled out too. (A sampler of your own
/// that drops receive spans but keeps process spans gets neither.) The consumer runs under
/// the receive span's context, which carries the decision on to what it sends.
pub(crate) fn process_span(
    tracer: &BusTracer,
    receive: &MessageSpan,
    system: &'static str,
    endpoint: &EndpointSpans,
    consumer: &'static str,
) -> MessageSpan {
    let receiving = receive.cx.span();
    if receiving.span_context().is_valid() && !receiving.is_recording() {
        return receive.clone();
    }
    let span = tracer.start(
        SpanKind::Consumer,
        &receive.cx,
        Vec::new(),
        || Cow::Borrowed(endpoint.process),
        || {
            let mut attributes = common(system, StringValue::from(endpoint.destination.clone()), "process", COMMON + 1);
            attributes.push(KeyValue::new("messaging.masstransit.consumer_type", consumer));
            attributes
        },
        Vec::new,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_name_is_made_once_and_shared() {
        let first = span_name("orders", "receive");
        assert_eq!(first, "orders receive");
        assert!(std::ptr::eq(first, span_name("orders", "receive")), "the same name is not made twice");
        assert_eq!(span_name("orders", "process"), "orders process");
    }
}
