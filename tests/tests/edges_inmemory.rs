//! Reliability at the edges on the in-memory transport: configuration that cannot work, text
//! from the wire in fault headers, a publish to several queues when one is full.

use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::testing::Log;
use bus_core::{BoxError, Bus, ConsumeContext, ConsumerOptions, Endpoint, Message, Transport, TransportMessage};
use bus_inmemory::{InMemoryOptions, InMemoryTestHarness, InMemoryTransport};
use serde::{Deserialize, Serialize};
use tests::WAIT;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Edges:Probe")]
struct Probe {
    n: u32,
}

fn handler(e: Endpoint) -> Endpoint {
    e.handler(|_: ConsumeContext<Probe>| async { Ok(()) })
}

#[tokio::test]
async fn configuration_that_cannot_work_is_refused_before_start() {
    let endpoint_limit = Bus::builder(InMemoryTransport::new())
        .endpoint(handler(Endpoint::new("unbounded").concurrency_limit(usize::MAX)))
        .try_build()
        .expect_err("refused");
    assert!(
        endpoint_limit.to_string().contains("endpoint `unbounded`: the endpoint's concurrency limit"),
        "{endpoint_limit}"
    );

    let consumer_limit = Bus::builder(InMemoryTransport::new())
        .endpoint(
            Endpoint::new("none-at-once")
                .handler_with(|_: ConsumeContext<Probe>| async { Ok(()) }, ConsumerOptions::new().concurrency_limit(0)),
        )
        .try_build()
        .expect_err("refused");
    assert!(consumer_limit.to_string().contains("concurrency limit is 0"), "{consumer_limit}");

    // A temporary endpoint's messages cannot wait for a redelivery in queues that outlive it.
    let temporary = Bus::builder(InMemoryTransport::new())
        .endpoint(handler(
            Endpoint::new("short-lived")
                .temporary()
                .redelivery(bus_core::RedeliveryPolicy::intervals([Duration::from_secs(5)])),
        ))
        .try_build()
        .expect_err("refused");
    assert!(temporary.to_string().contains("temporary endpoint has no delayed redelivery"), "{temporary}");

    // Built without checking, it refuses to start, with the same reason, and never panics.
    let bus = Bus::builder(InMemoryTransport::new())
        .endpoint(handler(Endpoint::new("unbounded").concurrency_limit(usize::MAX)))
        .build();
    let error = bus.start().await.expect_err("refused at start");
    assert!(error.to_string().contains("concurrency limit"), "{error}");

    // Pauses past what a duration holds saturate instead of overflowing.
    let policy = RetryPolicy::incremental(3, Duration::MAX, Duration::MAX);
    assert_eq!(policy.delay(3), Some(Duration::MAX));
    let policy = RetryPolicy::exponential(40, Duration::MAX, Duration::MAX).without_jitter();
    assert_eq!(policy.delay(40), Some(Duration::MAX));
}

/// Breaks: a content type and a message type from the wire holding newlines and escape
/// codes. Proves: the `_error` headers carry them escaped, never raw.
#[tokio::test]
async fn text_from_the_wire_is_escaped_in_fault_headers() {
    let transport = InMemoryTransport::new();
    let bus = Bus::builder(transport.clone()).endpoint(handler(Endpoint::new("escapes"))).build();
    bus.start().await.expect("bus starts");
    let forged = TransportMessage {
        body: bytes::Bytes::from_static(b"{}"),
        content_type: Some("text/plain\nMT-Fault-Message: forged\x1b[31m".into()),
        ..TransportMessage::default()
    };
    transport.send("escapes", forged).await.expect("sent raw");
    transport.wait_for_queue_len("escapes_error", 1, WAIT).await.expect("in _error");
    let moved = transport.drain("escapes_error");
    bus.stop().await.expect("stop");
    let reason = moved[0].headers.get_str("MT-Fault-Message").expect("a reason");
    assert!(!reason.contains('\n') && !reason.contains('\x1b'), "escaped: {reason:?}");
    assert!(reason.contains("text/plain\\nMT-Fault-Message: forged\\u{1b}[31m"), "{reason:?}");
}

