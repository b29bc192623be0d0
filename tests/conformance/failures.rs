//! Retries, redelivery, `_error`, `_skipped`, faults, bad input, panics, hangs, the outbox.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::testing::{BusRecorder, MessageLog};
use bus_core::{
    BoxError, ConsumeContext, ConsumerOptions, Endpoint, Fault, Message, Permanent, RedeliveryPolicy, Transport,
};
use serde::{Deserialize, Serialize};

use super::support::{header, log, raw, record};
use crate::{unique, Fixture, WAIT};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:AlwaysFails")]
struct AlwaysFails {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:FaultMarker")]
struct FaultMarker;

#[derive(Debug)]
struct InventoryDown;

impl std::fmt::Display for InventoryDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("inventory service unavailable")
    }
}

impl std::error::Error for InventoryDown {}

/// Runs a consumer that always fails under `retry` and `redelivery`; checks attempts, the
/// error queue with its headers, and exactly one fault.
async fn always_failing<F: Fixture>(
    fixture: &F,
    retry: RetryPolicy,
    redelivery: RedeliveryPolicy,
    attempts_expected: u32,
) {
    let name = unique("always-fails");
    let attempts = Arc::new(AtomicU32::new(0));
    let faults = log();
    let counter = attempts.clone();
    let fault_endpoint = unique("fault-watch");
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).retry(retry).redelivery(redelivery).handler(
            move |_: ConsumeContext<AlwaysFails>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), BoxError>(InventoryDown.into()) }
            },
        ))
        .endpoint(record::<FaultMarker>(
            record::<Fault<AlwaysFails>>(Endpoint::new(&fault_endpoint).concurrency_limit(1), &faults),
            &faults,
        ))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), AlwaysFails { n: 1 }).await.expect("send");
    let errors = fixture.take_messages(&format!("{name}_error"), 1, WAIT).await;
    // Every fault is emitted before the message reaches `_error`; the marker, behind any
    // fault in the watcher's FIFO queue, proves no second one is on its way.
    bus.send(&format!("queue:{fault_endpoint}"), FaultMarker).await.expect("marker");
    faults.wait_for::<FaultMarker>(1, WAIT).await.expect("marker arrives");
    bus.stop().await.expect("stop");

    assert_eq!(attempts.load(Ordering::SeqCst), attempts_expected, "attempts");
    assert_eq!(errors.len(), 1, "one message in the error queue");
    let moved = &errors[0];
    assert_eq!(header(moved, "MT-Reason"), "fault");
    assert_eq!(header(moved, "MT-Fault-ExceptionType"), "InventoryDown");
    assert_eq!(header(moved, "MT-Fault-Message"), "inventory service unavailable");
    assert!(header(moved, "MT-Fault-StackTrace").contains("inventory service unavailable"));
    assert!(!header(moved, "MT-Fault-Timestamp").is_empty());
    assert_eq!(header(moved, "MT-Fault-InputAddress"), bus.endpoint_address(&name));
    assert!(header(moved, "MT-Fault-ConsumerType").contains("always_failing"));
    assert_eq!(header(moved, "MT-Fault-MessageType"), AlwaysFails::message_type());
    assert!(moved.headers.get_i64("MT-Fault-RetryCount").is_some());
    for host in [
        "MT-Host-MachineName",
        "MT-Host-ProcessName",
        "MT-Host-ProcessId",
        "MT-Host-Assembly",
        "MT-Host-AssemblyVersion",
        "MT-Host-MassTransitVersion",
        "MT-Host-FrameworkVersion",
        "MT-Host-OperatingSystemVersion",
    ] {
        assert!(!header(moved, host).is_empty(), "{host}");
    }
    let original: serde_json::Value = serde_json::from_slice(&moved.body).expect("original bytes are the envelope");
    assert_eq!(original["message"]["n"], 1, "the body moved unchanged");

    let received = faults.messages::<Fault<AlwaysFails>>();
    assert_eq!(received.len(), 1, "exactly one fault");
    let fault = &received[0];
    assert_eq!(fault.message.n, 1);
    assert_eq!(fault.exceptions[0].exception_type, "InventoryDown");
    assert_eq!(fault.fault_message_types, [AlwaysFails::message_type()]);
    let envelope = &faults.envelopes::<Fault<AlwaysFails>>()[0];
    // As MassTransit's `FaultPipe` sets it: the failed message's correlation id, else its
    // request id; it had neither.
    assert_eq!(envelope.initiator_id, None);
}

