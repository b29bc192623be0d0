//! Flow control: a batch consumer of 100 versus one message at a time, draining the same
//! RabbitMQ backlog, with consumers that do nothing and with consumers that write each
//! message to PostgreSQL (one insert per message, or one per batch); and the partitioner's
//! cost in memory, partitioned versus not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{
    Batch, BatchOptions, BoxError, Bus, ConsumeContext, Consumer, Endpoint, EndpointTopology, Message, Transport,
};
use bus_inmemory::{InMemoryOptions, InMemoryTransport};
use bus_rabbitmq::RabbitMqTransport;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::Notify;

use crate::rabbitmq::{address, bus_publish, delete_endpoints, Shipment};
use crate::report::{compare, figure};
use crate::Scale;

/// Counts what it consumed, and says when it has all; with a table, writes each message
/// to it first.
#[derive(Clone)]
struct Counter {
    consumed: Arc<AtomicU64>,
    done: Arc<Notify>,
    total: u64,
    table: Option<(PgPool, Arc<str>)>,
}

impl Counter {
    fn new(total: u64, table: Option<(PgPool, Arc<str>)>) -> Self {
        Counter { consumed: Arc::default(), done: Arc::default(), total, table }
    }

    /// Writes the shipments, in one statement.
    async fn write(&self, shipments: &[&Shipment]) -> Result<(), BoxError> {
        let Some((pool, table)) = &self.table else { return Ok(()) };
        let ids: Vec<uuid::Uuid> = shipments.iter().map(|s| s.order_id).collect();
        let notes: Vec<&str> = shipments.iter().map(|s| s.note.as_str()).collect();
        sqlx::query(&format!("INSERT INTO {table} (id, note) SELECT * FROM UNNEST($1::uuid[], $2::text[])"))
            .bind(ids)
            .bind(notes)
            .execute(pool)
            .await?;
        Ok(())
    }

    fn add(&self, n: u64) {
        if self.consumed.fetch_add(n, Ordering::Relaxed) + n >= self.total {
            self.done.notify_one();
        }
    }
}

impl Consumer<Batch<Shipment>> for Counter {
    async fn consume(&self, ctx: ConsumeContext<Batch<Shipment>>) -> Result<(), BoxError> {
        self.write(&ctx.message().iter().collect::<Vec<_>>()).await?;
        self.add(ctx.message().len() as u64);
        Ok(())
    }
}

/// How a RabbitMQ backlog is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Single,
    Batch,
}

