//! Dispatch: one delivery read, handed to the consumers of its type, and what came of it.

use std::sync::Arc;

use super::{EndpointRun, EndpointRuntime};
use crate::context::ReceiveState;
use crate::headers::names;
use crate::middleware::Pipeline;
use crate::outbox::Outbox;
use crate::telemetry::metrics::ConsumerAttributes;
use crate::telemetry::MessageSpan;
use crate::{Bus, ConsumeError, ConsumeErrorKind, Delivery, Envelope, Error, ReceiveContext};

/// One consumer of an endpoint, with its pipeline.
#[derive(Debug)]
pub(crate) struct ConsumerEntry {
    pub(crate) consumer_type: &'static str,
    pub(crate) concurrency_limit: Option<usize>,
    /// The message type it consumes (its URN); `None`: every message (the bus's response
    /// endpoint, whose one consumer completes the pending requests).
    pub(crate) message_type: Option<&'static str>,
    pub(crate) pipeline: Pipeline,
    pub(crate) attributes: ConsumerAttributes,
}

/// What came of a delivery.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every consumer succeeded, and what they produced has left.
    Consumed,
    /// It could not be read: too large, an unknown content type, not an envelope.
    Unreadable(Error),
    /// No consumer here takes it, or one skipped it.
    Skipped,
    /// A consumer failed its last attempt, or what it produced could not leave.
    Failed(Failure),
}

/// A consume that failed: the message as read, the consumer and the error.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) state: Arc<ReceiveState>,
    pub(crate) consumer: usize,
    pub(crate) error: ConsumeError,
}

impl EndpointRuntime {
    /// Reads a delivery into its envelope; bounded by the endpoint's size limit.
    pub(super) fn read(&self, bus: &Bus, delivery: &Delivery) -> Result<Envelope, Error> {
        let message = delivery.message();
        if message.body.len() > self.settings.max_message_size {
            return Err(Error::MessageTooLarge { size: message.body.len(), limit: self.settings.max_message_size });
        }
        let serializers = &bus.inner.serializers;
        match (&message.content_type, &self.settings.default_content_type) {
            (None, Some(default)) => serializers.for_content_type(Some(default))?.deserialize(message),
            _ => serializers.deserialize(message),
        }
    }

    /// What every consumer of this delivery shares: the envelope read, and where it came
    /// from. Made as soon as the envelope is read: the envelope then travels to the
    /// consumers behind one pointer, not moved from future to future.
    pub(super) fn receive_state(
        &self,
        run: &Arc<EndpointRun>,
        delivery: &Delivery,
        envelope: Envelope,
    ) -> Arc<ReceiveState> {
        let redelivery_count = delivery
            .message()
            .headers
            .get_i64(names::REDELIVERY_COUNT)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        Arc::new(ReceiveState { envelope, run: run.clone(), redelivery_count, redelivered: delivery.redelivered() })
    }

    /// Runs every consumer of the message, one after another; releases what they produced
    /// once all of them succeeded.
    pub(super) async fn dispatch(&self, bus: &Bus, state: Arc<ReceiveState>, receive: Option<&MessageSpan>) -> Outcome {
        let instruments = &bus.inner.instruments;
        let matched = self.matching_consumers(&state.envelope);
        if matched.is_empty() {
            tracing::debug!(endpoint = %self.info.name, types = ?state.envelope.message_type, "no consumer for message; moved to skipped");
            return Outcome::Skipped;
        }
        // The outbox of each consumer that succeeded, released once all of them have.
        let mut succeeded = Vec::with_capacity(matched.len());
        for index in matched {
            let entry = &self.consumers[index];
            let outbox = Outbox::new(self.settings.outbox);
            let ctx = ReceiveContext::new(state.clone(), entry.consumer_type, outbox.clone());
            let consuming = instruments.consuming(&self.instruments, receive, entry.consumer_type);
            let result = {
                use opentelemetry::trace::FutureExt as _;
                entry.pipeline.run(ctx).with_context(consuming.context()).await
            };
            instruments.consumed(&self.instruments, consuming, receive, &entry.attributes, &state.envelope, &result);
            match result {
                Ok(()) => succeeded.push((index, outbox)),
                Err(error) if error.kind() == ConsumeErrorKind::Skipped => return Outcome::Skipped,
                Err(error) => {
                    outbox.discard();
                    return Outcome::Failed(Failure { state, consumer: index, error });
                }
            }
        }
        let release =
            succeeded.iter().flat_map(|(index, outbox)| outbox.release().into_iter().map(move |o| (*index, o)));
        for (index, outgoing) in release.collect::<Vec<_>>() {
            // Boxed: most consumers publish nothing, and the transport's future would
            // otherwise be carried, and copied, by every delivery's.
            if let Err(error) = Box::pin(bus.inner.dispatch(outgoing)).await {
                // Consumed, but what it produced did not all leave: a failed attempt like any
                // other, so that redelivery counts it and `_error` ends it. (Requeued as it
                // was, a message whose consumer sends to an endpoint that does not exist would
                // come back at once, for ever.) Messages already released leave again: at
                // least once.
                let kind = if error.is_transient() { ConsumeErrorKind::Failed } else { ConsumeErrorKind::Permanent };
                let error = ConsumeError::new(kind, "OutboxDeliveryException", error);
                return Outcome::Failed(Failure { state, consumer: index, error });
            }
        }
        Outcome::Consumed
    }

    fn matching_consumers(&self, envelope: &Envelope) -> Vec<usize> {
        // A raw JSON message without a type is offered to every consumer, as MassTransit does.
        if envelope.message_type.is_empty() {
            return (0..self.consumers.len()).collect();
        }
        let mut matched = self.catch_all.clone();
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

    /// The endpoint's own name for a message type it consumes, shared rather than copied.
    pub(super) fn known_type(&self, envelope: &Envelope) -> Option<&'static str> {
        match envelope.message_type.as_slice() {
            [one] => self.by_type.get_key_value(one.as_str()).map(|(known, _)| *known),
            _ => None,
        }
    }
}
