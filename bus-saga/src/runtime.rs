//! Running a state machine on a receive endpoint: load, apply, save, then send.

use bus_core::logged::chain;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{BoxError, ConsumeContext, Consumer, Message, Skip};
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::activities::Leave;
use crate::instance::FINAL;
use crate::machine::{EventInfo, MissingInstance, Outcome, TransitionRecord};
use crate::{
    AppliedEvent, Error, ProducedKind, Result, SagaData, SagaInstance, SagaRepository, StateMachine, StoredMessage,
};

/// The repository with its type erased: the saga's one erasure point.
pub(crate) trait DynRepository<S>: Send + Sync {
    fn load(&self, id: Uuid) -> BoxFuture<'_, Result<Option<SagaInstance<S>>>>;
    fn insert<'a>(&'a self, instance: &'a SagaInstance<S>) -> BoxFuture<'a, Result<()>>;
    fn update<'a>(&'a self, instance: &'a SagaInstance<S>, expected: u64) -> BoxFuture<'a, Result<()>>;
    fn delete(&self, id: Uuid, expected: u64) -> BoxFuture<'_, Result<()>>;
    fn keep_finalized<'a>(
        &'a self,
        instance: &'a SagaInstance<S>,
        expected: Option<u64>,
        keep_for: Duration,
    ) -> BoxFuture<'a, Result<()>>;
    fn lock<'a>(&'a self, id: Uuid, token: &'a str) -> BoxFuture<'a, Result<bool>>;
    fn unlock(&self, id: Uuid, token: String) -> BoxFuture<'_, Result<()>>;
    fn writes_with_durable_outbox(&self) -> bool;
    fn find_id_by<'a>(&'a self, field: &'a str, value: &'a serde_json::Value) -> BoxFuture<'a, Result<Option<Uuid>>>;
}

impl<S: Send + Sync + 'static, R: SagaRepository<S>> DynRepository<S> for R {
    fn load(&self, id: Uuid) -> BoxFuture<'_, Result<Option<SagaInstance<S>>>> {
        Box::pin(SagaRepository::load(self, id))
    }
    fn insert<'a>(&'a self, instance: &'a SagaInstance<S>) -> BoxFuture<'a, Result<()>> {
        Box::pin(SagaRepository::insert(self, instance))
    }
    fn update<'a>(&'a self, instance: &'a SagaInstance<S>, expected: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(SagaRepository::update(self, instance, expected))
    }
    fn delete(&self, id: Uuid, expected: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(SagaRepository::delete(self, id, expected))
    }
    fn keep_finalized<'a>(
        &'a self,
        instance: &'a SagaInstance<S>,
        expected: Option<u64>,
        keep_for: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(SagaRepository::keep_finalized(self, instance, expected, keep_for))
    }
    fn lock<'a>(&'a self, id: Uuid, token: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(SagaRepository::lock(self, id, token))
    }
    fn unlock(&self, id: Uuid, token: String) -> BoxFuture<'_, Result<()>> {
        Box::pin(SagaRepository::unlock(self, id, token))
    }
    fn writes_with_durable_outbox(&self) -> bool {
        SagaRepository::writes_with_durable_outbox(self)
    }
    fn find_id_by<'a>(&'a self, field: &'a str, value: &'a serde_json::Value) -> BoxFuture<'a, Result<Option<Uuid>>> {
        Box::pin(SagaRepository::find_id_by(self, field, value))
    }
}

/// A pessimistic lock, released when the consume ends, even when it is cancelled (a consumer
/// timeout drops the future): a lock left behind would hold up the instance for its lease.
struct LockGuard<S: Send + Sync + 'static> {
    repository: Arc<dyn DynRepository<S>>,
    id: Uuid,
    token: Option<String>,
}

impl<S: Send + Sync + 'static> LockGuard<S> {
    /// Takes the instance's lock, when the repository locks. The guard holds the token
    /// before the lock is asked for: cut short before the reply (a consumer timeout), it
    /// still unlocks, in case the lock was taken.
    async fn take(repository: Arc<dyn DynRepository<S>>, id: Uuid) -> Result<Self> {
        let token = Uuid::new_v4().to_string();
        let mut guard = LockGuard { repository, id, token: Some(token.clone()) };
        match guard.repository.lock(id, &token).await {
            Ok(true) => Ok(guard),
            Ok(false) => {
                guard.token = None;
                Ok(guard)
            }
            Err(error) => {
                // A conflict means it was not taken: nothing to release. Any other failure may
                // come after the store took it: the dropped guard releases it.
                if matches!(error, Error::Conflict(_)) {
                    guard.token = None;
                }
                Err(error)
            }
        }
    }

    async fn release(&mut self) {
        // The token is kept until the unlock returns: cut short, `Drop` unlocks again (a
        // second unlock with the same token does nothing).
        if let Some(token) = self.token.clone() {
            let released = self.repository.unlock(self.id, token).await;
            self.token = None;
            if let Err(error) = released {
                // The lease expires by itself; the next holder waits at most that long.
                tracing::warn!(id = %self.id, error = %chain(&error), "could not release the saga lock");
            }
        }
    }
}

