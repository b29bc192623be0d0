//! Recording what a bus does, and waiting on it with a timeout: the core of test harnesses.
//!
//! Works with any transport; `bus_inmemory::InMemoryTestHarness` wires it up in one line.

use crate::sync::MutexExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::observer::BusObserver;
use crate::{ConsumeError, Envelope, Message, TransportMessage};

/// How long waits on a [`MessageLog`] last by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// A wait on a [`MessageLog`] ended without its condition being met.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}")]
pub struct WaitTimeout {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub timeout: Duration,
}

#[derive(Debug)]
struct LogInner<T> {
    entries: Mutex<Vec<T>>,
    changed: watch::Sender<usize>,
}

/// An append-only log of recorded entries that tests can wait on.
#[derive(Debug)]
pub struct Log<T> {
    inner: Arc<LogInner<T>>,
}

impl<T> Clone for Log<T> {
    fn clone(&self) -> Self {
        Log { inner: self.inner.clone() }
    }
}

impl<T> Default for Log<T> {
    fn default() -> Self {
        Log { inner: Arc::new(LogInner { entries: Mutex::new(Vec::new()), changed: watch::channel(0).0 }) }
    }
}

impl<T: Clone> Log<T> {
    /// Appends an entry and wakes the waiters.
    pub fn push(&self, entry: T) {
        let len = {
            let mut entries = self.inner.entries.locked();
            entries.push(entry);
            entries.len()
        };
        self.inner.changed.send_replace(len);
    }

    /// A copy of every entry so far.
    pub fn snapshot(&self) -> Vec<T> {
        self.inner.entries.locked().clone()
    }

    /// Number of entries so far.
    pub fn len(&self) -> usize {
        self.inner.entries.locked().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `condition` holds for the entries, or `timeout` passes.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&[T]) -> bool,
    ) -> Result<(), WaitTimeout> {
        let mut changed = self.inner.changed.subscribe();
        let wait = async {
            loop {
                {
                    let entries = self.inner.entries.locked();
                    if condition(&entries) {
                        return;
                    }
                }
                // The sender lives in self, so the channel never closes while we wait.
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| WaitTimeout { what: what.to_owned(), timeout })
    }
}

/// Recorded messages (published, sent or consumed), queryable by type.
#[derive(Debug, Clone, Default)]
pub struct MessageLog {
    log: Log<Envelope>,
}

impl MessageLog {
    /// Records an envelope.
    pub fn record(&self, envelope: &Envelope) {
        self.log.push(envelope.clone());
    }

    /// Envelopes of messages that carry `M`'s URN.
    pub fn envelopes<M: Message>(&self) -> Vec<Envelope> {
        self.log.snapshot().into_iter().filter(|e| e.has_message_type(M::message_type())).collect()
    }

    /// Messages of type `M`, in the order recorded (those that do not read as `M` are left out).
    pub fn messages<M: Message>(&self) -> Vec<M> {
        self.envelopes::<M>().iter().filter_map(|e| e.message_of().ok()).collect()
    }

    /// How many messages of type `M` were recorded.
    pub fn count<M: Message>(&self) -> usize {
        self.envelopes::<M>().len()
    }

    /// How many messages of any type were recorded.
    pub fn len(&self) -> usize {
        self.log.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    /// Every envelope recorded.
    pub fn all(&self) -> Vec<Envelope> {
        self.log.snapshot()
    }

    /// Waits until at least `n` messages of type `M` were recorded; returns them.
    pub async fn wait_for<M: Message>(&self, n: usize, timeout: Duration) -> Result<Vec<M>, WaitTimeout> {
        let what = format!("{n} x {}", M::message_type());
        self.log
            .wait_until(&what, timeout, |entries| {
                entries.iter().filter(|e| e.has_message_type(M::message_type())).count() >= n
            })
            .await?;
        Ok(self.messages())
    }

    /// Whether a message of type `M` is recorded within [`DEFAULT_WAIT`].
    pub async fn any<M: Message>(&self) -> bool {
        self.wait_for::<M>(1, DEFAULT_WAIT).await.is_ok()
    }

    /// Waits until an envelope satisfies `condition`; returns it.
    pub async fn wait_for_envelope(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Envelope) -> bool,
    ) -> Result<Envelope, WaitTimeout> {
        self.log.wait_until(what, timeout, |entries| entries.iter().any(&condition)).await?;
        self.log
            .snapshot()
            .into_iter()
            .find(|e| condition(e))
            .ok_or_else(|| WaitTimeout { what: what.to_owned(), timeout })
    }
}

/// A consume failure, as recorded.
#[derive(Debug, Clone)]
pub struct RecordedFault {
    /// Endpoint where it failed.
    pub endpoint: String,
    /// Consumer that failed.
    pub consumer_type: String,
    /// The message.
    pub envelope: Envelope,
    /// The error's type.
    pub exception_type: String,
    /// The error's message.
    pub message: String,
}

/// A message moved to `_error` or `_skipped`, as recorded.
#[derive(Debug, Clone)]
pub struct RecordedDeadLetter {
    /// The queue it moved to.
    pub queue: String,
    /// Why.
    pub reason: String,
    /// The message as it arrived.
    pub message: TransportMessage,
}

/// Records everything a bus publishes, sends and consumes; add it with `BusBuilder::observer_arc`.
#[derive(Debug, Clone, Default)]
pub struct BusRecorder {
    /// Messages published.
    pub published: MessageLog,
    /// Messages sent.
    pub sent: MessageLog,
    /// Messages consumed successfully (once per consumer).
    pub consumed: MessageLog,
    /// Consume attempts that failed for good (after retries).
    pub faults: Log<RecordedFault>,
    /// Messages moved to `_error` or `_skipped`.
    pub dead_letters: Log<RecordedDeadLetter>,
}

impl BusObserver for BusRecorder {
    fn on_publish(&self, envelope: &Envelope) {
        self.published.record(envelope);
    }

    fn on_send(&self, _destination: &str, envelope: &Envelope) {
        self.sent.record(envelope);
    }

    fn on_consumed(&self, _endpoint: &str, _consumer_type: &str, envelope: &Envelope) {
        self.consumed.record(envelope);
    }

    fn on_consume_fault(&self, endpoint: &str, consumer_type: &str, envelope: &Envelope, error: &ConsumeError) {
        self.faults.push(RecordedFault {
            endpoint: endpoint.to_owned(),
            consumer_type: consumer_type.to_owned(),
            envelope: envelope.clone(),
            exception_type: error.exception_type().to_owned(),
            message: error.message().to_owned(),
        });
    }

    fn on_dead_letter(&self, queue: &str, reason: &str, message: &TransportMessage) {
        self.dead_letters.push(RecordedDeadLetter {
            queue: queue.to_owned(),
            reason: reason.to_owned(),
            message: message.clone(),
        });
    }
}
