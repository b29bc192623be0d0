//! Sagas and the scheduler on a Redis Cluster (three masters, one replica each) and on a
//! master watched by Sentinel, all of the test's own: the saga concurrency test (1,000
//! instances x 16 concurrent events) loses no update, neither as it is nor while a master
//! is killed (`kill -9`) and its replica takes over.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::RetryPolicy;
use bus_core::{Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::{InMemoryTestHarness, InMemoryTransport};
use bus_redis::{RedisScheduler, RedisSchedulerOptions};
use bus_saga::{when, RedisSagaOptions, RedisSagaRepository, Saga, SagaRepository, StateMachine};
use serde::{Deserialize, Serialize};
use tests::redis_support::{RedisCluster, RedisSentinel};
use tests::{unique, WAIT};
use uuid::Uuid;

/// One Redis Cluster or Sentinel set-up at a time: two of them side by side on two cores time out each other's
/// heartbeats and elections.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Tally {
    count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:RedisClusterTests:Add")]
struct Add {
    tally_id: Uuid,
}

fn tally_machine(name: &str) -> Arc<StateMachine<Tally>> {
    StateMachine::<Tally>::builder(name)
        .states(["Counting"])
        .event::<Add>(|m| m.tally_id)
        .initially(when::<Tally, Add>().then(|c, _| c.data.count += 1).transition_to("Counting"))
        .during("Counting", when::<Tally, Add>().then(|c, _| c.data.count += 1))
        .build()
        .expect("valid state machine")
}

fn saga_options(prefix: &str) -> RedisSagaOptions {
    // Each write waits for its replica, so that a master killed right after a write cannot
    // take an acknowledged update with it.
    RedisSagaOptions { key_prefix: prefix.to_owned(), replicas_to_wait_for: 1, ..RedisSagaOptions::default() }
}

/// `instances` tallies, `events` additions each published back to back, consumed by two
/// buses at concurrency 8 (an instance's events meet across the buses); `meanwhile`
/// runs (on a blocking thread) once a third of them are applied. Every addition must be
/// applied once. Returns the conflicts retried.
async fn add_concurrently(
    address: &str,
    instances: usize,
    events: u32,
    meanwhile: impl FnOnce() + Send + 'static,
) -> u64 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let prefix = unique("tallies");
    let endpoint = unique("Tally");
    let transport = InMemoryTransport::new();
    let mut buses = Vec::new();
    let mut stats = Vec::new();
    for _ in 0..2 {
        let repository =
            RedisSagaRepository::<Tally>::connect(address, saga_options(&prefix)).await.expect("connects to Redis");
        let saga = Saga::new(tally_machine(&endpoint), repository);
        stats.push(saga.stats());
        // A failover takes a few seconds (Sentinel's up to about 15): retries outlast it.
        let saga_endpoint = saga
            .endpoint()
            .concurrency_limit(8)
            .retry(RetryPolicy::intervals(std::iter::repeat_n(Duration::from_millis(500), 60)));
        buses.push(Bus::builder(transport.clone()).endpoint(saga_endpoint).build());
    }
    for bus in &buses {
        bus.start().await.expect("bus starts");
    }
    let ids: Vec<Uuid> = (0..instances).map(|_| Uuid::now_v7()).collect();
    let mut sends = Vec::new();
    for id in &ids {
        for _ in 0..events {
            sends.push(buses[0].publish(Add { tally_id: *id }));
        }
    }
    futures::future::try_join_all(sends).await.expect("all published");
    let total = u64::from(events) * instances as u64;
    let stats = &stats;
    let applied = move || stats.iter().map(|s| s.transitions()).sum::<u64>();
    let wait_for = move |target: u64| async move {
        let done = async {
            while applied() < target {
                let next =
                    stats.iter().map(|s| Box::pin(s.wait_for_transitions(s.transitions() + 1, Duration::from_secs(5))));
                futures::future::select_all(next).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(240), done).await.is_ok()
    };
    assert!(wait_for(total / 3).await, "a third applied");
    let repository = RedisSagaRepository::<Tally>::connect(address, saga_options(&prefix)).await.expect("redis");
    let repository = &repository;
    let fault = tokio::task::spawn_blocking(meanwhile);
    // Done when every instance holds every addition. A write whose answer a failover cut off
    // is found applied when its message is tried again: it counts no second transition, so
    // the transitions alone may stay short of the total. An update lost for good leaves its
    // instance short for good, and the wait fails listing it.
    let ids = &ids;
    tests::poll_until("every addition applied", Duration::from_secs(240), Duration::from_millis(500), || async move {
        let mut wrong = Vec::new();
        for id in ids {
            let instance = repository.load(*id).await.map_err(|e| e.to_string())?;
            let (count, version) = instance.map_or((0, 0), |i| (i.data.count, i.version));
            if count != events || version != u64::from(events) {
                wrong.push((count, version));
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("{} instances short (count, version): {:?}", wrong.len(), &wrong[..wrong.len().min(10)]))
        }
    })
    .await;
    fault.await.expect("the fault ran");
    for bus in &buses {
        bus.stop().await.expect("stop");
    }
    let conflicts = stats.iter().map(|s| s.conflicts()).sum();
    println!(
        "{address}: {instances} instances x {events} events on 2 buses, {} transitions, {conflicts} conflicts retried",
        applied()
    );
    assert!(transport.peek(&format!("{endpoint}_error")).is_empty(), "nothing failed for good");
    conflicts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_concurrency_test_on_a_redis_cluster_loses_no_update() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3);
    let conflicts = add_concurrently(&cluster.address(), 1_000, 16, || {}).await;
    assert!(conflicts > 0, "the buses really raced");
    // The instances are spread over the masters, not kept in one slot.
    let holding = cluster.keys_per_master();
    assert_eq!(holding.len(), 3, "three masters: {holding:?}");
    assert!(holding.iter().all(|(_, keys)| *keys > 100), "every master holds instances: {holding:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_concurrency_test_loses_no_update_while_a_master_fails_over() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = Arc::new(RedisCluster::start(3));
    let address = cluster.address();
    let killer = cluster.clone();
    add_concurrently(&address, 1_000, 16, move || {
        let key = "any-key";
        let master = killer.master_of(key);
        killer.fail_over(master, key);
        println!("master on {master} killed; its replica took over");
        // Back as a replica of the new master, so that writes find a replica to wait for.
        killer.restart(master);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_follow_a_sentinel_failover_and_lose_no_update() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let sentinel = Arc::new(RedisSentinel::start());
    let address = sentinel.address();
    let failing = sentinel.clone();
    let before = sentinel.master_port();
    add_concurrently(&address, 300, 8, move || {
        let started = std::time::Instant::now();
        failing.fail_over();
        println!("the Sentinels promoted the replica {:?} after the master was killed", started.elapsed());
        // Back as a replica of the new master, so that writes find a replica to wait for.
        failing.restart_old_master();
    })
    .await;
    assert_ne!(sentinel.master_port(), before, "the Sentinels named another master");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:RedisClusterTests:Due")]
struct Due {
    n: u32,
}

/// The scheduler's scripts touch several keys at once: on a cluster they must share a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_fires_every_message_on_a_redis_cluster() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3);
    let options = RedisSchedulerOptions {
        key_prefix: unique("sched"),
        poll_interval: Duration::from_millis(100),
        ..RedisSchedulerOptions::default()
    };
    let scheduler = RedisScheduler::connect(&cluster.address(), options).await.expect("connects to the cluster");
    let waiting = scheduler.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.scheduler(scheduler).endpoint(Endpoint::new("due").handler(|_: ConsumeContext<Due>| async { Ok(()) }))
    })
    .await
    .expect("harness");
    for n in 0..50 {
        harness.bus().schedule_send(Duration::from_millis(300), "queue:due", Due { n }).await.expect("scheduled");
    }
    let fired = harness.consumed().wait_for::<Due>(50, WAIT).await.expect("every message fires");
    let numbers: HashSet<u32> = fired.iter().map(|m| m.n).collect();
    assert_eq!(numbers.len(), 50, "each once");
    tests::poll_until("the fired messages removed", WAIT, Duration::from_millis(50), || async {
        match waiting.waiting().await {
            Ok(0) => Ok(()),
            other => Err(format!("waiting: {other:?}")),
        }
    })
    .await;
    harness.stop().await.expect("stop");
}
