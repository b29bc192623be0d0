//! Where the outbox and the inbox live, and the statements that create them.

use std::time::Duration;

use crate::error::{Error, Result};

/// Settings of the outbox and the inbox: where their tables are, and how the delivery
/// service and the cleanup run.
///
/// ```
/// use std::time::Duration;
/// let options = bus_postgres::PostgresOptions::new()
///     .schema("orders")
///     .duplicate_window(Duration::from_secs(3600));
/// assert_eq!(options.schema_name(), "orders");
/// ```
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    schema: String,
    outbox_table: String,
    inbox_table: String,
    saga_table: String,
    scheduled_table: String,
    /// How often the delivery service looks for messages when no notification wakes it.
    pub(crate) poll_interval: Duration,
    /// How many messages the delivery service claims at once.
    pub(crate) batch_size: i64,
    /// How long delivered outbox rows and inbox rows are kept.
    pub(crate) duplicate_window: Duration,
    /// How often the cleanup runs.
    pub(crate) cleanup_interval: Duration,
    /// The longest pause of the delivery service while the broker (or the database) is down.
    pub(crate) max_backoff: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: "bus".to_owned(),
            outbox_table: "outbox_messages".to_owned(),
            inbox_table: "inbox_messages".to_owned(),
            saga_table: "saga_instances".to_owned(),
            scheduled_table: "scheduled_messages".to_owned(),
            poll_interval: Duration::from_secs(1),
            batch_size: 100,
            duplicate_window: Duration::from_secs(30 * 60),
            cleanup_interval: Duration::from_secs(60),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl PostgresOptions {
    /// The defaults: schema `bus`, tables `outbox_messages` and `inbox_messages`, a poll
    /// every second, batches of 100, a 30-minute duplicate window (MassTransit's).
    pub fn new() -> Self {
        Self::default()
    }

    /// The schema of the tables (default `bus`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The schema of the tables.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// The outbox table's name (default `outbox_messages`).
    pub fn outbox_table(mut self, name: impl Into<String>) -> Self {
        self.outbox_table = name.into();
        self
    }

    /// The inbox table's name (default `inbox_messages`).
    pub fn inbox_table(mut self, name: impl Into<String>) -> Self {
        self.inbox_table = name.into();
        self
    }

    /// The saga instances table's name (default `saga_instances`).
    pub fn saga_table(mut self, name: impl Into<String>) -> Self {
        self.saga_table = name.into();
        self
    }

    /// The scheduled messages table's name (default `scheduled_messages`).
    pub fn scheduled_table(mut self, name: impl Into<String>) -> Self {
        self.scheduled_table = name.into();
        self
    }

    /// How often the delivery service looks for messages when no notification wakes it
    /// (default 1 s): a fallback, since each commit that wrote a message notifies it.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How many messages the delivery service claims at once (default 100).
    pub fn batch_size(mut self, size: u16) -> Self {
        self.batch_size = i64::from(size.max(1));
        self
    }

    /// How long delivered outbox rows and inbox rows are kept (default 30 minutes): a
    /// message delivered again within it is recognized as a duplicate.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// How often rows older than the duplicate window are removed (default 1 minute).
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// The names, checked, quoted and ready for statements.
    pub(crate) fn tables(&self) -> Result<Tables> {
        // The notification channel and the index names join the schema and the outbox
        // table's name; PostgreSQL cuts identifiers at 63 bytes.
        if self.schema.len() + self.outbox_table.len() > 48 {
            return Err(Error::InvalidName(format!("{}.{}", self.schema, self.outbox_table)));
        }
        for name in [&self.schema, &self.outbox_table, &self.inbox_table, &self.saga_table, &self.scheduled_table] {
            let mut chars = name.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.len() <= 63;
            if !valid {
                return Err(Error::InvalidName(name.clone()));
            }
        }
        Ok(self.quoted_tables())
    }

    /// The names quoted, unchecked: only for names known to be valid.
    pub(crate) fn quoted_tables(&self) -> Tables {
        Tables {
            schema: format!("\"{}\"", self.schema),
            outbox: format!("\"{}\".\"{}\"", self.schema, self.outbox_table),
            inbox: format!("\"{}\".\"{}\"", self.schema, self.inbox_table),
            sagas: format!("\"{}\".\"{}\"", self.schema, self.saga_table),
            scheduled: format!("\"{}\".\"{}\"", self.schema, self.scheduled_table),
            channel: format!("{}_{}", self.schema, self.outbox_table),
        }
    }
}