impl<S: Send + Sync + 'static> Drop for LockGuard<S> {
    fn drop(&mut self) {
        if let (Some(token), Ok(runtime)) = (self.token.take(), tokio::runtime::Handle::try_current()) {
            let (repository, id) = (self.repository.clone(), self.id);
            runtime.spawn(async move {
                let _ = repository.unlock(id, token).await;
            });
        }
    }
}

/// Counters of a running saga. Conflicts are also counted in the OpenTelemetry metric
/// `messaging.saga.conflicts` (global meter `rust-bus`, attribute `saga`).
#[derive(Debug)]
pub struct SagaStats {
    conflicts: AtomicU64,
    transitions: AtomicU64,
    saved: tokio::sync::Notify,
    /// `messaging.saga.conflicts`, made on the meter of the first bus to report one.
    conflict_counter: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>>,
}

impl Default for SagaStats {
    fn default() -> Self {
        SagaStats {
            conflicts: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
            saved: tokio::sync::Notify::new(),
            conflict_counter: std::sync::OnceLock::new(),
        }
    }
}

impl SagaStats {
    /// Waits until at least `n` transitions were saved, for at most `timeout`; returns
    /// whether they were.
    pub async fn wait_for_transitions(&self, n: u64, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let saved = self.saved.notified();
                if self.transitions() >= n {
                    return;
                }
                saved.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Wakes at the next saved transition.
    pub(crate) fn saved_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.saved.notified()
    }

    /// Concurrency conflicts met (each was retried with fresh state).
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    /// Events applied and saved.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }
}

/// A state machine bound to a repository.
pub(crate) struct SagaRuntime<S> {
    pub(crate) machine: Arc<StateMachine<S>>,
    pub(crate) repository: Arc<dyn DynRepository<S>>,
    pub(crate) stats: Arc<SagaStats>,
}

impl<S: SagaData> SagaRuntime<S> {
    async fn consume<E: Message>(&self, ctx: &ConsumeContext<E>) -> Result<(), BoxError> {
        let info = EventInfo {
            message_id: None,
            request_id: ctx.request_id(),
            initiator_id: ctx.initiator_id(),
            scheduling_token: ctx.receive_context().scheduling_token(),
            instance_id: None,
        };
        let by_field = match self.machine.field_correlation(ctx.message()) {
            Some((field, value)) => Some(
                self.repository
                    .find_id_by(field, &value)
                    .await?
                    .unwrap_or_else(|| self.machine.id_for_field(field, &value)),
            ),
            None => None,
        };
        let Some(id) = by_field.or_else(|| self.machine.correlate_with(ctx.message(), &info)) else {
            // Only an answer to a request correlates by something it may lack.
            return Err(Skip::new(format!(
                "{} carries no initiator id to find its instance of saga {}",
                E::message_type(),
                self.machine.name()
            ))
            .into());
        };
        let mut lock = LockGuard::take(self.repository.clone(), id).await?;
        let result = self.consume_instance(ctx, id, info).await;
        lock.release().await;
        result
    }