/// A consumer that always fails is attempted exactly 1 + N times, then lands in `_error`
/// with every fault header, and exactly one `Fault<T>` is published.
pub async fn always_failing_consumer_is_retried_then_moved_to_error_with_one_fault<F: Fixture>(fixture: &F) {
    always_failing(fixture, RetryPolicy::immediate(2), RedeliveryPolicy::default(), 3).await;
}

/// With redelivery, each delivery is retried in process, then redelivered, and only the
/// final failure produces a fault (not one per redelivery).
pub async fn redelivered_failures_produce_one_fault_after_the_last_redelivery<F: Fixture>(fixture: &F) {
    let redelivery = RedeliveryPolicy::intervals([Duration::from_millis(50), Duration::from_millis(100)]);
    always_failing(fixture, RetryPolicy::immediate(1), redelivery, 6).await;
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:FlakyJob")]
struct FlakyJob;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:JobAttempted")]
struct JobAttempted {
    attempt: u32,
}

/// A consumer that fails twice then succeeds is consumed once, leaves nothing in `_error`,
/// raises no fault, and what the failed attempts published never left the outbox.
pub async fn consumer_failing_twice_then_succeeding_publishes_only_from_the_successful_attempt<F: Fixture>(
    fixture: &F,
) {
    let recorder = Arc::new(BusRecorder::default());
    let name = unique("flaky");
    let seen_attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = seen_attempts.clone();
    let bus = fixture
        .bus()
        .observer_arc(recorder.clone())
        .endpoint(
            Endpoint::new(&name).retry(RetryPolicy::intervals([Duration::from_millis(10); 3])).handler_with_state(
                seen,
                |ctx: ConsumeContext<FlakyJob>, seen| async move {
                    let attempt = ctx.retry_attempt();
                    seen.lock().map_err(|e| e.to_string())?.push(attempt);
                    ctx.publish(JobAttempted { attempt }).await?;
                    if attempt < 2 {
                        return Err(InventoryDown.into());
                    }
                    Ok(())
                },
            ),
        )
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), FlakyJob).await.expect("send");
    recorder.consumed.wait_for::<FlakyJob>(1, WAIT).await.expect("consumed");
    // Outbox messages are released in order after the consume; had the failed attempts'
    // messages leaked, they would be recorded before this one.
    recorder
        .published
        .wait_for_envelope("JobAttempted", WAIT, |e| e.has_message_type(JobAttempted::message_type()))
        .await
        .expect("the successful attempt's message is published");
    let errors = fixture.take_messages(&format!("{name}_error"), 0, Duration::ZERO).await;
    bus.stop().await.expect("stop");
    assert_eq!(*seen_attempts.lock().expect("lock"), [0, 1, 2], "retry attempt visible on the context");
    let published: Vec<u32> = recorder.published.messages::<JobAttempted>().iter().map(|m| m.attempt).collect();
    assert_eq!(published, [2], "only the successful attempt's publish left the outbox");
    assert_eq!(recorder.consumed.count::<FlakyJob>(), 1);
    assert!(errors.is_empty());
    assert!(recorder.faults.is_empty(), "no fault");
    assert!(recorder.published.all().iter().all(|e| !e.message_type[0].contains("Fault")));
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:RedeliverMe")]
struct RedeliverMe;

