use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use tokio::time::Instant;

use super::{Middleware, Next};
use crate::sync::MutexExt;
use crate::{ConsumeError, ConsumeErrorKind, ReceiveContext};

/// The exception type of an attempt refused by an open circuit breaker, as MassTransit names it.
pub const CIRCUIT_BREAKER_OPEN: &str = "CircuitBreakerOpenException";

/// Where a circuit breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Messages go through; failures are counted.
    Closed,
    /// Messages fail at once, without reaching the consumer, until the reset interval ends.
    Open,
    /// One message (the probe) goes through; the others fail at once. Its outcome closes or
    /// opens the breaker.
    HalfOpen,
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        })
    }
}

#[derive(Debug)]
enum State {
    Closed {
        since: Instant,
        attempts: u32,
        failures: u32,
    },
    Open {
        until: Instant,
        reason: String,
    },
    /// Probing since `since`; a probe that has not ended after a reset interval (it hangs)
    /// lets another through.
    HalfOpen {
        since: Instant,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    tracking_period: Duration,
    trip_threshold: f64,
    active_threshold: u32,
    reset_interval: Duration,
}

/// Fails messages fast while what their consumer calls is failing (MassTransit's
/// `UseCircuitBreaker`), given with [`Endpoint::circuit_breaker`](crate::Endpoint::circuit_breaker).
///
/// Closed, it counts deliveries and failures over a tracking period (a delivery counts once,
/// after its retries). When at least [`active_threshold`](Self::active_threshold) were
/// counted and the share that failed reaches [`trip_threshold`](Self::trip_threshold), it
/// opens: for the [`reset_interval`](Self::reset_interval) every message fails at once with
/// [`CIRCUIT_BREAKER_OPEN`] without reaching its consumer, and takes the endpoint's failure
/// path (redelivery when configured, else `_error` and a fault). Then one message probes: its
/// success closes the breaker, its failure opens it for another interval.
///
/// Only failures that may pass count ([`Permanent`](crate::Permanent) errors do not). Given
/// with [`Endpoint::circuit_breaker`](crate::Endpoint::circuit_breaker) (one breaker per
/// endpoint), its state shows in the endpoint's health (`Degraded`, "circuit breaker open");
/// in any case, in the metrics `messaging.bus.circuit_breaker.open` (1 while open or half-open, by `endpoint`)
/// and `messaging.bus.circuit_breaker.transitions` (by `endpoint` and `state`).
///
/// Use it to spare a struggling dependency and fail quickly; to keep the messages in the
/// queue instead, use a [`KillSwitch`](crate::KillSwitch).
///
/// ```
/// use std::time::Duration;
/// use bus_core::middleware::{CircuitBreaker, CircuitState};
/// let breaker = CircuitBreaker::new()
///     .active_threshold(10)
///     .trip_threshold(0.15)
///     .reset_interval(Duration::from_secs(30));
/// assert_eq!(breaker.state(), CircuitState::Closed);
/// ```
#[doc(alias = "UseCircuitBreaker")]
#[derive(Clone)]
pub struct CircuitBreaker {
    settings: Arc<Settings>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker").field("settings", &self.settings).field("state", &self.state()).finish()
    }
}

