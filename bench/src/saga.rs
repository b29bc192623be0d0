//! Saga transitions per second on the Redis repository, versus raw Redis compare-and-set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus, Message};
use bus_inmemory::InMemoryTransport;
use bus_saga::{when, RedisSagaOptions, RedisSagaRepository, Saga, StateMachine};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::report::{compare, figure};
use crate::Scale;

const REDIS: &str = "redis://127.0.0.1:6379";
const INSTANCES: usize = 100;
const CONCURRENCY: usize = 16;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Tally {
    count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:Tick")]
struct Tick {
    id: Uuid,
}

/// The same compare-and-set the repository runs, called directly: the raw ceiling.
const CAS: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local stored = cjson.decode(current)
if tonumber(stored['version']) ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
";

async fn raw_cas(duration: Duration, prefix: &str) -> Result<f64, BoxError> {
    let client = redis::Client::open(REDIS)?;
    let connection = client.get_connection_manager().await?;
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for task in 0..CONCURRENCY {
        let mut connection = connection.clone();
        let ops = ops.clone();
        let key = format!("{prefix}:raw:{task}");
        tasks.push(tokio::spawn(async move {
            let script = redis::Script::new(CAS);
            let mut version = 1u64;
            let _: () =
                redis::cmd("SET").arg(&key).arg(r#"{"version":1,"count":0}"#).query_async(&mut connection).await?;
            while Instant::now() < deadline {
                let next = format!(
                    r#"{{"correlationId":"{key}","currentState":"Counting","version":{},"count":{}}}"#,
                    version + 1,
                    version
                );
                let swapped: i64 = script.key(&key).arg(version).arg(next).invoke_async(&mut connection).await?;
                if swapped == 1 {
                    version += 1;
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            let _: () = redis::cmd("DEL").arg(&key).query_async(&mut connection).await?;
            Ok::<_, redis::RedisError>(())
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(ops.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

async fn saga(events: u64, prefix: &str) -> Result<(f64, u64), BoxError> {
    let machine = StateMachine::<Tally>::builder("BenchTally")
        .states(["Counting"])
        .event::<Tick>(|m| m.id)
        .initially(when::<Tally, Tick>().then(|t, _| t.data.count += 1).transition_to("Counting"))
        .during("Counting", when::<Tally, Tick>().then(|t, _| t.data.count += 1))
        .build()?;
    let options = RedisSagaOptions { key_prefix: prefix.to_owned(), ..RedisSagaOptions::default() };
    let repository = RedisSagaRepository::<Tally>::connect(REDIS, options).await?;
    let saga = Saga::new(machine, repository);
    let stats = saga.stats();
    let bus = Bus::builder(InMemoryTransport::new())
        .endpoint(saga.endpoint().prefetch(64).concurrency_limit(CONCURRENCY))
        .build();
    bus.start().await?;
    let ids: Vec<Uuid> = (0..INSTANCES).map(|_| Uuid::now_v7()).collect();
    // Create the instances first, so the run measures transitions of existing instances.
    for id in &ids {
        bus.publish(Tick { id: *id }).await?;
    }
    stats.wait_for_transitions(INSTANCES as u64, Duration::from_secs(60)).await;
    let started = Instant::now();
    let conflicts_before = stats.conflicts();
    for n in 0..events {
        bus.publish(Tick { id: ids[n as usize % INSTANCES] }).await?;
    }
    stats.wait_for_transitions(INSTANCES as u64 + events, Duration::from_secs(600)).await;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    bus.stop().await?;
    let client = redis::Client::open(REDIS)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut connection).await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut connection).await?;
    }
    Ok((rate, stats.conflicts() - conflicts_before))
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    let prefix = format!("bench-{}", Uuid::now_v7().simple());
    let raw = raw_cas(scale.duration, &prefix).await?;
    figure("saga.baseline.redis_cas", raw, "ops/s");
    let (transitions, conflicts) = saga(scale.saga_events, &prefix).await?;
    figure("saga.redis.transitions", transitions, "transitions/s");
    figure("saga.redis.conflicts", conflicts as f64, "conflicts");
    compare(
        "saga transitions (Redis, 100 instances, concurrency 16) vs raw Redis CAS",
        transitions,
        raw,
        "ops/s",
        Some(0.25),
    );
    Ok(())
}