/// Delayed redelivery delivers again after the configured delays with `MT-Redelivery-Count`
/// counting up.
pub async fn delayed_redelivery_delivers_again_with_a_counted_header<F: Fixture>(fixture: &F) {
    let name = unique("redeliver");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Arc::new(BusRecorder::default());
    let seen_in = seen.clone();
    let bus = fixture
        .bus()
        .observer_arc(recorder.clone())
        .endpoint(
            Endpoint::new(&name)
                .redelivery(RedeliveryPolicy::intervals([Duration::from_millis(100), Duration::from_millis(200)]))
                .handler_with_state(seen_in, |ctx: ConsumeContext<RedeliverMe>, seen| async move {
                    let count = ctx.redelivery_count();
                    let header = ctx.headers().get_i64("MT-Redelivery-Count");
                    seen.lock().map_err(|e| e.to_string())?.push((count, header, std::time::Instant::now()));
                    if count < 2 {
                        return Err(InventoryDown.into());
                    }
                    Ok(())
                }),
        )
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), RedeliverMe).await.expect("send");
    recorder.consumed.wait_for::<RedeliverMe>(1, WAIT).await.expect("consumed after redeliveries");
    bus.stop().await.expect("stop");
    let seen = seen.lock().expect("lock").clone();
    let counts: Vec<(u32, Option<i64>)> = seen.iter().map(|(c, h, _)| (*c, *h)).collect();
    assert_eq!(counts, [(0, None), (1, Some(1)), (2, Some(2))]);
    assert!(seen[1].2 - seen[0].2 >= Duration::from_millis(100), "first redelivery waited its delay");
    assert!(seen[2].2 - seen[1].2 >= Duration::from_millis(200), "second redelivery waited its delay");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:NobodyConsumesThis")]
struct NobodyConsumesThis {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Consumed")]
struct Consumed {
    n: u32,
}

/// A message of a type no consumer on the endpoint handles moves, unchanged, to `_skipped`.
pub async fn unknown_message_type_goes_to_skipped_queue<F: Fixture>(fixture: &F) {
    let name = unique("skips");
    let got = log();
    let bus = fixture.bus().endpoint(record::<Consumed>(Endpoint::new(&name), &got)).build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), NobodyConsumesThis { n: 9 }).await.expect("send");
    let skipped = fixture.take_messages(&format!("{name}_skipped"), 1, WAIT).await;
    bus.send(&format!("queue:{name}"), Consumed { n: 1 }).await.expect("send");
    got.wait_for::<Consumed>(1, WAIT).await.expect("the endpoint keeps consuming");
    bus.stop().await.expect("stop");
    assert_eq!(skipped.len(), 1);
    assert_eq!(header(&skipped[0], "MT-Reason"), "dead-letter");
    let body: serde_json::Value = serde_json::from_slice(&skipped[0].body).expect("envelope");
    assert_eq!(body["message"]["n"], 9);
}

/// Malformed JSON, an unknown content type and an oversized body go straight to `_error`
/// with a reason that says what was wrong; nothing is retried and the endpoint carries on.
pub async fn unreadable_messages_go_to_error_queue_with_their_reason<F: Fixture>(fixture: &F) {
    let name = unique("bad-input");
    let got = log();
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let got_in = got.clone();
    let bus = fixture
        .bus()
        .endpoint(
            Endpoint::new(&name)
                .max_message_size(64 * 1024)
                .retry(RetryPolicy::immediate(5))
                .concurrency_limit(1)
                .handler(move |ctx: ConsumeContext<Consumed>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    got_in.record(ctx.envelope());
                    async { Ok(()) }
                }),
        )
        .build();
    bus.start().await.expect("bus starts");
    let transport = fixture.transport();
    let oversized = format!(
        r#"{{"messageType":["{}"],"message":{{"n":1,"pad":"{}"}}}}"#,
        Consumed::message_type(),
        "x".repeat(70 * 1024)
    );
    let cases = [
        raw(
            &b"{\"messageType\":[\"urn:message:Conformance:Consumed\"],\"message\":"[..],
            "application/vnd.masstransit+json",
        ),
        raw(&b"<order/>"[..], "application/xml"),
        raw(oversized.into_bytes(), "application/vnd.masstransit+json"),
        raw(&b"{\"message\":{\"n\":1}}"[..], "application/vnd.masstransit+json"),
    ];
    for case in cases.iter().cloned() {
        transport.send(&name, case).await.expect("raw send");
    }
    let errors = fixture.take_messages(&format!("{name}_error"), cases.len(), WAIT).await;
    bus.send(&format!("queue:{name}"), Consumed { n: 2 }).await.expect("send");
    got.wait_for::<Consumed>(1, WAIT).await.expect("the endpoint keeps consuming");
    bus.stop().await.expect("stop");

    assert_eq!(errors.len(), cases.len(), "every unreadable message is in the error queue");
    let reasons: Vec<(String, String)> = errors
        .iter()
        .map(|m| (header(m, "MT-Fault-ExceptionType").to_owned(), header(m, "MT-Fault-Message").to_owned()))
        .collect();
    let find = |needle: &str| reasons.iter().any(|(_, why)| why.contains(needle));
    assert!(find("not valid JSON"), "truncated body: {reasons:?}");
    assert!(find("unsupported content type `application/xml`"), "{reasons:?}");
    assert!(find("exceeds the limit of 65536 bytes"), "{reasons:?}");
    assert!(find("no messageType"), "{reasons:?}");
    for (message, case) in errors.iter().zip(&cases) {
        assert_eq!(header(message, "MT-Reason"), "fault");
        assert!(cases.iter().any(|c| c.body == message.body), "bodies moved unchanged");
        let _ = case;
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "only the good message reached the consumer");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Explosive")]
struct Explosive {
    hang: bool,
}

