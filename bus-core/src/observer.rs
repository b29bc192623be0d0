//! Hooks to watch what a bus does; every hook has an empty default.

use crate::{ConsumeError, Envelope, TransportMessage};

/// Watches a bus: the test harness records with it; metrics and logs can hook in too.
///
/// Hooks run inline on the message path: keep them short and never block.
#[allow(unused_variables)]
pub trait BusObserver: Send + Sync + 'static {
    /// A message was published (after the transport took it).
    fn on_publish(&self, envelope: &Envelope) {}

    /// A message was sent to `destination` (after the transport took it).
    fn on_send(&self, destination: &str, envelope: &Envelope) {}

    /// A consumer on `endpoint` consumed a message successfully.
    fn on_consumed(&self, endpoint: &str, consumer_type: &str, envelope: &Envelope) {}

    /// A consumer on `endpoint` failed its last attempt at a message.
    fn on_consume_fault(&self, endpoint: &str, consumer_type: &str, envelope: &Envelope, error: &ConsumeError) {}

    /// A message was moved to `queue` (`_error` or `_skipped`) for `reason`.
    fn on_dead_letter(&self, queue: &str, reason: &str, message: &TransportMessage) {}
}
