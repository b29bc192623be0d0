//! The outbox when things break: the writing process killed between its commit and the
//! delivery, and the broker out of reach while transactions commit. Each proves nothing was
//! lost (and, for the kill, nothing doubled).

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use bus_core::{Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::{InMemoryTestHarness, InMemoryTransport};
use bus_postgres::{PostgresOptions, PostgresOutbox};
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use serde::{Deserialize, Serialize};
use tests::postgres_support::{database_url, TestSchema};
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::{shared_addr, TcpProxy, Vhost};
use tests::WAIT;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:OutboxFaults:Placed")]
struct Placed {
    order: i64,
}

fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::new().schema(schema).poll_interval(Duration::from_millis(200))
}

#[tokio::test]
async fn a_process_killed_after_commit_delivers_the_message_once_after_restart() {
    let schema = TestSchema::create("outbox-kill").await;
    let setup = Bus::builder(InMemoryTransport::new()).build();
    PostgresOutbox::with_options(schema.pool.clone(), setup, options(&schema.name))
        .expect("outbox")
        .migrate()
        .await
        .expect("migrated");
    let id = uuid::Uuid::now_v7();
    // A service commits one message, then is killed with SIGKILL before it delivers it.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-writer"))
        .args([database_url(), schema.name.clone(), id.to_string()])
        .status()
        .await
        .expect("the writer runs");
    assert_eq!(status.signal(), Some(9), "the writer was killed with SIGKILL: {status:?}");
    let waiting: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".outbox_messages WHERE message_id = $1 AND delivered_at IS NULL",
        schema.name
    ))
    .bind(id)
    .fetch_one(&schema.pool)
    .await
    .expect("count");
    assert_eq!(waiting, 1, "the committed message waits in the outbox");

    // The service restarts: a bus and its delivery service.
    let harness = InMemoryTestHarness::start(|bus| {
        bus.endpoint(Endpoint::new("placed").handler(|_: ConsumeContext<Placed>| async { Ok(()) }))
    })
    .await
    .expect("harness");
    let outbox = PostgresOutbox::with_options(schema.pool.clone(), harness.bus().clone(), options(&schema.name))
        .expect("outbox");
    let delivery = outbox.start();
    harness.consumed().wait_for::<Placed>(1, WAIT).await.expect("delivered after the restart");
    delivery.stop().await;
    let delivered: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".outbox_messages WHERE message_id = $1 AND delivered_at IS NOT NULL",
        schema.name
    ))
    .bind(id)
    .fetch_one(&schema.pool)
    .await
    .expect("count");
    // A second delivery service pass finds nothing more to send.
    let again = outbox.start();
    again.stop().await;
    harness.stop().await.expect("stop");
    let envelopes = harness.consumed().envelopes::<Placed>();
    assert_eq!(envelopes.len(), 1, "delivered once");
    assert_eq!(envelopes[0].message_id, Some(id), "with the id it was written with");
    assert_eq!(delivered, 1, "and marked delivered");
    schema.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_out_of_reach_while_a_thousand_transactions_commit_loses_none() {
    const TRANSACTIONS: i64 = 1000;
    require_broker();
    let schema = TestSchema::create("outbox-down").await;
    let vhost = tokio::task::spawn_blocking(|| Vhost::create("outbox-down")).await.expect("vhost");
    // The consumer connects directly; the publishing service through a proxy that is cut.
    let consumer = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("consumer connects");
    let log = std::sync::Arc::new(bus_core::testing::MessageLog::default());
    let consuming = Bus::builder(consumer.clone())
        .endpoint(Endpoint::new("outbox-down").handler_with_state(
            log.clone(),
            |ctx: ConsumeContext<Placed>, log| async move {
                log.record(ctx.envelope());
                Ok(())
            },
        ))
        .build();
    consuming.start().await.expect("consumer starts");
    let proxy = TcpProxy::start(shared_addr()).await;
    let rabbit = RabbitMqOptions {
        heartbeat: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_secs(1),
        publish_timeout: Duration::from_secs(2),
        ..RabbitMqOptions::default()
    };
    let publisher = RabbitMqTransport::connect_with(&vhost.uri(proxy.port()), rabbit).await.expect("connects");
    let bus = Bus::builder(publisher.clone()).build();
    bus.start().await.expect("bus starts");
    let outbox = PostgresOutbox::with_options(schema.pool.clone(), bus.clone(), options(&schema.name)).expect("outbox");
    outbox.migrate().await.expect("migrated");
    let delivery = outbox.start();

    // The broker goes out of reach, for 10 s: what is connected is cut, what connects stalls.
    proxy.stall();
    proxy.cut();
    let down = tokio::time::Instant::now();
    let writers: Vec<_> = (0..TRANSACTIONS)
        .map(|order| {
            let (pool, outbox) = (schema.pool.clone(), outbox.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.expect("begin");
                outbox.publish(&mut tx, Placed { order }).await.expect("written");
                tx.commit().await.expect("commit");
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    // The outage this test is about: it lasts 10 s whatever the writers took.
    tokio::time::sleep_until(down + Duration::from_secs(10)).await;
    proxy.resume();

    let arrived = async {
        loop {
            let distinct: HashSet<i64> = log.messages::<Placed>().iter().map(|m| m.order).collect();
            if distinct.len() as i64 == TRANSACTIONS {
                return;
            }
            let _ = log.wait_for::<Placed>(log.len() + 1, Duration::from_secs(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(90), arrived).await.expect("all 1,000 delivered after the outage");
    delivery.stop().await;
    let waiting: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".outbox_messages WHERE delivered_at IS NULL",
        schema.name
    ))
    .fetch_one(&schema.pool)
    .await
    .expect("count");
    bus.stop().await.expect("stop");
    consuming.stop().await.expect("stop");
    publisher.close().await;
    consumer.close().await;
    let distinct: HashSet<i64> = log.messages::<Placed>().iter().map(|m| m.order).collect();
    assert_eq!(distinct.len() as i64, TRANSACTIONS, "none lost");
    assert_eq!(waiting, 0, "every row marked delivered");
    println!("{} deliveries of {TRANSACTIONS} messages (at least once)", log.len());
    schema.remove().await;
}
