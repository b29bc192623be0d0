//! The bus's response endpoint when its dead-letter queues cannot be declared: declared
//! when first needed, a transient failure requeues the message and tries again, a refusal
//! for good drops that message (rather than requeue it for ever) and tries again with the
//! next one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{Bus, EndpointTopology, Message, Result, Subscription, Transport, TransportMessage};
use bus_inmemory::InMemoryTransport;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:ResponseEndpoint:Answer")]
struct Answer {
    amount: u32,
}

/// The in-memory transport, with declarations of dead-letter queues failing as planned:
/// each planned entry fails one call (`true`: transiently), then calls succeed.
#[derive(Clone)]
struct DeadLettersFail {
    inner: InMemoryTransport,
    plan: Arc<Mutex<VecDeque<bool>>>,
    calls: Arc<AtomicUsize>,
}

impl DeadLettersFail {
    fn new(plan: impl IntoIterator<Item = bool>) -> Self {
        DeadLettersFail {
            inner: InMemoryTransport::new(),
            plan: Arc::new(Mutex::new(plan.into_iter().collect())),
            calls: Arc::default(),
        }
    }
}

impl Transport for DeadLettersFail {
    fn system(&self) -> &'static str {
        self.inner.system()
    }
    fn address(&self, name: &str) -> String {
        self.inner.address(name)
    }
    fn declare<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>> {
        // The bus declares a temporary endpoint's dead-letter queues when first needed.
        if topology.temporary && topology.dead_letter_queues {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let planned = self.plan.lock().expect("plan").pop_front();
            if let Some(transient) = planned {
                return Box::pin(async move { Err(bus_core::Error::transport("declaration failed", transient, None)) });
            }
        }
        self.inner.declare(topology)
    }
    fn publish<'a>(&'a self, types: &'a [&'a str], message: TransportMessage) -> BoxFuture<'a, Result<()>> {
        self.inner.publish(types, message)
    }
    fn send<'a>(&'a self, destination: &'a str, message: TransportMessage) -> BoxFuture<'a, Result<()>> {
        self.inner.send(destination, message)
    }
    fn subscribe<'a>(&'a self, topology: &'a EndpointTopology, prefetch: u16) -> BoxFuture<'a, Result<Subscription>> {
        self.inner.subscribe(topology, prefetch)
    }
    fn delete<'a>(&'a self, topology: &'a EndpointTopology) -> BoxFuture<'a, Result<()>> {
        self.inner.delete(topology)
    }
}

/// A response to a request nobody made, as the bus's response endpoint may receive it.
fn late_answer(amount: u32) -> TransportMessage {
    let body = format!(
        r#"{{"requestId":"{}","messageType":["{}"],"message":{{"amount":{amount}}}}}"#,
        uuid::Uuid::new_v4(),
        Answer::message_type()
    );
    TransportMessage {
        body: body.into_bytes().into(),
        content_type: Some("application/vnd.masstransit+json".into()),
        ..Default::default()
    }
}

/// The queue of the bus's response endpoint.
fn response_queue(bus: &Bus) -> String {
    bus.address().rsplit('/').next().and_then(|last| last.split('?').next()).expect("queue name").to_owned()
}

#[tokio::test]
async fn a_transient_declaration_failure_requeues_the_message_until_the_queues_exist() {
    let transport = DeadLettersFail::new([true, true]);
    let bus = Bus::builder(transport.clone()).build();
    bus.start().await.expect("bus starts");
    let queue = response_queue(&bus);
    transport.send(&queue, late_answer(7)).await.expect("raw send");
    let skipped = format!("{queue}_skipped");
    let arrived = transport.inner.wait_for_queue_len(&skipped, 1, WAIT).await;
    let moved = transport.inner.drain(&skipped);
    bus.stop().await.expect("stop");

    arrived.expect("the message reaches `_skipped` once its queues are declared");
    assert_eq!(transport.calls.load(Ordering::SeqCst), 3, "two failed declarations, then one that held");
    assert_eq!(moved.len(), 1, "moved once, not lost on the failures");
    assert!(String::from_utf8_lossy(&moved[0].body).contains(r#""amount":7"#));
}

#[tokio::test]
async fn a_refused_declaration_drops_that_message_and_is_tried_again_for_the_next() {
    let transport = DeadLettersFail::new([false]);
    let bus = Bus::builder(transport.clone()).build();
    bus.start().await.expect("bus starts");
    let queue = response_queue(&bus);
    transport.send(&queue, late_answer(7)).await.expect("raw send");
    transport.send(&queue, late_answer(8)).await.expect("raw send");
    let skipped = format!("{queue}_skipped");
    let arrived = transport.inner.wait_for_queue_len(&skipped, 1, WAIT).await;
    let moved = transport.inner.drain(&skipped);
    let left = transport.inner.queue_len(&queue);
    bus.stop().await.expect("stop");

    arrived.expect("the next message reaches `_skipped`");
    assert_eq!(transport.calls.load(Ordering::SeqCst), 2, "refused once, then declared for the next message");
    assert_eq!(moved.len(), 1);
    assert!(String::from_utf8_lossy(&moved[0].body).contains(r#""amount":8"#), "the first was dropped");
    assert_eq!(left, 0, "nothing requeued round and round");
}
