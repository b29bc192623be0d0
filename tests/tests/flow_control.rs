//! Flow control measured on tokio's paused clock, in memory: the rate limiter's rate, and
//! the circuit breaker's states with their health and metrics. (Partitions, the kill switch,
//! batches and the bus-wide limit are in the conformance suite, on every transport.)

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::{CircuitBreaker, CircuitState, CIRCUIT_BREAKER_OPEN};
use bus_core::testing::Log;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, HealthStatus, Message, RateLimit};
use bus_inmemory::InMemoryTransport;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:FlowTests:Email")]
struct Email {
    n: u32,
}

/// 50 a second, measured over the first 5 s of a backlog of 1,000: within 10%, and the
/// endpoint took no more from the queue than it was allowed to consume plus its prefetch.
#[tokio::test(start_paused = true)]
async fn the_rate_limiter_holds_its_rate_within_ten_percent_over_five_seconds() {
    const PREFETCH: usize = 16;
    let transport = InMemoryTransport::new();
    let consumed = Log::<Instant>::default();
    let log = consumed.clone();
    let bus = Bus::builder(transport.clone())
        .endpoint(
            Endpoint::new("mail")
                .prefetch(PREFETCH as u16)
                .rate_limit(RateLimit::new(50, Duration::from_secs(1)))
                .handler(move |_: ConsumeContext<Email>| {
                    let log = log.clone();
                    async move {
                        log.push(Instant::now());
                        Ok(())
                    }
                }),
        )
        .build();
    bus.start().await.expect("bus starts");
    for n in 0..1_000 {
        bus.send("queue:mail", Email { n }).await.expect("send");
    }
    consumed
        .wait_until("five seconds of consumes", Duration::from_secs(60), |c| {
            c.first().is_some_and(|first| c.last().is_some_and(|last| *last - *first >= Duration::from_secs(5)))
        })
        .await
        .expect("five seconds pass");
    let stamps = consumed.snapshot();
    let waiting = transport.queue_len("mail");
    bus.stop().await.expect("stop");

    let first = stamps[0];
    let in_five_seconds = stamps.iter().filter(|t| **t - first < Duration::from_secs(5)).count();
    let rate = in_five_seconds as f64 / 5.0;
    assert!((45.0..=55.0).contains(&rate), "{rate} messages a second, for 50");
    assert!(waiting + stamps.len() + PREFETCH >= 1_000, "the rest wait in the queue: {waiting} there");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:FlowTests:ReserveStock")]
struct ReserveStock {
    n: u32,
}

/// The latest exported sum of `name` by attribute value `state` (or all, when `None`).
fn sum_of(exporter: &InMemoryMetricExporter, name: &str, state: Option<&str>) -> i64 {
    let metrics = exporter.get_finished_metrics().expect("metrics");
    let mut total = 0;
    for metric in metrics.last().into_iter().flat_map(|r| r.scope_metrics()).flat_map(|s| s.metrics()) {
        if metric.name() != name {
            continue;
        }
        match metric.data() {
            AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                for point in sum.data_points() {
                    if has_state(point.attributes(), state) {
                        total += i64::try_from(point.value()).expect("small");
                    }
                }
            }
            AggregatedMetrics::I64(MetricData::Sum(sum)) => {
                for point in sum.data_points() {
                    if has_state(point.attributes(), state) {
                        total += point.value();
                    }
                }
            }
            _ => {}
        }
    }
    total
}

fn has_state<'a>(mut attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>, state: Option<&str>) -> bool {
    state.is_none_or(|state| attributes.any(|kv| kv.key.as_str() == "state" && kv.value.as_str() == state))
}

