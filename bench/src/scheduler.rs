//! The durable schedulers: messages scheduled 1 s ahead each, fired per second once due, and
//! their lateness (delivery time minus due time), on Redis and on PostgreSQL.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{
    BoxError, Bus, ConsumeContext, DueTime, Endpoint, Message, MessageScheduler, ScheduledMessage, SendOptions,
};
use bus_inmemory::InMemoryTransport;
use bus_postgres::{PostgresOptions, PostgresScheduler};
use bus_redis::{RedisScheduler, RedisSchedulerOptions};
use serde::{Deserialize, Serialize};

use crate::report::figure;
use crate::Scale;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Bench:Reminder")]
struct Reminder {
    /// When it was due, in ms since the Unix epoch.
    due_ms: i64,
}

const AHEAD: Duration = Duration::from_secs(1);
const WRITERS: usize = 8;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// Schedules `count` messages 1 s ahead each through `scheduler`, with `WRITERS` writers, and
/// measures their firing once due.
async fn measure(name: &str, scheduler: impl MessageScheduler + Clone, count: u64) -> Result<(), BoxError> {
    let lateness: Arc<Mutex<Vec<f64>>> = Arc::default();
    let fired_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let state = (lateness.clone(), fired_at.clone());
    let endpoint = format!("bench-scheduled-{name}");
    let bus = Bus::builder(InMemoryTransport::new())
        .scheduler(scheduler.clone())
        .endpoint(Endpoint::new(&endpoint).handler_with_state(
            state,
            |ctx: ConsumeContext<Reminder>, (late, at)| async move {
                let now = chrono::Utc::now().timestamp_millis();
                if let (Ok(mut late), Ok(mut at)) = (late.lock(), at.lock()) {
                    late.push((now - ctx.message().due_ms) as f64);
                    at.push(Instant::now());
                }
                Ok(())
            },
        ))
        .build();
    bus.start().await?;
    let address = format!("queue:{endpoint}");
    let writers: Vec<_> = (0..WRITERS as u64)
        .map(|writer| {
            let (bus, scheduler, address) = (bus.clone(), scheduler.clone(), address.clone());
            tokio::spawn(async move {
                for _ in (writer..count).step_by(WRITERS) {
                    let due = DueTime::from(AHEAD);
                    let message = Reminder { due_ms: due.time().timestamp_millis() };
                    let message = bus.prepare_send(&address, message, SendOptions::new())?;
                    scheduler.schedule(ScheduledMessage { token: uuid::Uuid::now_v7(), due, message }).await?;
                }
                Ok::<_, BoxError>(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while fired_at.lock().map(|f| (f.len() as u64) < count).unwrap_or(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus.stop().await?;
    let fired = fired_at.lock().map(|f| f.clone()).unwrap_or_default();
    let rate = match (fired.iter().min(), fired.iter().max()) {
        (Some(first), Some(last)) if last > first => fired.len() as f64 / (*last - *first).as_secs_f64(),
        _ => 0.0,
    };
    let mut sorted = lateness.lock().map(|l| l.clone()).unwrap_or_default();
    sorted.sort_by(f64::total_cmp);
    figure(&format!("scheduler.{name}.fired"), fired.len() as f64, "messages");
    figure(&format!("scheduler.{name}.fired_per_second"), rate, "msg/s");
    figure(&format!("scheduler.{name}.lateness.p50"), percentile(&sorted, 0.50), "ms");
    figure(&format!("scheduler.{name}.lateness.p99"), percentile(&sorted, 0.99), "ms");
    Ok(())
}

pub(crate) async fn run(scale: Scale) -> Result<(), BoxError> {
    let count = scale.scheduled;
    let prefix = format!("bench:scheduled:{}", uuid::Uuid::now_v7().simple());
    let options =
        RedisSchedulerOptions { key_prefix: prefix, poll_interval: Duration::from_millis(50), ..Default::default() };
    let redis = RedisScheduler::connect("redis://127.0.0.1:6379", options).await?;
    measure("redis", redis, count).await?;

    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(10).connect(&url).await?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("bench_sched_{}", &id[id.len() - 12..]);
    let options = PostgresOptions::new().schema(&schema).poll_interval(Duration::from_millis(50)).batch_size(500);
    let postgres = PostgresScheduler::with_options(pool.clone(), options)?;
    postgres.migrate().await?;
    measure("postgres", postgres, count).await?;
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE")).execute(&pool).await?;
    Ok(())
}
