//! The Redis scheduler on the real Redis (127.0.0.1:6379): a message fires at its time, a
//! cancelled one never; it survives a restart of the service; two instances share the
//! scheduled messages and fire each once.

use std::collections::HashSet;
use std::time::Duration;

use bus_core::{Bus, ConsumeContext, DueTime, Endpoint, Message};
use bus_inmemory::{InMemoryTestHarness, InMemoryTransport};
use bus_redis::{RedisScheduler, RedisSchedulerOptions};
use serde::{Deserialize, Serialize};
use tests::{unique, WAIT};

const REDIS: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:RedisSchedulerTests:Due")]
struct Due {
    n: u32,
}

async fn scheduler(prefix: &str) -> RedisScheduler {
    if std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], 6379).into(), Duration::from_secs(2)).is_err() {
        panic!("Redis does not answer on 127.0.0.1:6379: run scripts/test.sh (it starts or installs Redis)");
    }
    let options = RedisSchedulerOptions {
        key_prefix: prefix.to_owned(),
        poll_interval: Duration::from_millis(100),
        ..RedisSchedulerOptions::default()
    };
    RedisScheduler::connect(REDIS, options).await.expect("connects to Redis")
}

fn receiving(bus: bus_core::BusBuilder) -> bus_core::BusBuilder {
    bus.endpoint(Endpoint::new("due").handler(|_: ConsumeContext<Due>| async { Ok(()) }))
}

#[tokio::test]
async fn a_message_survives_a_restart_and_fires_once_and_a_cancelled_one_never() {
    let prefix = unique("sched");
    // The first service schedules, and stops before the messages are due.
    let first = scheduler(&prefix).await;
    let service = Bus::builder(InMemoryTransport::new()).scheduler(first.clone()).build();
    service.start().await.expect("start");
    let due = DueTime::from(Duration::from_millis(1200));
    service.schedule_send(due, "queue:due", Due { n: 1 }).await.expect("scheduled");
    let cancelled = service.schedule_send(due, "queue:due", Due { n: 2 }).await.expect("scheduled");
    assert!(service.cancel_scheduled(cancelled).await.expect("cancel"), "cancelled while waiting");
    service.stop().await.expect("stop");
    assert_eq!(first.waiting().await.expect("count"), 1, "waits in Redis across the restart");

    let second = scheduler(&prefix).await;
    let harness = InMemoryTestHarness::start(move |bus| receiving(bus.scheduler(second))).await.expect("harness");
    let fired = harness.consumed().wait_for::<Due>(1, WAIT).await.expect("fires after the restart");
    let removed = async {
        while first.waiting().await.expect("count") > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let left = tokio::time::timeout(WAIT, removed).await.map_or(1, |()| 0);
    harness.stop().await.expect("stop");
    assert_eq!(fired[0].n, 1, "the cancelled message never fired");
    assert_eq!(harness.consumed().count::<Due>(), 1, "once");
    assert_eq!(left, 0, "nothing left in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_scheduled_messages_and_fire_each_once() {
    const MESSAGES: u32 = 300;
    let prefix = unique("shared");
    let transport = InMemoryTransport::new();
    let log = std::sync::Arc::new(bus_core::testing::MessageLog::default());
    let first = Bus::builder(transport.clone())
        .scheduler(scheduler(&prefix).await)
        .endpoint(Endpoint::new("shared-due").handler_with_state(
            log.clone(),
            |ctx: ConsumeContext<Due>, log| async move {
                log.record(ctx.envelope());
                Ok(())
            },
        ))
        .build();
    let second = Bus::builder(transport.clone()).scheduler(scheduler(&prefix).await).build();
    let due = DueTime::from(Duration::from_millis(500));
    for n in 0..MESSAGES {
        first.schedule_send(due, "queue:shared-due", Due { n }).await.expect("scheduled");
    }
    first.start().await.expect("start");
    second.start().await.expect("start");
    let all = log.wait_for::<Due>(MESSAGES as usize, WAIT * 2).await.expect("every message fires");
    first.stop().await.expect("stop");
    second.stop().await.expect("stop");
    let distinct: HashSet<u32> = all.iter().map(|m| m.n).collect();
    assert_eq!(log.len(), MESSAGES as usize, "none twice");
    assert_eq!(distinct.len(), MESSAGES as usize, "none lost");
}
