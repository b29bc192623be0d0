//! The chaos soak: three endpoints under load while the broker, the network and Redis
//! misbehave, and every message accounted for at the end.
//!
//! - `chaos-work`: a consumer that fails 10% of its attempts, with a delayed redelivery;
//! - `ChaosTrip`: a saga on Redis (two events per instance, the second finalizes it);
//! - `chaos-ping`: a responder, called by request clients that try again on a timeout.
//!
//! Meanwhile a driver, at random moments spread over the run: cuts every connection five
//! times, restarts the (throwaway) broker node once, deletes the responder's queue once and
//! restarts the (throwaway) Redis once.
//!
//! At the end: every work message applied (counted by id) or in `_error` with a reason, every
//! saga instance final, every request answered. Zero lost; duplicates counted and printed.
//! `CHAOS_MESSAGES` sets the size (default 6,000, the test command's short pass); the full
//! soak: `CHAOS_MESSAGES=50000 cargo test --release -p tests --test chaos_soak -- --nocapture`.

use bus_core::sync::MutexExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::testing::MessageLog;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Fault, Message, RedeliveryPolicy};
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use bus_saga::{when, RedisSagaOptions, RedisSagaRepository, Saga, SagaRepository, StateMachine};
use lapin::options::BasicGetOptions;
use serde::{Deserialize, Serialize};
use tests::rabbit_support::ThrowawayNode;
use tests::record;
use tests::redis_support::ThrowawayRedis;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Chaos:Work")]
struct Work {
    id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Chaos:TripStarted")]
struct TripStarted {
    trip_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Chaos:TripFinished")]
struct TripFinished {
    trip_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Chaos:Ping")]
struct Ping {
    id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Chaos:Pong")]
struct Pong {
    id: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Trip {}

fn trip_machine() -> Arc<StateMachine<Trip>> {
    StateMachine::<Trip>::builder("ChaosTrip")
        .states(["Travelling"])
        .event::<TripStarted>(|m| m.trip_id)
        .event::<TripFinished>(|m| m.trip_id)
        .initially(when::<Trip, TripStarted>().transition_to("Travelling"))
        .during("Travelling", when::<Trip, TripFinished>().finalize())
        // Kept in its final state, so that the end can check every instance.
        .completed_when_finalized(false)
        .build()
        .expect("valid state machine")
}

/// How many times each id was seen.
#[derive(Debug, Default, Clone)]
struct Counts(Arc<Mutex<HashMap<u32, u32>>>);

impl Counts {
    fn add(&self, id: u32) {
        *self.0.locked().entry(id).or_default() += 1;
    }
    fn distinct(&self) -> usize {
        self.0.locked().len()
    }
    fn ids(&self) -> HashSet<u32> {
        self.0.locked().keys().copied().collect()
    }
    fn duplicates(&self) -> u32 {
        self.0.locked().values().map(|n| n - 1).sum()
    }
}

/// How long a producer waits before trying a failed publish or request again.
const BACKOFF: Duration = Duration::from_millis(50);

fn messages() -> u32 {
    std::env::var("CHAOS_MESSAGES").ok().and_then(|n| n.parse().ok()).unwrap_or(6_000)
}

/// Waits until `progress()` reaches `target`, checking every 50 ms, for at most `timeout`.
async fn wait_progress(what: &str, progress: impl Fn() -> u64, target: u64, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let now = progress();
        if now >= target {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {now} of {target} after {timeout:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_accounted_for_through_cuts_restarts_and_deletions() {
    let total = messages();
    let (works, trips) = (total * 6 / 10, total / 10);
    let pings = total - works - 2 * trips;
    let node = Arc::new(ThrowawayNode::start().await);
    let redis = Arc::new(tokio::task::spawn_blocking(ThrowawayRedis::start).await.expect("redis starts"));
    let options = RabbitMqOptions {
        heartbeat: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_secs(1),
        publish_timeout: Duration::from_secs(30),
        topology_check_interval: Duration::from_secs(1),
        ..RabbitMqOptions::default()
    };
    let transport = RabbitMqTransport::connect_with(&node.uri(), options).await.expect("connects");
    let saga_options = RedisSagaOptions {
        key_prefix: "chaos".into(),
        response_timeout: Duration::from_millis(500),
        ..RedisSagaOptions::default()
    };
    let repository = RedisSagaRepository::<Trip>::connect(&redis.url(), saga_options.clone()).await.expect("redis");

    let (applied, answered, responded) = (Counts::default(), Counts::default(), Counts::default());
    let faults = Arc::new(MessageLog::default());
    let trip_saga = Saga::new(trip_machine(), repository.clone());
    let saga = trip_saga.stats();
    let bus = Bus::builder(transport.clone())
        .stop_timeout(Duration::from_secs(20))
        .request_timeout(Duration::from_secs(3))
        .endpoint(
            // Two attempts: about 1% of the messages fail both and end in `_error`.
            Endpoint::new("chaos-work")
                .prefetch(64)
                .redelivery(RedeliveryPolicy::intervals([Duration::from_millis(200)]))
                .handler_with_state(applied.clone(), |ctx: ConsumeContext<Work>, applied| async move {
                    if fastrand::u32(0..10) == 0 {
                        return Err::<(), BoxError>("a downstream call failed (10% of attempts)".into());
                    }
                    applied.add(ctx.message().id);
                    Ok(())
                }),
        )
        .endpoint(Endpoint::new("chaos-ping").handler_with_state(
            responded.clone(),
            |ctx: ConsumeContext<Ping>, responded| async move {
                responded.add(ctx.message().id);
                ctx.respond(Pong { id: ctx.message().id }).await?;
                Ok(())
            },
        ))
        .endpoint(record::<Fault<Work>>(Endpoint::new("chaos-faults"), &faults))
        .endpoint(
            trip_saga
                .endpoint()
                .concurrency_limit(8)
                .retry(RetryPolicy::intervals([Duration::from_millis(100); 3]))
                .redelivery(RedeliveryPolicy::intervals([Duration::from_millis(500); 60])),
        )
        .build();
    bus.start().await.expect("bus starts");
    let started = std::time::Instant::now();

    let publish_retries = Arc::new(AtomicU64::new(0));
    let faulted = {
        let faults = faults.clone();
        move || faults.envelopes::<Fault<Work>>().len()
    };
    let trip_ids: Arc<Vec<Uuid>> = Arc::new((0..trips).map(|_| Uuid::now_v7()).collect());
    let progress = {
        let (applied, answered, saga, faulted) = (applied.clone(), answered.clone(), saga.clone(), faulted.clone());
        move || (applied.distinct() + faulted() + answered.distinct()) as u64 + saga.transitions()
    };
    let expected = u64::from(works + 2 * trips + pings);

    // Producers: each message is sent until the broker confirms it (at least once).
    let mut producers = Vec::new();
    for lane in 0..4u32 {
        let (bus, retries) = (bus.clone(), publish_retries.clone());
        producers.push(tokio::spawn(async move {
            for id in (lane..works).step_by(4) {
                while bus.send("queue:chaos-work", Work { id }).await.is_err() {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }));
    }
    {
        let (bus, retries, ids, saga) = (bus.clone(), publish_retries.clone(), trip_ids.clone(), saga.clone());
        producers.push(tokio::spawn(async move {
            for trip_id in ids.iter().copied() {
                while bus.publish(TripStarted { trip_id }).await.is_err() {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(BACKOFF).await;
                }
            }
            // The second event of each instance once every first one is in.
            assert!(saga.wait_for_transitions(ids.len() as u64, Duration::from_secs(600)).await, "trips started");
            for trip_id in ids.iter().copied() {
                while bus.publish(TripFinished { trip_id }).await.is_err() {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }));
    }
    for lane in 0..8u32 {
        let (bus, answered, retries) = (bus.clone(), answered.clone(), publish_retries.clone());
        producers.push(tokio::spawn(async move {
            for id in (lane..pings).step_by(8) {
                loop {
                    match bus.request::<Ping, Pong>(Ping { id }).await {
                        Ok(pong) if pong.message().id == id => break answered.add(id),
                        _ => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(BACKOFF).await;
                        }
                    }
                }
            }
        }));
    }

    // The driver: each fault at a random moment around its share of the run.
    let mut events = Vec::new();
    let chaos = [
        (10, "cut"),
        (22, "cut"),
        (35, "restart node"),
        (45, "cut"),
        (55, "delete queue"),
        (65, "cut"),
        (75, "restart redis"),
        (85, "cut"),
    ];
    for (percent, what) in chaos {
        let at = expected * percent / 100;
        wait_progress(what, &progress, at, Duration::from_secs(600)).await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        match what {
            "cut" => {
                node.ctl(&["close_all_connections", "chaos cut"]).await;
            }
            "restart node" => node.restart_app().await,
            "delete queue" => {
                node.ctl(&["delete_queue", "chaos-ping"]).await;
            }
            _ => {
                let stopped = redis.clone();
                tokio::task::spawn_blocking(move || {
                    stopped.stop();
                    stopped.launch();
                })
                .await
                .expect("redis restarted");
            }
        }
        events.push(format!("{what} at {:.1}s", started.elapsed().as_secs_f64()));
    }
    for producer in producers {
        producer.await.expect("producer finished");
    }
    wait_progress("everything accounted for", &progress, expected, Duration::from_secs(600)).await;
    bus.stop().await.expect("stop");

    // What `_error` holds: each failed work message once, with its reason.
    let inspector =
        lapin::Connection::connect(&node.uri(), lapin::ConnectionProperties::default()).await.expect("connects");
    let channel = inspector.create_channel().await.expect("channel");
    let in_error = Counts::default();
    let mut reasons = HashSet::new();
    while let Some(message) =
        channel.basic_get("chaos-work_error".into(), BasicGetOptions { no_ack: true }).await.expect("get")
    {
        let message = bus_rabbitmq::testing::transport_message(message.delivery.data, &message.delivery.properties);
        let envelope: serde_json::Value = serde_json::from_slice(&message.body).expect("an envelope");
        let id = envelope["message"]["id"].as_u64().expect("a work id") as u32;
        in_error.add(id);
        reasons.insert(message.headers.get_str("MT-Fault-Message").unwrap_or_default().to_owned());
    }
    let lost_work: Vec<u32> =
        (0..works).filter(|id| !applied.ids().contains(id) && !in_error.ids().contains(id)).collect();
    let check = RedisSagaRepository::<Trip>::connect(&redis.url(), saga_options).await.expect("redis");
    let mut not_final = 0;
    for trip_id in trip_ids.iter() {
        match check.load(*trip_id).await.expect("load") {
            Some(instance) if instance.is_in("Final") => {}
            other => {
                not_final += 1;
                println!("trip {trip_id} not final: {:?}", other.map(|i| i.current_state));
            }
        }
    }
    let lost_pings = pings as usize - answered.distinct();
    let depth = |queues: &[(String, u64)], name: &str| queues.iter().find(|(q, _)| q == name).map_or(0, |(_, n)| *n);
    let queues = node.list_queues().await;
    let both = applied.ids().intersection(&in_error.ids()).count();
    println!("chaos soak: {total} messages in {:.1}s; {}", started.elapsed().as_secs_f64(), events.join(", "));
    println!("| endpoint | messages | applied | in _error | lost | duplicates |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| chaos-work (10% of attempts fail) | {works} | {} | {} | {} | {} applied twice, {} twice in `_error`, {both} applied and in `_error` |",
        applied.distinct(),
        in_error.distinct(),
        lost_work.len(),
        applied.duplicates(),
        in_error.duplicates()
    );
    println!(
        "| ChaosTrip (saga on Redis) | {} events, {trips} instances | {} instances final | {} | {not_final} | - |",
        2 * trips,
        trips - not_final,
        depth(&queues, "ChaosTrip_error")
    );
    println!(
        "| chaos-ping (requests) | {pings} | {} answered | {} | {lost_pings} | {} handled twice |",
        answered.distinct(),
        depth(&queues, "chaos-ping_error"),
        responded.duplicates()
    );
    println!(
        "publishes and requests tried again: {}; saga transitions {}",
        publish_retries.load(Ordering::Relaxed),
        saga.transitions()
    );
    let faulted_ids: HashSet<u32> = faults.messages::<Fault<Work>>().iter().map(|f| f.message.id).collect();
    transport.close().await;
    assert!(lost_work.is_empty(), "work messages lost: {lost_work:?}");
    assert!(in_error.ids().is_subset(&faulted_ids), "a fault for every message in `_error`");
    assert!(reasons.iter().all(|r| r.contains("downstream call failed")), "each with its reason: {reasons:?}");
    assert_eq!(not_final, 0, "every saga instance final");
    assert_eq!(lost_pings, 0, "every request answered");
    assert_eq!(saga.transitions(), 2 * u64::from(trips), "each saga event applied once");
}
