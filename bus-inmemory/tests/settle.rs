//! Settling deliveries at the transport level: nothing is lost when a settlement is cut short.

use std::time::Duration;

use bus_core::{EndpointTopology, Headers, Settlement, Transport, TransportMessage};
use bus_inmemory::{InMemoryOptions, InMemoryTransport};
use futures::StreamExt;

fn message(body: &'static str) -> TransportMessage {
    TransportMessage { body: body.into(), content_type: Some("application/json".into()), ..Default::default() }
}

/// A move to a full `_error` queue that is abandoned while it waits for room (its future
/// dropped) returns the message to its own queue: it was neither moved nor lost, and the
/// queue still has its room for it.
#[tokio::test]
async fn a_move_cut_short_returns_the_message_to_its_queue() {
    let transport = InMemoryTransport::with_options(InMemoryOptions {
        queue_capacity: 1,
        full_queue_wait: Some(Duration::from_secs(30)),
    });
    let topology = EndpointTopology { queue: "orders".into(), ..EndpointTopology::default() };
    transport.declare(&topology).await.expect("declared");
    transport.send("orders_error", message("{\"earlier\":true}")).await.expect("the error queue fills up");
    transport.send("orders", message("{\"n\":1}")).await.expect("sent");

    let (mut deliveries, _) = transport.subscribe(&topology, 1).await.expect("consuming").into_parts();
    let delivery = deliveries.next().await.expect("a delivery");
    let settlement = Settlement::MoveTo { queue: "orders_error".into(), headers: Headers::new() };
    let cut_short = tokio::time::timeout(Duration::from_millis(50), delivery.settle(settlement)).await;
    assert!(cut_short.is_err(), "the move waits for room in the full error queue");

    transport.wait_for_queue_len("orders", 1, Duration::from_secs(5)).await.expect("the message is back in its queue");
    assert_eq!(transport.queue_len("orders_error"), 1, "and not in the error queue");
}

/// `usize::MAX` as a queue capacity means "no limit", not a panic.
#[tokio::test]
async fn an_unlimited_queue_capacity_is_accepted() {
    let transport =
        InMemoryTransport::with_options(InMemoryOptions { queue_capacity: usize::MAX, ..InMemoryOptions::default() });
    let topology = EndpointTopology { queue: "unlimited".into(), ..EndpointTopology::default() };
    transport.declare(&topology).await.expect("declared");
    transport.send("unlimited", message("{}")).await.expect("sent");
    assert_eq!(transport.queue_len("unlimited"), 1);
}
