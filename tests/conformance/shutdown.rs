//! Graceful shutdown: nothing lost, nothing acked that did not finish.

use bus_core::sync::MutexExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::testing::MessageLog;
use bus_core::{BoxError, ConsumeContext, Endpoint, Error, Message};
use serde::{Deserialize, Serialize};

use super::support::log;
use crate::{unique, Fixture, WAIT};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Numbered")]
struct Numbered {
    n: u32,
}

/// 10,000 messages, a stop in the middle and a restart: every message is consumed at least
/// once and none ends in `_error`.
pub async fn stop_and_restart_mid_run_loses_nothing<F: Fixture>(fixture: &F) {
    const COUNT: u32 = 10_000;
    let name = unique("stop-restart");
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let all = log();
    let (seen_in, all_in) = (seen.clone(), all.clone());
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).prefetch(64).concurrency_limit(16).handler_with_state(
            (seen_in, all_in),
            |ctx: ConsumeContext<Numbered>, (seen, all)| async move {
                tokio::task::yield_now().await;
                seen.lock().map_err(|e| e.to_string())?.insert(ctx.message().n);
                all.record(ctx.envelope());
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    let sender = fixture.bus().build();
    let address = format!("queue:{name}");
    // Four producers: a send waits for the broker's confirm, and one at a time they were
    // too slow on a loaded two-core machine to reach a third before the wait ran out.
    const PRODUCERS: u32 = 4;
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|first| {
            let sender = sender.clone();
            let address = address.clone();
            tokio::spawn(async move {
                for n in (first..COUNT).step_by(PRODUCERS as usize) {
                    sender.send(&address, Numbered { n }).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    all.wait_for::<Numbered>(COUNT as usize / 3, WAIT).await.expect("a third consumed");
    bus.stop().await.expect("stop mid-run");
    assert!(bus.publish(Numbered { n: 0 }).await.is_err(), "publishing after stop fails");
    let consumed_at_stop = all.len();
    bus.start().await.expect("restart");
    for producer in producers {
        producer.await.expect("producer task").expect("every send accepted");
    }
    let complete = async {
        loop {
            if seen.lock().expect("lock").len() == COUNT as usize {
                return;
            }
            let next = all.len() + 1;
            let _ = all.wait_for::<Numbered>(next, WAIT).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), complete).await.expect("every message consumed after the restart");
    let errors = fixture.take_messages(&format!("{name}_error"), 0, Duration::ZERO).await;
    bus.stop().await.expect("stop");
    assert!(consumed_at_stop < COUNT as usize, "the stop really happened mid-run");
    assert!(errors.is_empty(), "nothing in _error");
    let duplicates = all.len() - COUNT as usize;
    println!("stop/restart run: {COUNT} messages, {duplicates} consumed twice");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:LongRunning")]
struct LongRunning;

/// A consumer still running at the stop timeout is cancelled through its token, and its
/// message goes back to the queue: not acked, not in `_error`.
pub async fn stop_cancels_overrunning_consumers_and_requeues_their_messages<F: Fixture>(fixture: &F) {
    let name = unique("overrun");
    let started = Arc::new(MessageLog::default());
    let finish = Arc::new(AtomicBool::new(false));
    let done = log();
    let (started_in, finish_in, done_in) = (started.clone(), finish.clone(), done.clone());
    let bus = fixture
        .bus()
        .stop_timeout(Duration::from_millis(200))
        .endpoint(Endpoint::new(&name).handler_with_state(
            (started_in, finish_in, done_in),
            |ctx: ConsumeContext<LongRunning>, (started, finish, done)| async move {
                started.record(ctx.envelope());
                if !finish.load(Ordering::SeqCst) {
                    // Runs until the bus cancels it.
                    ctx.cancellation_token().cancelled().await;
                    return Err::<(), BoxError>("cancelled by shutdown".into());
                }
                done.record(ctx.envelope());
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), LongRunning).await.expect("send");
    started.wait_for::<LongRunning>(1, WAIT).await.expect("consumer started");
    tokio::time::timeout(WAIT, bus.stop()).await.expect("stop is bounded").expect("stop");
    let errors = fixture.take_messages(&format!("{name}_error"), 0, Duration::ZERO).await;
    assert!(errors.is_empty(), "a cancelled consume is not a failure");
    // Restarted, the same message is delivered again and now completes.
    finish.store(true, Ordering::SeqCst);
    bus.start().await.expect("restart");
    done.wait_for::<LongRunning>(1, WAIT).await.expect("the requeued message is consumed after restart");
    bus.stop().await.expect("stop");
    assert_eq!(started.count::<LongRunning>(), 2);
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:FinishesDuringStop")]
struct FinishesDuringStop;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:ProducedDuringStop")]
struct ProducedDuringStop;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:AskedDuringStop")]
struct AskedDuringStop;

/// A consumer that finishes while the bus stops can still publish and request through the
/// bus (requests are answered until its consumers are done): its message is acknowledged,
/// not failed into `_error` because the bus was stopping.
pub async fn a_consumer_finishing_during_stop_can_still_publish_and_request<F: Fixture>(fixture: &F) {
    let name = unique("finishes-during-stop");
    let responder_name = unique("stop-responder");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = log();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let (g, s, o) = (gate.clone(), started.clone(), outcomes.clone());
    // The responder runs on a bus of its own, which keeps running.
    let responder = fixture
        .bus()
        .endpoint(Endpoint::new(&responder_name).handler(|ctx: ConsumeContext<AskedDuringStop>| async move {
            ctx.respond(AskedDuringStop).await?;
            Ok(())
        }))
        .build();
    responder.start().await.expect("responder starts");
    let target = format!("queue:{responder_name}");
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).handler_with_state(
            (g, s, o, target),
            |ctx: ConsumeContext<FinishesDuringStop>, (g, s, o, target)| async move {
                s.record(ctx.envelope());
                let _permit = g.acquire().await?;
                let published = ctx.bus().publish(ProducedDuringStop).await;
                let client = ctx.bus().request_client::<AskedDuringStop>().with_destination(target);
                let answered = client.request::<AskedDuringStop>(AskedDuringStop).await.map(|_| ());
                o.locked().push((published.is_ok(), answered.is_ok()));
                published?;
                answered?;
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    bus.send(&format!("queue:{name}"), FinishesDuringStop).await.expect("send");
    started.wait_for::<FinishesDuringStop>(1, WAIT).await.expect("the consumer started");
    let stopping = tokio::spawn({
        let bus = bus.clone();
        async move { bus.stop().await }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while bus.is_started() && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert!(!bus.is_started(), "the bus is stopping");
    gate.add_permits(1);
    stopping.await.expect("stop task").expect("stop");
    let errors = fixture.take_messages(&format!("{name}_error"), 0, Duration::ZERO).await;
    responder.stop().await.expect("responder stops");
    assert_eq!(*outcomes.locked(), [(true, true)], "publish and request worked");
    assert!(errors.is_empty(), "the message was not failed into the error queue");
}
