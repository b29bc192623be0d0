//! Putting a saga on a receive endpoint.

use std::sync::Arc;

use bus_core::{BusBuilder, ReceiveEndpointBuilder};

use crate::runtime::{SagaRuntime, SagaStats};
use crate::{SagaData, SagaRepository, StateMachine};

/// Adds sagas to receive endpoints.
pub trait SagaEndpointExt {
    /// Consumes every event of `machine` here, with instances in `repository`. Returns the
    /// saga's counters (conflicts, transitions).
    fn saga<S: SagaData, R: SagaRepository<S>>(
        &mut self,
        machine: Arc<StateMachine<S>>,
        repository: R,
    ) -> Arc<SagaStats>;
}

impl SagaEndpointExt for ReceiveEndpointBuilder {
    fn saga<S: SagaData, R: SagaRepository<S>>(
        &mut self,
        machine: Arc<StateMachine<S>>,
        repository: R,
    ) -> Arc<SagaStats> {
        let stats = Arc::new(SagaStats::default());
        let runtime =
            Arc::new(SagaRuntime { machine: machine.clone(), repository: Arc::new(repository), stats: stats.clone() });
        for register in machine.registrations() {
            register(self, runtime.clone());
        }
        stats
    }
}

/// Adds a saga on its own endpoint, named after the instance type as MassTransit does.
pub trait SagaBusExt: Sized {
    /// Adds an endpoint named `machine.name()` running the saga; `configure` may set retry,
    /// concurrency and the like. `stats` receives the saga's counters.
    fn saga_endpoint<S: SagaData, R: SagaRepository<S>>(
        self,
        machine: Arc<StateMachine<S>>,
        repository: R,
        configure: impl FnOnce(&mut ReceiveEndpointBuilder),
    ) -> (Self, Arc<SagaStats>);
}

impl SagaBusExt for BusBuilder {
    fn saga_endpoint<S: SagaData, R: SagaRepository<S>>(
        self,
        machine: Arc<StateMachine<S>>,
        repository: R,
        configure: impl FnOnce(&mut ReceiveEndpointBuilder),
    ) -> (Self, Arc<SagaStats>) {
        let mut stats = None;
        let name = machine.name().to_owned();
        let builder = self.receive_endpoint(name, |e| {
            stats = Some(e.saga(machine, repository));
            configure(e);
        });
        // receive_endpoint runs the closure at once, so the stats are set.
        (builder, stats.unwrap_or_default())
    }
}
