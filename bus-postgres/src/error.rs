//! The crate's error type.

/// Result with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong with the outbox and the inbox. The text says what failed; the database's
/// or the bus's error is its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed or refused a statement.
    #[error("postgres: could not {operation}")]
    Database {
        /// What was attempted.
        operation: &'static str,
        /// sqlx's error.
        #[source]
        source: sqlx::Error,
    },
    /// The bus could not prepare or deliver a message.
    #[error("the bus could not {operation}")]
    Bus {
        /// What was attempted.
        operation: &'static str,
        /// The bus's error.
        #[source]
        source: bus_core::Error,
    },
    /// A stored message could not be read back (its row was changed by hand, say).
    #[error("outbox row {sequence_number} is not a message: {reason}")]
    InvalidRow {
        /// The row's sequence number.
        sequence_number: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// A name given for the schema or a table is not a plain SQL identifier.
    #[error("`{0}` is not a valid schema or table name (letters, digits and `_`, not starting with a digit; schema and outbox table 48 bytes together at most)")]
    InvalidName(String),
    /// The consumer asked for the inbox's transaction outside an inbox, or after it ended.
    #[error("no inbox transaction here: the endpoint has no PostgreSQL inbox, or the attempt is over")]
    NoTransaction,
}

impl Error {
    /// Whether trying again may succeed: a lost connection or a busy database may heal.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database { source, .. } => is_transient(source),
            Error::Bus { source, .. } => source.is_transient(),
            Error::InvalidRow { .. } | Error::InvalidName(_) | Error::NoTransaction => false,
        }
    }
}

/// Whether a database error may heal by itself: the connection, the pool, a serialization
/// failure or a deadlock, not a refused statement.
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08), transaction rollbacks (40: serialization, deadlock),
        // insufficient resources (53), operator intervention (57P0x: shutdown, restart,
        // starting up), lock not available, statement timeout, read-only after a failover.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P0")
                || matches!(&*code, "55P03" | "57014" | "25006")
        }),
        _ => false,
    }
}

/// `map_err` for a database call: what it attempted.
pub(crate) fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Database { operation, source }
}
