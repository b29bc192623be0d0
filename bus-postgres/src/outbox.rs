//! The outbox: messages written in the caller's database transaction, delivered once it has
//! committed.

use std::sync::Arc;

use bus_core::{Bus, Message, PreparedDestination, PreparedMessage, SendOptions};
use sqlx::{PgConnection, PgPool};

use crate::delivery::{self, DeliveryService};
use crate::error::{database, Error, Result};
use crate::inbox::PostgresInbox;
use crate::schema::{PostgresOptions, Tables};

/// A transactional outbox on PostgreSQL (MassTransit's Entity Framework outbox): what a
/// service publishes or sends in its database transaction is written to the outbox table in
/// that transaction, and a [`DeliveryService`] hands it to the transport once it has committed.
/// A write and its messages commit together, or neither does.
///
/// ```no_run
/// use bus_core::{Bus, Message};
/// use bus_postgres::PostgresOutbox;
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:OrderPlaced")]
/// # struct OrderPlaced { order_id: i64 }
/// # #[tokio::main] async fn main() -> Result<(), bus_core::BoxError> {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).build();
/// let outbox = PostgresOutbox::new(pool.clone(), bus.clone());
/// outbox.migrate().await?;
/// bus.start().await?;
/// let delivery = outbox.start();
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind(7_i64).execute(&mut *tx).await?;
/// outbox.publish(&mut tx, OrderPlaced { order_id: 7 }).await?;
/// tx.commit().await?; // the order and its event, together
///
/// delivery.stop().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresOutbox {
    pub(crate) store: Arc<Store>,
    pub(crate) bus: Bus,
}

/// The outbox and inbox tables of one database: what writes to them.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) pool: PgPool,
    pub(crate) options: PostgresOptions,
    pub(crate) tables: Tables,
    /// The statements run for every message, made once.
    insert: String,
    notify: String,
}

/// A prepared message as the columns of a row (the outbox's, the scheduler's).
struct MessageRow {
    kind: &'static str,
    destination: String,
    headers: serde_json::Value,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    message: bus_core::TransportMessage,
}

impl MessageRow {
    fn of(prepared: PreparedMessage) -> Result<Self> {
        let (kind, destination) = match prepared.destination {
            PreparedDestination::Publish(types) => ("publish", types.join("\n")),
            PreparedDestination::Send(endpoint) => ("send", endpoint),
        };
        let message = prepared.message;
        let headers = serde_json::to_value(&message.headers)
            .map_err(|e| Error::Bus { operation: "write the headers", source: bus_core::Error::Serialize(e) })?;
        let expires_at = message
            .time_to_live
            .and_then(|ttl| chrono::Duration::from_std(ttl).ok())
            .and_then(|ttl| chrono::Utc::now().checked_add_signed(ttl));
        Ok(MessageRow { kind, destination, headers, expires_at, message })
    }

    /// Binds the message's ten columns, in the order of the outbox's.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.message.message_id)
            .bind(self.kind)
            .bind(&self.destination)
            .bind(self.message.content_type.as_deref())
            .bind(&self.headers)
            .bind(self.message.body.as_ref())
            .bind(self.message.correlation_id)
            .bind(self.expires_at)
            .bind(self.message.priority.map(i16::from))
            .bind(self.message.routing_key.as_deref())
    }
}

impl Store {
    /// Writes a scheduled message (its token and due time, then the message's columns).
    pub(crate) async fn insert_scheduled(
        &self,
        connection: &mut PgConnection,
        scheduled: bus_core::ScheduledMessage,
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO {} (message_id, destination_kind, destination, content_type, headers, body, correlation_id, expires_at, priority, routing_key, token, due_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (token) DO UPDATE SET message_id = EXCLUDED.message_id, priority = EXCLUDED.priority,
               routing_key = EXCLUDED.routing_key,
               destination_kind = EXCLUDED.destination_kind, destination = EXCLUDED.destination,
               content_type = EXCLUDED.content_type, headers = EXCLUDED.headers, body = EXCLUDED.body,
               correlation_id = EXCLUDED.correlation_id, expires_at = EXCLUDED.expires_at, due_at = EXCLUDED.due_at",
            self.tables.scheduled
        );
        let row = MessageRow::of(scheduled.message)?;
        row.bind(sqlx::query(&sql))
            .bind(scheduled.token)
            .bind(scheduled.due.time())
            .execute(connection)
            .await
            .map_err(database("schedule a message"))?;
        Ok(())
    }

    pub(crate) fn new(pool: PgPool, options: PostgresOptions, tables: Tables) -> Self {
        let insert = format!(
            "INSERT INTO {} (message_id, destination_kind, destination, content_type, headers, body, correlation_id, expires_at, priority, routing_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            tables.outbox
        );
        let notify = format!("SELECT pg_notify('{}', '')", tables.channel);
        Store { pool, options, tables, insert, notify }
    }

