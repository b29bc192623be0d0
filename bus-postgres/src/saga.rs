//! Saga instances on PostgreSQL, in the inbox's transaction when there is one.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bus_saga::{SagaData, SagaInstance, SagaRepository};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use crate::inbox::{current_transaction, in_inbox_attempt};
use crate::outbox::Store;
use crate::PostgresOptions;

/// Saga instances in a PostgreSQL table: one row per instance, the instance as `jsonb`
/// beside its state and version.
///
/// - **Optimistic concurrency**: an update or delete applies only to the version it read; a
///   concurrent change makes it a conflict, and the saga runs the event again on fresh state
///   (as with the Redis repository).
/// - **Pessimistic mode** ([`pessimistic`](Self::pessimistic)): on an endpoint with the
///   [`PostgresInbox`](crate::PostgresInbox), each event first locks its instance's row
///   (`SELECT ... FOR UPDATE`; an advisory lock on the id when the instance does not exist
///   yet) for the rest of the inbox's transaction, so events of one instance run one at a time.
/// - **Atomic with the messages**: on an endpoint with the inbox, the instance is written in
///   the inbox's transaction, with the inbox record and the messages the transition produced
///   (written to the outbox): all commit together, or none does. A transition that finalizes
///   its instance deletes it in that same transaction.
/// - **Queries**: [`in_state`](Self::in_state) and [`find_by`](Self::find_by).
///
/// Do not hold [`transaction`](crate::transaction)'s guard across a saga's repository calls
/// (in code of your own that calls it): it is the same transaction.
pub struct PostgresSagaRepository<S> {
    store: Arc<Store>,
    saga: Arc<str>,
    pessimistic: bool,
    statements: Arc<Statements>,
    _state: PhantomData<fn() -> S>,
}

/// The repository's statements, made once.
#[derive(Debug)]
struct Statements {
    load: String,
    in_state: String,
    find_by: String,
    find_id_by: String,
    insert: String,
    update: String,
    delete: String,
    lock: String,
}

impl Statements {
    fn new(table: &str) -> Self {
        // An instance kept after it finalized counts only until it expires.
        let live = "(expires_at IS NULL OR expires_at > now())";
        let select = format!("SELECT instance FROM {table} WHERE saga = $1");
        Statements {
            load: format!("{select} AND correlation_id = $2 AND {live}"),
            in_state: format!("{select} AND current_state = $2 AND {live} ORDER BY correlation_id"),
            find_by: format!("{select} AND instance -> $2 = $3 AND {live} ORDER BY correlation_id"),
            find_id_by: format!(
                "SELECT correlation_id FROM {table} WHERE saga = $1 AND instance -> $2 = $3 AND {live}
                 ORDER BY correlation_id LIMIT 1"
            ),
            insert: format!(
                "INSERT INTO {table} AS stored (saga, correlation_id, current_state, version, instance, expires_at)
                 VALUES ($1, $2, $3, 1, $4, now() + make_interval(secs => $5))
                 ON CONFLICT (saga, correlation_id) DO UPDATE
                   SET current_state = EXCLUDED.current_state, version = 1, instance = EXCLUDED.instance,
                       expires_at = EXCLUDED.expires_at
                   WHERE stored.expires_at IS NOT NULL AND stored.expires_at <= now()"
            ),
            update: format!(
                "UPDATE {table} SET current_state = $3, version = $4, instance = $5,
                   expires_at = now() + make_interval(secs => $6)
                 WHERE saga = $1 AND correlation_id = $2 AND version = $7 AND {live}"
            ),
            delete: format!("DELETE FROM {table} WHERE saga = $1 AND correlation_id = $2 AND version = $3"),
            lock: format!("SELECT 1 FROM {table} WHERE saga = $1 AND correlation_id = $2 FOR UPDATE"),
        }
    }
}

impl<S> Clone for PostgresSagaRepository<S> {
    fn clone(&self) -> Self {
        PostgresSagaRepository {
            store: self.store.clone(),
            saga: self.saga.clone(),
            pessimistic: self.pessimistic,
            statements: self.statements.clone(),
            _state: PhantomData,
        }
    }
}

impl<S> std::fmt::Debug for PostgresSagaRepository<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSagaRepository")
            .field("saga", &self.saga)
            .field("table", &self.store.tables.sagas)
            .field("pessimistic", &self.pessimistic)
            .finish()
    }
}