    async fn consume_instance<E: Message>(
        &self,
        ctx: &ConsumeContext<E>,
        id: Uuid,
        mut info: EventInfo,
    ) -> Result<(), BoxError> {
        let attempts = self.machine.conflict_attempts();
        let message_id = ctx.message_id().or_else(|| Some(self.derived_event_id(ctx, id)));
        info.message_id = message_id;
        info.instance_id = Some(id);
        for attempt in 1..=attempts {
            let loaded = self.repository.load(id).await?;
            // Finalized, and kept only until the messages of its last transition have left.
            // (A machine that keeps its finalized instances stores them for good instead.)
            let finalized = loaded
                .as_ref()
                .filter(|i| self.machine.completed_when_finalized() && i.is_in(FINAL))
                .map(|i| i.version);
            let applied = message_id.and_then(|m| loaded.as_ref()?.applied(m, E::message_type()));
            if let Some(applied) = applied {
                // Only the event that finalized the instance (its last one) takes it away;
                // an earlier one delivered again sends its messages and leaves it waiting.
                let last = loaded.as_ref().and_then(|i| i.applied_events.last());
                let finalized = finalized.filter(|_| last.is_some_and(|l| std::ptr::eq(l, applied)));
                return self.send_again(ctx, id, applied, finalized).await;
            }
            if finalized.is_some() {
                // Its life is over: a later event meets it as it would meet no instance.
                return self.missing(ctx, id).await;
            }
            let expected = loaded.as_ref().map(|i| i.version);
            // Produced ids and schedule tokens derive from the event's id: applied again, it
            // produces the same.
            let mut transition = match self.machine.apply_with(loaded, ctx.message(), &info).await {
                Ok(transition) => transition,
                // The activity's own error fails the message, so that its fault says why
                // (and a `Skip` or `Permanent` it returns is honoured).
                Err(Error::Activity(source)) => return Err(source),
                Err(other) => return Err(other.into()),
            };
            // An instance finalized by an event that produced messages is kept until they have
            // left, so that the event, delivered again, can still send them; unless they are
            // stored durably with it (a database outbox), in one transaction with its deletion.
            let durable = ctx.payload::<bus_core::middleware::DurableOutbox>().is_some()
                && self.repository.writes_with_durable_outbox();
            let finalizing = transition.outcome == Outcome::Completed && !transition.produced.is_empty() && !durable;
            // Saved with the state, so that this event, delivered again, finds what it sent.
            // (Only a state that is stored keeps it: not one ignored, missing or deleted.)
            let stored = matches!(transition.outcome, Outcome::Created | Outcome::Updated) || finalizing;
            if let Some(message_id) = message_id.filter(|_| stored) {
                let applied = AppliedEvent {
                    message_id,
                    event_type: E::message_type().to_owned(),
                    produced: transition
                        .produced
                        .iter()
                        .map(|p| StoredMessage {
                            kind: p.kind.clone(),
                            message_type: p.message_type.to_owned(),
                            message_id: p.message_id,
                            message: p.json.clone(),
                        })
                        .collect(),
                };
                // The event that finalizes is kept whatever the window: it is what the kept
                // instance is for.
                let window =
                    if finalizing { self.machine.duplicate_window().max(1) } else { self.machine.duplicate_window() };
                transition.instance.record_applied(applied, window);
            }
            let saved = match transition.outcome {
                Outcome::Missing => return self.missing(ctx, id).await,
                Outcome::Ignored => {
                    tracing::debug!(saga = self.machine.name(), %id, event = E::message_type(), "event ignored in state");
                    return Ok(());
                }
                Outcome::Created => self.repository.insert(&transition.instance).await,
                Outcome::Updated => self.repository.update(&transition.instance, expected.unwrap_or_default()).await,
                Outcome::Completed if finalizing => {
                    let keep_for = self.machine.keep_finalized_for();
                    self.repository.keep_finalized(&transition.instance, expected, keep_for).await
                }
                Outcome::Completed => match expected {
                    Some(version) => self.repository.delete(id, version).await,
                    // Created and finished by one event: nothing was stored.
                    None => Ok(()),
                },
            };
            match saved {
                Ok(()) => {
                    self.stats.transitions.fetch_add(1, Ordering::Relaxed);
                    self.stats.saved.notify_waiters();
                    record_transition(
                        self.machine.name(),
                        id,
                        &transition.begin_state,
                        &transition.instance.current_state,
                    );
                    self.machine.notify(&TransitionRecord {
                        saga: self.machine.name().to_owned(),
                        id,
                        event: E::message_type(),
                        begin_state: transition.begin_state,
                        path: transition.path,
                        outcome: transition.outcome,
                    });
                    // Saved: now the messages may leave (through the consume's outbox). Those
                    // of a finalizing event leave at once, confirmed, so that the instance kept
                    // for them can go.
                    let leave = if finalizing { Leave::AtOnce } else { Leave::WithTheConsume };
                    for produced in transition.produced {
                        (produced.dispatch)(ctx.receive_context(), produced.message_id, leave).await?;
                    }
                    if finalizing {
                        self.forget_finalized(id, expected.map_or(1, |version| version + 1)).await;
                    }
                    return Ok(());
                }
                Err(Error::Conflict(_)) => {
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    let counter = self.stats.conflict_counter.get_or_init(|| {
                        ctx.bus()
                            .meter()
                            .u64_counter("messaging.saga.conflicts")
                            .with_description("saga concurrency conflicts, each retried with fresh state")
                            .build()
                    });
                    counter.add(1, &[opentelemetry::KeyValue::new("saga", self.machine.name().to_owned())]);
                    tracing::debug!(saga = self.machine.name(), %id, attempt, "saga conflict; reloading");
                    // Spread the competitors out a little so one of them wins the next round.
                    let pause = Duration::from_micros(fastrand::u64(0..500 * u64::from(attempt.min(10))));
                    tokio::time::sleep(pause).await;
                }
                Err(other) => return Err(other.into()),
            }
        }
        Err(Error::TooManyConflicts { id, attempts }.into())
    }

