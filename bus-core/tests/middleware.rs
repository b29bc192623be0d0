//! Custom consume and send middleware, and the outbox switch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::middleware::{from_fn, RetryPolicy};
use bus_core::{BoxError, ConsumeContext, ConsumerOptions, Endpoint, Envelope, Error, Message};
use bus_inmemory::InMemoryTestHarness;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:Job")]
struct Job {
    fail_first: bool,
}

#[derive(Debug, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tests:Note")]
struct Note {
    attempt: u32,
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn middleware_runs_in_documented_order_around_each_attempt() {
    let trace = Arc::new(Mutex::new(Vec::<String>::new()));
    let (outer, inner) = (trace.clone(), trace.clone());
    let in_consumer = trace.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(
            Endpoint::new("ordered")
                .retry(RetryPolicy::immediate(1))
                .middleware(from_fn(move |ctx, next| {
                    let trace = outer.clone();
                    async move {
                        if let Ok(mut t) = trace.lock() {
                            t.push("endpoint:before".into());
                        }
                        let result = next.run(ctx).await;
                        if let Ok(mut t) = trace.lock() {
                            t.push(format!("endpoint:after ok={}", result.is_ok()));
                        }
                        result
                    }
                }))
                .handler_with(
                    move |ctx: ConsumeContext<Job>| {
                        let trace = in_consumer.clone();
                        async move {
                            trace
                                .lock()
                                .map_err(|e| e.to_string())?
                                .push(format!("consumer attempt {}", ctx.retry_attempt()));
                            if ctx.message().fail_first && ctx.retry_attempt() == 0 {
                                return Err("first attempt fails".into());
                            }
                            Ok(())
                        }
                    },
                    ConsumerOptions::new().middleware(from_fn(move |ctx, next| {
                        let trace = inner.clone();
                        async move {
                            if let Ok(mut t) = trace.lock() {
                                t.push("consumer-middleware".into());
                            }
                            next.run(ctx).await
                        }
                    })),
                ),
        )
    })
    .await
    .expect("harness");
    harness.bus().publish(Job { fail_first: true }).await.expect("publish");
    harness.consumed().wait_for::<Job>(1, WAIT).await.expect("consumed");
    harness.stop().await.expect("stop");
    let trace = trace.lock().expect("lock").clone();
    assert_eq!(
        trace,
        [
            "endpoint:before",
            "consumer-middleware",
            "consumer attempt 0",
            "consumer attempt 1",
            "endpoint:after ok=true"
        ],
        "user middleware sits outside retry: it sees one call per message"
    );
}

#[tokio::test]
async fn send_middleware_sees_every_outgoing_message_and_can_refuse() {
    let harness = InMemoryTestHarness::start(|bus| {
        bus.send_middleware(|envelope: &mut Envelope| {
            envelope.headers.insert_if_absent("Tenant", "acme");
            Ok::<_, BoxError>(())
        })
        .send_middleware(|envelope: &mut Envelope| {
            if envelope.headers.contains("Forbidden") {
                return Err("forbidden header".into());
            }
            Ok::<_, BoxError>(())
        })
        .endpoint(Endpoint::new("notes").handler(|ctx: ConsumeContext<Job>| async move {
            ctx.publish(Note { attempt: ctx.retry_attempt() }).await?;
            Ok(())
        }))
    })
    .await
    .expect("harness");
    harness.bus().publish(Job { fail_first: false }).await.expect("publish");
    harness.published().wait_for::<Note>(1, WAIT).await.expect("note published");
    let refused = harness
        .bus()
        .publish_with(Job { fail_first: false }, bus_core::SendOptions::new().header("Forbidden", true))
        .await;
    harness.stop().await.expect("stop");
    for envelope in harness.published().all() {
        assert_eq!(envelope.headers.get_str("Tenant"), Some("acme"), "{:?}", envelope.message_type);
    }
    assert!(matches!(refused, Err(Error::SendRejected(_))), "{refused:?}");
}

