//! The crate's error type.

use std::time::Duration;

/// Result with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the in-memory transport can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A queue stayed full for longer than the configured wait.
    #[error("queue `{queue}` is full: no room within {waited:?}")]
    QueueFull {
        /// The full queue.
        queue: String,
        /// How long the publisher waited.
        waited: Duration,
    },
    /// A send found no queue to deliver to.
    #[error("no queue receives messages sent to `{destination}`")]
    Unroutable {
        /// The destination name.
        destination: String,
    },
    /// The named queue does not exist.
    #[error("queue `{0}` does not exist")]
    QueueNotFound(String),
}

impl Error {
    /// Whether trying again may succeed (a full queue drains; a missing route stays missing).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::QueueFull { .. })
    }
}

impl From<Error> for bus_core::Error {
    fn from(error: Error) -> Self {
        bus_core::Error::transport(error.to_string(), error.is_transient(), Some(Box::new(error) as bus_core::BoxError))
    }
}