/// A panicking consumer and a hung consumer (past its timeout) are failed attempts; other
/// messages on the endpoint are consumed meanwhile and afterwards.
pub async fn panicking_and_hung_consumers_are_failed_attempts<F: Fixture>(fixture: &F) {
    let name = unique("explosive");
    let attempts = Arc::new(AtomicU32::new(0));
    let got = log();
    let counter = attempts.clone();
    let bus = fixture
        .bus()
        .endpoint(record::<Consumed>(
            Endpoint::new(&name).concurrency_limit(4).handler_with(
                move |ctx: ConsumeContext<Explosive>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let hang = ctx.message().hang;
                    async move {
                        if hang {
                            // Never completes: only the timeout ends it.
                            std::future::pending::<()>().await;
                        }
                        panic!("boom in the consumer");
                    }
                },
                ConsumerOptions::new().retry(RetryPolicy::immediate(1)).timeout(Duration::from_millis(200)),
            ),
            &got,
        ))
        .build();
    bus.start().await.expect("bus starts");
    let queue = format!("queue:{name}");
    bus.send(&queue, Explosive { hang: false }).await.expect("send");
    bus.send(&queue, Explosive { hang: true }).await.expect("send");
    bus.send(&queue, Consumed { n: 1 }).await.expect("send");
    got.wait_for::<Consumed>(1, WAIT).await.expect("a good message is consumed meanwhile");
    let errors = fixture.take_messages(&format!("{name}_error"), 2, WAIT).await;
    bus.send(&queue, Consumed { n: 2 }).await.expect("send");
    got.wait_for::<Consumed>(2, WAIT).await.expect("and afterwards");
    bus.stop().await.expect("stop");
    assert_eq!(attempts.load(Ordering::SeqCst), 4, "two attempts each");
    let mut kinds: Vec<&str> = errors.iter().map(|m| header(m, "MT-Fault-ExceptionType")).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["Panic", "TimeoutException"]);
    assert!(errors.iter().any(|m| header(m, "MT-Fault-Message").contains("boom in the consumer")));
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:PermanentlyBad")]
struct PermanentlyBad;

/// An error marked permanent skips retries and redelivery.
pub async fn permanent_errors_are_not_retried<F: Fixture>(fixture: &F) {
    let name = unique("permanent");
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let bus = fixture
        .bus()
        .endpoint(
            Endpoint::new(&name)
                .retry(RetryPolicy::immediate(5))
                .redelivery(RedeliveryPolicy::intervals([Duration::from_millis(10)]))
                .handler(move |_: ConsumeContext<PermanentlyBad>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { Err::<(), BoxError>(Permanent::new(InventoryDown).into()) }
                }),
        )
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), PermanentlyBad).await.expect("send");
    let errors = fixture.take_messages(&format!("{name}_error"), 1, WAIT).await;
    bus.stop().await.expect("stop");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(errors.len(), 1);
    assert_eq!(header(&errors[0], "MT-Fault-ExceptionType"), "InventoryDown");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:SlowPoison")]
struct SlowPoison;

