//! Where saga instances live between messages.

mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

pub use self::memory::InMemorySagaRepository;
#[cfg(feature = "redis")]
pub use self::redis::{RedisSagaOptions, RedisSagaRepository};
use crate::{Result, SagaInstance};

/// Loads and saves saga instances with optimistic concurrency.
///
/// Versions: an inserted instance has version 1; each update stores `expected + 1`. A write
/// whose expectation does not hold fails with [`Error::Conflict`](crate::Error::Conflict),
/// and the saga reloads the instance and runs the event again.
pub trait SagaRepository<S>: Send + Sync + 'static {
    /// The instance with this id, if there is one.
    fn load(&self, id: Uuid) -> impl Future<Output = Result<Option<SagaInstance<S>>>> + Send;

    /// Stores a new instance (version 1); a conflict if one exists already.
    fn insert(&self, instance: &SagaInstance<S>) -> impl Future<Output = Result<()>> + Send;

    /// Replaces an instance stored with `expected_version` by `instance` (saved as
    /// `expected_version + 1`); a conflict when the stored version differs or it is gone.
    fn update(&self, instance: &SagaInstance<S>, expected_version: u64) -> impl Future<Output = Result<()>> + Send;

    /// Deletes an instance stored with `expected_version`; a conflict when it differs.
    fn delete(&self, id: Uuid, expected_version: u64) -> impl Future<Output = Result<()>> + Send;

    /// Stores an instance that reached its final state while the messages of its last
    /// transition have not left yet: as [`insert`](Self::insert) when `expected_version` is
    /// `None`, else as [`update`](Self::update). The saga deletes it once they have left; a
    /// store that can expire keys drops it after `keep_for` if that never happens. The
    /// default keeps it until deleted.
    fn keep_finalized(
        &self,
        instance: &SagaInstance<S>,
        expected_version: Option<u64>,
        keep_for: Duration,
    ) -> impl Future<Output = Result<()>> + Send
    where
        S: Sync,
    {
        let _ = keep_for;
        async move {
            match expected_version {
                Some(version) => self.update(instance, version).await,
                None => self.insert(instance).await,
            }
        }
    }

    /// Whether what this repository writes now commits in one transaction with the messages
    /// the consume produces (a database outbox: see `bus_core::middleware::DurableOutbox`).
    /// Then a finalized instance is deleted in that transaction rather than kept until its
    /// messages have left. The default: no.
    fn writes_with_durable_outbox(&self) -> bool {
        false
    }

    /// The id of the instance whose data has `field` (a top-level field, as serialized)
    /// equal to `value`, for events correlated by a field of the instance
    /// ([`StateMachineBuilder::event_correlated_by`](crate::StateMachineBuilder::event_correlated_by)).
    /// The default: [`Error::NotIndexed`](crate::Error::NotIndexed), a repository that cannot
    /// look instances up by their fields.
    fn find_id_by(&self, field: &str, value: &serde_json::Value) -> impl Future<Output = Result<Option<Uuid>>> + Send {
        let field = field.to_owned();
        let _ = value;
        async move { Err(crate::Error::NotIndexed(field)) }
    }

    /// Takes an exclusive lock on the instance for pessimistic concurrency, held with
    /// `token`; `false` when the repository does not lock (the default: optimistic only).
    ///
    /// The caller makes the token, and releases with it even when this call is cut short:
    /// a lock taken whose reply never arrived is not left behind for its whole lease.
    fn lock(&self, id: Uuid, token: &str) -> impl Future<Output = Result<bool>> + Send {
        let _ = (id, token);
        async { Ok(false) }
    }

    /// Releases a lock taken by [`lock`](Self::lock), only if it is still held with `token`.
    fn unlock(&self, id: Uuid, token: String) -> impl Future<Output = Result<()>> + Send {
        let _ = (id, token);
        async { Ok(()) }
    }
}