/// A connection to run on: the inbox's transaction, or one of the pool's.
enum Connection {
    Inbox(OwnedMutexGuard<Option<Transaction<'static, Postgres>>>),
    Pooled(PoolConnection<Postgres>),
}

impl Connection {
    fn get(&mut self) -> &mut PgConnection {
        match self {
            // Checked to hold one when taken.
            Connection::Inbox(guard) => guard.as_deref_mut().unwrap_or_else(|| unreachable!("checked when taken")),
            Connection::Pooled(connection) => connection,
        }
    }
}

fn repository_error(error: impl std::error::Error + Send + Sync + 'static) -> bus_saga::Error {
    bus_saga::Error::Repository(Box::new(error))
}

impl<S: SagaData> PostgresSagaRepository<S> {
    /// Instances of the saga named `saga` (its machine's name) in the `bus` schema.
    pub fn new(pool: PgPool, saga: impl Into<String>) -> Self {
        let options = PostgresOptions::default();
        // The default names are plain identifiers.
        let tables = options.quoted_tables();
        Self::on(Arc::new(Store::new(pool, options, tables)), saga.into())
    }

    /// Instances in the tables `options` names; fails when a name is not a plain identifier.
    pub fn with_options(pool: PgPool, options: PostgresOptions, saga: impl Into<String>) -> crate::Result<Self> {
        let tables = options.tables()?;
        Ok(Self::on(Arc::new(Store::new(pool, options, tables)), saga.into()))
    }

    fn on(store: Arc<Store>, saga: String) -> Self {
        let statements = Arc::new(Statements::new(&store.tables.sagas));
        PostgresSagaRepository { store, saga: saga.into(), pessimistic: false, statements, _state: PhantomData }
    }

    /// Pessimistic mode: on an endpoint with the inbox, each event locks its instance until
    /// the inbox's transaction ends (elsewhere, concurrency stays optimistic).
    pub fn pessimistic(mut self) -> Self {
        self.pessimistic = true;
        self
    }

    async fn connection(&self) -> bus_saga::Result<Connection> {
        if let Some(guard) = current_transaction().await {
            return Ok(Connection::Inbox(guard));
        }
        self.store.pool.acquire().await.map(Connection::Pooled).map_err(repository_error)
    }

    /// The live instances in `state`.
    pub async fn in_state(&self, state: &str) -> bus_saga::Result<Vec<SagaInstance<S>>> {
        let sql = &self.statements.in_state;
        let mut connection = self.connection().await?;
        let rows = sqlx::query(sql)
            .bind(&*self.saga)
            .bind(state)
            .fetch_all(connection.get())
            .await
            .map_err(repository_error)?;
        rows.iter().map(instance).collect()
    }

    /// The live instances whose saga data has `field` (a top-level field, as serialized)
    /// equal to `value`.
    pub async fn find_by(&self, field: &str, value: impl serde::Serialize) -> bus_saga::Result<Vec<SagaInstance<S>>> {
        let value = serde_json::to_value(value).map_err(repository_error)?;
        let sql = &self.statements.find_by;
        let mut connection = self.connection().await?;
        let rows = sqlx::query(sql)
            .bind(&*self.saga)
            .bind(field)
            .bind(sqlx::types::Json(value))
            .fetch_all(connection.get())
            .await
            .map_err(repository_error)?;
        rows.iter().map(instance).collect()
    }

    /// Writes `instance` as new (version 1), replacing only a kept instance that expired.
    async fn insert_row(&self, instance: &SagaInstance<S>, keep_for: Option<Duration>) -> bus_saga::Result<()> {
        bus_saga::check_state_fields(&instance.data)?;
        let mut stored = instance.clone();
        stored.version = 1;
        let sql = &self.statements.insert;
        let json = serde_json::to_value(&stored).map_err(repository_error)?;
        let mut connection = self.connection().await?;
        let written = sqlx::query(sql)
            .bind(&*self.saga)
            .bind(instance.correlation_id)
            .bind(&instance.current_state)
            .bind(sqlx::types::Json(json))
            .bind(keep_for.map(|k| k.as_secs_f64()))
            .execute(connection.get())
            .await
            .map_err(repository_error)?
            .rows_affected();
        if written == 0 {
            return Err(bus_saga::Error::Conflict(instance.correlation_id));
        }
        Ok(())
    }

