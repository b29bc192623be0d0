//! Messages delivered later: scheduled now, delivered at their due time by a scheduler.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Bus, PreparedMessage, Result};

/// When a scheduled message is due: a time, or a delay from now.
///
/// ```
/// use std::time::Duration;
/// let in_a_minute = bus_core::DueTime::from(Duration::from_secs(60));
/// assert!(in_a_minute.time() > chrono::Utc::now());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DueTime(DateTime<Utc>);

impl DueTime {
    /// The time it is due.
    pub fn time(&self) -> DateTime<Utc> {
        self.0
    }

    /// How long from now until it is due (zero when it is past).
    pub fn remaining(&self) -> Duration {
        (self.0 - Utc::now()).to_std().unwrap_or(Duration::ZERO)
    }
}

impl From<DateTime<Utc>> for DueTime {
    fn from(time: DateTime<Utc>) -> Self {
        DueTime(time)
    }
}

impl From<Duration> for DueTime {
    /// Due `delay` from now; a delay too long to represent is the latest time there is.
    fn from(delay: Duration) -> Self {
        let later = chrono::Duration::from_std(delay).ok().and_then(|d| Utc::now().checked_add_signed(d));
        DueTime(later.unwrap_or(DateTime::<Utc>::MAX_UTC))
    }
}

/// A message waiting in a scheduler: its token (to cancel it), when it is due, and the
/// message, prepared (ids, addresses, headers) when it was scheduled.
#[derive(Debug, Clone)]
pub struct ScheduledMessage {
    /// Cancels it ([`Bus::cancel_scheduled`]).
    pub token: Uuid,
    /// When it is delivered.
    pub due: DueTime,
    /// The message.
    pub message: PreparedMessage,
}

/// Where scheduled messages wait (MassTransit's message scheduler): in memory for tests, or
/// a durable store that survives a restart and fires each message once.
///
/// The bus runs [`run`](Self::run) from its start to its stop; it delivers due messages with
/// [`Bus::deliver`].
pub trait MessageScheduler: Send + Sync + 'static {
    /// Stores `message` until it is due. A message scheduled under a token that already
    /// waits replaces it (so that scheduling again, after a failure, does not fire twice).
    fn schedule<'a>(&'a self, message: ScheduledMessage) -> BoxFuture<'a, Result<()>>;

    /// Cancels the message of `token`; `false` when there is none waiting (it fired, or was
    /// cancelled before).
    fn cancel<'a>(&'a self, token: Uuid) -> BoxFuture<'a, Result<bool>>;

    /// Delivers due messages through `bus` until `stop` fires.
    fn run(&self, bus: Bus, stop: CancellationToken) -> BoxFuture<'static, ()>;
}
