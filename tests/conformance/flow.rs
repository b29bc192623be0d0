//! Flow control: partitions, the kill switch, batches and the bus-wide concurrency limit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::testing::{Log, MessageLog};
use bus_core::{
    Batch, BatchCompletion, BatchOptions, BoxError, ConsumeContext, Consumer, Endpoint, Fault, HealthStatus,
    KillSwitch, Message,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::support::{header, record};
use crate::{poll_until, unique, Fixture, WAIT};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Keyed")]
struct Keyed {
    key: u32,
    seq: u32,
}

/// What the partitioned consumer saw.
#[derive(Default)]
struct KeyedSeen {
    active: Vec<AtomicBool>,
    overlaps: AtomicU32,
    in_flight: AtomicU32,
    peak: AtomicU32,
    order: Mutex<HashMap<u32, Vec<u32>>>,
}

/// 10,000 messages over 100 keys at concurrency 32: never two of one key at once, each key's
/// in the order they were sent, and different keys at once.
pub async fn partitioned_messages_run_one_at_a_time_per_key_in_delivery_order<F: Fixture>(fixture: &F) {
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 100;
    let name = unique("partitioned");
    let seen =
        Arc::new(KeyedSeen { active: (0..KEYS).map(|_| AtomicBool::new(false)).collect(), ..Default::default() });
    let done = Log::<()>::default();
    let (s, d) = (seen.clone(), done.clone());
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).prefetch(64).concurrency_limit(32).partition_by(|m: &Keyed| m.key, 64).handler(
            move |ctx: ConsumeContext<Keyed>| {
                let (seen, done) = (s.clone(), d.clone());
                async move {
                    let Keyed { key, seq } = *ctx.message();
                    if seen.active[key as usize].swap(true, Ordering::SeqCst) {
                        seen.overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.peak.fetch_max(now, Ordering::SeqCst);
                    seen.order.lock().expect("order").entry(key).or_default().push(seq);
                    // Work that gives the other tasks the chance to run meanwhile.
                    for _ in 0..3 {
                        tokio::task::yield_now().await;
                    }
                    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                    seen.active[key as usize].store(false, Ordering::SeqCst);
                    done.push(());
                    Ok(())
                }
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    // Each key's messages are sent one after another (each taken before the next is sent),
    // the keys side by side: the queue holds each key's in order, the keys interleaved.
    let destination = format!("queue:{name}");
    let senders = (0..KEYS).map(|key| {
        let (bus, destination) = (bus.clone(), destination.clone());
        async move {
            for seq in 0..PER_KEY {
                bus.send(&destination, Keyed { key, seq }).await?;
            }
            Ok::<_, bus_core::Error>(())
        }
    });
    futures::future::try_join_all(senders).await.expect("all sent");
    let total = (KEYS * PER_KEY) as usize;
    done.wait_until("every message consumed", WAIT * 6, |d| d.len() >= total).await.expect("all consumed");
    bus.stop().await.expect("stop");

    assert_eq!(seen.overlaps.load(Ordering::SeqCst), 0, "two messages of one key ran at once");
    let order = seen.order.lock().expect("order");
    for key in 0..KEYS {
        let seqs = order.get(&key).cloned().unwrap_or_default();
        assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "key {key} consumed in the order sent, once each");
    }
    assert!(seen.peak.load(Ordering::SeqCst) > 1, "different keys ran at the same time");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Charge")]
struct Charge {
    n: u32,
}

#[derive(Debug)]
struct PaymentsDown;

impl std::fmt::Display for PaymentsDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payment provider unavailable")
    }
}

impl std::error::Error for PaymentsDown {}

/// A consumer fails every message for 5 s (its downstream is down). The kill switch trips
/// after its activation threshold, the endpoint stops consuming, and health says why; the
/// messages wait in the queue; consumption starts again by itself. When the outage is over,
/// `_error` holds only messages that failed before the switch tripped, every other message
/// was consumed once, and none is lost.
pub async fn kill_switch_stops_an_endpoint_through_an_outage_and_loses_nothing<F: Fixture>(fixture: &F) {
    const MESSAGES: u32 = 200;
    const ACTIVATION: u32 = 10;
    const OUTAGE: Duration = Duration::from_secs(5);
    let name = unique("payments");
    let outage_ends: Arc<Mutex<Option<Instant>>> = Arc::default();
    let failures = Arc::new(AtomicU32::new(0));
    let consumed = Log::<u32>::default();
    let (o, f, c) = (outage_ends.clone(), failures.clone(), consumed.clone());
    let kill_switch = KillSwitch::new()
        .activation_threshold(ACTIVATION)
        .trip_threshold(0.5)
        .tracking_period(Duration::from_secs(60))
        .restart_after(Duration::from_secs(1));
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).prefetch(8).concurrency_limit(4).kill_switch(kill_switch).handler(
            move |ctx: ConsumeContext<Charge>| {
                let (outage, failures, consumed) = (o.clone(), f.clone(), c.clone());
                async move {
                    let ends = *outage.lock().expect("outage").get_or_insert_with(|| Instant::now() + OUTAGE);
                    if Instant::now() < ends {
                        failures.fetch_add(1, Ordering::SeqCst);
                        return Err::<(), BoxError>(PaymentsDown.into());
                    }
                    consumed.push(ctx.message().n);
                    Ok(())
                }
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    let destination = format!("queue:{name}");
    futures::future::try_join_all((0..MESSAGES).map(|n| bus.send(&destination, Charge { n }))).await.expect("sent");

    // Health says the switch tripped, on this endpoint, and why.
    let tripped = poll_until("the kill switch trips", WAIT, Duration::from_millis(20), || async {
        let health = bus.health().await;
        let endpoint = health.endpoints.iter().find(|e| e.endpoint == name).cloned();
        let tripped = |e: &bus_core::EndpointHealth| {
            e.status == HealthStatus::Degraded
                && e.reason.as_deref().is_some_and(|r| r.starts_with("kill switch tripped"))
        };
        endpoint.filter(tripped).ok_or_else(|| {
            let (failed, consumed) = (failures.load(Ordering::SeqCst), consumed.len());
            format!("{health:?}; {failed} failures, {consumed} consumed")
        })
    })
    .await;
    let reason = tripped.reason.clone().unwrap_or_default();
    assert!(reason.contains("kill switch tripped"), "{reason}");
    assert!(reason.contains("payment provider unavailable"), "{reason}");

    // The outage ends; everything not in `_error` is consumed, once.
    consumed
        .wait_until("all but the error queue's consumed", WAIT * 3, |c| {
            c.iter().collect::<HashSet<_>>().len() + ACTIVATION as usize >= MESSAGES as usize
        })
        .await
        .expect("consumed after the outage");
    let errors = fixture.take_messages(&format!("{name}_error"), 0, Duration::ZERO).await;
    let errored: HashSet<u32> = errors
        .iter()
        .map(|m| {
            let envelope: serde_json::Value = serde_json::from_slice(&m.body).expect("an envelope");
            u32::try_from(envelope["message"]["n"].as_u64().expect("n")).expect("n")
        })
        .collect();
    consumed
        .wait_until("every message not in _error consumed", WAIT * 3, |c| {
            c.iter().collect::<HashSet<_>>().len() + errored.len() >= MESSAGES as usize
        })
        .await
        .expect("the rest consumed");
    // Health comes back once the switch has closed again.
    poll_until("the endpoint is healthy again", WAIT, Duration::from_millis(20), || async {
        let health = bus.health().await;
        if health.status == HealthStatus::Healthy {
            Ok(())
        } else {
            Err(format!("{health:?}"))
        }
    })
    .await;
    bus.stop().await.expect("stop");
    let left = fixture.take_messages(&name, 0, Duration::ZERO).await;

    let consumed = consumed.snapshot();
    let unique_consumed: HashSet<u32> = consumed.iter().copied().collect();
    assert_eq!(unique_consumed.len(), consumed.len(), "no message consumed twice");
    assert!(unique_consumed.is_disjoint(&errored), "no message both consumed and in _error");
    assert_eq!(unique_consumed.len() + errored.len(), MESSAGES as usize, "nothing lost");
    assert!(left.is_empty(), "nothing left in the queue");
    // Only what failed before the switch tripped reached `_error`: the tripping failure
    // itself went back to the queue, as did every later one.
    assert!(errored.len() < ACTIVATION as usize, "{} messages in _error", errored.len());
    for error in &errors {
        assert_eq!(header(error, "MT-Fault-Message"), "payment provider unavailable");
    }
    // The switch held the queue back: without it, every message would have failed.
    let failed = failures.load(Ordering::SeqCst);
    assert!(failed < MESSAGES / 2, "{failed} attempts failed during the outage");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Reading")]
struct Reading {
    n: u32,
}

/// A batch consumer that records each batch it gets.
struct SaveReadings(Log<(BatchCompletion, Vec<u32>)>);

impl Consumer<Batch<Reading>> for SaveReadings {
    async fn consume(&self, ctx: ConsumeContext<Batch<Reading>>) -> Result<(), BoxError> {
        let batch = ctx.message();
        self.0.push((batch.completed_by(), batch.iter().map(|r| r.n).collect()));
        Ok(())
    }
}

/// 25 messages with a message limit of 10, on an endpoint whose prefetch and concurrency
/// (4) are raised to fit a batch: two full batches, then the last 5 when the time limit
/// passes; each message once, and every one acknowledged.
pub async fn batches_end_at_their_message_limit_or_their_time_limit<F: Fixture>(fixture: &F) {
    let name = unique("readings");
    let batches = Log::default();
    let options = BatchOptions::new().message_limit(10).time_limit(Duration::from_millis(500));
    // A prefetch and a limit below the batch's size are raised to it: batches still fill.
    let endpoint = Endpoint::new(&name).prefetch(4).concurrency_limit(4);
    let bus = fixture.bus().endpoint(endpoint.batch_consumer(SaveReadings(batches.clone()), options)).build();
    bus.start().await.expect("bus starts");
    let destination = format!("queue:{name}");
    futures::future::try_join_all((0..25).map(|n| bus.send(&destination, Reading { n }))).await.expect("sent");
    batches
        .wait_until("25 messages in batches", WAIT, |b| b.iter().map(|(_, ns)| ns.len()).sum::<usize>() >= 25)
        .await
        .expect("all batched");
    bus.stop().await.expect("stop");
    let left = fixture.take_messages(&name, 0, Duration::ZERO).await;
    let errors = fixture.take_messages(&format!("{name}_error"), 0, Duration::ZERO).await;

    let batches = batches.snapshot();
    let sizes: Vec<(BatchCompletion, usize)> = batches.iter().map(|(by, ns)| (*by, ns.len())).collect();
    assert_eq!(
        sizes,
        [(BatchCompletion::MessageLimit, 10), (BatchCompletion::MessageLimit, 10), (BatchCompletion::TimeLimit, 5)],
        "two full batches, then the rest by time"
    );
    let all: HashSet<u32> = batches.iter().flat_map(|(_, ns)| ns.iter().copied()).collect();
    assert_eq!(all, (0..25).collect(), "each message in one batch");
    assert!(left.is_empty(), "every message acknowledged");
    assert!(errors.is_empty());
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Invoice")]
struct Invoice {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:InvoiceFaultMarker")]
struct InvoiceFaultMarker;

/// A batch consumer that always fails.
struct FailingInvoices(Arc<AtomicU32>);

impl Consumer<Batch<Invoice>> for FailingInvoices {
    async fn consume(&self, ctx: ConsumeContext<Batch<Invoice>>) -> Result<(), BoxError> {
        assert_eq!(ctx.message().len(), 5, "the whole batch each attempt");
        self.0.fetch_add(1, Ordering::SeqCst);
        Err("ledger rejected the batch".into())
    }
}

/// A failed batch is retried as a batch, then each of its messages goes to `_error` with
/// its reason, and one `Fault<T>` is published for each.
pub async fn a_failed_batch_sends_each_message_to_error_with_one_fault_each<F: Fixture>(fixture: &F) {
    let name = unique("invoices");
    let watch = unique("invoice-faults");
    let attempts = Arc::new(AtomicU32::new(0));
    let faults = Arc::new(MessageLog::default());
    let options =
        BatchOptions::new().message_limit(5).time_limit(Duration::from_secs(5)).retry(RetryPolicy::immediate(1));
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).batch_consumer(FailingInvoices(attempts.clone()), options))
        .endpoint(record::<InvoiceFaultMarker>(
            record::<Fault<Invoice>>(Endpoint::new(&watch).concurrency_limit(1), &faults),
            &faults,
        ))
        .build();
    bus.start().await.expect("bus starts");
    let destination = format!("queue:{name}");
    futures::future::try_join_all((0..5).map(|n| bus.send(&destination, Invoice { n }))).await.expect("sent");
    let errors = fixture.take_messages(&format!("{name}_error"), 5, WAIT).await;
    // Behind every fault in the watcher's queue: when it arrives, no fault is still coming.
    bus.send(&format!("queue:{watch}"), InvoiceFaultMarker).await.expect("marker");
    faults.wait_for::<InvoiceFaultMarker>(1, WAIT).await.expect("marker arrives");
    bus.stop().await.expect("stop");

    assert_eq!(attempts.load(Ordering::SeqCst), 2, "one batch, tried twice");
    assert_eq!(errors.len(), 5, "each message in _error");
    for error in &errors {
        assert_eq!(header(error, "MT-Fault-Message"), "ledger rejected the batch");
        assert_eq!(header(error, "MT-Fault-MessageType"), Invoice::message_type());
        // The retries were the batch's: a message of a batch has none of its own, as in
        // MassTransit, where the retry context is the batch's.
        assert_eq!(error.headers.get_i64("MT-Fault-RetryCount"), Some(0), "{:?}", error.headers);
    }
    let faulted: Vec<u32> = faults.messages::<Fault<Invoice>>().iter().map(|f| f.message.n).collect();
    let distinct: HashSet<u32> = faulted.iter().copied().collect();
    assert_eq!(faulted.len(), 5, "one fault per message: {faulted:?}");
    assert_eq!(distinct, (0..5).collect());
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:Shared")]
struct Shared;

/// The bus-wide limit holds across endpoints whose own limits would allow more.
pub async fn the_bus_wide_concurrency_limit_holds_across_endpoints<F: Fixture>(fixture: &F) {
    let (first, second) = (unique("pool-a"), unique("pool-b"));
    let active = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Log::<()>::default();
    let endpoint = |name: &str| {
        let (a, p, g, e) = (active.clone(), peak.clone(), gate.clone(), entered.clone());
        Endpoint::new(name).prefetch(8).concurrency_limit(8).handler(move |_: ConsumeContext<Shared>| {
            let (a, p, g, e) = (a.clone(), p.clone(), g.clone(), e.clone());
            async move {
                let now = a.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                e.push(());
                let _permit = tokio::time::timeout(WAIT, g.acquire()).await?;
                a.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let bus = fixture.bus().concurrency_limit(3).endpoint(endpoint(&first)).endpoint(endpoint(&second)).build();
    bus.start().await.expect("bus starts");
    for name in [&first, &second] {
        for _ in 0..6 {
            bus.send(&format!("queue:{name}"), Shared).await.expect("send");
        }
    }
    entered.wait_until("three in", WAIT, |e| e.len() >= 3).await.expect("three enter");
    // A fourth would enter now if the limit did not hold: give it the chance, expect it not to.
    let fourth = entered.wait_until("a fourth", Duration::from_millis(200), |e| e.len() >= 4).await;
    gate.add_permits(12);
    entered.wait_until("all in", WAIT, |e| e.len() >= 12).await.expect("all pass in the end");
    bus.stop().await.expect("stop");
    assert!(fourth.is_err(), "no fourth message while three are consumed");
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}

/// An endpoint with nothing to consume holds no place in the bus-wide limit: with a limit
/// of one, the busy endpoint still consumes while the idle one waits for messages.
pub async fn an_idle_endpoint_holds_no_place_in_the_bus_wide_limit<F: Fixture>(fixture: &F) {
    let (idle, busy) = (unique("idle"), unique("busy"));
    let consumed = Log::<()>::default();
    let c = consumed.clone();
    let bus = fixture
        .bus()
        .concurrency_limit(1)
        .endpoint(Endpoint::new(&idle).handler(|_: ConsumeContext<Keyed>| async { Ok(()) }))
        .endpoint(Endpoint::new(&busy).handler(move |_: ConsumeContext<Shared>| {
            c.push(());
            async { Ok(()) }
        }))
        .build();
    bus.start().await.expect("bus starts");
    for _ in 0..5 {
        bus.send(&format!("queue:{busy}"), Shared).await.expect("send");
    }
    let all = consumed.wait_until("five consumed", WAIT, |c| c.len() >= 5).await;
    bus.stop().await.expect("stop");
    all.expect("the busy endpoint consumed while the idle one waited");
}

/// Deliveries of a key waiting for their turn hold no place in the endpoint's limit: while
/// one key's first message is held in its consumer and more of that key wait, another key
/// still runs on an endpoint with a limit of two.
pub async fn a_busy_key_does_not_hold_the_places_of_other_keys<F: Fixture>(fixture: &F) {
    let name = unique("hot-key");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let consumed = Log::<(u32, u32)>::default();
    let (g, c) = (gate.clone(), consumed.clone());
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).prefetch(16).concurrency_limit(2).partition_by(|m: &Keyed| m.key, 16).handler(
            move |ctx: ConsumeContext<Keyed>| {
                let (gate, consumed) = (g.clone(), c.clone());
                async move {
                    let Keyed { key, seq } = *ctx.message();
                    consumed.push((key, seq));
                    if key == 0 && seq == 0 {
                        let _permit = tokio::time::timeout(WAIT, gate.acquire()).await?;
                    }
                    Ok(())
                }
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    let destination = format!("queue:{name}");
    for seq in 0..5 {
        bus.send(&destination, Keyed { key: 0, seq }).await.expect("send");
    }
    consumed.wait_until("the busy key's first", WAIT, |c| c.contains(&(0, 0))).await.expect("held in its consumer");
    bus.send(&destination, Keyed { key: 1, seq: 0 }).await.expect("send");
    let other = consumed.wait_until("the other key", WAIT, |c| c.contains(&(1, 0))).await;
    let held = consumed.snapshot().iter().filter(|(key, _)| *key == 0).count();
    gate.add_permits(1);
    consumed.wait_until("all", WAIT, |c| c.len() >= 6).await.expect("all consumed in the end");
    bus.stop().await.expect("stop");
    other.expect("the other key ran while the busy one was held");
    assert_eq!(held, 1, "the busy key's others waited their turn");
}