    /// Replaces the instance stored with `expected`.
    async fn update_row(
        &self,
        instance: &SagaInstance<S>,
        expected: u64,
        keep_for: Option<Duration>,
    ) -> bus_saga::Result<()> {
        bus_saga::check_state_fields(&instance.data)?;
        let id = instance.correlation_id;
        let next = expected.checked_add(1).ok_or(bus_saga::Error::VersionExhausted(id))?;
        // Stored as PostgreSQL's BIGINT.
        let (expected, next) = match (i64::try_from(expected), i64::try_from(next)) {
            (Ok(expected), Ok(next)) => (expected, next),
            _ => return Err(bus_saga::Error::VersionExhausted(id)),
        };
        let mut stored = instance.clone();
        stored.version = next as u64;
        let sql = &self.statements.update;
        let json = serde_json::to_value(&stored).map_err(repository_error)?;
        let mut connection = self.connection().await?;
        let written = sqlx::query(sql)
            .bind(&*self.saga)
            .bind(id)
            .bind(&instance.current_state)
            .bind(next)
            .bind(sqlx::types::Json(json))
            .bind(keep_for.map(|k| k.as_secs_f64()))
            .bind(expected)
            .execute(connection.get())
            .await
            .map_err(repository_error)?
            .rows_affected();
        if written == 0 {
            return Err(bus_saga::Error::Conflict(id));
        }
        Ok(())
    }
}

fn instance<S: SagaData>(row: &PgRow) -> bus_saga::Result<SagaInstance<S>> {
    let json: sqlx::types::Json<serde_json::Value> = row.try_get("instance").map_err(repository_error)?;
    let id = json.0.get("correlationId").and_then(|v| v.as_str()).and_then(|v| v.parse().ok()).unwrap_or_default();
    serde_json::from_value(json.0).map_err(|source| bus_saga::Error::Serialization { id, source })
}

impl<S: SagaData> SagaRepository<S> for PostgresSagaRepository<S> {
    async fn load(&self, id: Uuid) -> bus_saga::Result<Option<SagaInstance<S>>> {
        let sql = &self.statements.load;
        let mut connection = self.connection().await?;
        let row = sqlx::query(sql)
            .bind(&*self.saga)
            .bind(id)
            .fetch_optional(connection.get())
            .await
            .map_err(repository_error)?;
        row.as_ref().map(instance).transpose()
    }

    async fn insert(&self, instance: &SagaInstance<S>) -> bus_saga::Result<()> {
        self.insert_row(instance, None).await
    }

    async fn update(&self, instance: &SagaInstance<S>, expected_version: u64) -> bus_saga::Result<()> {
        self.update_row(instance, expected_version, None).await
    }

    async fn delete(&self, id: Uuid, expected_version: u64) -> bus_saga::Result<()> {
        let expected = i64::try_from(expected_version).map_err(|_| bus_saga::Error::Conflict(id))?;
        let sql = &self.statements.delete;
        let mut connection = self.connection().await?;
        let deleted = sqlx::query(sql)
            .bind(&*self.saga)
            .bind(id)
            .bind(expected)
            .execute(connection.get())
            .await
            .map_err(repository_error)?
            .rows_affected();
        if deleted == 0 {
            return Err(bus_saga::Error::Conflict(id));
        }
        Ok(())
    }

    async fn keep_finalized(
        &self,
        instance: &SagaInstance<S>,
        expected_version: Option<u64>,
        keep_for: Duration,
    ) -> bus_saga::Result<()> {
        match expected_version {
            Some(version) => self.update_row(instance, version, Some(keep_for)).await,
            None => self.insert_row(instance, Some(keep_for)).await,
        }
    }

    /// By a query on the instance's `jsonb` (add an expression index on the field when
    /// many instances live).
    async fn find_id_by(&self, field: &str, value: &serde_json::Value) -> bus_saga::Result<Option<Uuid>> {
        let sql = &self.statements.find_id_by;
        let mut connection = self.connection().await?;
        sqlx::query_scalar(sql)
            .bind(&*self.saga)
            .bind(field)
            .bind(sqlx::types::Json(value))
            .fetch_optional(connection.get())
            .await
            .map_err(repository_error)
    }

    async fn lock(&self, id: Uuid, _token: &str) -> bus_saga::Result<bool> {
        if !self.pessimistic {
            return Ok(false);
        }
        let Some(mut guard) = current_transaction().await else {
            // No transaction to hold it for: optimistic.
            return Ok(false);
        };
        let Some(tx) = guard.as_deref_mut() else { return Ok(false) };
        // The instance's row, for the rest of the transaction; and, for an instance not
        // created yet, a lock on its id, so that its initiating events wait for each other too.
        let row = &self.statements.lock;
        let locked =
            sqlx::query(row).bind(&*self.saga).bind(id).fetch_optional(&mut *tx).await.map_err(repository_error)?;
        if locked.is_none() {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                .bind(&*self.saga)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(repository_error)?;
        }
        Ok(true)
    }

    fn writes_with_durable_outbox(&self) -> bool {
        // In an inbox attempt, every statement here runs in its transaction.
        in_inbox_attempt()
    }

    async fn unlock(&self, _id: Uuid, _token: String) -> bus_saga::Result<()> {
        // Released when the inbox's transaction ends.
        Ok(())
    }
}