/// A failing message retrying with pauses does not hold up the endpoint's other messages.
pub async fn a_retrying_message_does_not_block_the_others<F: Fixture>(fixture: &F) {
    let name = unique("poison");
    let got = log();
    let bus = fixture
        .bus()
        .endpoint(record::<Consumed>(
            Endpoint::new(&name).concurrency_limit(4).handler_with(
                |_: ConsumeContext<SlowPoison>| async { Err::<(), BoxError>(InventoryDown.into()) },
                ConsumerOptions::new().retry(RetryPolicy::intervals([Duration::from_millis(300); 3])),
            ),
            &got,
        ))
        .build();
    bus.start().await.expect("bus starts");
    let queue = format!("queue:{name}");
    bus.send(&queue, SlowPoison).await.expect("send");
    for n in 0..20 {
        bus.send(&queue, Consumed { n }).await.expect("send");
    }
    got.wait_for::<Consumed>(20, WAIT).await.expect("the others are consumed");
    let errors_meanwhile = fixture.take_messages(&format!("{name}_error"), 0, Duration::ZERO).await;
    let errors = fixture.take_messages(&format!("{name}_error"), 1, WAIT).await;
    bus.stop().await.expect("stop");
    assert!(errors_meanwhile.is_empty(), "the poison message was still retrying while the others went through");
    assert_eq!(errors.len(), 1, "then it failed for good");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Gated")]
struct Gated;

/// A consumer's own concurrency limit holds even when the endpoint allows more.
pub async fn consumer_concurrency_limit_is_respected<F: Fixture>(fixture: &F) {
    let name = unique("limited");
    let active = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::new(MessageLog::default());
    let (a, p, g, d) = (active.clone(), peak.clone(), gate.clone(), done.clone());
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).prefetch(16).concurrency_limit(8).handler_with(
            move |ctx: ConsumeContext<Gated>| {
                let (a, p, g, d) = (a.clone(), p.clone(), g.clone(), d.clone());
                async move {
                    let now = a.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    d.record(ctx.envelope());
                    let _permit = tokio::time::timeout(WAIT, g.acquire()).await?;
                    a.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            },
            ConsumerOptions::new().concurrency_limit(2),
        ))
        .build();
    bus.start().await.expect("bus starts");
    for _ in 0..6 {
        bus.send(&format!("queue:{name}"), Gated).await.expect("send");
    }
    done.wait_for::<Gated>(2, WAIT).await.expect("two enter");
    // A third would enter now if the limit did not hold: give it the chance, expect it not to.
    let third = done.wait_for::<Gated>(3, Duration::from_millis(200)).await;
    gate.add_permits(6);
    done.wait_for::<Gated>(6, WAIT).await.expect("all pass in the end");
    bus.stop().await.expect("stop");
    assert!(third.is_err(), "no third message while two are in the consumer");
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:SendsNowhere")]
struct SendsNowhere;

/// A consumer that succeeds but whose outgoing message cannot leave (its destination does
/// not exist) fails like any other attempt: counted, then in `_error` with the reason. (It
/// was requeued as it was, and came back at once, for ever.)
pub async fn a_message_whose_outbox_cannot_be_delivered_ends_in_error<F: Fixture>(fixture: &F) {
    let name = unique("outbox-nowhere");
    let nowhere = format!("queue:{}", unique("missing"));
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).handler(move |ctx: ConsumeContext<SendsNowhere>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let nowhere = nowhere.clone();
            async move {
                ctx.send(&nowhere, Consumed { n: 1 }).await?;
                Ok(())
            }
        }))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), SendsNowhere).await.expect("send");
    let errors = fixture.take_messages(&format!("{name}_error"), 1, WAIT).await;
    bus.stop().await.expect("stop");
    assert_eq!(errors.len(), 1, "the message ends in the error queue");
    assert_eq!(header(&errors[0], "MT-Fault-ExceptionType"), "OutboxDeliveryException");
    assert!(header(&errors[0], "MT-Fault-Message").contains("missing"), "{:?}", errors[0].headers);
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "a destination that does not exist is not retried");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:PublishesLater")]
struct PublishesLater;

/// A message produced through the consume context after the consume finished (by a task the
/// consumer left running) leaves at once: its outbox was already released.
pub async fn a_message_produced_after_the_consume_finished_still_leaves<F: Fixture>(fixture: &F) {
    let name = unique("publishes-later");
    let got = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let consumed = Arc::new(MessageLog::default());
    let c = consumed.clone();
    let bus = fixture
        .bus()
        .endpoint(record::<Consumed>(
            Endpoint::new(&name).handler_with_state((g, c), |ctx: ConsumeContext<PublishesLater>, (g, c)| async move {
                let later = ctx.receive_context().clone();
                tokio::spawn(async move {
                    if let Ok(_permit) = g.acquire().await {
                        let address = format!("queue:{}", later.endpoint_name());
                        let _ = later.send(&address, Consumed { n: 7 }).await;
                    }
                });
                c.record(ctx.envelope());
                Ok(())
            }),
            &got,
        ))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), PublishesLater).await.expect("send");
    consumed.wait_for::<PublishesLater>(1, WAIT).await.expect("consumed");
    gate.add_permits(1);
    let later = got.wait_for::<Consumed>(1, WAIT).await;
    bus.stop().await.expect("stop");
    assert_eq!(later.expect("the late message arrives").first().map(|m| m.n), Some(7));
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:PanicsAround")]
struct PanicsAround {
    n: u32,
}

