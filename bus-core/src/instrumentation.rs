//! Everything the bus tells the outside about its messages, in one place: spans, metrics,
//! logs and observer calls. The message path calls a few hooks (received, consuming,
//! consumed or failed, redelivering, dead-lettered, sent) and knows nothing of what each does.

use crate::logged::chain;
use std::sync::Arc;
use std::time::Instant;

use opentelemetry::KeyValue;

use crate::observer::BusObserver;
use crate::outbox::Route;
use crate::telemetry::metrics::ConsumerAttributes;
use crate::telemetry::{self, BusMetrics, BusTracer, EndpointSpans, MessageSpan};
use crate::{ConsumeError, ConsumeErrorKind, Envelope, TransportMessage};

/// The bus's instruments and observers.
pub(crate) struct Instrumentation {
    pub(crate) metrics: BusMetrics,
    tracer: BusTracer,
    observers: Vec<Arc<dyn BusObserver>>,
    system: &'static str,
}

/// What one endpoint's spans and metrics are named and attributed with, made once.
#[derive(Debug)]
pub(crate) struct EndpointInstruments {
    name: String,
    spans: EndpointSpans,
    attributes: [KeyValue; 1],
    /// The bus's own (response) endpoint: its messages belong to the requests' spans and
    /// are not consumes an operator counts.
    quiet: bool,
}

impl EndpointInstruments {
    pub(crate) fn new(name: &str, quiet: bool) -> Self {
        EndpointInstruments {
            name: name.to_owned(),
            spans: EndpointSpans::new(name),
            attributes: [KeyValue::new("endpoint", name.to_owned())],
            quiet,
        }
    }
}

/// A consumer's attempt at a message under way: its span and when it started.
pub(crate) struct Consuming {
    span: Option<MessageSpan>,
    started: Instant,
}

impl Consuming {
    /// The context to run the consumer under, so that its own spans and messages are children.
    pub(crate) fn context(&self) -> opentelemetry::Context {
        self.span.as_ref().map_or_else(opentelemetry::Context::current, |span| span.context().clone())
    }
}

impl Instrumentation {
    pub(crate) fn new(
        metrics: BusMetrics,
        tracer: BusTracer,
        observers: Vec<Arc<dyn BusObserver>>,
        system: &'static str,
    ) -> Self {
        Instrumentation { metrics, tracer, observers, system }
    }

    /// Whether any observer is told of messages (and so needs their bodies).
    pub(crate) fn observed(&self) -> bool {
        !self.observers.is_empty()
    }