/// Closed, the breaker counts failures and opens at its threshold; open, messages fail at
/// once without reaching the consumer; after the reset interval one probe goes through: its
/// failure opens it again, its success closes it. Health and metrics follow each state.
#[tokio::test(start_paused = true)]
async fn the_circuit_breaker_trips_fails_fast_probes_and_closes() {
    let transport = InMemoryTransport::new();
    let exporter = InMemoryMetricExporter::default();
    let meters = SdkMeterProvider::builder().with_reader(PeriodicReader::builder(exporter.clone()).build()).build();
    let breaker = CircuitBreaker::new()
        .active_threshold(4)
        .trip_threshold(0.5)
        .tracking_period(Duration::from_secs(60))
        .reset_interval(Duration::from_secs(10));
    let failing = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let succeeded = Log::<u32>::default();
    let (f, c, s) = (failing.clone(), calls.clone(), succeeded.clone());
    let bus = Bus::builder(transport.clone())
        .meter(&meters.meter("flow-tests"))
        .endpoint(Endpoint::new("stock").concurrency_limit(1).circuit_breaker(breaker.clone()).handler(
            move |ctx: ConsumeContext<ReserveStock>| {
                c.fetch_add(1, Ordering::SeqCst);
                let (failing, succeeded) = (f.load(Ordering::SeqCst), s.clone());
                async move {
                    if failing {
                        return Err::<(), BoxError>("stock service unavailable".into());
                    }
                    succeeded.push(ctx.message().n);
                    Ok(())
                }
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    let wait = Duration::from_secs(30);
    let mut errors_expected = 0;
    let send = |n: u32| {
        let bus = bus.clone();
        async move { bus.send("queue:stock", ReserveStock { n }).await.expect("send") }
    };

    // Four failures out of four: it opens.
    for n in 0..4 {
        send(n).await;
    }
    errors_expected += 4;
    transport.wait_for_queue_len("stock_error", errors_expected, wait).await.expect("four failed");
    assert_eq!(breaker.state(), CircuitState::Open);
    let health = bus.health().await;
    assert_eq!(health.status, HealthStatus::Degraded);
    let reason = health.endpoints[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("circuit breaker open") && reason.contains("stock service unavailable"), "{reason}");

    // Open: three more fail fast, without reaching the consumer.
    for n in 4..7 {
        send(n).await;
    }
    errors_expected += 3;
    transport.wait_for_queue_len("stock_error", errors_expected, wait).await.expect("failed fast");
    assert_eq!(calls.load(Ordering::SeqCst), 4, "the consumer was not called while open");
    let fast = transport.drain("stock_error");
    errors_expected = 0;
    let fast_types: Vec<&str> = fast[4..].iter().filter_map(|m| m.headers.get_str("MT-Fault-ExceptionType")).collect();
    assert_eq!(fast_types, [CIRCUIT_BREAKER_OPEN; 3]);

    // After the reset interval, a probe that fails opens it again.
    tokio::time::advance(Duration::from_secs(10)).await;
    send(7).await;
    errors_expected += 1;
    transport.wait_for_queue_len("stock_error", errors_expected, wait).await.expect("probe failed");
    assert_eq!(calls.load(Ordering::SeqCst), 5, "one probe reached the consumer");
    assert_eq!(breaker.state(), CircuitState::Open);
    send(8).await;
    errors_expected += 1;
    transport.wait_for_queue_len("stock_error", errors_expected, wait).await.expect("failed fast again");
    assert_eq!(calls.load(Ordering::SeqCst), 5, "open again: failed fast");

    // The dependency is back: after the interval, the probe succeeds and closes it.
    failing.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    send(9).await;
    succeeded.wait_until("the probe", wait, |s| s.len() == 1).await.expect("the probe succeeds");
    // One at a time: each of these starts once the one before has been counted, so all
    // three reach the consumer only if the probe closed the breaker.
    for n in 10..13 {
        send(n).await;
    }
    succeeded.wait_until("closed", wait, |s| s.len() == 4).await.expect("closed: every message reaches the consumer");
    assert_eq!(succeeded.snapshot(), [9, 10, 11, 12]);
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(bus.health().await.status, HealthStatus::Healthy);
    assert_eq!(transport.queue_len("stock_error"), 2, "nothing failed once it closed");
    bus.stop().await.expect("stop");

    meters.force_flush().expect("flush");
    let transitions = "messaging.bus.circuit_breaker.transitions";
    assert_eq!(sum_of(&exporter, transitions, Some("open")), 2);
    assert_eq!(sum_of(&exporter, transitions, Some("half-open")), 2);
    assert_eq!(sum_of(&exporter, transitions, Some("closed")), 1);
    assert_eq!(sum_of(&exporter, "messaging.bus.circuit_breaker.open", None), 0, "closed at the end");
}