/// Fills a queue with `count` messages, then times how fast an endpoint drains it.
async fn drain(count: u64, mode: Mode, table: Option<(PgPool, Arc<str>)>) -> Result<f64, BoxError> {
    let transport = RabbitMqTransport::connect(&address()).await?;
    let queue = format!("bench-flow-{}", uuid::Uuid::now_v7().simple());
    let topology = EndpointTopology {
        queue: queue.clone(),
        message_types: vec![Shipment::message_type().into()],
        ..Default::default()
    };
    transport.declare(&topology).await?;
    let publisher = Bus::builder(transport.clone()).build();
    bus_publish(&publisher, count, Some(&format!("queue:{queue}"))).await?;

    let counter = Counter::new(count, table);
    let endpoint = match mode {
        Mode::Single => Endpoint::new(&queue).prefetch(200).handler_with_state(
            counter.clone(),
            |ctx: ConsumeContext<Shipment>, counter| async move {
                counter.write(&[ctx.message()]).await?;
                counter.add(1);
                Ok(())
            },
        ),
        Mode::Batch => Endpoint::new(&queue).batch_consumer(
            counter.clone(),
            BatchOptions::new().message_limit(100).time_limit(Duration::from_millis(50)).concurrency_limit(2),
        ),
    };
    let bus = Bus::builder(transport.clone()).endpoint(endpoint).build();
    let finished = counter.done.notified();
    let started = Instant::now();
    bus.start().await?;
    tokio::time::timeout(Duration::from_secs(600), finished).await?;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    bus.stop().await?;
    delete_endpoints(&[queue]).await?;
    transport.close().await;
    Ok(rate)
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:AccountEntry")]
struct AccountEntry {
    account: u64,
    amount_cents: u64,
    note: String,
}

const PRODUCERS: u64 = 2;
const ACCOUNTS: u64 = 1_000;

/// Publish -> consume in memory at concurrency 64, with or without partitions by account.
async fn in_memory(count: u64, partitioned: bool) -> Result<f64, BoxError> {
    let transport =
        InMemoryTransport::with_options(InMemoryOptions { queue_capacity: 10_000, ..InMemoryOptions::default() });
    let total = count / PRODUCERS * PRODUCERS;
    let counter = Counter::new(total, None);
    let c = counter.clone();
    let mut endpoint = Endpoint::new("bench-ledger").prefetch(1000).concurrency_limit(64);
    if partitioned {
        endpoint = endpoint.partition_by(|entry: &AccountEntry| entry.account, 256);
    }
    let endpoint = endpoint.handler(move |ctx: ConsumeContext<AccountEntry>| {
        std::hint::black_box(ctx.message());
        c.add(1);
        async { Ok(()) }
    });
    let bus = Bus::builder(transport).endpoint(endpoint).build();
    bus.start().await?;
    let finished = counter.done.notified();
    let started = Instant::now();
    let mut producers = Vec::new();
    for producer in 0..PRODUCERS {
        let bus = bus.clone();
        producers.push(tokio::spawn(async move {
            for n in 0..count / PRODUCERS {
                let account = (n * PRODUCERS + producer) % ACCOUNTS;
                bus.publish(AccountEntry { account, amount_cents: n, note: "deposit".repeat(20) }).await?;
            }
            Ok::<_, bus_core::Error>(())
        }));
    }
    for producer in producers {
        producer.await??;
    }
    tokio::time::timeout(Duration::from_secs(300), finished).await?;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    bus.stop().await?;
    Ok(rate)
}

/// Rounds of each side, alternating; each keeps its best (the machine is shared).
const ROUNDS: usize = 2;

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    let (mut single, mut batch) = (0.0f64, 0.0f64);
    for _ in 0..ROUNDS {
        single = single.max(drain(scale.rabbitmq, Mode::Single, None).await?);
        batch = batch.max(drain(scale.rabbitmq, Mode::Batch, None).await?);
    }
    figure("flow.rabbitmq.single_consume", single, "msg/s");
    figure("flow.rabbitmq.batch_100_consume", batch, "msg/s");
    compare("rabbitmq drain: batch consumer of 100 vs one message at a time", batch, single, "msg/s", None);

    // The same with a PostgreSQL insert per consume call: where batches pay.
    let pool = PgPoolOptions::new().max_connections(16).connect(&crate::outbox::database_url()).await?;
    let table: Arc<str> = format!("bench_flow_{}", uuid::Uuid::now_v7().simple()).into();
    sqlx::query(&format!("CREATE TABLE {table} (id uuid NOT NULL, note text NOT NULL)")).execute(&pool).await?;
    let rows = (scale.rabbitmq / 5).max(100);
    let (mut single, mut batch) = (0.0f64, 0.0f64);
    for _ in 0..ROUNDS {
        single = single.max(drain(rows, Mode::Single, Some((pool.clone(), table.clone()))).await?);
        batch = batch.max(drain(rows, Mode::Batch, Some((pool.clone(), table.clone()))).await?);
    }
    sqlx::query(&format!("DROP TABLE {table}")).execute(&pool).await?;
    pool.close().await;
    figure("flow.rabbitmq.single_consume_pg_insert", single, "msg/s");
    figure("flow.rabbitmq.batch_100_consume_pg_insert", batch, "msg/s");
    compare(
        "rabbitmq drain + PostgreSQL insert: batch of 100 (one insert) vs one message (one insert each)",
        batch,
        single,
        "msg/s",
        None,
    );

    let (mut plain, mut partitioned) = (0.0f64, 0.0f64);
    for _ in 0..ROUNDS {
        plain = plain.max(in_memory(scale.inmemory, false).await?);
        partitioned = partitioned.max(in_memory(scale.inmemory, true).await?);
    }
    figure("flow.inmemory.unpartitioned", plain, "msg/s");
    figure("flow.inmemory.partitioned", partitioned, "msg/s");
    compare("inmemory partitioned (1,000 keys, 256 partitions) vs unpartitioned", partitioned, plain, "msg/s", None);
    Ok(())
}