#[tokio::test]
async fn with_the_outbox_off_failed_attempts_publish_at_once() {
    let harness = InMemoryTestHarness::start(|bus| {
        bus.endpoint(Endpoint::new("no-outbox").outbox(false).retry(RetryPolicy::immediate(1)).handler(
            |ctx: ConsumeContext<Job>| async move {
                ctx.publish(Note { attempt: ctx.retry_attempt() }).await?;
                if ctx.retry_attempt() == 0 {
                    return Err("first attempt fails".into());
                }
                Ok(())
            },
        ))
    })
    .await
    .expect("harness");
    harness.bus().publish(Job { fail_first: true }).await.expect("publish");
    let notes = harness.published().wait_for::<Note>(2, WAIT).await.expect("both attempts published");
    harness.stop().await.expect("stop");
    assert_eq!(notes.iter().map(|n| n.attempt).collect::<Vec<_>>(), [0, 1]);
}

#[tokio::test]
async fn publishing_after_stop_is_a_clear_error() {
    let harness = InMemoryTestHarness::start(|bus| bus).await.expect("harness");
    harness.stop().await.expect("stop");
    let result = harness.bus().publish(Note { attempt: 0 }).await;
    assert!(matches!(result, Err(Error::Stopped)), "{result:?}");
    assert_eq!(result.err().map(|e| e.to_string()).as_deref(), Some("the bus is stopped"));
}

#[tokio::test]
async fn endpoint_names_follow_the_formatter() {
    struct SubmitOrderConsumer;
    impl bus_core::Consumer<Job> for SubmitOrderConsumer {
        async fn consume(&self, _: ConsumeContext<Job>) -> Result<(), BoxError> {
            Ok(())
        }
    }
    let harness = InMemoryTestHarness::start(|bus| {
        bus.endpoint_name_formatter(bus_core::KebabCaseEndpointNameFormatter)
            .endpoint(Endpoint::for_consumer(SubmitOrderConsumer))
    })
    .await
    .expect("harness");
    let declared = harness.transport().has_queue("submit-order");
    let bound = harness.transport().is_bound("Tests:Job", "submit-order", false);
    harness.stop().await.expect("stop");
    assert!(declared && bound);
}

/// What attempt middleware hands down, for the test below.
#[derive(Debug)]
struct AttemptNumber(u32);

#[tokio::test]
async fn attempt_middleware_runs_once_per_attempt_and_hands_its_payload_and_the_held_messages() {
    let seen = Arc::new(Mutex::new(Vec::<(u32, usize)>::new()));
    let (in_middleware, in_consumer) = (seen.clone(), Arc::new(Mutex::new(Vec::<u32>::new())));
    let consumer_saw = in_consumer.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(
            Endpoint::new("attempts")
                .retry(RetryPolicy::immediate(2))
                .attempt_middleware(from_fn(move |mut ctx: bus_core::ReceiveContext, next| {
                    let seen = in_middleware.clone();
                    async move {
                        let attempt = ctx.retry_attempt();
                        ctx.insert_payload(AttemptNumber(attempt));
                        let result = next.run(ctx.clone()).await;
                        // What the attempt published, taken before the bus would release it.
                        let held = ctx.take_held().len();
                        if let Ok(mut seen) = seen.lock() {
                            seen.push((attempt, held));
                        }
                        result
                    }
                }))
                .handler_with_state(consumer_saw, |ctx: ConsumeContext<Job>, saw| async move {
                    let attempt = ctx.payload::<AttemptNumber>().map(|a| a.0).ok_or("no payload")?;
                    saw.lock().map_err(|e| e.to_string())?.push(attempt);
                    ctx.publish(Note { attempt }).await?;
                    if attempt < 2 {
                        return Err("not yet".into());
                    }
                    Ok(())
                }),
        )
    })
    .await
    .expect("harness");
    harness.bus().publish(Job { fail_first: true }).await.expect("publish");
    harness.consumed().wait_for::<Job>(1, WAIT).await.expect("consumed on the third attempt");
    harness.stop().await.expect("stop");
    assert_eq!(*in_consumer.lock().expect("lock"), [0, 1, 2], "the payload of each attempt reached the consumer");
    assert_eq!(
        *seen.lock().expect("lock"),
        [(0, 1), (1, 1), (2, 1)],
        "once per attempt, each finding only its own attempt's message held"
    );
    assert_eq!(harness.published().count::<Note>(), 0, "the held message was taken, not released");
}
