//! Scheduled messages in a PostgreSQL table: durable, claimed with `SKIP LOCKED` so that
//! several instances share one table, each message delivered once.

use std::sync::Arc;
use std::time::Duration;

use bus_core::logged::chain;
use bus_core::{Bus, MessageScheduler, ScheduledMessage};
use futures::future::BoxFuture;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::delivery::prepared;
use crate::error::{database, Result};
use crate::outbox::Store;
use crate::PostgresOptions;

/// A durable [`MessageScheduler`] on PostgreSQL (MassTransit's Quartz or Hangfire
/// scheduler): scheduled messages survive a restart of the service, and each is delivered
/// once, when due, by whichever instance claims it. Messages due at the same time leave in
/// the order they were scheduled. Its table is created by
/// [`PostgresOutbox::migrate`](crate::PostgresOutbox::migrate) or [`migrate`](Self::migrate).
///
/// ```no_run
/// use std::time::Duration;
/// use bus_core::{Bus, Message};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:OrderTimeout")]
/// # struct OrderTimeout { order_id: i64 }
/// # #[tokio::main] async fn main() -> Result<(), bus_core::BoxError> {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
/// let scheduler = bus_postgres::PostgresScheduler::new(pool);
/// scheduler.migrate().await?;
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).scheduler(scheduler).build();
/// bus.start().await?;
/// let token = bus.schedule_send(Duration::from_secs(30), "queue:orders", OrderTimeout { order_id: 7 }).await?;
/// bus.cancel_scheduled(token).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresScheduler {
    store: Arc<Store>,
}

impl PostgresScheduler {
    /// A scheduler in the `bus` schema of `pool`'s database.
    pub fn new(pool: PgPool) -> Self {
        let options = PostgresOptions::default();
        // The default names are plain identifiers.
        let tables = options.quoted_tables();
        PostgresScheduler { store: Arc::new(Store::new(pool, options, tables)) }
    }

    /// A scheduler in the tables `options` names; fails when a name is not a plain identifier.
    pub fn with_options(pool: PgPool, options: PostgresOptions) -> Result<Self> {
        let tables = options.tables()?;
        Ok(PostgresScheduler { store: Arc::new(Store::new(pool, options, tables)) })
    }

    /// Creates the schema and the tables (the outbox's among them) when they do not exist.
    pub async fn migrate(&self) -> Result<()> {
        self.store.migrate().await
    }

    /// How many messages wait.
    pub async fn waiting(&self) -> Result<i64> {
        let sql = format!("SELECT count(*) FROM {}", self.store.tables.scheduled);
        sqlx::query_scalar(&sql).fetch_one(&self.store.pool).await.map_err(database("count scheduled messages"))
    }

    /// Delivers the due messages of one batch; returns how many, and when the next one is due.
    async fn fire(&self, bus: &Bus) -> Result<(usize, Option<Duration>)> {
        let store = &self.store;
        let table = &store.tables.scheduled;
        let mut tx = store.pool.begin().await.map_err(database("begin a scheduler batch"))?;
        let claim = format!(
            "SELECT sequence_number, destination_kind, destination, content_type, headers, body, message_id,
                    correlation_id, expires_at, priority, routing_key, token
             FROM {table} WHERE due_at <= now() ORDER BY due_at, sequence_number LIMIT $1 FOR UPDATE SKIP LOCKED"
        );
        let rows = sqlx::query(&claim)
            .bind(store.options.batch_size)
            .fetch_all(&mut *tx)
            .await
            .map_err(database("claim due scheduled messages"))?;
        let mut fired = Vec::new();
        let mut failure = None;
        for row in &rows {
            let sequence_number: i64 = row.try_get("sequence_number").unwrap_or_default();
            let message = match prepared(row, sequence_number) {
                Ok(message) => message,
                Err(error) => {
                    tracing::error!(sequence_number, error = %chain(&error), "scheduled row is not a message; dropped");
                    fired.push(sequence_number);
                    continue;
                }
            };
            match bus.deliver(message).await {
                Ok(()) => fired.push(sequence_number),
                Err(error) if error.is_transient() || matches!(error, bus_core::Error::Stopped) => {
                    // It and those after it wait for the next round, in order.
                    failure = Some(error);
                    break;
                }
                Err(error) => {
                    tracing::error!(sequence_number, error = %chain(&error), "scheduled message refused by the transport; dropped");
                    fired.push(sequence_number);
                }
            }
        }
        if !fired.is_empty() {
            let delete = format!("DELETE FROM {table} WHERE sequence_number = ANY($1)");
            sqlx::query(&delete).bind(&fired).execute(&mut *tx).await.map_err(database("remove fired messages"))?;
        }
        tx.commit().await.map_err(database("commit a scheduler batch"))?;
        if let Some(error) = failure {
            return Err(crate::Error::Bus { operation: "deliver a scheduled message", source: error });
        }
        let next = format!("SELECT EXTRACT(EPOCH FROM (min(due_at) - now()))::float8 FROM {table}");
        let next: Option<f64> =
            sqlx::query_scalar(&next).fetch_one(&store.pool).await.map_err(database("find the next due message"))?;
        Ok((rows.len(), next.map(|secs| Duration::from_secs_f64(secs.max(0.0)))))
    }
}

impl MessageScheduler for PostgresScheduler {
    fn schedule<'a>(&'a self, message: ScheduledMessage) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(async move {
            let mut connection =
                self.store.pool.acquire().await.map_err(database("connect the scheduler")).map_err(scheduler_error)?;
            self.store.insert_scheduled(&mut connection, message).await.map_err(scheduler_error)
        })
    }

    fn cancel<'a>(&'a self, token: Uuid) -> BoxFuture<'a, bus_core::Result<bool>> {
        Box::pin(async move {
            let sql = format!("DELETE FROM {} WHERE token = $1", self.store.tables.scheduled);
            let deleted = sqlx::query(&sql)
                .bind(token)
                .execute(&self.store.pool)
                .await
                .map_err(database("cancel a scheduled message"))
                .map_err(scheduler_error)?;
            Ok(deleted.rows_affected() > 0)
        })
    }

    fn run(&self, bus: Bus, stop: CancellationToken) -> BoxFuture<'static, ()> {
        let scheduler = self.clone();
        Box::pin(async move {
            let poll = scheduler.store.options.poll_interval;
            let mut backoff = Duration::from_millis(100);
            loop {
                let pause = match scheduler.fire(&bus).await {
                    Ok((count, _)) if count as i64 >= scheduler.store.options.batch_size => Duration::ZERO,
                    Ok((_, next)) => {
                        backoff = Duration::from_millis(100);
                        next.map_or(poll, |next| next.min(poll))
                    }
                    Err(error) => {
                        tracing::warn!(error = %chain(&error), "scheduled messages could not be delivered; trying again after a pause");
                        let pause = backoff;
                        backoff = (backoff * 2).min(scheduler.store.options.max_backoff);
                        pause
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        })
    }
}

fn scheduler_error(error: crate::Error) -> bus_core::Error {
    bus_core::Error::transport(
        "the PostgreSQL scheduler failed",
        error.is_transient(),
        Some(Box::new(error) as bus_core::BoxError),
    )
}
