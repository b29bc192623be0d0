//! bus-postgres: a transactional outbox and inbox on PostgreSQL for bus-core.
//!
//! - [`PostgresOutbox`]: what a service publishes or sends in its database transaction is
//!   written to an outbox table in that transaction, and a [`DeliveryService`] hands it to
//!   the transport once it has committed: a write and its messages commit together. Messages
//!   keep their ids; those of one transaction leave in order; several service instances
//!   share one table.
//! - [`PostgresInbox`]: each consume runs in a database transaction the consumer shares
//!   ([`transaction`]); a message delivered again is recognized by its id and not consumed
//!   twice; what the consumer produces goes out through the outbox, with its writes.
//! - Cleanup: delivered outbox rows and inbox rows older than the duplicate window (30
//!   minutes by default, as MassTransit's) are removed in the background.
//! - [`PostgresSagaRepository`]: saga instances as `jsonb` with a version, optimistic or
//!   pessimistic, written in the inbox's transaction with the messages of their transition.
//! - [`PostgresScheduler`]: durable scheduled messages (`Bus::schedule_send`), claimed with
//!   `SKIP LOCKED`, each delivered once.
//! - [`PostgresOutbox::migrate`] creates the tables, in a schema of your choice.
//!
//! Delivery is at least once: a delivery service that dies between the transport taking a
//! message and marking it delivered leaves it to be delivered again, with the same message
//! id, which an inbox downstream recognizes. See `docs/outbox.md`.

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

mod delivery;
mod error;
mod inbox;
mod outbox;
mod saga;
mod scheduler;
mod schema;

pub use delivery::DeliveryService;
pub use error::{Error, Result};
pub use inbox::{transaction, InboxTransaction, PostgresInbox, TransactionGuard};
pub use outbox::PostgresOutbox;
pub use saga::PostgresSagaRepository;
pub use scheduler::PostgresScheduler;
pub use schema::PostgresOptions;
