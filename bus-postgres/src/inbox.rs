//! The inbox: each consume in a database transaction the consumer shares, recorded by message
//! id so that a message delivered again changes the database once.

use std::sync::Arc;

use bus_core::logged::chain;
use bus_core::middleware::{Middleware, Next};
use bus_core::{ConsumeError, ConsumeErrorKind, ReceiveContext};
use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};

use crate::error::{database, Error, Result};
use crate::outbox::Store;
use crate::PostgresOptions;

/// A PostgreSQL inbox (MassTransit's Entity Framework inbox), as middleware for
/// [`Endpoint::attempt_middleware`](bus_core::Endpoint::attempt_middleware): each attempt at
/// a message runs in a database transaction that
/// - records `(endpoint, consumer, message id)`: a message whose id is recorded already for
///   this consumer is acknowledged without running it (each consumer of an endpoint keeps
///   its own record);
/// - the consumer uses for its own writes, through [`transaction`];
/// - holds what the consumer publishes or sends, written to the outbox and delivered once the
///   transaction commits.
///
/// The transaction commits when the consumer succeeds; a failure rolls it back, leaving no
/// inbox row and no messages, and the endpoint's retry, redelivery and `_error` go on as
/// usual. The endpoint's in-memory outbox must be on (it is by default), so that what the
/// consumer produces is held for the transaction.
///
/// ```no_run
/// use bus_core::{ConsumeContext, Endpoint, Message};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:OrderPlaced")]
/// # struct OrderPlaced { order_id: i64 }
/// # async fn billing() -> Result<(), bus_core::BoxError> {
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
/// let billing = Endpoint::new("billing")
///     .attempt_middleware(bus_postgres::PostgresInbox::new(pool))
///     .handler(|ctx: ConsumeContext<OrderPlaced>| async move {
///         let mut db = bus_postgres::transaction(&ctx).await?;
///         sqlx::query("INSERT INTO charges (order_id) VALUES ($1)")
///             .bind(ctx.message().order_id)
///             .execute(&mut *db)
///             .await?;
///         Ok(())
///     });
/// # drop(billing);
/// # Ok(()) }
/// # drop(billing());
/// ```
#[derive(Debug, Clone)]
pub struct PostgresInbox {
    store: Arc<Store>,
    insert: Arc<str>,
}

impl PostgresInbox {
    /// An inbox in the `bus` schema of `pool`'s database; what consumers produce goes to the
    /// outbox there (a [`PostgresOutbox`](crate::PostgresOutbox)'s delivery service sends it).
    pub fn new(pool: PgPool) -> Self {
        let options = PostgresOptions::default();
        // The default names are plain identifiers.
        let tables = options.quoted_tables();
        Self::on(Arc::new(Store::new(pool, options, tables)))
    }

    /// An inbox with other tables; fails when a name is not a plain identifier.
    pub fn with_options(pool: PgPool, options: PostgresOptions) -> Result<Self> {
        let tables = options.tables()?;
        Ok(Self::on(Arc::new(Store::new(pool, options, tables))))
    }

    pub(crate) fn on(store: Arc<Store>) -> Self {
        let insert = format!(
            "INSERT INTO {} (endpoint, consumer, message_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            store.tables.inbox
        );
        PostgresInbox { store, insert: insert.into() }
    }

