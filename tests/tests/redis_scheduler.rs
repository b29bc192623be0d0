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

/// A transport whose first send waits until the test lets it go, and says when it started.
struct HeldFirstSend {
    inner: InMemoryTransport,
    started: tokio::sync::mpsc::UnboundedSender<()>,
    release: std::sync::Arc<tokio::sync::Semaphore>,
    sends: std::sync::atomic::AtomicU32,
}

impl bus_core::Transport for HeldFirstSend {
    fn system(&self) -> &'static str {
        self.inner.system()
    }
    fn address(&self, name: &str) -> String {
        self.inner.address(name)
    }
    fn declare<'a>(
        &'a self,
        topology: &'a bus_core::EndpointTopology,
    ) -> futures::future::BoxFuture<'a, bus_core::Result<()>> {
        self.inner.declare(topology)
    }
    fn publish<'a>(
        &'a self,
        types: &'a [&'a str],
        message: bus_core::TransportMessage,
    ) -> futures::future::BoxFuture<'a, bus_core::Result<()>> {
        self.inner.publish(types, message)
    }
    fn send<'a>(
        &'a self,
        destination: &'a str,
        message: bus_core::TransportMessage,
    ) -> futures::future::BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(async move {
            if self.sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let _ = self.started.send(());
                let _permit = self.release.acquire().await;
            }
            self.inner.send(destination, message).await
        })
    }
    fn subscribe<'a>(
        &'a self,
        topology: &'a bus_core::EndpointTopology,
        prefetch: u16,
    ) -> futures::future::BoxFuture<'a, bus_core::Result<bus_core::Subscription>> {
        self.inner.subscribe(topology, prefetch)
    }
    fn delete<'a>(
        &'a self,
        topology: &'a bus_core::EndpointTopology,
    ) -> futures::future::BoxFuture<'a, bus_core::Result<()>> {
        self.inner.delete(topology)
    }
}

/// A message scheduled again under its token while the first is being delivered (a saga
/// starting its timeout again as the old one fires) is kept: the batch that delivered the
/// first removes only the first.
#[tokio::test]
async fn a_message_scheduled_again_while_its_token_fires_is_kept() {
    let prefix = unique("sched-again");
    let scheduler = scheduler(&prefix).await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let transport = HeldFirstSend {
        inner: InMemoryTransport::new(),
        started: started_tx,
        release: release.clone(),
        sends: Default::default(),
    };
    let got = std::sync::Arc::new(bus_core::testing::MessageLog::default());
    let bus = Bus::builder(transport)
        .scheduler(scheduler.clone())
        .endpoint(tests::record::<Due>(Endpoint::new("due"), &got))
        .build();
    bus.start().await.expect("bus starts");
    let token = uuid::Uuid::now_v7();
    let options = bus_core::SendOptions::new;
    bus.schedule_send_with(token, Duration::ZERO, "queue:due", Due { n: 1 }, options()).await.expect("first");
    tokio::time::timeout(WAIT, started.recv()).await.expect("the first is being delivered");
    // Claimed and on its way: scheduled again under the same token.
    let soon = DueTime::from(Duration::from_millis(200));
    bus.schedule_send_with(token, soon, "queue:due", Due { n: 2 }, options()).await.expect("again");
    release.add_permits(1);
    let delivered = got.wait_for::<Due>(2, WAIT).await.expect("both delivered");
    bus.stop().await.expect("stop");
    assert_eq!(delivered.iter().map(|d| d.n).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(scheduler.waiting().await.expect("count"), 0);
}

/// Messages due at the same time wait in the order they were scheduled: Redis orders ties in
/// its due set by token, so the tokens of one millisecond must be ordered too.
#[tokio::test]
async fn messages_due_at_the_same_time_wait_in_the_order_scheduled() {
    let prefix = unique("sched");
    let service = Bus::builder(InMemoryTransport::new()).scheduler(scheduler(&prefix).await).build();
    service.start().await.expect("start");
    // Far enough ahead that none fires during the test.
    let due = DueTime::from(Duration::from_secs(3600));
    let mut scheduled = Vec::new();
    for n in 0..200 {
        scheduled.push(service.schedule_send(due, "queue:due", Due { n }).await.expect("scheduled").to_string());
    }
    service.stop().await.expect("stop");
    let client = redis::Client::open(REDIS).expect("redis url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connects to Redis");
    let waiting: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}:due"))
        .arg(0)
        .arg(-1)
        .query_async(&mut connection)
        .await
        .expect("zrange");
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut connection).await.expect("keys");
    let _: () = redis::cmd("DEL").arg(keys).query_async(&mut connection).await.expect("del");
    assert_eq!(waiting, scheduled, "in the order scheduled");
}
