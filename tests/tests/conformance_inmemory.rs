//! The conformance suite on the in-memory transport.

use std::time::Duration;

use bus_core::TransportMessage;
use bus_inmemory::InMemoryTransport;
use tests::Fixture;

struct InMemoryFixture {
    transport: InMemoryTransport,
}

impl Fixture for InMemoryFixture {
    type Transport = InMemoryTransport;

    fn transport(&self) -> InMemoryTransport {
        self.transport.clone()
    }

    async fn take_messages(&self, queue: &str, n: usize, timeout: Duration) -> Vec<TransportMessage> {
        let _ = self.transport.wait_for_queue_len(queue, n, timeout).await;
        self.transport.drain(queue)
    }
}

async fn fixture() -> InMemoryFixture {
    InMemoryFixture { transport: InMemoryTransport::new() }
}

tests::conformance_suite!(fixture());
