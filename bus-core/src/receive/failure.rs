//! The failure policy: what becomes of a message that was not consumed. A failed consume is
//! redelivered later while the endpoint's redelivery policy allows, else it goes to `_error`
//! with the reason in its headers and a `Fault<T>` goes to whoever waits for one; a message
//! that cannot be read goes to `_error` unread; one nobody takes goes to `_skipped`.

use super::dispatch::{Failure, Outcome};
use super::EndpointRuntime;
use crate::bus::BusInner;
use crate::envelope::format_time;
use crate::fault::{fault_urn, ExceptionInfo, Fault, FAULT_URN};
use crate::flow::kill_switch::Verdict;
use crate::headers::names;
use crate::logged::chain;
use crate::logged::escaped;
use crate::message::entity_name as type_entity_name;
use crate::outbox::{MessageTypes, Route};
use crate::serializer::MassTransitJsonSerializer;
use crate::{address, Bus, ConsumeError, Delivery, Envelope, Error, Headers, Result, Settlement, TransportMessage};

/// The largest header value copied onto a fault, and the most copied in all: the headers
/// came from the wire, and a fault that does not fit in the broker's frame would be lost.
const FAULT_HEADER_VALUE_LIMIT: usize = 4096;
const FAULT_HEADERS_LIMIT: usize = 16 * 1024;

impl EndpointRuntime {
    /// How a delivery with this outcome is settled.
    /// `epoch`: the kill switch's subscription the delivery came from.
    pub(super) async fn settlement_for(
        &self,
        bus: &Bus,
        delivery: &Delivery,
        outcome: Outcome,
        epoch: u64,
    ) -> Settlement {
        match outcome {
            Outcome::Consumed => {
                if let Some(kill_switch) = self.kill_switch() {
                    kill_switch.succeeded(epoch);
                }
                Settlement::Ack
            }
            Outcome::Skipped => self.skip(bus, delivery.message()),
            Outcome::Unreadable(error) => self.unreadable(bus, delivery.message(), unreadable_type(&error), &error),
            // Boxed: the failure path (faults, redelivery, moves) is a large future that every
            // delivery's task would otherwise carry, and copy, on the way to an ack.
            Outcome::Failed(failure) => Box::pin(self.failed(bus, delivery, failure, epoch)).await,
        }
    }

    async fn failed(&self, bus: &Bus, delivery: &Delivery, failure: Failure, epoch: u64) -> Settlement {
        let Failure { state, consumer, error } = failure;
        let entry = &self.consumers[consumer];
        let instruments = &bus.inner.instruments;
        if state.cancel().is_cancelled() {
            // The bus is stopping: the attempt was cut short, not failed; deliver it again later.
            return Settlement::Requeue;
        }
        if !delivery.is_live() {
            // The broker has put it back in its queue already: its next delivery is the one
            // that redelivers, faults or moves it. Doing it here too would make two.
            tracing::warn!(endpoint = %self.info.name, message_id = state.envelope.message_id.map(tracing::field::display),
                error = %chain(&error), "consume failed after the delivery's channel closed; the broker delivers it again");
            return Settlement::Requeue;
        }
        if let Some(kill_switch) = self.kill_switch() {
            match kill_switch.failed(epoch, &error) {
                Verdict::FailurePath => {}
                // The endpoint stops: the message waits in its queue for it to start again.
                Verdict::Requeue => return Settlement::Requeue,
                Verdict::ToBack => {
                    return Settlement::MoveTo { queue: self.topology.queue.clone(), headers: Headers::new() }
                }
            }
        }
        if error.is_retryable() {
            if let Some(delay) = self.settings.redelivery.delay_after(state.redelivery_count) {
                let redelivery = state.redelivery_count + 1;
                instruments.redelivering(&self.instruments, &state.envelope, redelivery, delay, &error);
                let mut headers = Headers::new();
                headers.insert(names::REDELIVERY_COUNT, redelivery);
                return Settlement::Redeliver { delay, headers };
            }
        }
        instruments.failed(&self.instruments, &entry.attributes, &state.envelope, &error);
        let consumed_type = entry.message_type.unwrap_or_default();
        if let Err(fault_error) =
            bus.inner.emit_fault(&state.envelope, consumed_type, &error, entry.consumer_type, &self.info.address).await
        {
            tracing::warn!(endpoint = %self.info.name, error = %chain(&fault_error), "could not emit the fault");
        }
        let mut headers = fault_headers(&bus.inner, &self.info.address, error.exception_type(), error.message());
        headers.insert("MT-Fault-ConsumerType", entry.consumer_type);
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
        instruments.dead_lettered(&queue, error.message(), delivery.message());
        Settlement::MoveTo { queue, headers }
    }

    /// A message that cannot be read at all: straight to `_error` with the reason, never
    /// retried, no fault (there is no message to put in one).
    pub(super) fn unreadable(
        &self,
        bus: &Bus,
        message: &TransportMessage,
        exception_type: &str,
        error: &Error,
    ) -> Settlement {
        let reason = error.to_string();
        tracing::error!(endpoint = %self.info.name, message_id = message.message_id.map(tracing::field::display),
            content_type = message.content_type.as_deref().map(|c| tracing::field::display(escaped(c, 256))), reason = %escaped(&reason, 4096),
            "unreadable message moved to the error queue");
        let headers = fault_headers(&bus.inner, &self.info.address, exception_type, &reason);
        let queue = self.topology.error_queue();
        bus.inner.instruments.dead_lettered(&queue, &reason, message);
        Settlement::MoveTo { queue, headers }
    }

