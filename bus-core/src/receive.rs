//! The receive path of one endpoint: delivery -> envelope -> consumers -> settlement.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::{FutureExt as _, StreamExt};
use opentelemetry::trace::FutureExt as _;
use opentelemetry::KeyValue;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::ReceiveState;
use crate::dead_letter::{self, truncate};
use crate::endpoint::{Endpoint, EndpointInfo, EndpointSettings};
use crate::headers::names;
use crate::logged::escaped;
use crate::middleware::{panic_message, CatchPanic, ConcurrencyLimit, Middleware, Pipeline, Retry, Timeout};
use crate::observer::guarded;
use crate::outbox::Outbox;
use crate::stalled_moves::{MoveRetry, StalledMoves};
use crate::telemetry::{self, metrics::ConsumerAttributes};
use crate::{
    Bus, ConsumeError, ConsumeErrorKind, Delivery, DeliveryStream, EndpointTopology, Envelope, Error, Headers,
    ReceiveContext, Settlement, TransportMessage,
};

#[derive(Debug)]
struct ConsumerEntry {
    consumer_type: &'static str,
    concurrency_limit: Option<usize>,
    /// The message type it consumes (its URN).
    message_type: &'static str,
    pipeline: Pipeline,
    attributes: ConsumerAttributes,
}

/// A configured endpoint, ready to consume.
#[derive(Debug)]
pub(crate) struct EndpointRuntime {
    pub(crate) topology: EndpointTopology,
    info: Arc<EndpointInfo>,
    settings: EndpointSettings,
    consumers: Vec<ConsumerEntry>,
    /// foldhash: looked up for every delivery; a fixed table, so keys from the wire cannot
    /// grow it.
    by_type: foldhash::HashMap<&'static str, Vec<usize>>,
    system: &'static str,
    endpoint_attributes: [KeyValue; 1],
    /// The names and destination attribute of its spans, made once.
    spans: telemetry::EndpointSpans,
    /// Moves to `_error`, `_skipped` or a delay queue that failed, to try again.
    stalled: StalledMoves,
}

impl EndpointRuntime {
    pub(crate) fn new(name: String, endpoint: Endpoint, address: String, system: &'static str) -> Self {
        let Endpoint { settings, middleware, consumers: registrations, .. } = endpoint;
        let mut consumers = Vec::with_capacity(registrations.len());
        let mut by_type: foldhash::HashMap<&'static str, Vec<usize>> = foldhash::HashMap::default();
        let mut message_types = Vec::new();
        for (index, registration) in registrations.into_iter().enumerate() {
            let config = registration.options;
            let mut stack: Vec<Arc<dyn Middleware>> = Vec::new();
            if let Some(limit) = config.concurrency_limit {
                stack.push(Arc::new(ConcurrencyLimit::new(limit)));
            }
            stack.extend(middleware.iter().cloned());
            stack.extend(config.middleware);
            stack.push(Arc::new(Retry(config.retry.unwrap_or_else(|| settings.retry.clone()))));
            if let Some(timeout) = config.timeout {
                stack.push(Arc::new(Timeout(timeout)));
            }
            stack.push(Arc::new(CatchPanic));
            consumers.push(ConsumerEntry {
                consumer_type: registration.consumer_type,
                concurrency_limit: config.concurrency_limit,
                message_type: registration.message_type,
                pipeline: Pipeline::new(stack, registration.consumer),
                attributes: ConsumerAttributes::new(&name, registration.message_type, registration.consumer_type),
            });
            by_type.entry(registration.message_type).or_default().push(index);
            if !message_types.iter().any(|t| t == registration.message_type) {
                message_types.push(registration.message_type.to_owned());
            }
        }
        let topology = EndpointTopology {
            queue: name.clone(),
            message_types,
            redelivery_delays: settings.redelivery.delays().to_vec(),
            temporary: false,
            prefetch: settings.prefetch,
        };
        let endpoint_attributes = [KeyValue::new("endpoint", name.clone())];
        EndpointRuntime {
            spans: telemetry::EndpointSpans::new(&name),
            topology,
            info: Arc::new(EndpointInfo { name, address }),
            settings,
            consumers,
            by_type,
            system,
            endpoint_attributes,
            stalled: StalledMoves::default(),
        }
    }

