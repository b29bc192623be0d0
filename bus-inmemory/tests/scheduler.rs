//! The in-memory scheduler on tokio's paused clock: a message fires at its time and not
//! before, a cancelled one never, many at once all, and those due together in the order
//! they were scheduled.

use std::time::Duration;

use bus_core::{Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::{InMemoryScheduler, InMemoryTransport};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:SchedulerTests:Tick")]
struct Tick {
    n: u32,
}

/// A started bus with the scheduler, whose `ticks` endpoint forwards each tick, one at a time.
async fn bus(scheduler: &InMemoryScheduler) -> (Bus, mpsc::UnboundedReceiver<u32>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let bus = Bus::builder(InMemoryTransport::new())
        .scheduler(scheduler.clone())
        .endpoint(Endpoint::new("ticks").concurrency_limit(1).handler_with_state(
            tx,
            |ctx: ConsumeContext<Tick>, tx| async move {
                tx.send(ctx.message().n)?;
                Ok(())
            },
        ))
        .build();
    bus.start().await.expect("bus starts");
    (bus, rx)
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_message_fires_at_its_time_and_not_before() {
    let scheduler = InMemoryScheduler::new();
    let (bus, mut ticks) = bus(&scheduler).await;
    bus.schedule_send(Duration::from_secs(60), "queue:ticks", Tick { n: 1 }).await.expect("scheduled");
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(scheduler.len(), 1, "still waiting a second before its time");
    assert!(ticks.try_recv().is_err(), "nothing delivered yet");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(ticks.recv().await, Some(1), "delivered at its time");
    assert!(scheduler.is_empty());
    bus.stop().await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_message_never_fires() {
    let scheduler = InMemoryScheduler::new();
    let (bus, mut ticks) = bus(&scheduler).await;
    let token = bus.schedule_send(Duration::from_secs(10), "queue:ticks", Tick { n: 1 }).await.expect("scheduled");
    bus.schedule_send(Duration::from_secs(20), "queue:ticks", Tick { n: 2 }).await.expect("scheduled");
    assert!(bus.cancel_scheduled(token).await.expect("cancel"), "cancelled while waiting");
    assert!(!bus.cancel_scheduled(token).await.expect("cancel"), "a second cancel finds nothing");
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(ticks.recv().await, Some(2), "the later message comes, and is the first to");
    assert!(ticks.try_recv().is_err(), "the cancelled one never did");
    bus.stop().await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn many_messages_due_together_all_fire_in_the_order_scheduled() {
    let scheduler = InMemoryScheduler::new();
    let (bus, mut ticks) = bus(&scheduler).await;
    let due = bus_core::DueTime::from(Duration::from_secs(5));
    for n in 0..1_000 {
        bus.schedule_send(due, "queue:ticks", Tick { n }).await.expect("scheduled");
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    let mut seen = Vec::with_capacity(1_000);
    while seen.len() < 1_000 {
        seen.push(ticks.recv().await.expect("a tick"));
    }
    assert_eq!(seen, (0..1_000).collect::<Vec<_>>(), "all of them, in the order scheduled");
    bus.stop().await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_consumer_schedules_a_follow_up_and_a_bus_without_a_scheduler_says_so() {
    let scheduler = InMemoryScheduler::new();
    let (tx, mut followed) = mpsc::unbounded_channel();
    let bus = Bus::builder(InMemoryTransport::new())
        .scheduler(scheduler.clone())
        .endpoint(Endpoint::new("starts").handler(|ctx: ConsumeContext<Tick>| async move {
            ctx.schedule_send(Duration::from_secs(30), "queue:follow-ups", Tick { n: ctx.message().n + 1 }).await?;
            Ok(())
        }))
        .endpoint(Endpoint::new("follow-ups").handler_with_state(tx, |ctx: ConsumeContext<Tick>, tx| async move {
            tx.send((ctx.message().n, ctx.conversation_id()))?;
            Ok(())
        }))
        .build();
    bus.start().await.expect("bus starts");
    bus.send("queue:starts", Tick { n: 1 }).await.expect("send");
    let (n, conversation) = followed.recv().await.expect("the follow-up fires");
    assert_eq!(n, 2);
    assert!(conversation.is_some(), "part of the flow that scheduled it");
    bus.stop().await.expect("stop");

    let plain = Bus::builder(InMemoryTransport::new()).build();
    let error = plain.schedule_publish(Duration::from_secs(1), Tick { n: 0 }).await.expect_err("no scheduler");
    assert!(error.to_string().contains("no message scheduler"), "{error}");
}

/// Scheduling again under a waiting token replaces what waited: one message fires, the
/// second, at the second's time; and it carries its token.
#[tokio::test(start_paused = true)]
async fn scheduling_again_under_a_token_replaces_the_waiting_message() {
    let scheduler = InMemoryScheduler::new();
    let (bus, mut ticks) = bus(&scheduler).await;
    let token = uuid::Uuid::now_v7();
    let options = bus_core::SendOptions::new;
    bus.schedule_send_with(token, Duration::from_secs(10), "queue:ticks", Tick { n: 1 }, options())
        .await
        .expect("first");
    bus.schedule_send_with(token, Duration::from_secs(20), "queue:ticks", Tick { n: 2 }, options())
        .await
        .expect("again");
    assert_eq!(scheduler.len(), 1, "one waits under the token");
    tokio::time::advance(Duration::from_secs(15)).await;
    assert!(ticks.try_recv().is_err(), "the first was replaced: nothing at its time");
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(ticks.recv().await, Some(2));
    assert!(scheduler.is_empty());
    bus.stop().await.expect("stop");
}