    /// Calls every observer; a panic in one is logged, not let through: on the consume path
    /// it would drop the delivery, which would come straight back and panic again.
    fn observe(&self, call: impl Fn(&dyn BusObserver)) {
        for observer in &self.observers {
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&**observer))) {
                tracing::error!(panic = %crate::middleware::panic_message(&*panic), "a bus observer panicked");
            }
        }
    }

    /// A message is about to leave: its `send` span, a child of the current context, and
    /// the trace headers that continue it written into the envelope.
    pub(crate) fn sending(
        &self,
        destination: telemetry::SendDestination<'_>,
        operation: &'static str,
        envelope: &mut Envelope,
        types: &'static [&'static str],
    ) -> MessageSpan {
        let span = telemetry::send_span(&self.tracer, self.system, destination, operation, envelope, types);
        if span.is_traced() {
            telemetry::inject(span.context(), &mut envelope.headers);
        }
        span
    }

    /// A publish or send is over (taken by the transport, held in an outbox, or failed).
    pub(crate) fn send_done(&self, span: MessageSpan, result: &crate::Result<()>) {
        if let Err(error) = result {
            span.record_exception("SendException", &crate::logged::chain(error).to_string());
        }
        span.end();
    }

    /// A message left through the transport.
    pub(crate) fn sent(&self, route: &Route, envelope: &Envelope) {
        let message_type = || KeyValue::new("message_type", envelope.message_type.first().cloned().unwrap_or_default());
        match route {
            Route::Publish(types) => {
                let attribute = match types.first_static() {
                    Some(first) => KeyValue::new("message_type", first),
                    None => message_type(),
                };
                self.metrics.published.add(1, &[attribute]);
                self.observe(|o| o.on_publish(envelope));
            }
            Route::Send(destination) => {
                self.metrics.sent.add(1, &[message_type()]);
                self.observe(|o| o.on_send(destination, envelope));
            }
        }
    }

    /// A delivery was read: its `receive` span, continuing its producer's trace.
    pub(crate) fn received(
        &self,
        endpoint: &EndpointInstruments,
        envelope: &Envelope,
        link: bool,
        known_type: impl FnOnce() -> Option<&'static str>,
    ) -> Option<MessageSpan> {
        if endpoint.quiet {
            return None;
        }
        if let Some(sent) = envelope.sent_time {
            if let Ok(latency) = (chrono::Utc::now() - sent).to_std() {
                self.metrics.delivery_latency.record(latency.as_secs_f64(), &endpoint.attributes);
            }
        }
        let producer = telemetry::extract_producer(&envelope.headers, link);
        Some(telemetry::receive_span(&self.tracer, self.system, &endpoint.spans, envelope, known_type, producer))
    }

    /// The receive span of a delivery is over.
    pub(crate) fn receive_done(&self, span: Option<MessageSpan>) {
        if let Some(span) = span {
            span.end();
        }
    }

    /// A consumer starts on a message.
    pub(crate) fn consuming(
        &self,
        endpoint: &EndpointInstruments,
        receive: Option<&MessageSpan>,
        consumer_type: &'static str,
    ) -> Consuming {
        let span = receive.filter(|_| !endpoint.quiet).map(|receive| {
            self.metrics.in_flight.add(1, &endpoint.attributes);
            telemetry::process_span(&self.tracer, receive, self.system, &endpoint.spans, consumer_type)
        });
        Consuming { span, started: Instant::now() }
    }

    /// A consumer is done with a message (its retries included).
    pub(crate) fn consumed(
        &self,
        endpoint: &EndpointInstruments,
        consuming: Consuming,
        receive: Option<&MessageSpan>,
        consumer: &ConsumerAttributes,
        envelope: &Envelope,
        result: &Result<(), ConsumeError>,
    ) {
        let Consuming { span, started } = consuming;
        if let Some(span) = span {
            if let Some(error) = result.as_ref().err().filter(|e| e.kind() != ConsumeErrorKind::Skipped) {
                span.record_error(error);
                if let Some(receive) = receive {
                    receive.record_error(error);
                }
            }
            span.end();
            self.metrics.in_flight.add(-1, &endpoint.attributes);
            self.metrics.consume_duration.record(started.elapsed().as_secs_f64(), &consumer.full);
        }
        match result {
            Ok(()) if !endpoint.quiet => {
                self.metrics.consumed.add(1, &consumer.full);
                self.observe(|o| o.on_consumed(&endpoint.name, consumer.consumer_type, envelope));
            }
            Ok(()) => {}
            Err(error) if error.kind() == ConsumeErrorKind::Skipped => {
                tracing::debug!(endpoint = %endpoint.name, reason = %error, "consumer skipped the message");
            }
            Err(error) => {
                self.observe(|o| o.on_consume_fault(&endpoint.name, consumer.consumer_type, envelope, error));
            }
        }
    }

    /// An in-process retry of a failed attempt is coming.
    pub(crate) fn retrying(
        &self,
        endpoint: &str,
        consumer_type: &'static str,
        envelope: &Envelope,
        retry: u32,
        delay: std::time::Duration,
        error: &ConsumeError,
    ) {
        let attributes = [KeyValue::new("endpoint", endpoint.to_owned()), KeyValue::new("consumer", consumer_type)];
        self.metrics.retries.add(1, &attributes);
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        telemetry::current_event("retry", || {
            vec![
                KeyValue::new("retry.attempt", i64::from(retry)),
                KeyValue::new("retry.delay_ms", delay_ms),
                KeyValue::new("exception.message", error.message().to_owned()),
            ]
        });
        tracing::info!(endpoint = %endpoint, message_id = envelope.message_id.map(tracing::field::display),
            message_type = envelope.message_type.first().map(String::as_str), consumer = consumer_type,
            trace_id = telemetry::current_trace_id(), retry.attempt = retry, retry.delay_ms = delay_ms,
            error = %chain(error), "consume failed; retrying");
    }

    /// A failed message goes back to its queue after `delay`.
    pub(crate) fn redelivering(
        &self,
        endpoint: &EndpointInstruments,
        envelope: &Envelope,
        redelivery: u32,
        delay: std::time::Duration,
        error: &ConsumeError,
    ) {
        self.metrics.redeliveries.add(1, &endpoint.attributes);
        telemetry::current_event("redelivery", || {
            vec![
                KeyValue::new("redelivery.count", i64::from(redelivery)),
                KeyValue::new("redelivery.delay_ms", i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            ]
        });
        tracing::info!(endpoint = %endpoint.name, message_id = envelope.message_id.map(tracing::field::display),
            message_type = envelope.message_type.first().map(String::as_str),
            trace_id = telemetry::current_trace_id(), ?delay, redelivery, error = %chain(error),
            "consume failed; redelivering later");
    }

    /// A consume failed for good: the message goes to `_error` with a fault.
    pub(crate) fn failed(
        &self,
        endpoint: &EndpointInstruments,
        consumer: &ConsumerAttributes,
        envelope: &Envelope,
        error: &ConsumeError,
    ) {
        self.metrics.failed.add(1, &consumer.full);
        tracing::error!(endpoint = %endpoint.name, message_id = envelope.message_id.map(tracing::field::display),
            message_type = envelope.message_type.first().map(String::as_str), consumer = consumer.consumer_type,
            trace_id = telemetry::current_trace_id(), error = %chain(error), "consume failed; moved to the error queue");
    }

    /// A message is being moved to `queue` (`_error`, `_skipped`) for `reason`.
    pub(crate) fn dead_lettered(&self, queue: &str, reason: &str, message: &TransportMessage) {
        self.observe(|o| o.on_dead_letter(queue, reason, message));
    }
}