    /// A message nobody here consumes: to `_skipped`.
    fn skip(&self, bus: &Bus, message: &TransportMessage) -> Settlement {
        let queue = self.topology.skipped_queue();
        let mut headers = Headers::new();
        headers.insert(names::REASON, "dead-letter");
        bus.inner.instruments.dead_lettered(&queue, "dead-letter", message);
        Settlement::MoveTo { queue, headers }
    }
}

/// The headers of a message moved to `_error`: why, when, from where, and the host that
/// moved it, as MassTransit writes them.
fn fault_headers(bus: &BusInner, input_address: &str, exception_type: &str, message: &str) -> Headers {
    let mut headers = Headers::new();
    headers.insert(names::REASON, "fault");
    // Both may quote the wire (a content type, an address): escaped and bounded.
    headers.insert("MT-Fault-ExceptionType", escaped(exception_type, 1024).into_owned());
    headers.insert("MT-Fault-Message", escaped(message, 4096).into_owned());
    headers.insert("MT-Fault-Timestamp", format_time(&chrono::Utc::now()));
    headers.insert("MT-Fault-InputAddress", input_address);
    bus.host.to_fault_headers(&mut headers);
    headers
}

/// The exception type recorded for a message that could not be read because of `error`.
fn unreadable_type(error: &Error) -> &'static str {
    match error {
        Error::MessageTooLarge { .. } => "MessageTooLarge",
        Error::UnsupportedContentType(_) => "UnsupportedContentType",
        _ => "SerializationException",
    }
}

/// At most `max` characters of `text`: headers are no place for a whole cause chain.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text.to_owned(),
    }
}

/// Copies the failed message's user headers onto its fault (see
/// [`is_flow_header`](crate::bus::is_flow_header)); values too large are left out, with a warning.
fn copy_flow_headers_to_fault(failed: &Headers, fault: &mut Headers) {
    let (mut budget, mut left_out) = (FAULT_HEADERS_LIMIT, 0usize);
    fault.add_absent(failed, |name, value| {
        if !crate::bus::is_flow_header(name) {
            return false;
        }
        let size = name.len() + crate::headers::value_len(value);
        if size > FAULT_HEADER_VALUE_LIMIT || size > budget {
            left_out += 1;
            return false;
        }
        budget -= size;
        true
    });
    if left_out > 0 {
        tracing::warn!(left_out, "headers too large to copy onto a fault were left out");
    }
}

impl BusInner {
    /// Publishes or sends one `Fault` for a message that finally failed: to its
    /// `faultAddress`, else its `responseAddress`, else published.
    ///
    /// The fault is typed by `consumed`, the message type of the consumer that failed, as
    /// MassTransit types it (`Fault<T>` of the consumer's `T`). The message's other types
    /// came from the wire: each would be a fault destination declared on the broker, so they
    /// are named only in its `faultMessageTypes`.
    async fn emit_fault(
        &self,
        failed: &Envelope,
        consumed: &str,
        error: &ConsumeError,
        consumer_type: &str,
        source_address: &str,
    ) -> Result<()> {
        let fault = Fault {
            fault_id: crate::id::new_id(),
            faulted_message_id: failed.message_id,
            timestamp: chrono::Utc::now(),
            exceptions: vec![ExceptionInfo {
                exception_type: error.exception_type().to_owned(),
                inner_exception: None,
                stack_trace: Some(error.causes()).filter(|s| !s.is_empty()),
                message: error.message().to_owned(),
                source: Some(consumer_type.to_owned()),
                data: None,
            }],
            host: (*self.host).clone(),
            fault_message_types: failed.message_type.clone(),
            message: &*failed.message,
        };
        let types = vec![fault_urn(consumed), FAULT_URN.to_owned()];
        let raw = serde_json::value::to_raw_value(&fault).map_err(Error::Serialize)?;
        let mut envelope = Envelope::new(types.clone(), raw);
        envelope.correlation_id = failed.correlation_id;
        envelope.request_id = failed.request_id;
        envelope.conversation_id = failed.conversation_id;
        // As MassTransit sets it on what a consume produces: the consumed message's
        // correlation id, else its request id (a saga finds its request's fault by it).
        envelope.initiator_id = failed.correlation_id.or(failed.request_id);
        envelope.source_address = Some(source_address.to_owned());
        envelope.host = Some(self.host.clone());
        copy_flow_headers_to_fault(&failed.headers, &mut envelope.headers);
        // The first of `faultAddress` and `responseAddress` that names an endpoint; one that
        // does not (it came from the wire) is skipped, not the end of the fault.
        let target = [failed.fault_address.as_deref(), failed.response_address.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|target| match address::entity_name(target) {
                Ok(name) => Some((target, name.to_owned())),
                Err(error) => {
                    tracing::warn!(address = target, error = %chain(&error), "fault address is not an endpoint; trying the next");
                    None
                }
            });
        let route = match target {
            Some((target, name)) => {
                envelope.destination_address = Some(target.to_owned());
                Route::Send(name)
            }
            None => {
                envelope.destination_address = Some(self.transport.address(&type_entity_name(&types[0])));
                Route::Publish(MessageTypes::Owned(types))
            }
        };
        // Always MassTransit JSON: a fault has no protobuf form, and a bus writing protobuf by
        // default would otherwise drop every fault (requesters then timed out).
        let outgoing = self.outgoing_with(route, envelope, &MassTransitJsonSerializer)?;
        self.dispatch(outgoing).await
    }
}