    /// Writes prepared messages, in order, in the transaction of `connection`, and notifies
    /// the delivery services (on commit).
    pub(crate) async fn store(&self, connection: &mut PgConnection, messages: Vec<PreparedMessage>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        for prepared in messages {
            let row = MessageRow::of(prepared)?;
            row.bind(sqlx::query(&self.insert))
                .execute(&mut *connection)
                .await
                .map_err(database("write to the outbox"))?;
        }
        // Delivered with the commit (and once per transaction, however many are sent).
        sqlx::query(&self.notify).execute(&mut *connection).await.map_err(database("notify the delivery service"))?;
        Ok(())
    }
}

impl PostgresOutbox {
    /// An outbox in the `bus` schema of `pool`'s database, delivering through `bus`.
    pub fn new(pool: PgPool, bus: Bus) -> Self {
        let options = PostgresOptions::default();
        // The default names are plain identifiers.
        let tables = options.quoted_tables();
        Self::build(pool, bus, options, tables)
    }

    /// An outbox with other tables or timings; fails when a name is not a plain identifier.
    pub fn with_options(pool: PgPool, bus: Bus, options: PostgresOptions) -> Result<Self> {
        let tables = options.tables()?;
        Ok(Self::build(pool, bus, options, tables))
    }

    fn build(pool: PgPool, bus: Bus, options: PostgresOptions, tables: Tables) -> Self {
        PostgresOutbox { store: Arc::new(Store::new(pool, options, tables)), bus }
    }

    /// Creates the schema and the tables when they do not exist. Safe to run from several
    /// service instances at once.
    pub async fn migrate(&self) -> Result<()> {
        self.store.migrate().await
    }

    /// Writes a publish of `message` into the outbox, in the transaction of `connection`.
    /// It leaves when the transaction commits; nothing leaves if it rolls back.
    pub async fn publish<M: Message>(&self, connection: &mut PgConnection, message: M) -> Result<()> {
        self.publish_with(connection, message, SendOptions::default()).await
    }
}

impl Store {
    /// Creates the schema and the tables, idempotently, one instance at a time.
    pub(crate) async fn migrate(&self) -> Result<()> {
        let inner = self;
        let mut tx = inner.pool.begin().await.map_err(database("begin a migration"))?;
        // One instance at a time: concurrent `CREATE ... IF NOT EXISTS` can still collide.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&inner.tables.outbox)
            .execute(&mut *tx)
            .await
            .map_err(database("lock the migration"))?;
        for statement in inner.tables.migrations() {
            sqlx::query(&statement).execute(&mut *tx).await.map_err(database("create the outbox tables"))?;
        }
        tx.commit().await.map_err(database("commit the migration"))
    }
}

impl PostgresOutbox {
    /// [`publish`](Self::publish) with options (headers, correlation id, message id...).
    pub async fn publish_with<M: Message>(
        &self,
        connection: &mut PgConnection,
        message: M,
        options: SendOptions,
    ) -> Result<()> {
        let prepared = self
            .bus
            .prepare_publish(message, options)
            .map_err(|source| Error::Bus { operation: "prepare a publish", source })?;
        self.store(connection, vec![prepared]).await
    }

    /// Writes a send of `message` to `address` into the outbox, in the transaction of
    /// `connection`.
    pub async fn send<M: Message>(&self, connection: &mut PgConnection, address: &str, message: M) -> Result<()> {
        self.send_with(connection, address, message, SendOptions::default()).await
    }

    /// [`send`](Self::send) with options.
    pub async fn send_with<M: Message>(
        &self,
        connection: &mut PgConnection,
        address: &str,
        message: M,
        options: SendOptions,
    ) -> Result<()> {
        let prepared = self
            .bus
            .prepare_send(address, message, options)
            .map_err(|source| Error::Bus { operation: "prepare a send", source })?;
        self.store(connection, vec![prepared]).await
    }

    /// Writes prepared messages into the outbox, in order, in the transaction of
    /// `connection`, and notifies the delivery service (on commit).
    pub async fn store(&self, connection: &mut PgConnection, messages: Vec<PreparedMessage>) -> Result<()> {
        self.store.store(connection, messages).await
    }

    /// Starts the delivery service (and the cleanup) on the current tokio runtime: committed
    /// messages go to the transport, in order per transaction; several instances share one
    /// table. Stop it with [`DeliveryService::stop`].
    pub fn start(&self) -> DeliveryService {
        delivery::start(self.clone())
    }

    /// The inbox of this outbox: middleware that runs each consume in a transaction, once per
    /// message id (see [`PostgresInbox`]).
    pub fn inbox(&self) -> PostgresInbox {
        PostgresInbox::on(self.store.clone())
    }

    /// Removes now what the background cleanup removes every interval: delivered outbox rows
    /// and inbox rows older than the duplicate window. Returns how many of each.
    pub async fn cleanup(&self) -> Result<(u64, u64)> {
        delivery::cleanup(self).await
    }

    /// The pool the outbox writes with.
    pub fn pool(&self) -> &PgPool {
        &self.store.pool
    }
}