    /// An id for an event that came without one (raw JSON, an AMQP message id that is no
    /// GUID), so that it is recognised when delivered again: a name-based (v5) UUID of the
    /// saga, the event type, the instance and the event's JSON. Two events alike in every
    /// field count as one.
    fn derived_event_id<E: Message>(&self, ctx: &ConsumeContext<E>, id: Uuid) -> Uuid {
        let name = format!("{}/{}/{id}/{}", self.machine.name(), E::message_type(), ctx.envelope().message.get());
        Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
    }

    /// Deletes a finalized instance kept for its last messages, now that they have left. A
    /// failure leaves it to the store's expiry (or the next delivery of the event).
    async fn forget_finalized(&self, id: Uuid, version: u64) {
        match self.repository.delete(id, version).await {
            Ok(()) | Err(Error::Conflict(_)) => {}
            Err(error) => {
                tracing::warn!(saga = self.machine.name(), %id, error = %chain(&error), "could not delete a finalized instance; it expires")
            }
        }
    }

    /// The event was applied and saved before, but its messages may not all have left (the
    /// broker was unreachable when they were released, say): sends them again, as its
    /// transition produced them (with the same ids), and changes nothing. At least once, as
    /// any outbox: those that had left leave twice, and receivers can tell by their ids.
    ///
    /// An instance `finalized` (its stored version given) was kept only for these messages:
    /// they leave at once, confirmed, and then it is deleted.
    async fn send_again<E: Message>(
        &self,
        ctx: &ConsumeContext<E>,
        id: Uuid,
        applied: &AppliedEvent,
        finalized: Option<u64>,
    ) -> Result<(), BoxError> {
        tracing::info!(saga = self.machine.name(), %id, event = E::message_type(), produced = applied.produced.len(),
            "event already applied; sending what its transition produced again");
        let leave = if finalized.is_some() { Leave::AtOnce } else { Leave::WithTheConsume };
        for stored in &applied.produced {
            if let ProducedKind::CancelScheduled(token) = stored.kind {
                ctx.cancel_scheduled(token).await?;
                continue;
            }
            let Some(redispatch) = self.machine.redispatcher(&stored.message_type) else {
                // The machine changed since: it no longer produces that type.
                return Err(Error::Redispatch { id, message_type: stored.message_type.clone() }.into());
            };
            let (kind, json) = (stored.kind.clone(), stored.message.clone());
            redispatch(ctx.receive_context(), kind, stored.message_id, json, leave).await?;
        }
        if let Some(version) = finalized {
            self.forget_finalized(id, version).await;
        }
        Ok(())
    }

    async fn missing<E: Message>(&self, ctx: &ConsumeContext<E>, id: Uuid) -> Result<(), BoxError> {
        let definition = self.machine.event::<E>();
        match definition.map(|d| &d.missing) {
            Some(MissingInstance::Discard) => Ok(()),
            Some(MissingInstance::Fault) => Err(Error::MissingInstance { id, event: E::message_type() }.into()),
            Some(MissingInstance::Execute(f)) => f(ctx).await,
            Some(MissingInstance::Skip) | None => {
                Err(Skip::new(format!("no saga instance {id} for {}", E::message_type())).into())
            }
        }
    }
}

/// The hook that marks a transition on the current span; the observability layer builds
/// the spans, this records what the saga did.
fn record_transition(saga: &str, id: Uuid, begin: &str, end: &str) {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes([
            opentelemetry::KeyValue::new("saga.id", id.to_string()),
            opentelemetry::KeyValue::new("saga.begin_state", begin.to_owned()),
            opentelemetry::KeyValue::new("saga.end_state", end.to_owned()),
        ]);
    }
    tracing::debug!(saga, saga.id = %id, saga.begin_state = begin, saga.end_state = end, "saga transition");
}

/// Consumes event `E` for a saga.
pub(crate) struct SagaEventConsumer<S, E> {
    runtime: Arc<SagaRuntime<S>>,
    _event: PhantomData<fn(E)>,
}

