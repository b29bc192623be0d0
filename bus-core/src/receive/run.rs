//! What the deliveries of one run of an endpoint share, and a delivery's places in its
//! concurrency limits.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::EndpointRuntime;
use crate::Bus;

/// What every delivery of one run of an endpoint shares, behind one pointer.
///
/// A delivery's task is spawned by the endpoint's loop and often runs on another worker
/// thread than the loop's. Every pointer it held of its own (the endpoint, the bus, the
/// limits, the tokens) was cloned on the loop's thread and dropped on the other, which
/// moved each one's reference count between the cores twice per message; one pointer moves
/// instead.
pub(crate) struct EndpointRun {
    pub(crate) endpoint: Arc<EndpointRuntime>,
    pub(crate) bus: Bus,
    /// The endpoint's concurrency limit. Never closed: acquiring only waits.
    limit: Semaphore,
    /// The bus-wide concurrency limit, when it applies to this endpoint.
    bus_limit: Option<Arc<Semaphore>>,
    /// Fires when the bus cancels its consumers.
    pub(crate) cancel: CancellationToken,
    /// Fires when the endpoint stops taking deliveries.
    pub(crate) stopping: CancellationToken,
}

/// Only the endpoint's name: a consume context's `Debug` shows this, and the endpoint's own
/// would print its consumers and settings (and lock its state) for every context logged.
impl std::fmt::Debug for EndpointRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRun").field("endpoint", &self.endpoint.info().name).finish_non_exhaustive()
    }
}

impl EndpointRun {
    pub(crate) fn new(
        endpoint: Arc<EndpointRuntime>,
        bus: Bus,
        concurrency: usize,
        bus_limit: Option<Arc<Semaphore>>,
        cancel: CancellationToken,
        stopping: CancellationToken,
    ) -> Self {
        let limit = Semaphore::new(concurrency.clamp(1, Semaphore::MAX_PERMITS));
        EndpointRun { endpoint, bus, limit, bus_limit, cancel, stopping }
    }
}

/// One delivery's hold on its endpoint's run, and its places in the concurrency limits,
/// given back when it is dropped: when the delivery's task ends (however the delivery
/// ended) or is dropped.
pub(crate) struct Delivering {
    pub(crate) run: Arc<EndpointRun>,
    endpoint_place: bool,
    bus_place: bool,
}

impl Delivering {
    /// A hold on `run`, with no places yet.
    pub(crate) fn new(run: Arc<EndpointRun>) -> Self {
        Delivering { run, endpoint_place: false, bus_place: false }
    }

    /// Takes a place in the endpoint's limit, waiting for one; `false` only if the limit
    /// closed, which it never does.
    pub(crate) async fn take_endpoint_place(&mut self) -> bool {
        if !self.endpoint_place {
            let limit = &self.run.limit;
            // Tried first without waiting: when a place is free, cheaper than building and
            // polling an acquire future.
            let permit = match limit.try_acquire() {
                Ok(permit) => Some(permit),
                Err(_) => limit.acquire().await.ok(),
            };
            // Given back by `drop`, which holds no borrow of the limit; counted in the same
            // poll that took it.
            self.endpoint_place = permit.map(tokio::sync::SemaphorePermit::forget).is_some();
        }
        self.endpoint_place
    }

    /// Takes the places it does not hold yet, waiting for them: in the endpoint's limit,
    /// then in the bus's.
    pub(crate) async fn take_places(&mut self) {
        self.take_endpoint_place().await;
        if let (false, Some(limit)) = (self.bus_place, &self.run.bus_limit) {
            if let Ok(permit) = limit.acquire().await {
                permit.forget();
                self.bus_place = true;
            }
        }
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        if self.endpoint_place {
            self.run.limit.add_permits(1);
        }
        if let (true, Some(limit)) = (self.bus_place, &self.run.bus_limit) {
            limit.add_permits(1);
        }
    }
}
