//! The in-memory scheduler: scheduled messages in a map ordered by due time, fired on
//! tokio's clock (so tests can pause and advance it).

use bus_core::sync::MutexExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bus_core::logged::chain;
use bus_core::{Bus, DueTime, MessageScheduler, ScheduledMessage};
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Scheduled messages in memory, for tests and single-process use: they do not survive a
/// restart. Due times are read on tokio's clock when a message is scheduled, so a test with
/// a paused clock (`tokio::time::pause`, `advance`) decides when they fire; messages due at
/// the same time fire in the order they were scheduled.
///
/// ```
/// use std::time::Duration;
/// use bus_core::{Bus, ConsumeContext, Endpoint, Message};
/// use bus_inmemory::{InMemoryScheduler, InMemoryTransport};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:Reminder")]
/// # struct Reminder;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), bus_core::BoxError> {
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let bus = Bus::builder(InMemoryTransport::new())
///     .scheduler(InMemoryScheduler::new())
///     .endpoint(Endpoint::new("reminders").handler_with_state(tx, |_: ConsumeContext<Reminder>, tx| async move {
///         tx.send(())?;
///         Ok(())
///     }))
///     .build();
/// bus.start().await?;
/// bus.schedule_send(Duration::from_secs(3600), "queue:reminders", Reminder).await?;
/// tokio::time::advance(Duration::from_secs(3600)).await;
/// assert_eq!(rx.recv().await, Some(()));
/// bus.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct InMemoryScheduler {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    waiting: Mutex<Waiting>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Waiting {
    /// By due time, then by the order scheduled; with the instant on tokio's clock when it
    /// fires (read when it was scheduled, so that a paused clock decides).
    by_due: BTreeMap<(DueTime, u64), (Instant, ScheduledMessage)>,
    by_token: HashMap<Uuid, (DueTime, u64)>,
    next: u64,
}

impl InMemoryScheduler {
    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many messages wait.
    pub fn len(&self) -> usize {
        self.inner.waiting.locked().by_due.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The messages due now, in order, taken out.
    fn take_due(&self) -> (Vec<ScheduledMessage>, Option<Instant>) {
        let mut waiting = self.inner.waiting.locked();
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(entry) = waiting.by_due.first_entry() {
            let at = entry.get().0;
            if at > now {
                return (due, Some(at));
            }
            let (_, message) = entry.remove();
            waiting.by_token.remove(&message.token);
            due.push(message);
        }
        (due, None)
    }
}

impl MessageScheduler for InMemoryScheduler {
    fn schedule<'a>(&'a self, message: ScheduledMessage) -> BoxFuture<'a, bus_core::Result<()>> {
        let at = Instant::now() + message.due.remaining();
        {
            let mut waiting = self.inner.waiting.locked();
            let key = (message.due, waiting.next);
            waiting.next += 1;
            // Scheduled again under a waiting token: it replaces what waited there.
            if let Some(previous) = waiting.by_token.insert(message.token, key) {
                waiting.by_due.remove(&previous);
            }
            waiting.by_due.insert(key, (at, message));
        }
        self.inner.changed.notify_one();
        Box::pin(async { Ok(()) })
    }

    fn cancel<'a>(&'a self, token: Uuid) -> BoxFuture<'a, bus_core::Result<bool>> {
        let cancelled = {
            let mut waiting = self.inner.waiting.locked();
            match waiting.by_token.remove(&token) {
                Some(key) => waiting.by_due.remove(&key).is_some(),
                None => false,
            }
        };
        Box::pin(async move { Ok(cancelled) })
    }

    fn run(&self, bus: Bus, stop: CancellationToken) -> BoxFuture<'static, ()> {
        let scheduler = self.clone();
        Box::pin(async move {
            loop {
                // Registered before looking, so that a message scheduled meanwhile wakes it.
                let changed = scheduler.inner.changed.notified();
                let (due, next) = scheduler.take_due();
                for message in due {
                    let token = message.token;
                    match bus.deliver(message.message.clone()).await {
                        Ok(()) => {}
                        // The transport may take it a moment later: it waits a second, in place.
                        Err(error) if error.is_transient() => {
                            tracing::warn!(%token, error = %chain(&error), "a scheduled message could not be delivered yet; trying again in a second");
                            let again = ScheduledMessage { due: std::time::Duration::from_secs(1).into(), ..message };
                            let _ = scheduler.schedule(again).await;
                        }
                        Err(error) => {
                            tracing::error!(%token, error = %chain(&error), "a scheduled message was refused; dropped");
                        }
                    }
                }
                let wait = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = changed => {}
                    () = wait => {}
                }
            }
        })
    }
}