impl Default for CircuitBreaker {
    /// MassTransit's defaults: active after 10 messages, opens at 15% failed over a minute,
    /// resets after five minutes.
    fn default() -> Self {
        CircuitBreaker {
            settings: Arc::new(Settings {
                tracking_period: Duration::from_secs(60),
                trip_threshold: 0.15,
                active_threshold: 10,
                reset_interval: Duration::from_secs(300),
            }),
            state: Arc::new(Mutex::new(State::Closed { since: Instant::now(), attempts: 0, failures: 0 })),
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    fn set(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = *self.settings;
        change(&mut settings);
        self.settings = Arc::new(settings);
        self
    }

    /// The window failures are counted over; the counts start again at the end of each.
    pub fn tracking_period(self, period: Duration) -> Self {
        self.set(|s| s.tracking_period = period.clamp(Duration::from_millis(1), Duration::from_secs(86_400)))
    }

    /// The share of failed deliveries, from 0.0 to 1.0, that opens the breaker.
    pub fn trip_threshold(self, share: f64) -> Self {
        self.set(|s| s.trip_threshold = share.clamp(0.0, 1.0))
    }

    /// How many deliveries must be counted in a tracking period before it can open (at least 1).
    pub fn active_threshold(self, deliveries: u32) -> Self {
        self.set(|s| s.active_threshold = deliveries.max(1))
    }

    /// How long it stays open before a probe (at most a day).
    pub fn reset_interval(self, interval: Duration) -> Self {
        self.set(|s| s.reset_interval = interval.min(Duration::from_secs(86_400)))
    }

    /// Where it stands now (open until its reset interval has passed and a message probes).
    pub fn state(&self) -> CircuitState {
        match &*self.state.locked() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Why it is open or half-open, for health.
    pub(crate) fn open_reason(&self) -> Option<String> {
        match &*self.state.locked() {
            State::Closed { .. } => None,
            State::Open { reason, .. } | State::HalfOpen { reason, .. } => {
                Some(format!("circuit breaker open: {reason}"))
            }
        }
    }

    /// Lets the attempt through (`Ok(Some(probe))`: as the probe that started at `probe`),
    /// or refuses it.
    fn admit(&self) -> Result<Option<Instant>, String> {
        let mut state = self.state.locked();
        let now = Instant::now();
        // A probe is given at least a second before another goes, whatever the interval.
        let hung_after = self.settings.reset_interval.max(Duration::from_secs(1));
        match &*state {
            State::Closed { .. } => Ok(None),
            State::Open { until, reason } if now >= *until => {
                *state = State::HalfOpen { since: now, reason: reason.clone() };
                Ok(Some(now))
            }
            State::HalfOpen { since, reason } if now.duration_since(*since) >= hung_after => {
                *state = State::HalfOpen { since: now, reason: reason.clone() };
                Ok(Some(now))
            }
            State::Open { reason, .. } | State::HalfOpen { reason, .. } => Err(reason.clone()),
        }
    }

    /// Records an outcome (of the probe started at `probe`, if it was one); the new state
    /// when it changed. The outcome of a probe another has replaced (it hung) is ignored.
    fn record(&self, probe: Option<Instant>, failure: Option<&ConsumeError>) -> Option<CircuitState> {
        let counted = failure.filter(|e| e.kind() == ConsumeErrorKind::Failed);
        let mut state = self.state.locked();
        let reason = || counted.map(|e| format!("{}: {}", e.exception_type(), e.message())).unwrap_or_default();
        match &mut *state {
            State::HalfOpen { reason: last, since } if probe == Some(*since) => {
                if counted.is_some() {
                    *state = State::Open { until: Instant::now() + self.settings.reset_interval, reason: reason() };
                    Some(CircuitState::Open)
                } else if failure.is_some() {
                    // Failed for a reason of its own (permanent, unreadable, skipped): it says
                    // nothing of the dependency; the next message probes instead.
                    *state = State::Open { until: Instant::now(), reason: last.clone() };
                    Some(CircuitState::Open)
                } else {
                    *state = State::Closed { since: Instant::now(), attempts: 0, failures: 0 };
                    Some(CircuitState::Closed)
                }
            }
            State::Closed { since, attempts, failures } if probe.is_none() => {
                if since.elapsed() >= self.settings.tracking_period {
                    (*since, *attempts, *failures) = (Instant::now(), 0, 0);
                }
                *attempts += 1;
                *failures += u32::from(counted.is_some());
                let trips = counted.is_some()
                    && *attempts >= self.settings.active_threshold
                    && f64::from(*failures) >= self.settings.trip_threshold * f64::from(*attempts);
                trips.then(|| {
                    *state = State::Open { until: Instant::now() + self.settings.reset_interval, reason: reason() };
                    CircuitState::Open
                })
            }
            _ => None,
        }
    }

    /// The probe started at `probe` ended without an outcome (cancelled): the next message
    /// probes instead, unless another probe already replaced it.
    fn probe_abandoned(&self, probe: Instant) {
        let mut state = self.state.locked();
        if let State::HalfOpen { reason, since } = &*state {
            if *since == probe {
                *state = State::Open { until: Instant::now(), reason: reason.clone() };
            }
        }
    }
}

/// Puts a probe that is dropped before its outcome back to open.
struct ProbeGuard<'a>(Option<(&'a CircuitBreaker, Instant)>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some((breaker, probe)) = self.0.take() {
            breaker.probe_abandoned(probe);
        }
    }
}