/// Breaks: a message published to two endpoints, one of whose queues is full. Proves: the
/// publish fails without leaving a copy in the other queue, so trying again does not double it.
#[tokio::test]
async fn a_publish_to_several_queues_enters_all_or_none() {
    let transport = InMemoryTransport::with_options(InMemoryOptions { queue_capacity: 2, full_queue_wait: None });
    // `idle` is declared and bound, then nobody consumes it: what reaches it stays there.
    let idle = Bus::builder(transport.clone()).endpoint(handler(Endpoint::new("idle"))).build();
    idle.start().await.expect("starts");
    idle.stop().await.expect("stops");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let consumed = Log::<u32>::default();
    let bus = Bus::builder(transport.clone())
        .endpoint(Endpoint::new("busy").prefetch(1).handler_with_state(
            (gate.clone(), consumed.clone()),
            |ctx: ConsumeContext<Probe>, (gate, consumed)| async move {
                gate.acquire().await?.forget();
                consumed.push(ctx.message().n);
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    bus.publish(Probe { n: 1 }).await.expect("room in both");
    assert_eq!(transport.queue_len("idle"), 1);
    // `busy` holds message 1 until the gate opens, and message 3 waits behind it: full.
    bus.send("queue:busy", Probe { n: 3 }).await.expect("the last place in `busy`");
    let refused = bus.publish(Probe { n: 2 }).await;
    assert!(refused.is_err(), "`busy` is full");
    assert_eq!(transport.queue_len("idle"), 1, "the refused publish left no copy in `idle`");
    gate.add_permits(3);
    consumed.wait_until("messages 1 and 3", WAIT, |c| c.len() == 2).await.expect("consumed");
    bus.publish(Probe { n: 2 }).await.expect("room again");
    consumed.wait_until("message 2", WAIT, |c| c.len() == 3).await.expect("consumed");
    bus.stop().await.expect("stop");
    let in_idle: Vec<u32> = transport
        .drain("idle")
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.body).expect("json")["message"]["n"].as_u64().unwrap_or(0)
                as u32
        })
        .collect();
    assert_eq!(in_idle, [1, 2], "each message once in `idle`");
    assert_eq!(consumed.snapshot(), [1, 3, 2]);
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tally {
    count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Edges:Tick")]
struct Tick {
    tally_id: uuid::Uuid,
}

/// Breaks: a raw JSON event (no message id at all) delivered twice. Proves: the saga gives it
/// a deterministic id and applies it once.
#[tokio::test]
async fn a_saga_event_without_a_message_id_is_applied_once() {
    use bus_saga::{when, InMemorySagaRepository, Saga, StateMachine};
    let machine = StateMachine::<Tally>::builder("Tally")
        .states(["Counting"])
        .event::<Tick>(|m| m.tally_id)
        .initially(when::<Tally, Tick>().then(|t, _| t.data.count += 1).transition_to("Counting"))
        .during("Counting", when::<Tally, Tick>().then(|t, _| t.data.count += 1))
        .build()
        .expect("valid state machine");
    let transport = InMemoryTransport::new();
    let repository = InMemorySagaRepository::<Tally>::new();
    let saga = Saga::new(machine, repository.clone());
    let stats = saga.stats();
    let bus = Bus::builder(transport.clone()).endpoint(saga.endpoint()).build();
    bus.start().await.expect("bus starts");
    let tally_id = uuid::Uuid::now_v7();
    let raw = || TransportMessage {
        body: format!(r#"{{"tallyId":"{tally_id}"}}"#).into_bytes().into(),
        content_type: Some("application/json".into()),
        ..TransportMessage::default()
    };
    transport.send("Tally", raw()).await.expect("sent");
    assert!(stats.wait_for_transitions(1, WAIT).await, "applied");
    transport.send("Tally", raw()).await.expect("sent again");
    // The second is consumed (and recognised) once the queue is empty and nothing is in progress.
    transport.wait_for_queue_len("Tally", 0, WAIT).await.expect("taken");
    bus.stop().await.expect("stop: the second delivery is settled");
    assert_eq!(repository.get(tally_id).expect("stored").data.count, 1, "the same event counted once");
    assert_eq!(stats.transitions(), 1);
}

/// A machine that keeps its finalized instances keeps them when the finalizing event is
/// delivered again (its ack lost): only a machine that deletes them keeps one for a while.
#[tokio::test]
async fn a_kept_final_instance_survives_its_finalizing_event_delivered_again() {
    use bus_saga::{when, InMemorySagaRepository, Saga, StateMachine};
    let machine = StateMachine::<Tally>::builder("KeptTally")
        .states(["Counting"])
        .event::<Tick>(|m| m.tally_id)
        .initially(when::<Tally, Tick>().transition_to("Counting"))
        .during("Counting", when::<Tally, Tick>().finalize())
        .completed_when_finalized(false)
        .build()
        .expect("valid state machine");
    let repository = InMemorySagaRepository::<Tally>::new();
    let saga = Saga::new(machine, repository.clone());
    let stats = saga.stats();
    let bus = Bus::builder(InMemoryTransport::new()).endpoint(saga.endpoint().concurrency_limit(1)).build();
    bus.start().await.expect("bus starts");
    let tally_id = uuid::Uuid::now_v7();
    let finishing = bus_core::SendOptions::new().message_id(uuid::Uuid::now_v7());
    bus.publish(Tick { tally_id }).await.expect("first");
    assert!(stats.wait_for_transitions(1, WAIT).await);
    bus.publish_with(Tick { tally_id }, finishing.clone()).await.expect("finishing");
    assert!(stats.wait_for_transitions(2, WAIT).await);
    bus.publish_with(Tick { tally_id }, finishing).await.expect("finishing again");
    bus.stop().await.expect("stop: the repeat is settled");
    let kept = repository.get(tally_id).expect("still stored");
    assert!(kept.is_in("Final"), "{}", kept.current_state);
    assert_eq!(stats.transitions(), 2);
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Edges:Close")]
struct Close {
    tally_id: uuid::Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Edges:Closed")]
struct Closed {
    tally_id: uuid::Uuid,
}

/// Breaks: the message a finalizing event sends has nowhere to go yet (its queue does not
/// exist), so the event ends in `_error`; meanwhile an earlier event is delivered again.
/// Proves: the finalized instance is kept through both (also with a duplicate window of 0),
/// and when the finalizing event comes back the message leaves once and the instance goes.
#[tokio::test]
async fn a_finalized_instance_waits_for_its_own_event_to_come_back() {
    use bus_saga::{when, InMemorySagaRepository, Saga, StateMachine};
    for window in [10, 0] {
        let machine = StateMachine::<Tally>::builder("ClosingTally")
            .states(["Counting"])
            .event::<Tick>(|m| m.tally_id)
            .event::<Close>(|m| m.tally_id)
            .initially(when::<Tally, Tick>().transition_to("Counting"))
            .during(
                "Counting",
                when::<Tally, Close>().send("queue:closings", |_, e| Closed { tally_id: e.tally_id }).finalize(),
            )
            .duplicate_window(window)
            .build()
            .expect("valid state machine");
        let transport = InMemoryTransport::new();
        let repository = InMemorySagaRepository::<Tally>::new();
        let saga = Saga::new(machine, repository.clone());
        let stats = saga.stats();
        let bus = Bus::builder(transport.clone()).endpoint(saga.endpoint().concurrency_limit(1)).build();
        bus.start().await.expect("bus starts");
        let tally_id = uuid::Uuid::now_v7();
        let (tick, close) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let with_id = |id| bus_core::SendOptions::new().message_id(id);
        bus.publish_with(Tick { tally_id }, with_id(tick)).await.expect("tick");
        assert!(stats.wait_for_transitions(1, WAIT).await);
        bus.publish_with(Close { tally_id }, with_id(close)).await.expect("close");
        transport.wait_for_queue_len("ClosingTally_error", 1, WAIT).await.expect("the close fails: no `closings` yet");
        let failed = transport.drain("ClosingTally_error");
        assert!(repository.get(tally_id).is_some_and(|i| i.is_in("Final")), "kept for its message (window {window})");

        // The earlier event again: it changes nothing and takes nothing away.
        bus.publish_with(Tick { tally_id }, with_id(tick)).await.expect("tick again");
        transport.wait_for_queue_len("ClosingTally", 0, WAIT).await.expect("taken");
        bus.stop().await.expect("stop: settled");
        assert!(repository.get(tally_id).is_some(), "still kept after an earlier event came back (window {window})");

        // `closings` exists now; the failed event moved back from `_error`, as an operator does.
        let closings = Arc::new(bus_core::testing::MessageLog::default());
        let receiver = Bus::builder(transport.clone())
            .endpoint(tests::record::<Closed>(Endpoint::new("closings"), &closings))
            .build();
        receiver.start().await.expect("receiver starts");
        bus.start().await.expect("bus starts again");
        transport.send("ClosingTally", failed[0].clone()).await.expect("moved back");
        closings.wait_for::<Closed>(1, WAIT).await.expect("the message leaves");
        transport.wait_for_queue_len("ClosingTally", 0, WAIT).await.expect("taken");
        bus.stop().await.expect("stop");
        receiver.stop().await.expect("stop");
        assert_eq!(closings.count::<Closed>(), 1, "once (window {window})");
        assert!(repository.get(tally_id).is_none(), "deleted once its message left (window {window})");
    }
}

/// Breaks: the bus stops while a message waits for its delayed redelivery. Proves: the
/// message comes back, once, to the next bus on the same broker.
#[tokio::test]
async fn a_message_waiting_for_redelivery_comes_back_once_after_a_stop() {
    let transport = InMemoryTransport::new();
    let seen = Log::<u32>::default();
    let bus = |seen: Log<u32>| {
        Bus::builder(transport.clone())
            .endpoint(
                Endpoint::new("later")
                    .redelivery(bus_core::RedeliveryPolicy::intervals([Duration::from_millis(300)]))
                    .handler_with_state(seen, |ctx: ConsumeContext<Probe>, seen| async move {
                        seen.push(ctx.redelivery_count());
                        if ctx.redelivery_count() == 0 {
                            return Err::<(), BoxError>("not yet".into());
                        }
                        Ok(())
                    }),
            )
            .build()
    };
    let first = bus(seen.clone());
    first.start().await.expect("starts");
    first.publish(Probe { n: 1 }).await.expect("published");
    seen.wait_until("the first attempt", WAIT, |s| s.len() == 1).await.expect("attempted");
    first.stop().await.expect("stops with the redelivery pending");
    let second = bus(seen.clone());
    second.start().await.expect("starts");
    seen.wait_until("the redelivery", WAIT, |s| s.len() == 2).await.expect("redelivered");
    second.stop().await.expect("stops");
    assert_eq!(seen.snapshot(), [0, 1], "redelivered once");
    assert_eq!(transport.queue_len("later"), 0);
    assert!(transport.drain("later_error").is_empty());
}

/// A time header (`SendOptions::header_time`) reaches a consumer as the text the envelope
/// carries for it, with the envelope and with raw JSON alike (this transport has no time
/// type of its own).
#[tokio::test]
async fn a_time_header_reaches_consumers_as_its_text() {
    let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("a time");
    for raw in [false, true] {
        let got = Arc::new(bus_core::testing::MessageLog::default());
        let recorded = got.clone();
        let harness = InMemoryTestHarness::start(move |bus| {
            let bus = if raw {
                bus.serializers(
                    bus_core::serializer::Serializers::default().with_default(bus_core::serializer::RawJsonSerializer),
                )
            } else {
                bus
            };
            bus.endpoint(tests::record::<Probe>(Endpoint::new("timed"), &recorded))
        })
        .await
        .expect("harness");
        let options = bus_core::SendOptions::new().header_time("Offer-Expires", at);
        harness.bus().send_with("queue:timed", Probe { n: 1 }, options).await.expect("send");
        let envelope = got.wait_for_envelope("the probe", WAIT, |_| true).await.expect("consumed");
        harness.stop().await.expect("stop");
        assert_eq!(envelope.headers.get_str("Offer-Expires"), Some("2027-01-15T08:00:00.0000000Z"), "raw JSON: {raw}");
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Edges:Large")]
struct Large {
    note: String,
}

/// A large message is not kept beside its bytes while the transport takes it when nobody
/// observes the bus; either way, its consumer and an observer get it whole.
#[tokio::test]
async fn a_large_message_arrives_whole_with_and_without_observers() {
    let large = Large { note: "x".repeat(100_000) };
    for observed in [false, true] {
        let recorder = Arc::new(bus_core::testing::BusRecorder::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut builder = Bus::builder(InMemoryTransport::new()).endpoint(Endpoint::new("large").handler(
            move |ctx: ConsumeContext<Large>| {
                let _ = tx.send(ctx.message().clone());
                async { Ok(()) }
            },
        ));
        if observed {
            builder = builder.observer_arc(recorder.clone());
        }
        let bus = builder.build();
        bus.start().await.expect("bus starts");
        bus.publish(large.clone()).await.expect("publish");
        let received = tokio::time::timeout(WAIT, rx.recv()).await.expect("consumed in time").expect("a message");
        assert_eq!(received, large, "the consumer got it whole (observed: {observed})");
        if observed {
            assert_eq!(
                recorder.published.messages::<Large>(),
                std::slice::from_ref(&large),
                "the observer got it whole"
            );
        }
        bus.stop().await.expect("bus stops");
    }
}