/// An observer that panics when told a message was consumed.
struct PanickingObserver;

impl bus_core::BusObserver for PanickingObserver {
    fn on_consumed(&self, _: &str, _: &str, _: &bus_core::Envelope) {
        panic!("observer bug");
    }

    fn on_publish(&self, _: &bus_core::Envelope) {
        panic!("observer bug on publish");
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:PublishedByPanicsAround")]
struct PublishedByPanicsAround;

/// A panic in consume middleware is a failed attempt like the consumer's own (it ends in
/// `_error`), and one in an observer is logged: neither drops the delivery, which came
/// straight back and panicked again, for ever.
pub async fn panics_in_middleware_and_observers_do_not_loop<F: Fixture>(fixture: &F) {
    let name = unique("panics-around");
    let consumed = log();
    let recorded = consumed.clone();
    let bus = fixture
        .bus()
        .observer(PanickingObserver)
        .endpoint(
            Endpoint::new(&name)
                .middleware(bus_core::middleware::from_fn(
                    |ctx: bus_core::ReceiveContext, next: bus_core::middleware::Next| async move {
                        if ctx.envelope().message.get().contains("\"n\":1") {
                            panic!("middleware bug");
                        }
                        next.run(ctx).await
                    },
                ))
                .handler(move |ctx: ConsumeContext<PanicsAround>| {
                    recorded.record(ctx.envelope());
                    async move {
                        // Released after the consume: the observer panics on it.
                        ctx.publish(PublishedByPanicsAround).await?;
                        Ok(())
                    }
                }),
        )
        .build();
    bus.start().await.expect("bus starts");
    let queue = format!("queue:{name}");
    bus.send(&queue, PanicsAround { n: 1 }).await.expect("send");
    bus.send(&queue, PanicsAround { n: 2 }).await.expect("send");
    let errors = fixture.take_messages(&format!("{name}_error"), 1, WAIT).await;
    consumed.wait_for::<PanicsAround>(1, WAIT).await.expect("the other message is consumed");
    // A message consumed again and again would show here (or leave `_error` empty).
    let again = fixture.take_messages(&name, 1, Duration::from_millis(200)).await;
    bus.stop().await.expect("stop");
    assert_eq!(errors.len(), 1, "the message whose middleware panics ends in the error queue");
    assert!(header(&errors[0], "MT-Fault-Message").contains("middleware bug"), "{:?}", errors[0].headers);
    assert_eq!(consumed.count::<PanicsAround>(), 1, "the other is consumed once despite its observer panicking");
    assert!(again.is_empty(), "nothing came back to the queue");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:BadFaultAddress")]
struct BadFaultAddress;

/// A `faultAddress` from the wire that names no endpoint is skipped: the fault goes to the
/// `responseAddress` instead of nowhere.
pub async fn a_fault_address_that_names_no_endpoint_falls_back_to_the_response_address<F: Fixture>(fixture: &F) {
    let name = unique("bad-fault-address");
    let requester = unique("fault-requester");
    let faults = log();
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).handler(|_: ConsumeContext<BadFaultAddress>| async {
            Err::<(), BoxError>(Permanent::new(InventoryDown).into())
        }))
        .endpoint(record::<Fault<BadFaultAddress>>(Endpoint::new(&requester), &faults))
        .build();
    bus.start().await.expect("bus starts");
    let mut options = bus_core::SendOptions::new();
    options.fault_address = Some("rabbitmq://localhost/".into());
    options.response_address = Some(format!("queue:{requester}"));
    bus.send_with(&format!("queue:{name}"), BadFaultAddress, options).await.expect("send");
    let received = faults.wait_for::<Fault<BadFaultAddress>>(1, WAIT).await;
    bus.stop().await.expect("stop");
    assert_eq!(received.expect("the fault reaches the response address").len(), 1);
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:WireNamed")]
struct WireNamed {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:AlsoConsumed")]
struct AlsoConsumed {
    n: u32,
}

/// Names in a message are its sender's, and AMQP names stop at 255 bytes. A message listing
/// a foreign type with a longer name, or naming such a fault address, fails only what needs
/// that name: nothing panics, the message goes to `_error` with its consumer's reason, and
/// the fault is published typed by the failed consumer's message type only (not by the
/// message's other types, even one the endpoint consumes too; the foreign one is named in
/// `faultMessageTypes` only, so no exchange is declared for it).
pub async fn names_from_the_wire_too_long_for_the_broker_fail_only_what_needs_them<F: Fixture>(fixture: &F) {
    let name = unique("long-names");
    let watcher = unique("long-name-faults");
    let faults = log();
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).handler(|_: ConsumeContext<AlsoConsumed>| async { Ok(()) }).handler(
            |_: ConsumeContext<WireNamed>| async { Err::<(), BoxError>(Permanent::new(InventoryDown).into()) },
        ))
        .endpoint(record::<Fault<WireNamed>>(Endpoint::new(&watcher), &faults))
        .build();
    bus.start().await.expect("bus starts");
    let long = "A".repeat(300);
    let foreign = format!("urn:message:Foreign:{long}");
    let bodies = [
        format!(
            r#"{{"messageType":["{}","{}","{foreign}"],"message":{{"n":1}}}}"#,
            WireNamed::message_type(),
            AlsoConsumed::message_type()
        ),
        format!(
            r#"{{"messageType":["{}"],"faultAddress":"queue:{long}","message":{{"n":2}}}}"#,
            WireNamed::message_type()
        ),
    ];
    for body in bodies {
        let message = raw(body.into_bytes(), "application/vnd.masstransit+json");
        fixture.transport().send(&name, message).await.expect("raw send");
    }
    let errors = fixture.take_messages(&format!("{name}_error"), 2, WAIT).await;
    let published = faults.wait_for::<Fault<WireNamed>>(1, WAIT).await;
    bus.stop().await.expect("stop");

    assert_eq!(errors.len(), 2, "both messages are in the error queue");
    for message in &errors {
        assert_eq!(header(message, "MT-Fault-Message"), "inventory service unavailable", "{:?}", message.headers);
    }
    let published = published.expect("the fault of the message with a foreign type is published");
    assert_eq!(published[0].message.n, 1);
    assert!(published[0].fault_message_types.contains(&foreign), "{:?}", published[0].fault_message_types);
    let envelope = &faults.envelopes::<Fault<WireNamed>>()[0];
    assert_eq!(
        envelope.message_type,
        ["urn:message:MassTransit:Fault[[Conformance:WireNamed]]", "urn:message:MassTransit:Fault"],
        "typed by the consumer's message type"
    );
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:FaultPanics")]
struct FaultPanics;

/// A panic the bus meets while handling a delivery outside any consumer or middleware (here:
/// send middleware that panics on the fault it writes) moves the message to `_error` with
/// the reason, instead of dropping it to come straight back, for ever.
pub async fn a_panic_while_writing_the_fault_moves_the_message_to_error<F: Fixture>(fixture: &F) {
    let name = unique("fault-panics");
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let bus = fixture
        .bus()
        .send_middleware(|envelope: &mut bus_core::Envelope| {
            if envelope.message_type.iter().any(|t| t.starts_with("urn:message:MassTransit:Fault")) {
                panic!("send middleware bug");
            }
            Ok::<(), BoxError>(())
        })
        .endpoint(Endpoint::new(&name).handler(move |_: ConsumeContext<FaultPanics>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), BoxError>(Permanent::new(InventoryDown).into()) }
        }))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), FaultPanics).await.expect("send");
    let errors = fixture.take_messages(&format!("{name}_error"), 1, WAIT).await;
    let again = fixture.take_messages(&name, 1, Duration::from_millis(200)).await;
    bus.stop().await.expect("stop");
    assert_eq!(errors.len(), 1, "the message ends in the error queue");
    assert!(header(&errors[0], "MT-Fault-Message").contains("send middleware bug"), "{:?}", errors[0].headers);
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "consumed once");
    assert!(again.is_empty(), "nothing came back to the queue");
}