    async fn attempt(&self, ctx: ReceiveContext, next: Next) -> std::result::Result<(), ConsumeError> {
        let Some(message_id) = ctx.message_id() else {
            // Nothing to recognize it by: consumed as on any endpoint.
            tracing::debug!(endpoint = ctx.endpoint_name(), "message without a message id; consumed without the inbox");
            return next.run(ctx).await;
        };
        let pool = &self.store.pool;
        let mut tx = pool.begin().await.map_err(database("begin an inbox transaction")).map_err(failed)?;
        // Blocks while another attempt at the same message holds its row, then finds it.
        let recorded = sqlx::query(&self.insert)
            .bind(ctx.endpoint_name())
            .bind(ctx.consumer_type())
            .bind(message_id)
            .execute(&mut *tx)
            .await
            .map_err(database("record the message in the inbox"))
            .map_err(failed)?
            .rows_affected();
        if recorded == 0 {
            tracing::debug!(endpoint = ctx.endpoint_name(), %message_id, "message consumed before; acknowledged without consuming");
            return Ok(());
        }
        let shared = InboxTransaction(Arc::new(Mutex::new(Some(tx))));
        let mut attempt = ctx.clone();
        attempt.insert_payload(shared.clone());
        // What the consume produces is stored with its state: a saga may finalize in this
        // transaction rather than wait for its messages to leave.
        attempt.insert_payload(bus_core::middleware::DurableOutbox);
        // Reachable from the whole attempt (a saga repository finds it here).
        let result = CURRENT.scope(shared.clone(), next.run(attempt)).await;
        // The consumer is done with it (a task it left running no longer gets it).
        let tx = shared.0.lock().await.take();
        let held = ctx.take_held();
        let Some(mut tx) = tx else {
            return Err(failed(Error::NoTransaction));
        };
        match result {
            Ok(()) => {
                let stored = async {
                    self.store.store(&mut tx, held).await?;
                    tx.commit().await.map_err(database("commit the inbox transaction"))
                };
                stored.await.map_err(failed)
            }
            Err(error) => {
                // Dropped with the transaction: no inbox row, no messages.
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %chain(&rollback), "could not roll back an inbox transaction; the database does when the connection goes");
                }
                Err(error)
            }
        }
    }
}

impl Middleware for PostgresInbox {
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, std::result::Result<(), ConsumeError>> {
        Box::pin(self.attempt(ctx, next))
    }
}

/// A failed attempt for a database error. Retried by the endpoint's policy, whatever its
/// kind: a database restarting or failing over answers with errors of many kinds, and one
/// that does not heal ends in `_error` once the retries and redeliveries are spent. Only the
/// inbox's own misuse (no transaction) is permanent.
fn failed(error: Error) -> ConsumeError {
    let kind = match error {
        Error::NoTransaction | Error::InvalidName(_) => ConsumeErrorKind::Permanent,
        _ => ConsumeErrorKind::Failed,
    };
    ConsumeError::new(kind, "PostgresException", error)
}

tokio::task_local! {
    /// The inbox transaction of the attempt running on this task.
    static CURRENT: InboxTransaction;
}

/// Whether an inbox attempt runs on this task: what is written through
/// [`current_transaction`] commits with its inbox record and its messages.
pub(crate) fn in_inbox_attempt() -> bool {
    CURRENT.try_with(|_| ()).is_ok()
}

/// The inbox transaction of the attempt running on this task, locked, when there is one and
/// it is still open.
pub(crate) async fn current_transaction() -> Option<OwnedMutexGuard<Option<Transaction<'static, Postgres>>>> {
    let shared = CURRENT.try_with(|current| current.0.clone()).ok()?;
    let guard = shared.lock_owned().await;
    guard.is_some().then_some(guard)
}

/// The database transaction of an inbox attempt, as the consumer finds it in its context.
#[derive(Debug, Clone)]
pub struct InboxTransaction(Arc<Mutex<Option<Transaction<'static, Postgres>>>>);

/// The inbox's transaction, locked for the consumer's statements: it dereferences to the
/// connection (`&mut *db`).
#[derive(Debug)]
pub struct TransactionGuard<'a>(MutexGuard<'a, Option<Transaction<'static, Postgres>>>);

impl std::ops::Deref for TransactionGuard<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        // Checked when the guard was made, and nobody else can take it while it is held.
        self.0.as_deref().unwrap_or_else(|| unreachable!("an inbox transaction guard holds a transaction"))
    }
}

impl std::ops::DerefMut for TransactionGuard<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0.as_deref_mut().unwrap_or_else(|| unreachable!("an inbox transaction guard holds a transaction"))
    }
}

/// The inbox's transaction of the message being consumed, for the consumer's own statements:
/// they commit with the inbox record and the messages it produces, or not at all.
pub async fn transaction(ctx: &ReceiveContext) -> Result<TransactionGuard<'_>> {
    let shared = ctx.payload::<InboxTransaction>().ok_or(Error::NoTransaction)?;
    let guard = shared.0.lock().await;
    if guard.is_none() {
        return Err(Error::NoTransaction);
    }
    Ok(TransactionGuard(guard))
}
