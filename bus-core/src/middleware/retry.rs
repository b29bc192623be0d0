use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::{Middleware, Next};
use crate::{ConsumeError, ReceiveContext};

#[derive(Debug, Clone)]
enum Intervals {
    None,
    Immediate(u32),
    Fixed(Arc<[Duration]>),
    Exponential { limit: u32, min: Duration, max: Duration, jitter: bool },
    Incremental { limit: u32, initial: Duration, step: Duration },
}

type Filter = Arc<dyn Fn(&ConsumeError) -> bool + Send + Sync>;

/// How often, and after which pauses, a failed attempt is tried again in process.
///
/// Permanent errors ([`Permanent`](crate::Permanent)) and messages that cannot be read
/// are never retried, whatever the policy.
///
/// ```
/// use std::time::Duration;
/// use bus_core::middleware::RetryPolicy;
///
/// let policy = RetryPolicy::intervals([Duration::from_millis(10), Duration::from_millis(50)]);
/// assert_eq!(policy.retry_limit(), 2);
/// assert_eq!(policy.delay(1), Some(Duration::from_millis(10)));
/// assert_eq!(policy.delay(3), None);
///
/// let policy = RetryPolicy::incremental(3, Duration::from_millis(100), Duration::from_millis(50));
/// assert_eq!(policy.delay(3), Some(Duration::from_millis(200)));
///
/// let policy = RetryPolicy::exponential(5, Duration::from_millis(10), Duration::from_secs(1)).without_jitter();
/// assert_eq!(policy.delay(4), Some(Duration::from_millis(80)));
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    intervals: Intervals,
    filter: Option<Filter>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("intervals", &self.intervals)
            .field("filtered", &self.filter.is_some())
            .finish()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::none()
    }
}

impl RetryPolicy {
    fn with(intervals: Intervals) -> Self {
        RetryPolicy { intervals, filter: None }
    }

    /// No retries: the first failure is final.
    pub fn none() -> Self {
        Self::with(Intervals::None)
    }

    /// Up to `n` retries, at once.
    pub fn immediate(n: u32) -> Self {
        Self::with(Intervals::Immediate(n))
    }

    /// One retry after each of the given pauses.
    pub fn intervals(delays: impl IntoIterator<Item = Duration>) -> Self {
        Self::with(Intervals::Fixed(delays.into_iter().collect()))
    }

    /// Up to `n` retries after pauses doubling from `min`, capped at `max`, with jitter
    /// (each pause drawn between half and all of its value) so retries of many messages spread out.
    pub fn exponential(n: u32, min: Duration, max: Duration) -> Self {
        Self::with(Intervals::Exponential { limit: n, min, max, jitter: true })
    }

    /// Up to `n` retries after `initial`, `initial + step`, `initial + 2 step`...
    pub fn incremental(n: u32, initial: Duration, step: Duration) -> Self {
        Self::with(Intervals::Incremental { limit: n, initial, step })
    }

    /// Exponential pauses exactly as computed, without jitter.
    pub fn without_jitter(mut self) -> Self {
        if let Intervals::Exponential { jitter, .. } = &mut self.intervals {
            *jitter = false;
        }
        self
    }

    /// Retries only the errors for which `filter` returns true.
    pub fn with_filter(mut self, filter: impl Fn(&ConsumeError) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Retries only errors whose source is of type `E`.
    pub fn handle<E: std::error::Error + 'static>(self) -> Self {
        self.with_filter(|e| e.source_error().is_some_and(|s| s.is::<E>()))
    }

    /// Does not retry errors whose source is of type `E`.
    pub fn ignore<E: std::error::Error + 'static>(self) -> Self {
        self.with_filter(|e| !e.source_error().is_some_and(|s| s.is::<E>()))
    }

    /// The most retries this policy allows.
    pub fn retry_limit(&self) -> u32 {
        match &self.intervals {
            Intervals::None => 0,
            Intervals::Immediate(n) => *n,
            Intervals::Fixed(delays) => u32::try_from(delays.len()).unwrap_or(u32::MAX),
            Intervals::Exponential { limit, .. } | Intervals::Incremental { limit, .. } => *limit,
        }
    }

    /// The pause before retry number `retry` (1 for the first retry), or `None` past the limit.
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        if retry == 0 || retry > self.retry_limit() {
            return None;
        }
        Some(match &self.intervals {
            Intervals::None => return None,
            Intervals::Immediate(_) => Duration::ZERO,
            Intervals::Fixed(delays) => delays[(retry - 1) as usize],
            Intervals::Exponential { min, max, jitter, .. } => {
                let factor = 2u32.saturating_pow(retry - 1);
                let full = min.saturating_mul(factor).min(*max);
                if *jitter {
                    let half = full / 2;
                    half + full.saturating_sub(half).mul_f64(fastrand::f64())
                } else {
                    full
                }
            }
            Intervals::Incremental { initial, step, .. } => initial.saturating_add(step.saturating_mul(retry - 1)),
        })
    }

    /// Whether this error may be retried under this policy.
    pub fn should_retry(&self, error: &ConsumeError) -> bool {
        error.is_retryable() && self.filter.as_ref().is_none_or(|f| f(error))
    }
}

/// Runs the rest of the pipeline again, by its [`RetryPolicy`], until it succeeds or the
/// policy gives up. Messages an attempt published are discarded when it fails.
#[derive(Debug, Clone)]
pub struct Retry(pub RetryPolicy);

impl Middleware for Retry {
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, Result<(), ConsumeError>> {
        Box::pin(async move {
            let mut retry = 0;
            loop {
                let mut attempt = ctx.clone();
                attempt.set_retry_attempt(retry);
                let error = match next.clone().run(attempt).await {
                    Ok(()) => return Ok(()),
                    Err(error) => error.with_retry_count(retry),
                };
                ctx.outbox().discard();
                if !self.0.should_retry(&error) || ctx.cancellation_token().is_cancelled() {
                    return Err(error);
                }
                retry += 1;
                let Some(delay) = self.0.delay(retry) else {
                    return Err(error);
                };
                ctx.record_retry(retry, delay, &error);
                if !delay.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = ctx.cancellation_token().cancelled() => return Err(error),
                    }
                }
            }
        })
    }
}