    /// Takes deliveries until `stop_taking` fires; each runs on its own task, at most
    /// `concurrency` at once, tracked by `tracker` so that stop can wait for them.
    pub(crate) async fn run(
        self: Arc<Self>,
        bus: Bus,
        mut deliveries: DeliveryStream,
        stop_taking: CancellationToken,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let limit = Arc::new(Semaphore::new(self.settings.concurrency().clamp(1, Semaphore::MAX_PERMITS)));
        loop {
            let permit = tokio::select! {
                biased;
                () = stop_taking.cancelled() => break,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let delivery = tokio::select! {
                biased;
                () = stop_taking.cancelled() => break,
                next = deliveries.next() => match next {
                    Some(delivery) => delivery,
                    None => {
                        tracing::warn!(endpoint = %self.info.name, "delivery stream ended; endpoint no longer consuming");
                        break;
                    }
                },
            };
            let endpoint = self.clone();
            let bus = bus.clone();
            let cancel = cancel.clone();
            // Boxed: the consume future is large, and a task moves its future several times
            // (into the task, out when it finishes); a box is moved instead.
            tracker.spawn(Box::pin(async move {
                endpoint.handle(&bus, delivery, cancel).await;
                drop(permit);
            }));
        }
    }

    async fn handle(&self, bus: &Bus, delivery: Delivery, cancel: CancellationToken) {
        // Only a delivery that came back (requeued when its move failed) can owe a move: the
        // same message sent anew (moved back from `_error`, say) is consumed as usual.
        if delivery.redelivered() {
            if let Some(retry) = self.stalled.find(delivery.message()) {
                return self.move_again(delivery, retry, cancel).await;
            }
        }
        // Panics in consumers, middleware and observers are caught where they happen; this
        // is the net under the rest (send middleware on a fault, say). Dropped unsettled, the
        // delivery would come straight back and panic again, for ever.
        let processed = AssertUnwindSafe(self.process(bus, &delivery, cancel.clone())).catch_unwind().await;
        let settlement = match processed {
            Ok(settlement) => settlement,
            Err(panic) => {
                let reason = format!("the bus panicked handling the message: {}", panic_message(&*panic));
                let error = Error::Configuration(reason);
                self.unreadable(bus, delivery.message(), "Panic", &error)
            }
        };
        self.settle(delivery, settlement).await;
    }

    /// Settles `delivery`; a move that fails is remembered, so that the message is moved
    /// again (not consumed again) when it comes back.
    async fn settle(&self, delivery: Delivery, settlement: Settlement) {
        if !delivery.is_live() {
            // Its channel closed: the broker has requeued it already and delivers it again.
            tracing::debug!(endpoint = %self.info.name, "delivery's channel closed before it was settled; the broker delivers it again");
            return;
        }
        let moving = matches!(settlement, Settlement::MoveTo { .. } | Settlement::Redeliver { .. });
        let key = moving.then(|| StalledMoves::key(delivery.message()));
        if let Some(key) = key {
            self.stalled.moving(key, settlement.clone());
        }
        match (delivery.settle(settlement).await, key) {
            (Ok(()), Some(key)) => self.stalled.done(key),
            (Ok(()), None) => {}
            (Err(error), Some(key)) => {
                // Back in its queue: when it returns, the same move is tried after a pause.
                tracing::warn!(endpoint = %self.info.name, %error, "could not move a message; it went back to its queue and the move is tried again later");
                self.stalled.failed(key, error.to_string());
            }
            (Err(error), None) => {
                // The transport keeps the delivery unacknowledged; the broker delivers it again.
                tracing::warn!(endpoint = %self.info.name, %error, "could not settle a delivery");
            }
        }
    }

    /// A message whose move failed before is back: the move is tried again once its pause is
    /// over, without consuming the message again (its consumers ran, its fault went out).
    async fn move_again(&self, delivery: Delivery, retry: MoveRetry, cancel: CancellationToken) {
        tokio::select! {
            () = tokio::time::sleep_until(retry.retry_at) => {}
            // Stopping: dropped unsettled, it goes back to its queue.
            () = cancel.cancelled() => return,
        }
        tracing::debug!(endpoint = %self.info.name, key = retry.key, "trying a failed move again");
        self.settle(delivery, retry.settlement).await;
    }

    async fn process(&self, bus: &Bus, delivery: &Delivery, cancel: CancellationToken) -> Settlement {
        let inner = &bus.inner;
        let message = delivery.message();
        if message.body.len() > self.settings.max_message_size {
            let error = Error::MessageTooLarge { size: message.body.len(), limit: self.settings.max_message_size };
            return self.unreadable(bus, message, dead_letter::unreadable_type(&error), &error);
        }
        let envelope = match inner.serializers.deserialize(message) {
            Ok(envelope) => envelope,
            Err(error) => return self.unreadable(bus, message, dead_letter::unreadable_type(&error), &error),
        };
        let always_link = self.settings.trace_propagation == crate::TracePropagation::Link;
        let producer = telemetry::extract_producer(&envelope.headers, always_link);
        // Looked up only when a span is built.
        let known_type = || match envelope.message_type.as_slice() {
            [one] => self.by_type.get_key_value(one.as_str()).map(|(known, _)| *known),
            _ => None,
        };
        let span = telemetry::receive_span(&inner.tracer, self.system, &self.spans, &envelope, known_type, producer);
        let settlement =
            self.consume(bus, delivery, envelope, cancel, &span).with_context(span.context().clone()).await;
        span.end();
        settlement
    }

    async fn consume(
        &self,
        bus: &Bus,
        delivery: &Delivery,
        envelope: Envelope,
        cancel: CancellationToken,
        receive: &telemetry::MessageSpan,
    ) -> Settlement {
        let inner = &bus.inner;
        let message = delivery.message();
        let matched = self.matching_consumers(&envelope);
        if matched.is_empty() {
            tracing::debug!(endpoint = %self.info.name, types = ?envelope.message_type, "no consumer for message; moved to skipped");
            return self.skip(bus, message);
        }
        let redelivery_count =
            message.headers.get_i64(names::REDELIVERY_COUNT).and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        if let Some(sent) = envelope.sent_time {
            if let Ok(latency) = (chrono::Utc::now() - sent).to_std() {
                inner.metrics.delivery_latency.record(latency.as_secs_f64(), &self.endpoint_attributes);
            }
        }
        let state = Arc::new(ReceiveState {
            envelope,
            endpoint: self.info.clone(),
            bus: bus.clone(),
            redelivery_count,
            cancel,
        });
        // The outbox of each consumer that succeeded, released once all of them have.
        let mut succeeded = Vec::with_capacity(matched.len());
        for index in matched {
            let entry = &self.consumers[index];
            let outbox = Outbox::new(self.settings.outbox);
            let ctx = ReceiveContext::new(state.clone(), entry.consumer_type, outbox.clone());
            let span = telemetry::process_span(&inner.tracer, receive, self.system, &self.spans, entry.consumer_type);
            inner.metrics.in_flight.add(1, &self.endpoint_attributes);
            let started = std::time::Instant::now();
            // The consumer's own panics are caught innermost; one in middleware is a failed
            // attempt too, rather than a dropped delivery that comes straight back, for ever.
            let attempt = entry.pipeline.run(ctx).with_context(span.context().clone());
            let result = match AssertUnwindSafe(attempt).catch_unwind().await {
                Ok(result) => result,
                Err(panic) => Err(ConsumeError::panicked(panic_message(&*panic))),
            };
            if let Err(error) = &result {
                if error.kind() != ConsumeErrorKind::Skipped {
                    span.record_error(error);
                    receive.record_error(error);
                }
            }
            span.end();
            inner.metrics.in_flight.add(-1, &self.endpoint_attributes);
            inner.metrics.consume_duration.record(started.elapsed().as_secs_f64(), &entry.attributes.full);
            match result {
                Ok(()) => {
                    inner.metrics.consumed.add(1, &entry.attributes.full);
                    for observer in &inner.observers {
                        guarded(|| observer.on_consumed(&self.info.name, entry.consumer_type, &state.envelope));
                    }
                    succeeded.push((index, outbox));
                }
                Err(error) => {
                    outbox.discard();
                    return self.failed(bus, &state, delivery, entry, error).await;
                }
            }
        }
        let release =
            succeeded.iter().flat_map(|(index, outbox)| outbox.release().into_iter().map(move |o| (*index, o)));
        for (index, outgoing) in release.collect::<Vec<_>>() {
            if let Err(error) = inner.dispatch(outgoing).await {
                // Consumed, but what it produced did not all leave: a failed attempt like any
                // other, so that redelivery counts it and `_error` ends it. (Requeued as it
                // was, a message whose consumer sends to an endpoint that does not exist came
                // back at once, for ever.) Messages already released leave again: at least once.
                let kind = if error.is_transient() { ConsumeErrorKind::Failed } else { ConsumeErrorKind::Permanent };
                let error = ConsumeError::new(kind, "OutboxDeliveryException", error);
                return self.failed(bus, &state, delivery, &self.consumers[index], error).await;
            }
        }
        Settlement::Ack
    }

    /// What in this endpoint's settings cannot work, if anything.
    pub(crate) fn configuration_error(&self) -> Option<String> {
        let limits = std::iter::once(("the endpoint", self.settings.concurrency))
            .chain(self.consumers.iter().map(|c| (c.consumer_type, c.concurrency_limit)));
        for (what, limit) in limits {
            match limit {
                Some(0) => return Some(format!("endpoint `{}`: {what}'s concurrency limit is 0", self.info.name)),
                Some(n) if n > Semaphore::MAX_PERMITS => {
                    return Some(format!(
                        "endpoint `{}`: {what}'s concurrency limit {n} is over the most that can be counted ({})",
                        self.info.name,
                        Semaphore::MAX_PERMITS
                    ))
                }
                _ => {}
            }
        }
        None
    }

    /// Why the endpoint is degraded, from the bus's side: moves it cannot complete.
    pub(crate) fn health_reason(&self) -> Option<String> {
        self.stalled.health_reason()
    }

    fn matching_consumers(&self, envelope: &Envelope) -> Vec<usize> {
        // A raw JSON message without a type is offered to every consumer, as MassTransit does.
        if envelope.message_type.is_empty() {
            return (0..self.consumers.len()).collect();
        }
        let mut matched = Vec::with_capacity(1);
        for urn in &envelope.message_type {
            if let Some(indexes) = self.by_type.get(urn.as_str()) {
                for index in indexes {
                    if !matched.contains(index) {
                        matched.push(*index);
                    }
                }
            }
        }
        matched
    }

    async fn failed(
        &self,
        bus: &Bus,
        state: &ReceiveState,
        delivery: &Delivery,
        entry: &ConsumerEntry,
        error: ConsumeError,
    ) -> Settlement {
        let consumer_type = entry.consumer_type;
        let inner = &bus.inner;
        let message = delivery.message();
        if error.kind() == ConsumeErrorKind::Skipped {
            tracing::debug!(endpoint = %self.info.name, reason = %error, "consumer skipped the message");
            return self.skip(bus, message);
        }
        for observer in &inner.observers {
            guarded(|| observer.on_consume_fault(&self.info.name, consumer_type, &state.envelope, &error));
        }
        if state.cancel.is_cancelled() {
            // The bus is stopping: the attempt was cut short, not failed; deliver it again later.
            return Settlement::Requeue;
        }
        if !delivery.is_live() {
            // The broker has put it back in its queue already: its next delivery is the one
            // that redelivers, faults or moves it. Doing it here too would make two.
            tracing::warn!(endpoint = %self.info.name, message_id = state.envelope.message_id.map(tracing::field::display),
                %error, "consume failed after the delivery's channel closed; the broker delivers it again");
            return Settlement::Requeue;
        }
        if error.is_retryable() {
            if let Some(delay) = self.settings.redelivery.delay_after(state.redelivery_count) {
                let mut headers = Headers::new();
                headers.insert(names::REDELIVERY_COUNT, state.redelivery_count + 1);
                inner.metrics.redeliveries.add(1, &self.endpoint_attributes);
                let redelivery = state.redelivery_count + 1;
                telemetry::current_event("redelivery", || {
                    vec![
                        KeyValue::new("redelivery.count", i64::from(redelivery)),
                        KeyValue::new("redelivery.delay_ms", i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                    ]
                });
                tracing::info!(endpoint = %self.info.name, message_id = state.envelope.message_id.map(tracing::field::display),
                    message_type = state.envelope.message_type.first().map(String::as_str),
                    trace_id = telemetry::current_trace_id(), ?delay, redelivery, %error,
                    "consume failed; redelivering later");
                return Settlement::Redeliver { delay, headers };
            }
        }
        inner.metrics.failed.add(1, &entry.attributes.full);
        tracing::error!(endpoint = %self.info.name, message_id = state.envelope.message_id.map(tracing::field::display),
            message_type = state.envelope.message_type.first().map(String::as_str), consumer = consumer_type,
            trace_id = telemetry::current_trace_id(), %error, "consume failed; moved to the error queue");
        if let Err(fault_error) =
            inner.emit_fault(&state.envelope, entry.message_type, &error, consumer_type, &self.info.address).await
        {
            tracing::warn!(endpoint = %self.info.name, error = %fault_error, "could not emit the fault");
        }
        let mut headers = dead_letter::fault_headers(bus, &self.info.address, error.exception_type(), error.message());
        headers.insert("MT-Fault-ConsumerType", consumer_type);
        // From the wire: bounded, so that the move to `_error` always fits the broker's frame.
        let failed_type = state.envelope.message_type.first().map_or(String::new(), |t| escaped(t, 1024).into_owned());
        headers.insert("MT-Fault-MessageType", failed_type);
        headers.insert("MT-Fault-RetryCount", error.retry_count());
        // Rust errors carry no stack trace; the cause chain is what says where it came from.
        let causes = error.causes();
        let trace = if causes.is_empty() {
            format!("{}: {}", error.exception_type(), error.message())
        } else {
            format!("{}: {}\n{causes}", error.exception_type(), error.message())
        };
        headers.insert("MT-Fault-StackTrace", truncate(&trace, 4096));
        let queue = self.topology.error_queue();
        dead_letter::notify(bus, &queue, error.message(), message);
        Settlement::MoveTo { queue, headers }
    }

    /// A message that cannot be read at all: straight to `_error`, never retried, no fault
    /// (there is no message to put in one).
    fn unreadable(&self, bus: &Bus, message: &TransportMessage, exception_type: &str, error: &Error) -> Settlement {
        dead_letter::unreadable(bus, &self.topology, &self.info.address, message, exception_type, error)
    }

    fn skip(&self, bus: &Bus, message: &TransportMessage) -> Settlement {
        dead_letter::skipped(bus, &self.topology, message)
    }
}
