//! The test harness's waits: they end on the transport's events, not on polling.

use std::time::Duration;

use bus_core::{EndpointTopology, Transport, TransportMessage};
use bus_inmemory::InMemoryTransport;

/// Waiting for messages in a queue that is not declared yet ends when it is declared and
/// filled: the declaration wakes the wait (without that wake-up, it times out).
#[tokio::test]
async fn waiting_for_a_queue_declared_later_ends_when_it_fills() {
    let transport = InMemoryTransport::default();
    let waiting = transport.clone();
    let waiter = tokio::spawn(async move { waiting.wait_for_queue_len("later", 1, Duration::from_secs(10)).await });
    // On this one-thread runtime the waiter runs until it waits for the declaration.
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "nothing to find yet");

    let topology = EndpointTopology { queue: "later".into(), ..EndpointTopology::default() };
    transport.declare(&topology).await.expect("declared");
    let message = TransportMessage { body: "{}".into(), ..Default::default() };
    transport.send("later", message).await.expect("sent");
    waiter.await.expect("the waiter ran").expect("the wait ends once the queue has its message");
}
