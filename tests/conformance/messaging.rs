//! Publish, send, competing consumers, contracts and headers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bus_core::testing::MessageLog;
use bus_core::{BoxError, ConsumeContext, Endpoint, Message, SendOptions};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;

use super::support::{log, record};
use crate::{unique, Fixture, WAIT};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:FanOutEvent")]
struct FanOutEvent {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:FanOutMarker")]
struct FanOutMarker {
    n: u32,
}

/// A published message reaches every endpoint consuming its type, once, and no other endpoint.
pub async fn publish_reaches_every_consuming_endpoint_and_no_other<F: Fixture>(fixture: &F) {
    let (a, b, c) = (log(), log(), log());
    let (name_a, name_b, name_c) = (unique("fan-a"), unique("fan-b"), unique("fan-c"));
    let bus = fixture
        .bus()
        .endpoint(record::<FanOutEvent>(Endpoint::new(&name_a), &a))
        .endpoint(record::<FanOutEvent>(Endpoint::new(&name_b), &b))
        .endpoint(record::<FanOutMarker>(Endpoint::new(&name_c).concurrency_limit(1), &c))
        .build();
    bus.start().await.expect("bus starts");
    bus.publish(FanOutEvent { n: 7 }).await.expect("publish");
    // C's queue is FIFO with one consumer: had the event reached C, it would come before the marker.
    bus.publish(FanOutMarker { n: 1 }).await.expect("publish marker");
    a.wait_for::<FanOutEvent>(1, WAIT).await.expect("endpoint A receives the event");
    b.wait_for::<FanOutEvent>(1, WAIT).await.expect("endpoint B receives the event");
    c.wait_for::<FanOutMarker>(1, WAIT).await.expect("endpoint C receives the marker");
    let skipped = fixture.take_messages(&format!("{name_c}_skipped"), 0, WAIT).await;
    bus.stop().await.expect("stop");
    assert_eq!(a.messages::<FanOutEvent>().iter().map(|m| m.n).collect::<Vec<_>>(), [7]);
    assert_eq!(b.count::<FanOutEvent>(), 1, "B consumed the event exactly once");
    assert_eq!(c.count::<FanOutEvent>(), 0, "C does not consume the event type");
    assert!(skipped.is_empty(), "the event was never routed to C: {skipped:?}");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:WorkItem")]
struct WorkItem {
    n: u32,
}

type Handler = Box<dyn Fn(ConsumeContext<WorkItem>) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

fn competing_consumer(log: &Arc<MessageLog>, total: &Arc<MessageLog>, barrier: &Arc<Barrier>) -> Handler {
    let log = log.clone();
    let total = total.clone();
    let barrier = barrier.clone();
    let first = Arc::new(AtomicBool::new(true));
    Box::new(move |ctx| {
        let log = log.clone();
        let total = total.clone();
        let barrier = barrier.clone();
        let first = first.clone();
        Box::pin(async move {
            // Each instance holds its first message until the other has one too, so neither
            // can take the whole queue before the other starts.
            if first.swap(false, Ordering::SeqCst) {
                tokio::time::timeout(WAIT, barrier.wait()).await?;
            }
            log.record(ctx.envelope());
            total.record(ctx.envelope());
            Ok(())
        })
    })
}

/// Two bus instances on one endpoint share its messages: each gets some, none gets one twice.
pub async fn competing_consumers_share_one_endpoint_without_duplicates<F: Fixture>(fixture: &F) {
    const COUNT: u32 = 40;
    let name = unique("competing");
    let barrier = Arc::new(Barrier::new(2));
    let (first, second, total) = (log(), log(), log());
    let build = |log: &Arc<MessageLog>| {
        let handler = competing_consumer(log, &total, &barrier);
        fixture.bus().endpoint(Endpoint::new(&name).prefetch(1).concurrency_limit(1).handler(handler)).build()
    };
    let (bus1, bus2) = (build(&first), build(&second));
    bus1.start().await.expect("first bus starts");
    bus2.start().await.expect("second bus starts");
    for n in 0..COUNT {
        bus1.send(&format!("queue:{name}"), WorkItem { n }).await.expect("send");
    }
    total.wait_for::<WorkItem>(COUNT as usize, WAIT).await.expect("all work items consumed");
    bus1.stop().await.expect("stop");
    bus2.stop().await.expect("stop");
    let a: Vec<u32> = first.messages::<WorkItem>().iter().map(|w| w.n).collect();
    let b: Vec<u32> = second.messages::<WorkItem>().iter().map(|w| w.n).collect();
    assert!(!a.is_empty() && !b.is_empty(), "both instances got a share: {a:?} / {b:?}");
    let mut seen = HashSet::new();
    for n in a.iter().chain(&b) {
        assert!(seen.insert(*n), "work item {n} consumed twice");
    }
    assert_eq!(seen.len(), COUNT as usize);
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Direct")]
struct Direct {
    to: String,
}

/// A sent message reaches only the queue it was sent to, even when others consume its type.
pub async fn send_reaches_only_its_queue<F: Fixture>(fixture: &F) {
    let (a, b) = (log(), log());
    let (name_a, name_b) = (unique("send-a"), unique("send-b"));
    let bus = fixture
        .bus()
        .endpoint(record::<Direct>(Endpoint::new(&name_a), &a))
        .endpoint(record::<Direct>(Endpoint::new(&name_b).concurrency_limit(1), &b))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name_a}"), Direct { to: "a".into() }).await.expect("send to A");
    bus.send(&bus.endpoint_address(&name_b), Direct { to: "b".into() }).await.expect("send to B by address");
    a.wait_for::<Direct>(1, WAIT).await.expect("A receives");
    b.wait_for::<Direct>(1, WAIT).await.expect("B receives");
    bus.stop().await.expect("stop");
    assert_eq!(a.messages::<Direct>().iter().map(|d| d.to.as_str()).collect::<Vec<_>>(), ["a"]);
    assert_eq!(b.messages::<Direct>().iter().map(|d| d.to.as_str()).collect::<Vec<_>>(), ["b"]);
    let envelope = &a.envelopes::<Direct>()[0];
    assert_eq!(envelope.destination_address.as_deref(), Some(bus.endpoint_address(&name_a).as_str()));
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:OrderShipped", implements("urn:message:Conformance:OrderEvent"))]
struct OrderShipped {
    order_id: u32,
    carrier: String,
}

/// The contract: only the fields its consumers need.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:OrderEvent")]
struct OrderEvent {
    order_id: u32,
}

/// A consumer of a contract URN receives a message that lists the contract.
pub async fn consumer_of_a_contract_receives_messages_that_list_it<F: Fixture>(fixture: &F) {
    let (events, shipped) = (log(), log());
    // One endpoint consumes the concrete type (so its exchange exists before the first
    // publish), another only the contract: both receive the message.
    let bus = fixture
        .bus()
        .endpoint(record::<OrderEvent>(Endpoint::new(unique("contract")), &events))
        .endpoint(record::<OrderShipped>(Endpoint::new(unique("concrete")), &shipped))
        .build();
    bus.start().await.expect("bus starts");
    bus.publish(OrderShipped { order_id: 12, carrier: "ups".into() }).await.expect("publish");
    let got = events.wait_for::<OrderEvent>(1, WAIT).await.expect("contract consumer receives");
    shipped.wait_for::<OrderShipped>(1, WAIT).await.expect("concrete consumer receives");
    bus.stop().await.expect("stop");
    assert_eq!(got[0].order_id, 12);
    assert_eq!(events.all()[0].message_type, OrderShipped::message_types());
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:WithHeaders")]
struct WithHeaders {
    n: u32,
}

/// Headers written on publish arrive unchanged (strings, numbers, booleans).
pub async fn headers_round_trip<F: Fixture>(fixture: &F) {
    let got = log();
    let bus = fixture.bus().endpoint(record::<WithHeaders>(Endpoint::new(unique("headers")), &got)).build();
    bus.start().await.expect("bus starts");
    let options = SendOptions::new().header("Tenant", "acme").header("Priority", 5).header("Urgent", true);
    bus.publish_with(WithHeaders { n: 1 }, options).await.expect("publish");
    got.wait_for::<WithHeaders>(1, WAIT).await.expect("received");
    bus.stop().await.expect("stop");
    let envelope = &got.all()[0];
    assert_eq!(envelope.headers.get_str("Tenant"), Some("acme"));
    assert_eq!(envelope.headers.get_i64("Priority"), Some(5));
    assert_eq!(envelope.headers.get("Urgent"), Some(&serde_json::Value::Bool(true)));
}
