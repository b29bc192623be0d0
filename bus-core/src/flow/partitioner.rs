//! The partitioner: messages with the same key run one at a time, in delivery order.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::{Envelope, Message};

/// Reads a message's partition key from its envelope (`None`: not partitioned).
pub(crate) type KeyFn = Arc<dyn Fn(&Envelope) -> Option<u64> + Send + Sync>;

/// Partitions of saga endpoints, and of endpoints whose partitioner was given no count.
pub const DEFAULT_PARTITIONS: usize = 256;

/// The most partitions an endpoint may have.
pub(crate) const MAX_PARTITIONS: usize = 1 << 16;

/// How an endpoint partitions its messages: a key per message type, hashed into a fixed
/// number of partitions (so that keys from the wire cannot grow what the bus holds).
#[derive(Clone, Default)]
pub(crate) struct PartitionerSettings {
    pub(crate) partitions: usize,
    pub(crate) keys: Vec<(&'static str, KeyFn)>,
}

impl fmt::Debug for PartitionerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionerSettings")
            .field("partitions", &self.partitions)
            .field("message_types", &self.keys.iter().map(|(urn, _)| *urn).collect::<Vec<_>>())
            .finish()
    }
}

/// Hashes a key the same way in every process, so that a partition is a function of the key.
pub(crate) fn hash_key<K: Hash>(key: &K) -> u64 {
    foldhash::fast::FixedState::with_seed(0x5eed).hash_one(key)
}

impl PartitionerSettings {
    /// Adds (or replaces) the key of message type `M`.
    pub(crate) fn add<M: Message>(&mut self, partitions: usize, key: KeyFn) {
        self.partitions = partitions.max(1);
        let urn = M::message_type();
        self.keys.retain(|(known, _)| *known != urn);
        self.keys.push((urn, key));
    }
}

/// The run loop's partitioner: for each partition, the completion of the last delivery
/// assigned to it. A delivery waits for its predecessor's, so a partition's deliveries run one
/// at a time in the order the loop took them, whatever order their tasks are scheduled in.
pub(crate) struct Partitioner {
    keys: HashMap<&'static str, KeyFn>,
    tails: Vec<Option<oneshot::Receiver<()>>>,
}

impl Partitioner {
    pub(crate) fn new(settings: &PartitionerSettings) -> Option<Self> {
        if settings.keys.is_empty() {
            return None;
        }
        let partitions = settings.partitions.max(1);
        Some(Partitioner {
            keys: settings.keys.iter().cloned().collect(),
            tails: std::iter::repeat_with(|| None).take(partitions).collect(),
        })
    }

    /// The partition key of a message: that of the first of its types with one.
    /// A raw JSON message without a type is offered to every consumer, so it takes the key
    /// of the endpoint's only keyed type, when it has one.
    pub(crate) fn key(&self, envelope: &Envelope) -> Option<u64> {
        let key = match envelope.message_type.as_slice() {
            [] if self.keys.len() == 1 => self.keys.values().next(),
            types => types.iter().find_map(|urn| self.keys.get(urn.as_str())),
        };
        let key = key?;
        // A key function is user code run on input from the wire, in the endpoint's loop:
        // its panic leaves the message unpartitioned rather than end the loop.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| key(envelope))) {
            Ok(key) => key,
            Err(_) => {
                tracing::warn!(
                    message_id = envelope.message_id.map(tracing::field::display),
                    "the partition key function panicked; the message runs unpartitioned"
                );
                None
            }
        }
    }

    /// A place in line in the key's partition, after every delivery given one before.
    pub(crate) fn ticket(&mut self, key: u64) -> Ticket {
        // Bounded by the partition count, which is at least one.
        let index = usize::try_from(key % self.tails.len() as u64).unwrap_or(0);
        let (done, next) = oneshot::channel();
        let previous = self.tails.get_mut(index).and_then(|tail| tail.replace(next));
        Ticket { previous, _done: done }
    }
}

/// A delivery's place in its partition: it may run once its predecessor has finished, and
/// its successor may once this is dropped (whether the delivery finished, failed or panicked).
pub(crate) struct Ticket {
    previous: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
}

impl Ticket {
    /// Waits for the predecessor to finish.
    pub(crate) async fn wait_turn(&mut self) {
        if let Some(previous) = self.previous.take() {
            // Sent by no one: the predecessor's sender is dropped when it is done.
            let _ = previous.await;
        }
    }
}

/// A key function of message type `M`: the message read from the envelope, then `key`.
/// A message that cannot be read has no key (its consumer fails it anyway).
pub(crate) fn typed_key<M, K>(key: impl Fn(&M, &Envelope) -> Option<K> + Send + Sync + 'static) -> KeyFn
where
    M: Message,
    K: Hash,
{
    Arc::new(move |envelope: &Envelope| {
        let message: M = envelope.message_of().ok()?;
        key(&message, envelope).map(|k| hash_key(&k))
    })
}
