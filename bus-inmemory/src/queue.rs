//! One in-memory queue: bounded, with competing consumers, and requeue to where a message was.

use bus_core::sync::MutexExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Its place in the queue's order, kept while it is delivered: a requeued message goes
    /// back where it was, before those that came after it, as RabbitMQ puts it back.
    pub(crate) position: u64,
}

/// A queue holds at most `capacity` messages, counting those delivered but not yet settled.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) name: String,
    items: Mutex<VecDeque<Stored>>,
    /// The next message's position.
    next_position: std::sync::atomic::AtomicU64,
    /// Wakes consumers when a message arrives.
    ready: Notify,
    /// Wakes test code waiting on the queue's contents.
    observed: Notify,
    /// How many wait on `observed`: without any, a message entering wakes nobody (waking
    /// takes the `Notify`'s lock, on every message).
    observers: AtomicUsize,
    /// Free places: taken when a message enters, given back when it is settled away.
    room: Arc<Semaphore>,
    pub(crate) temporary: bool,
}

impl Queue {
    pub(crate) fn new(name: String, capacity: usize, temporary: bool) -> Self {
        Queue {
            name,
            items: Mutex::new(VecDeque::new()),
            next_position: std::sync::atomic::AtomicU64::new(0),
            ready: Notify::new(),
            observed: Notify::new(),
            observers: AtomicUsize::new(0),
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
        self.push_back(message, false);
        self.arrived();
    }

    fn push_back(&self, message: TransportMessage, redelivered: bool) {
        let mut items = self.items();
        // Taken under the lock, so that positions grow along the queue.
        let position = self.next_position.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        items.push_back(Stored { message, redelivered, position });
    }

    /// Puts a delivered message back at the head, before every message that came after it
    /// (`position`: its place when it was delivered); it keeps the place it already had.
    pub(crate) fn requeue(&self, message: TransportMessage, position: u64) {
        let mut items = self.items();
        let at = items.iter().position(|waiting| waiting.position > position).unwrap_or(items.len());
        items.insert(at, Stored { message, redelivered: true, position });
        drop(items);
        self.arrived();
    }

    /// Adds a message at the tail into a place it already holds (a delayed redelivery).
    pub(crate) fn enqueue_reserved(&self, message: TransportMessage) {
        self.push_back(message, true);
        self.arrived();
    }

    /// Puts a delivered message at the tail, as sent anew; it keeps the place it had.
    pub(crate) fn move_to_back(&self, message: TransportMessage) {
        self.push_back(message, false);
        self.arrived();
    }

    /// A message went in: wakes a consumer, and those waiting in
    /// [`wait_for_len`](Self::wait_for_len), if any.
    fn arrived(&self) {
        self.ready.notify_one();
        // Ordered by the items' lock: a waiter counts itself before it looks under the lock,
        // and this looks after the message went in under it. Either the waiter sees the
        // message, or this sees the waiter counted.
        if self.observers.load(Ordering::SeqCst) > 0 {
            self.observed.notify_waiters();
        }
    }

    /// Waits until at least `n` messages wait in the queue.
    pub(crate) async fn wait_for_len(&self, n: usize) {
        struct Observing<'a>(&'a AtomicUsize);
        impl Drop for Observing<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.observers.fetch_add(1, Ordering::SeqCst);
        let _observing = Observing(&self.observers);
        loop {
            // Registered before looking, so a push between the look and the wait wakes us.
            let observed = self.observed.notified();
            tokio::pin!(observed);
            observed.as_mut().enable();
            if self.len() >= n {
                return;
            }
            observed.await;
        }
    }

    /// Gives back the place of a message that left the queue for good.
    pub(crate) fn release(&self) {
        self.room.add_permits(1);
    }

    /// Waits for the next message. Cancel-safe: a message is taken only when returned.
    pub(crate) async fn pop(&self) -> Stored {
        // A busy queue has one waiting: taken without registering for a wake-up.
        if let Some(stored) = self.items().pop_front() {
            return stored;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> TransportMessage {
        TransportMessage { body: vec![n].into(), ..TransportMessage::default() }
    }

    /// Delivered messages requeued in any order go back in the order they were queued, ahead
    /// of those that came after them, as RabbitMQ requeues them.
    #[tokio::test]
    async fn requeued_messages_go_back_to_where_they_were() {
        let queue = Queue::new("q".to_owned(), 10, false);
        for n in 0..4 {
            queue.push(message(n), None).await.expect("room");
        }
        let taken: Vec<Stored> = vec![queue.pop().await, queue.pop().await, queue.pop().await];
        for stored in taken.into_iter().rev() {
            queue.requeue(stored.message, stored.position);
        }
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(queue.pop().await.message.body[0]);
        }
        assert_eq!(order, [0, 1, 2, 3]);
    }

    /// A waiter is woken by a message that enters after it started waiting, by each path a
    /// message enters by.
    #[tokio::test]
    async fn a_waiter_sees_a_message_enter_by_each_path() {
        let queue = Arc::new(Queue::new("q".to_owned(), 10, false));
        queue.push(message(0), None).await.expect("room");
        let taken = queue.pop().await;
        type Enter = Box<dyn FnOnce(&Queue) + Send>;
        let paths: [(&str, Enter); 4] = [
            (
                "a push",
                Box::new(|q: &Queue| q.fill(q.room.clone().try_acquire_owned().map(Place).expect("room"), message(1))),
            ),
            ("a requeue", Box::new(move |q: &Queue| q.requeue(taken.message, taken.position))),
            ("a move to the back", Box::new(|q: &Queue| q.move_to_back(message(2)))),
            ("a delayed redelivery", Box::new(|q: &Queue| q.enqueue_reserved(message(3)))),
        ];
        for (path, enter) in paths {
            let waiter = tokio::spawn({
                let queue = queue.clone();
                let wanted = queue.len() + 1;
                async move { queue.wait_for_len(wanted).await }
            });
            // Counted as an observer before it looks: the message below cannot slip past it.
            tokio::time::timeout(Duration::from_secs(5), async {
                while queue.observers.load(Ordering::SeqCst) == 0 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the waiter starts waiting");
            enter(&queue);
            tokio::time::timeout(Duration::from_secs(5), waiter).await.expect(path).expect("waiter");
            assert_eq!(queue.observers.load(Ordering::SeqCst), 0, "a waiter that returned no longer counts");
        }
        assert_eq!(queue.len(), 4);
    }
}
