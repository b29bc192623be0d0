//! Saga transitions per second on the Redis repository, versus raw Redis compare-and-set;
//! and how they hold up as the instances stored grow (1,000; 100,000; 1,000,000, in a
//! Redis server of the benchmark's own), with Redis's memory per instance.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus, Message};
use bus_inmemory::InMemoryTransport;
use bus_saga::{when, RedisSagaOptions, RedisSagaRepository, Saga, StateMachine, DEFAULT_DUPLICATE_WINDOW};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::report::{compare, figure, point};
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

/// A bus running the tally saga on the Redis at `redis`, and the saga's statistics.
async fn tally_bus(redis: &str, prefix: &str) -> Result<(Bus, Arc<bus_saga::SagaStats>), BoxError> {
    let machine = StateMachine::<Tally>::builder("BenchTally")
        .states(["Counting"])
        .event::<Tick>(|m| m.id)
        .initially(when::<Tally, Tick>().then(|t, _| t.data.count += 1).transition_to("Counting"))
        .during("Counting", when::<Tally, Tick>().then(|t, _| t.data.count += 1))
        .build()?;
    let options = RedisSagaOptions { key_prefix: prefix.to_owned(), ..RedisSagaOptions::default() };
    let repository = RedisSagaRepository::<Tally>::connect(redis, options).await?;
    let saga = Saga::new(machine, repository);
    let stats = saga.stats();
    let bus = Bus::builder(InMemoryTransport::new())
        .endpoint(saga.endpoint().prefetch(64).concurrency_limit(CONCURRENCY))
        .build();
    bus.start().await?;
    Ok((bus, stats))
}

async fn saga(events: u64, prefix: &str) -> Result<(f64, u64), BoxError> {
    let (bus, stats) = tally_bus(REDIS, prefix).await?;
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

/// Redis's `used_memory`, in bytes.
async fn used_memory(connection: &mut redis::aio::MultiplexedConnection) -> Result<f64, BoxError> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(connection).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
        .ok_or_else(|| "INFO memory has no used_memory".into())
}

/// Transitions per second of events spread at random over `stored` instances, for each
/// size in `scale.saga_instances`, and Redis's memory per instance. Instances are made by
/// the saga for the first thousand; the rest are copies of one of them written straight to
/// Redis (the same JSON under its own id), so a million take seconds, not minutes.
async fn instances_curve(scale: Scale) -> Result<(), BoxError> {
    let server = tests::redis_support::ThrowawayRedis::start();
    let url = server.url();
    let prefix = "curve";
    let mut connection = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
    let empty = used_memory(&mut connection).await?;
    let (bus, stats) = tally_bus(&url, prefix).await?;
    let mut ids: Vec<Uuid> = Vec::new();
    let mut transitions = 0;
    for stored in scale.saga_instances {
        let stored = usize::try_from(stored)?;
        if ids.is_empty() {
            let first: Vec<Uuid> = (0..stored.min(1_000)).map(|_| Uuid::now_v7()).collect();
            for id in &first {
                bus.publish(Tick { id: *id }).await?;
            }
            // Then each takes as many events as the duplicate window keeps, so every instance
            // holds a full window of applied-event ids, as instances do in steady state.
            for _ in 0..DEFAULT_DUPLICATE_WINDOW {
                for id in &first {
                    bus.publish(Tick { id: *id }).await?;
                }
            }
            transitions += (first.len() * (1 + DEFAULT_DUPLICATE_WINDOW)) as u64;
            stats.wait_for_transitions(transitions, Duration::from_secs(60)).await;
            ids = first;
        }
        let template_id = ids[0];
        let template: String =
            redis::cmd("GET").arg(format!("{prefix}:{template_id}")).query_async(&mut connection).await?;
        let template_id = template_id.to_string();
        while ids.len() < stored {
            let mut pipe = redis::pipe();
            for _ in 0..(stored - ids.len()).min(10_000) {
                let id = Uuid::now_v7();
                pipe.cmd("SET")
                    .arg(format!("{prefix}:{id}"))
                    .arg(template.replace(&template_id, &id.to_string()))
                    .ignore();
                ids.push(id);
            }
            let () = pipe.query_async(&mut connection).await?;
        }
        let keys: u64 = redis::cmd("DBSIZE").query_async(&mut connection).await?;
        if keys != stored as u64 {
            return Err(format!("{keys} keys stored for {stored} instances").into());
        }
        let per_instance = (used_memory(&mut connection).await? - empty) / stored as f64;
        // Events on instances drawn at random (a cheap xorshift), so the working set is all
        // of them rather than the few a cache would keep.
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ stored as u64;
        let started = Instant::now();
        for _ in 0..scale.saga_events {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bus.publish(Tick { id: ids[(state % stored as u64) as usize] }).await?;
        }
        transitions += scale.saga_events;
        stats.wait_for_transitions(transitions, Duration::from_secs(600)).await;
        let rate = scale.saga_events as f64 / started.elapsed().as_secs_f64();
        figure(&format!("saga.instances_{stored}.transitions"), rate, "transitions/s");
        figure(&format!("saga.instances_{stored}.redis_memory_per_instance"), per_instance, "bytes");
        point("saga-instances", "Redis repository", stored as f64, rate);
        point("saga-memory", "used_memory / instances", stored as f64, per_instance);
    }
    bus.stop().await?;
    drop(server);
    Ok(())
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    instances_curve(scale).await?;
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
