//! One in-memory queue: bounded, with competing consumers and requeue at the head.

use bus_core::sync::MutexExt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::TransportMessage;
use tokio::sync::{Notify, Semaphore};

use crate::error::{Error, Result};

/// A message waiting in a queue.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) message: TransportMessage,
    pub(crate) redelivered: bool,
}

/// A queue holds at most `capacity` messages, counting those delivered but not yet settled.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) name: String,
    items: Mutex<VecDeque<Stored>>,
    /// Wakes consumers when a message arrives.
    ready: Notify,
    /// Wakes test code waiting on the queue's contents.
    pub(crate) observed: Notify,
    /// Free places: taken when a message enters, given back when it is settled away.
    room: Arc<Semaphore>,
    pub(crate) temporary: bool,
}

impl Queue {
    pub(crate) fn new(name: String, capacity: usize, temporary: bool) -> Self {
        Queue {
            name,
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            observed: Notify::new(),
            // Clamped: "no limit" as `usize::MAX` would panic the semaphore.
            room: Arc::new(Semaphore::new(capacity.clamp(1, Semaphore::MAX_PERMITS))),
            temporary,
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Stored>> {
        // A panic while holding this lock cannot leave the deque inconsistent.
        self.items.locked()
    }

    /// Adds a message at the tail, waiting up to `wait` for room (`None`: fail at once).
    pub(crate) async fn push(&self, message: TransportMessage, wait: Option<Duration>) -> Result<()> {
        let place = self.reserve(wait).await?;
        self.fill(place, message);
        Ok(())
    }

    /// Takes a place for a message, waiting up to `wait` for room (`None`: fail at once).
    /// Dropped unfilled, the place is given back: a message routed to several queues takes a
    /// place in each before it enters any, so that it enters all of them or none.
    pub(crate) async fn reserve(&self, wait: Option<Duration>) -> Result<Place> {
        if let Ok(permit) = self.room.clone().try_acquire_owned() {
            return Ok(Place(permit));
        }
        let full = || Error::QueueFull { queue: self.name.clone(), waited: wait.unwrap_or_default() };
        let wait = wait.ok_or_else(full)?;
        match tokio::time::timeout(wait, self.room.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Place(permit)),
            _ => Err(full()),
        }
    }

    /// Puts a message into a place taken with [`reserve`](Self::reserve).
    pub(crate) fn fill(&self, place: Place, message: TransportMessage) {
        place.0.forget();
        self.items().push_back(Stored { message, redelivered: false });
        self.ready.notify_one();
        self.observed.notify_waiters();
    }

    /// Puts a delivered message back at the head; it keeps the place it already had.
    pub(crate) fn requeue(&self, message: TransportMessage) {
        self.items().push_front(Stored { message, redelivered: true });
        self.ready.notify_one();
        self.observed.notify_waiters();
    }

    /// Adds a message at the tail into a place it already holds (a delayed redelivery).
    pub(crate) fn enqueue_reserved(&self, message: TransportMessage) {
        self.items().push_back(Stored { message, redelivered: true });
        self.ready.notify_one();
        self.observed.notify_waiters();
    }

    /// Puts a delivered message at the tail, as sent anew; it keeps the place it had.
    pub(crate) fn move_to_back(&self, message: TransportMessage) {
        self.items().push_back(Stored { message, redelivered: false });
        self.ready.notify_one();
        self.observed.notify_waiters();
    }

    /// Gives back the place of a message that left the queue for good.
    pub(crate) fn release(&self) {
        self.room.add_permits(1);
    }

    /// Waits for the next message. Cancel-safe: a message is taken only when returned.
    pub(crate) async fn pop(&self) -> Stored {
        loop {
            // Registered before looking, so a push between the look and the wait wakes us.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(stored) = self.items().pop_front() {
                return stored;
            }
            notified.await;
        }
    }

    /// Number of messages waiting (not delivered).
    pub(crate) fn len(&self) -> usize {
        self.items().len()
    }

    /// Takes every waiting message out of the queue.
    pub(crate) fn drain(&self) -> Vec<TransportMessage> {
        let drained: Vec<TransportMessage> = self.items().drain(..).map(|s| s.message).collect();
        self.room.add_permits(drained.len());
        drained
    }

    /// Copies of every waiting message.
    pub(crate) fn peek(&self) -> Vec<TransportMessage> {
        self.items().iter().map(|s| s.message.clone()).collect()
    }
}

pub(crate) type QueueRef = Arc<Queue>;

/// A place taken in a queue, given back unless filled.
#[derive(Debug)]
pub(crate) struct Place(tokio::sync::OwnedSemaphorePermit);
