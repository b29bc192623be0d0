//! Putting a saga on a receive endpoint.

use std::fmt;
use std::sync::Arc;

use bus_core::Endpoint;

use crate::runtime::{SagaRuntime, SagaStats};
use crate::{SagaData, SagaProbe, SagaRepository, StateMachine};

/// A state machine with the repository its instances live in (MassTransit's
/// `StateMachineSaga`), ready to go on an endpoint: its own with [`endpoint`](Self::endpoint),
/// or one with other consumers with [`SagaEndpointExt::saga`].
///
/// ```
/// use bus_core::{Bus, Message};
/// use bus_saga::{when, InMemorySagaRepository, Saga, StateMachine};
/// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
/// # struct TripState { legs: u32 }
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Trips:TripBooked")]
/// # struct TripBooked { trip: uuid::Uuid }
/// let machine = StateMachine::<TripState>::builder("TripState")
///     .states(["Booked"])
///     .event::<TripBooked>(|m| m.trip)
///     .initially(when::<TripState, TripBooked>().transition_to("Booked"))
///     .build()?;
/// let saga = Saga::new(machine, InMemorySagaRepository::new());
/// let stats = saga.stats();
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
///     .endpoint(saga.endpoint().concurrency_limit(8))
///     .build();
/// assert_eq!(stats.conflicts(), 0);
/// # drop(bus);
/// # Ok::<_, bus_saga::Error>(())
/// ```
#[doc(alias = "StateMachineSaga")]
pub struct Saga<S> {
    runtime: Arc<SagaRuntime<S>>,
}

impl<S: SagaData> fmt::Debug for Saga<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Saga").field("machine", &self.runtime.machine.name()).finish_non_exhaustive()
    }
}

impl<S: SagaData> Saga<S> {
    /// The saga of `machine`, with instances in `repository`.
    pub fn new<R: SagaRepository<S>>(machine: Arc<StateMachine<S>>, repository: R) -> Self {
        let stats = Arc::new(SagaStats::default());
        let runtime = Arc::new(SagaRuntime { machine, repository: Arc::new(repository), stats });
        runtime.machine.bind(&runtime);
        Saga { runtime }
    }

    /// A probe that waits for this saga's instances to reach states (for tests).
    pub fn probe(&self) -> SagaProbe<S> {
        SagaProbe::of_runtime(self.runtime.clone())
    }

    /// The saga's counters (conflicts, transitions), shared with the running saga.
    pub fn stats(&self) -> Arc<SagaStats> {
        self.runtime.stats.clone()
    }

    /// An endpoint of its own, named after the instance type as MassTransit names it
    /// (`machine.name()`), consuming every event of the machine.
    pub fn endpoint(self) -> Endpoint {
        let name = self.runtime.machine.name().to_owned();
        Endpoint::new(name).saga(self)
    }
}

/// Puts sagas on endpoints.
pub trait SagaEndpointExt {
    /// Consumes every event of the saga's machine here.
    fn saga<S: SagaData>(self, saga: Saga<S>) -> Self;
}

impl SagaEndpointExt for Endpoint {
    fn saga<S: SagaData>(self, saga: Saga<S>) -> Self {
        let runtime = saga.runtime;
        runtime.machine.registrations().iter().fold(self, |endpoint, register| register(endpoint, runtime.clone()))
    }
}
