//! The rate limiter: at most so many messages per interval through an endpoint.

use std::time::Duration;

use tokio::time::Instant;

/// At most `limit` messages per `interval` through an endpoint (MassTransit's
/// `UseRateLimit`), given with [`Endpoint::rate_limit`](crate::Endpoint::rate_limit).
///
/// Messages are spread evenly over the interval (one every `interval / limit`). With a
/// [`burst`](Self::burst) above 1 (the default), up to that many may go at once after a
/// quiet spell, so that an interval can see up to `limit + burst - 1`; the long-run rate
/// stays `limit` per `interval`. The endpoint takes a delivery
/// only when the limit allows it, so it never holds more than its prefetch: the rest wait in
/// the queue, where other instances of the service can take them.
///
/// ```
/// use std::time::Duration;
/// use bus_core::RateLimit;
/// let limit = RateLimit::new(100, Duration::from_secs(1)).burst(10);
/// assert_eq!(limit.spacing(), Duration::from_millis(10));
/// ```
#[doc(alias = "UseRateLimit")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    limit: u32,
    interval: Duration,
    burst: u32,
}

impl RateLimit {
    /// At most `limit` messages (at least 1) per `interval` (at most a day).
    pub fn new(limit: u32, interval: Duration) -> Self {
        RateLimit { limit: limit.max(1), interval: interval.min(Duration::from_secs(86_400)), burst: 1 }
    }

    /// Lets up to `burst` messages through at once after a quiet spell (at most `limit`),
    /// the long-run rate staying the same.
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst.clamp(1, self.limit);
        self
    }

    /// The time between two messages at the steady rate.
    pub fn spacing(&self) -> Duration {
        self.interval / self.limit
    }
}

/// The run loop's limiter: the generic cell rate algorithm, on tokio's clock (so that a test
/// on a paused clock measures it exactly). `next` is when the next message is due at the
/// steady rate; a message may go up to `burst - 1` spacings before that.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    spacing: Duration,
    tolerance: Duration,
    next: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let spacing = limit.spacing();
        RateLimiter { spacing, tolerance: spacing * (limit.burst - 1), next: None }
    }

    /// Waits until one more message may go, and counts it.
    pub(crate) async fn ready(&mut self) {
        let now = Instant::now();
        let due = self.next.map_or(now, |next| next.max(now));
        if let Some(wait_until) = due.checked_sub(self.tolerance).filter(|at| *at > now) {
            tokio::time::sleep_until(wait_until).await;
        }
        self.next = Some(due + self.spacing);
    }
}