impl<S, E> SagaEventConsumer<S, E> {
    pub(crate) fn new(runtime: Arc<SagaRuntime<S>>) -> Self {
        SagaEventConsumer { runtime, _event: PhantomData }
    }
}

impl<S: SagaData, E: Message> Consumer<E> for SagaEventConsumer<S, E> {
    async fn consume(&self, ctx: ConsumeContext<E>) -> Result<(), BoxError> {
        self.runtime.consume(&ctx).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bus_core::sync::MutexExt;
    use std::time::Duration;

    use super::*;
    use crate::{SagaInstance, SagaRepository};

    /// A repository that records locks and unlocks. Its lock either never answers (a reply
    /// lost to a consumer timeout) or finds the lock held by someone else; its first unlock
    /// never finishes.
    #[derive(Default)]
    struct Recording {
        contended: bool,
        locks: Mutex<Vec<String>>,
        unlocks: Mutex<Vec<String>>,
        unlocked: tokio::sync::Notify,
    }

    impl Recording {
        fn unlocks(&self) -> Vec<String> {
            self.unlocks.locked().clone()
        }

        async fn wait_unlocks(&self, n: usize) -> bool {
            let wait = async {
                loop {
                    let notified = self.unlocked.notified();
                    if self.unlocks().len() >= n {
                        return;
                    }
                    notified.await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), wait).await.is_ok()
        }
    }

    impl SagaRepository<()> for Recording {
        async fn load(&self, _: Uuid) -> Result<Option<SagaInstance<()>>> {
            Ok(None)
        }
        async fn insert(&self, _: &SagaInstance<()>) -> Result<()> {
            Ok(())
        }
        async fn update(&self, _: &SagaInstance<()>, _: u64) -> Result<()> {
            Ok(())
        }
        async fn delete(&self, _: Uuid, _: u64) -> Result<()> {
            Ok(())
        }
        async fn lock(&self, id: Uuid, token: &str) -> Result<bool> {
            if self.contended {
                return Err(Error::Conflict(id));
            }
            self.locks.locked().push(token.to_owned());
            std::future::pending::<()>().await;
            Ok(true)
        }
        async fn unlock(&self, _: Uuid, token: String) -> Result<()> {
            let first = {
                let mut unlocks = self.unlocks.locked();
                unlocks.push(token);
                unlocks.len() == 1
            };
            self.unlocked.notify_one();
            if first {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    }

    /// A release cut short (the consume's future dropped by a timeout) still unlocks: the
    /// guard keeps its token until the unlock returns, and unlocks again when dropped.
    #[tokio::test]
    async fn a_release_cut_short_still_unlocks() {
        let repository = Arc::new(Recording::default());
        let mut guard =
            LockGuard::<()> { repository: repository.clone(), id: Uuid::nil(), token: Some("token".to_owned()) };
        let cut_short = tokio::time::timeout(Duration::from_millis(20), guard.release()).await;
        assert!(cut_short.is_err(), "the first unlock hangs");
        drop(guard);
        assert!(repository.wait_unlocks(2).await, "dropping the guard unlocks again");
        assert_eq!(repository.unlocks(), ["token", "token"]);
    }

    /// A lock whose reply never comes (the consume cut short by its timeout) is released
    /// with the token it was asked for, in case the store took it.
    #[tokio::test]
    async fn a_lock_cut_short_is_released_with_its_token() {
        let repository = Arc::new(Recording::default());
        let dyn_repository: Arc<dyn DynRepository<()>> = repository.clone();
        let cut_short =
            tokio::time::timeout(Duration::from_millis(20), LockGuard::take(dyn_repository, Uuid::nil())).await;
        assert!(cut_short.is_err(), "the lock's reply never comes");
        assert!(repository.wait_unlocks(1).await, "it is unlocked all the same");
        let asked = repository.locks.locked().clone();
        assert_eq!(*repository.unlocks.locked(), asked, "with the token it asked with");
    }

    /// A lock held by someone else was never ours: no unlock is sent for it (a round trip
    /// to the store on every conflict, when it is busiest).
    #[tokio::test]
    async fn a_lock_conflict_sends_no_unlock() {
        let repository = Arc::new(Recording { contended: true, ..Recording::default() });
        let dyn_repository: Arc<dyn DynRepository<()>> = repository.clone();
        let taken = LockGuard::take(dyn_repository, Uuid::nil()).await;
        assert!(matches!(taken, Err(Error::Conflict(_))));
        // On this single-threaded runtime, an unlock spawned by the dropped guard runs here.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(repository.unlocks().is_empty());
    }
}