fn report(ctx: &ReceiveContext, from: CircuitState, to: CircuitState) {
    let endpoint = KeyValue::new("endpoint", ctx.endpoint_name().to_owned());
    let meter = ctx.bus().meter();
    meter
        .u64_counter("messaging.bus.circuit_breaker.transitions")
        .with_description("circuit breaker state changes")
        .build()
        .add(1, &[endpoint.clone(), KeyValue::new("state", to.to_string())]);
    let open = |s: CircuitState| i64::from(s != CircuitState::Closed);
    let change = open(to) - open(from);
    if change != 0 {
        meter
            .i64_up_down_counter("messaging.bus.circuit_breaker.open")
            .with_description("circuit breakers open or half-open")
            .build()
            .add(change, &[endpoint]);
    }
    match to {
        CircuitState::Open => tracing::warn!(endpoint = ctx.endpoint_name(), "circuit breaker opened"),
        _ => tracing::info!(endpoint = ctx.endpoint_name(), state = %to, "circuit breaker state changed"),
    }
}

impl Middleware for CircuitBreaker {
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, Result<(), ConsumeError>> {
        Box::pin(async move {
            let probe = match self.admit() {
                Ok(probe) => probe,
                Err(reason) => {
                    return Err(ConsumeError::new(
                        ConsumeErrorKind::Failed,
                        CIRCUIT_BREAKER_OPEN,
                        format!("the circuit breaker is open; last failure: {reason}"),
                    ))
                }
            };
            if probe.is_some() {
                report(&ctx, CircuitState::Open, CircuitState::HalfOpen);
            }
            let mut guard = ProbeGuard(probe.map(|probe| (self, probe)));
            let report_ctx = ctx.clone();
            let result = next.run(ctx).await;
            guard.0 = None;
            let from = if probe.is_some() { CircuitState::HalfOpen } else { CircuitState::Closed };
            if let Some(to) = self.record(probe, result.as_ref().err()) {
                report(&report_ctx, from, to);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: ConsumeErrorKind) -> ConsumeError {
        ConsumeError::new(kind, "StockDown", "stock service unavailable")
    }

    /// Open, with probes allowed at once.
    fn open_breaker() -> CircuitBreaker {
        let breaker = CircuitBreaker::new().active_threshold(1).reset_interval(Duration::ZERO);
        assert_eq!(breaker.admit(), Ok(None));
        assert_eq!(breaker.record(None, Some(&failure(ConsumeErrorKind::Failed))), Some(CircuitState::Open));
        breaker
    }

    #[test]
    fn a_probe_failing_for_a_reason_of_its_own_leaves_the_next_message_to_probe() {
        let breaker = open_breaker();
        let probe = breaker.admit().expect("the probe");
        assert!(probe.is_some());
        assert_eq!(breaker.record(probe, Some(&failure(ConsumeErrorKind::Permanent))), Some(CircuitState::Open));
        let next = breaker.admit().expect("the next message probes");
        assert!(next.is_some());
        assert_eq!(breaker.record(next, None), Some(CircuitState::Closed));
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[test]
    fn a_probe_that_hangs_past_the_reset_interval_lets_another_through() {
        let breaker = CircuitBreaker::new().active_threshold(1).reset_interval(Duration::from_secs(1));
        assert_eq!(breaker.record(None, Some(&failure(ConsumeErrorKind::Failed))), Some(CircuitState::Open));
        assert!(breaker.admit().is_err(), "open: fails fast");
        // The interval passed while the probe is still running.
        let hung = Instant::now().checked_sub(Duration::from_secs(2)).expect("the clock has run two seconds");
        *breaker.state.locked() = State::HalfOpen { since: hung, reason: "stock".to_owned() };
        let second = breaker.admit().expect("another probe");
        assert!(second.is_some());
        assert!(breaker.admit().is_err(), "and only one");
        // The hung probe ends at last: its outcome no longer decides.
        assert_eq!(breaker.record(Some(hung), None), None);
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        assert_eq!(breaker.record(second, None), Some(CircuitState::Closed));
    }
}
