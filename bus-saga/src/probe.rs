//! Waiting in tests until a saga instance exists, reaches a state, or is finalized.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bus_core::sync::MutexExt;
use uuid::Uuid;

use crate::instance::FINAL;
use crate::runtime::SagaRuntime;
use crate::{Error, Result, SagaData, SagaInstance, StateMachine};

/// How long a [`SagaProbe`] waits unless told otherwise.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a probe reads the instance again when no save by this process wakes it (the
/// instance may be changed by another process sharing the repository).
const RECHECK: Duration = Duration::from_millis(100);

/// Waits for saga instances to exist, reach a state or be finalized, with a timeout: what
/// a test waits on instead of sleeping. Get one with [`Saga::probe`](crate::Saga::probe), or
/// from a test harness with `harness.saga(&machine)` (feature `testing`).
///
/// ```
/// use std::time::Duration;
/// use bus_core::{BoxError, Message};
/// use bus_inmemory::InMemoryTestHarness;
/// use bus_saga::{when, InMemorySagaRepository, Saga, StateMachine};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)] struct Trip;
/// # #[derive(Debug, Serialize, Deserialize, Message)]
/// # #[message(urn = "urn:message:Trips:TripBooked")] struct TripBooked { trip: uuid::Uuid }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let machine = StateMachine::<Trip>::builder("Trip")
///     .states(["Booked"])
///     .event::<TripBooked>(|m| m.trip)
///     .initially(when::<Trip, TripBooked>().transition_to("Booked"))
///     .build()?;
/// let saga = Saga::new(machine, InMemorySagaRepository::new());
/// let probe = saga.probe().timeout(Duration::from_secs(5));
/// let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await?;
/// let trip = uuid::Uuid::now_v7();
/// harness.bus().publish(TripBooked { trip }).await?;
/// let booked = probe.wait_for(trip, "Booked").await?;
/// assert_eq!(booked.current_state, "Booked");
/// # Ok(()) }
/// ```
pub struct SagaProbe<S> {
    machine: Arc<StateMachine<S>>,
    runtime: Option<Arc<SagaRuntime<S>>>,
    timeout: Duration,
}

impl<S> std::fmt::Debug for SagaProbe<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaProbe").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl<S: SagaData> SagaProbe<S> {
    /// A probe of the saga `machine` was last put in (with [`Saga::new`](crate::Saga::new)).
    pub fn of(machine: &Arc<StateMachine<S>>) -> Self {
        SagaProbe { machine: machine.clone(), runtime: None, timeout: DEFAULT_PROBE_TIMEOUT }
    }

    pub(crate) fn of_runtime(runtime: Arc<SagaRuntime<S>>) -> Self {
        SagaProbe { machine: runtime.machine.clone(), runtime: Some(runtime), timeout: DEFAULT_PROBE_TIMEOUT }
    }

    /// How long each wait lasts before it fails with [`Error::WaitTimedOut`] (default
    /// [`DEFAULT_PROBE_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn runtime(&self) -> Result<Arc<SagaRuntime<S>>> {
        match &self.runtime {
            Some(runtime) => Ok(runtime.clone()),
            None => self.machine.bound_runtime().ok_or_else(|| Error::NotInASaga(self.machine.name().to_owned())),
        }
    }

    /// The instance as stored now.
    pub async fn instance(&self, id: Uuid) -> Result<Option<SagaInstance<S>>> {
        self.runtime()?.repository.load(id).await
    }

    /// Waits until instance `id` is in `state`; returns it.
    pub async fn wait_for(&self, id: Uuid, state: impl AsRef<str>) -> Result<SagaInstance<S>> {
        let state = state.as_ref();
        let found = self.wait(id, &format!("state {state}"), |i| i.filter(|i| i.is_in(state)).cloned()).await?;
        Ok(found)
    }

    /// Waits until instance `id` exists; returns it.
    pub async fn wait_exists(&self, id: Uuid) -> Result<SagaInstance<S>> {
        self.wait(id, "its creation", |i| i.cloned()).await
    }

    /// Waits until instance `id` is finalized: deleted (when completed when finalized, after
    /// it existed or not) or in the final state.
    pub async fn wait_finalized(&self, id: Uuid) -> Result<()> {
        let finalized = |i: Option<&SagaInstance<S>>| match i {
            None => Some(()),
            Some(i) if i.is_in(FINAL) && !self.machine.completed_when_finalized() => Some(()),
            Some(_) => None,
        };
        self.wait(id, "its finalization", finalized).await
    }

    async fn wait<T>(
        &self,
        id: Uuid,
        waited_for: &str,
        mut done: impl FnMut(Option<&SagaInstance<S>>) -> Option<T>,
    ) -> Result<T> {
        let runtime = self.runtime()?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let saved = runtime.stats.saved_notified();
            let loaded = runtime.repository.load(id).await?;
            if let Some(found) = done(loaded.as_ref()) {
                return Ok(found);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::WaitTimedOut {
                    id,
                    waited_for: waited_for.to_owned(),
                    last_state: loaded.map(|i| i.current_state),
                });
            }
            let _ = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + RECHECK), saved).await;
        }
    }
}

/// The saga a machine was last put in, kept weakly by the machine for probes.
#[derive(Default)]
pub(crate) struct BoundRuntime<S>(std::sync::Mutex<Weak<SagaRuntime<S>>>);

impl<S> BoundRuntime<S> {
    pub(crate) fn new() -> Self {
        BoundRuntime(std::sync::Mutex::new(Weak::new()))
    }

    pub(crate) fn bind(&self, runtime: &Arc<SagaRuntime<S>>) {
        *self.0.locked() = Arc::downgrade(runtime);
    }

    pub(crate) fn get(&self) -> Option<Arc<SagaRuntime<S>>> {
        self.0.locked().upgrade()
    }
}

/// `harness.saga(&machine)` on the in-memory test harness.
#[cfg(feature = "testing")]
pub trait SagaHarnessExt {
    /// A probe of the saga `machine` was put in on this harness's bus.
    ///
    /// ```
    /// use bus_saga::SagaHarnessExt as _;
    /// # use bus_core::{BoxError, Message};
    /// # use bus_inmemory::InMemoryTestHarness;
    /// # use bus_saga::{when, InMemorySagaRepository, Saga, StateMachine};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Clone, Default, Serialize, Deserialize)] struct Trip;
    /// # #[derive(Debug, Serialize, Deserialize, Message)]
    /// # #[message(urn = "urn:message:Trips:TripBooked")] struct TripBooked { trip: uuid::Uuid }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), BoxError> {
    /// # let machine = StateMachine::<Trip>::builder("Trip").states(["Booked"]).event::<TripBooked>(|m| m.trip)
    /// #     .initially(when::<Trip, TripBooked>().transition_to("Booked")).build()?;
    /// let saga = Saga::new(machine.clone(), InMemorySagaRepository::new());
    /// let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await?;
    /// let trip = uuid::Uuid::now_v7();
    /// harness.bus().publish(TripBooked { trip }).await?;
    /// harness.saga(&machine).wait_for(trip, "Booked").await?;
    /// # Ok(()) }
    /// ```
    fn saga<S: SagaData>(&self, machine: &Arc<StateMachine<S>>) -> SagaProbe<S>;
}

#[cfg(feature = "testing")]
impl SagaHarnessExt for bus_inmemory::InMemoryTestHarness {
    fn saga<S: SagaData>(&self, machine: &Arc<StateMachine<S>>) -> SagaProbe<S> {
        SagaProbe::of(machine)
    }
}