/// Quoted table names, and the notification channel of the outbox.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    pub(crate) schema: String,
    pub(crate) outbox: String,
    pub(crate) inbox: String,
    pub(crate) sagas: String,
    pub(crate) scheduled: String,
    pub(crate) channel: String,
}

impl Tables {
    /// The statements that create the schema and its tables, idempotently.
    pub(crate) fn migrations(&self) -> Vec<String> {
        let Tables { schema, outbox, inbox, sagas, scheduled, .. } = self;
        vec![
            format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
            // One row per message; `sequence_number` orders them, `transaction_id` groups the
            // messages of one database transaction, which leave in order, one group at a time.
            format!(
                "CREATE TABLE IF NOT EXISTS {outbox} (
                    sequence_number BIGSERIAL PRIMARY KEY,
                    transaction_id BIGINT NOT NULL DEFAULT txid_current(),
                    message_id UUID,
                    destination_kind TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    content_type TEXT,
                    headers JSONB NOT NULL,
                    body BYTEA NOT NULL,
                    correlation_id UUID,
                    expires_at TIMESTAMPTZ,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    delivered_at TIMESTAMPTZ,
                    failure TEXT,
                    priority SMALLINT,
                    routing_key TEXT
                )"
            ),
            // Tables made before messages had a priority.
            add_column(outbox, "priority", "SMALLINT"),
            add_column(outbox, "routing_key", "TEXT"),
            format!(
                "CREATE INDEX IF NOT EXISTS \"{}_pending\" ON {outbox} (sequence_number) WHERE delivered_at IS NULL",
                self.channel
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS \"{}_delivered\" ON {outbox} (delivered_at) WHERE delivered_at IS NOT NULL",
                self.channel
            ),
            // One row per message consumed through the inbox, per endpoint.
            format!(
                "CREATE TABLE IF NOT EXISTS {inbox} (
                    endpoint TEXT NOT NULL,
                    consumer TEXT NOT NULL,
                    message_id UUID NOT NULL,
                    consumed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    PRIMARY KEY (endpoint, consumer, message_id)
                )"
            ),
            format!("CREATE INDEX IF NOT EXISTS \"{}_inbox_consumed\" ON {inbox} (consumed_at)", self.channel),
            // One row per saga instance; `expires_at` is set on a finalized instance kept
            // until the messages of its last transition have left.
            format!(
                "CREATE TABLE IF NOT EXISTS {sagas} (
                    saga TEXT NOT NULL,
                    correlation_id UUID NOT NULL,
                    current_state TEXT NOT NULL,
                    version BIGINT NOT NULL,
                    instance JSONB NOT NULL,
                    expires_at TIMESTAMPTZ,
                    PRIMARY KEY (saga, correlation_id)
                )"
            ),
            format!("CREATE INDEX IF NOT EXISTS \"{}_saga_state\" ON {sagas} (saga, current_state)", self.channel),
            // One row per scheduled message, until it fires or is cancelled.
            format!(
                "CREATE TABLE IF NOT EXISTS {scheduled} (
                    sequence_number BIGSERIAL PRIMARY KEY,
                    token UUID NOT NULL UNIQUE,
                    due_at TIMESTAMPTZ NOT NULL,
                    message_id UUID,
                    destination_kind TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    content_type TEXT,
                    headers JSONB NOT NULL,
                    body BYTEA NOT NULL,
                    correlation_id UUID,
                    expires_at TIMESTAMPTZ,
                    priority SMALLINT,
                    routing_key TEXT
                )"
            ),
            add_column(scheduled, "priority", "SMALLINT"),
            add_column(scheduled, "routing_key", "TEXT"),
            format!("CREATE INDEX IF NOT EXISTS \"{}_due\" ON {scheduled} (due_at, sequence_number)", self.channel),
        ]
    }
}

/// Adds a column to a table made before messages had it; only then, since `ALTER TABLE`
/// locks the table even when the column is there.
fn add_column(table: &str, column: &str, kind: &str) -> String {
    let literal = table.replace('\'', "''");
    format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_attribute
                          WHERE attrelid = '{literal}'::regclass AND attname = '{column}' AND NOT attisdropped) THEN
             ALTER TABLE {table} ADD COLUMN {column} {kind};
           END IF;
         END $$"
    )
}
