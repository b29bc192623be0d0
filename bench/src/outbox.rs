//! The PostgreSQL outbox on RabbitMQ: committed transactions with one message each, against a
//! raw baseline of the same INSERT and a separate confirmed lapin publish; and the latency
//! from commit to consume at 500 transactions/s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, EndpointTopology, Message, SendOptions, Transport};
use bus_postgres::{PostgresOptions, PostgresOutbox};
use bus_rabbitmq::RabbitMqTransport;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::report::{compare, figure};
use crate::Scale;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:OrderRecorded")]
struct OrderRecorded {
    order: i64,
    note: String,
}

const LATENCY_RATE: u64 = 500;

pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn insert(tx: &mut sqlx::PgConnection, schema: &str, order: i64) -> Result<(), BoxError> {
    sqlx::query(&format!("INSERT INTO \"{schema}\".orders (id, note) VALUES ($1, $2)"))
        .bind(order)
        .bind("x".repeat(100))
        .execute(tx)
        .await?;
    Ok(())
}

/// The same work by hand: the INSERT committed, then a confirmed publish of the same bytes.
async fn baseline(pool: &PgPool, schema: &str, count: u64, body: &[u8]) -> Result<f64, BoxError> {
    let connection = Connection::connect(&bus_rabbitmq::default_address(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = format!("bench-outbox-raw-{}", uuid::Uuid::now_v7().simple());
    let options = QueueDeclareOptions { auto_delete: false, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await?;
    let started = Instant::now();
    for order in 0..count as i64 {
        let mut tx = pool.begin().await?;
        insert(&mut tx, schema, order).await?;
        tx.commit().await?;
        let properties = BasicProperties::default().with_content_type("application/vnd.masstransit+json".into());
        channel
            .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), body, properties)
            .await?
            .await?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    channel.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(rate)
}

/// Transactions through the outbox, one after another, until every message is delivered.
async fn through_outbox(outbox: &PostgresOutbox, pool: &PgPool, schema: &str, count: u64) -> Result<f64, BoxError> {
    let started = Instant::now();
    for order in 0..count as i64 {
        let mut tx = pool.begin().await?;
        insert(&mut tx, schema, order + 1_000_000).await?;
        outbox.publish(&mut tx, OrderRecorded { order, note: "x".repeat(100) }).await?;
        tx.commit().await?;
    }
    let pending = format!("SELECT count(*) FROM \"{schema}\".outbox_messages WHERE delivered_at IS NULL");
    loop {
        let left: i64 = sqlx::query_scalar(&pending).fetch_one(pool).await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// Commit to consume, at a fixed rate of transactions.
async fn latency(
    outbox: &PostgresOutbox,
    pool: &PgPool,
    schema: &str,
    duration: Duration,
) -> Result<Vec<f64>, BoxError> {
    let committed: Arc<Mutex<HashMap<uuid::Uuid, Instant>>> = Arc::default();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let transport = RabbitMqTransport::connect(&bus_rabbitmq::default_address()).await?;
    let endpoint = format!("bench-outbox-latency-{}", uuid::Uuid::now_v7().simple());
    let state = (committed.clone(), samples.clone());
    let consumer = Bus::builder(transport.clone())
        .endpoint(Endpoint::new(&endpoint).prefetch(100).handler_with_state(
            state,
            |ctx: ConsumeContext<OrderRecorded>, (committed, samples)| async move {
                let at = ctx.message_id().and_then(|id| committed.lock().ok()?.get(&id).copied());
                if let (Some(at), Ok(mut samples)) = (at, samples.lock()) {
                    samples.push(at.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(())
            },
        ))
        .build();
    consumer.start().await?;
    let count = (duration.as_secs_f64() * LATENCY_RATE as f64) as u64;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writers = Vec::with_capacity(count as usize);
    for order in 0..count as i64 {
        ticker.tick().await;
        let (pool, outbox, committed, schema) = (pool.clone(), outbox.clone(), committed.clone(), schema.to_owned());
        writers.push(tokio::spawn(async move {
            let id = uuid::Uuid::now_v7();
            let mut tx = pool.begin().await?;
            insert(&mut tx, &schema, order + 2_000_000).await?;
            let message = OrderRecorded { order, note: "x".repeat(100) };
            outbox.publish_with(&mut tx, message, SendOptions::new().message_id(id)).await?;
            tx.commit().await?;
            if let Ok(mut committed) = committed.lock() {
                committed.insert(id, Instant::now());
            }
            Ok::<_, BoxError>(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.lock().map(|s| (s.len() as u64) < count).unwrap_or(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.stop().await?;
    transport.close().await;
    crate::rabbitmq::delete_endpoints(&[endpoint]).await?;
    let mut sorted = samples.lock().map(|s| s.clone()).unwrap_or_default();
    sorted.sort_by(f64::total_cmp);
    Ok(sorted)
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&database_url()).await?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    // Short: PostgreSQL cuts the names made from it at 63 bytes.
    let schema = format!("bench_outbox_{}", &id[id.len() - 12..]);
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\"")).execute(&pool).await?;
    sqlx::query(&format!("CREATE TABLE \"{schema}\".orders (id BIGINT PRIMARY KEY, note TEXT NOT NULL)"))
        .execute(&pool)
        .await?;
    let transport = RabbitMqTransport::connect(&bus_rabbitmq::default_address()).await?;
    // Published messages reach a queue, as the baseline's do.
    let tap = format!("bench-outbox-tap-{}", uuid::Uuid::now_v7().simple());
    let topology = EndpointTopology {
        queue: tap.clone(),
        message_types: vec![OrderRecorded::message_type().into()],
        ..Default::default()
    };
    transport.declare(&topology).await?;
    let bus = Bus::builder(transport.clone()).build();
    bus.start().await?;
    let options = PostgresOptions::new().schema(&schema);
    let outbox = PostgresOutbox::with_options(pool.clone(), bus.clone(), options)?;
    outbox.migrate().await?;
    let delivery = outbox.start();

    let body = bus.prepare_publish(OrderRecorded { order: 0, note: "x".repeat(100) }, SendOptions::new())?.message.body;
    let count = scale.outbox;
    let raw = baseline(&pool, &schema, count, &body).await?;
    let through = through_outbox(&outbox, &pool, &schema, count).await?;
    figure("outbox.baseline.insert_then_publish", raw, "tx/s");
    figure("outbox.postgres.committed_and_delivered", through, "tx/s");
    compare("postgres outbox vs INSERT + confirmed lapin publish", through, raw, "tx/s", Some(0.5));
    let sorted = latency(&outbox, &pool, &schema, scale.duration).await?;
    figure("outbox.latency.commit_to_consume.p50", percentile(&sorted, 0.50), "ms");
    figure("outbox.latency.commit_to_consume.p99", percentile(&sorted, 0.99), "ms");
    figure("outbox.latency.samples", sorted.len() as f64, "messages");

    delivery.stop().await;
    bus.stop().await?;
    transport.close().await;
    crate::rabbitmq::delete_endpoints(&[tap]).await?;
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE")).execute(&pool).await?;
    Ok(())
}
