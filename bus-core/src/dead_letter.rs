//! Where messages that cannot be consumed go: an endpoint's `_error` queue (unreadable or
//! failed) or its `_skipped` queue (nobody consumes them), with the reason in their headers.

use crate::envelope::format_time;
use crate::headers::names;
use crate::logged::escaped;
use crate::observer::guarded;
use crate::{Bus, EndpointTopology, Error, Headers, Settlement, TransportMessage};

/// The headers of a message moved to `_error`: why, when, from where, and the host that
/// moved it, as MassTransit writes them.
pub(crate) fn fault_headers(bus: &Bus, input_address: &str, exception_type: &str, message: &str) -> Headers {
    let mut headers = Headers::new();
    headers.insert(names::REASON, "fault");
    // Both may quote the wire (a content type, an address): escaped and bounded.
    headers.insert("MT-Fault-ExceptionType", escaped(exception_type, 1024).into_owned());
    headers.insert("MT-Fault-Message", escaped(message, 4096).into_owned());
    headers.insert("MT-Fault-Timestamp", format_time(&chrono::Utc::now()));
    headers.insert("MT-Fault-InputAddress", input_address);
    bus.inner.host.to_fault_headers(&mut headers);
    headers
}

/// A message that cannot be read at all: to `_error`, with the reason.
pub(crate) fn unreadable(
    bus: &Bus,
    topology: &EndpointTopology,
    input_address: &str,
    message: &TransportMessage,
    exception_type: &str,
    error: &Error,
) -> Settlement {
    let reason = error.to_string();
    tracing::error!(endpoint = %topology.queue, message_id = message.message_id.map(tracing::field::display),
        content_type = message.content_type.as_deref().map(|c| tracing::field::display(escaped(c, 256))), reason = %escaped(&reason, 4096),
        "unreadable message moved to the error queue");
    let headers = fault_headers(bus, input_address, exception_type, &reason);
    let queue = topology.error_queue();
    notify(bus, &queue, &reason, message);
    Settlement::MoveTo { queue, headers }
}

/// The exception type recorded for a message that could not be read because of `error`.
pub(crate) fn unreadable_type(error: &Error) -> &'static str {
    match error {
        Error::MessageTooLarge { .. } => "MessageTooLarge",
        Error::UnsupportedContentType(_) => "UnsupportedContentType",
        _ => "SerializationException",
    }
}

/// A message nobody here consumes: to `_skipped`.
pub(crate) fn skipped(bus: &Bus, topology: &EndpointTopology, message: &TransportMessage) -> Settlement {
    let queue = topology.skipped_queue();
    let mut headers = Headers::new();
    headers.insert(names::REASON, "dead-letter");
    notify(bus, &queue, "dead-letter", message);
    Settlement::MoveTo { queue, headers }
}

/// Tells the bus's observers that `message` is being moved to `queue` for `reason`.
pub(crate) fn notify(bus: &Bus, queue: &str, reason: &str, message: &TransportMessage) {
    for observer in &bus.inner.observers {
        guarded(|| observer.on_dead_letter(queue, reason, message));
    }
}

/// At most `max` characters of `text`: headers are no place for a whole cause chain.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text.to_owned(),
    }
}
