//! A bus on the in-memory transport in one line, recording what it does.

use std::sync::Arc;
use std::time::Duration;

use bus_core::testing::{BusRecorder, Log, MessageLog, RecordedDeadLetter, RecordedFault};
use bus_core::{Bus, BusBuilder};

use crate::InMemoryTransport;

/// Starts a bus on a fresh in-memory transport and records everything it publishes, sends,
/// consumes, faults and dead-letters, with waits that end on the condition or a timeout.
///
/// ```
/// use bus_core::{BoxError, ConsumeContext, Endpoint, Message};
/// use bus_inmemory::InMemoryTestHarness;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:Ping")]
/// # struct Ping { n: u32 }
/// # #[derive(Debug, Serialize, Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:Pong")]
/// # struct Pong { n: u32 }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let harness = InMemoryTestHarness::start(|bus| {
///     bus.endpoint(Endpoint::new("ping").handler(|ctx: ConsumeContext<Ping>| async move {
///         ctx.publish(Pong { n: ctx.message().n + 1 }).await?;
///         Ok(())
///     }))
/// })
/// .await?;
/// harness.bus().publish(Ping { n: 1 }).await?;
/// let pongs = harness.published().wait_for::<Pong>(1, std::time::Duration::from_secs(5)).await?;
/// assert_eq!(pongs[0].n, 2);
/// harness.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct InMemoryTestHarness {
    bus: Bus,
    transport: InMemoryTransport,
    recorder: Arc<BusRecorder>,
}

impl InMemoryTestHarness {
    /// Builds a bus with `configure` on a new in-memory transport, with an
    /// [`InMemoryScheduler`](crate::InMemoryScheduler), and starts it.
    pub async fn start(configure: impl FnOnce(BusBuilder) -> BusBuilder) -> bus_core::Result<Self> {
        Self::start_on(InMemoryTransport::new(), configure).await
    }

    /// Like [`start`](Self::start), on a given transport (to share it with other buses).
    pub async fn start_on(
        transport: InMemoryTransport,
        configure: impl FnOnce(BusBuilder) -> BusBuilder,
    ) -> bus_core::Result<Self> {
        let recorder = Arc::new(BusRecorder::default());
        let builder = Bus::builder(transport.clone())
            .observer_arc(recorder.clone())
            .stop_timeout(Duration::from_secs(5))
            .request_timeout(Duration::from_secs(5))
            // Scheduled messages and saga timeouts work in tests without more setup; a
            // `scheduler(..)` in `configure` replaces it.
            .scheduler(crate::InMemoryScheduler::new());
        let bus = configure(builder).build();
        bus.start().await?;
        Ok(InMemoryTestHarness { bus, transport, recorder })
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The transport, to inspect queues (`_error`, `_skipped`).
    pub fn transport(&self) -> &InMemoryTransport {
        &self.transport
    }

    /// Messages published.
    pub fn published(&self) -> &MessageLog {
        &self.recorder.published
    }

    /// Messages sent.
    pub fn sent(&self) -> &MessageLog {
        &self.recorder.sent
    }

    /// Messages consumed successfully.
    pub fn consumed(&self) -> &MessageLog {
        &self.recorder.consumed
    }

    /// Consumes that failed for good.
    pub fn faults(&self) -> &Log<RecordedFault> {
        &self.recorder.faults
    }

    /// Messages moved to `_error` or `_skipped`.
    pub fn dead_letters(&self) -> &Log<RecordedDeadLetter> {
        &self.recorder.dead_letters
    }

    /// Stops the bus.
    pub async fn stop(&self) -> bus_core::Result<()> {
        self.bus.stop().await
    }
}
