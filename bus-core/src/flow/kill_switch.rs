//! The kill switch: an endpoint that fails too often stops consuming for a while.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::sync::MutexExt;
use crate::{ConsumeError, ConsumeErrorKind};

/// Stops consuming an endpoint whose failure rate passes a threshold (a downstream outage),
/// and starts again by itself after a pause (MassTransit's `UseKillSwitch`), given with
/// [`Endpoint::kill_switch`](crate::Endpoint::kill_switch).
///
/// Without it, an outage of what consumers call pushes the whole queue through retries and
/// redelivery into `_error`. With it:
///
/// - Once at least [`activation_threshold`](Self::activation_threshold) messages were
///   consumed within the [`tracking_period`](Self::tracking_period), and the share that
///   failed reaches [`trip_threshold`](Self::trip_threshold), the switch trips: the endpoint
///   stops taking messages and hands back those its transport held (on RabbitMQ its
///   consumer is cancelled), and messages still being consumed that fail go back to the
///   queue instead of to redelivery or `_error`. The queue keeps the rest.
/// - Health reports the endpoint `Degraded`, "kill switch tripped", with the last error.
/// - After [`restart_after`](Self::restart_after) it consumes again (health is as the
///   transport reports it). A failure before any success trips it again, and that message
///   goes to the back of the queue, so that a message failing by itself cannot keep the
///   endpoint stopped while others wait behind it. Once a message has succeeded, failures
///   take the normal path (the dependency is back; the message itself is at fault), and
///   `activation_threshold` successes close the switch.
///
/// Only failures that may pass count: [`Permanent`](crate::Permanent) errors, messages that
/// cannot be read and skipped messages say nothing about what is downstream.
///
/// ```
/// use std::time::Duration;
/// use bus_core::{ConsumeContext, Endpoint, KillSwitch, Message};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:ChargeCard")] struct ChargeCard;
/// let payments = Endpoint::new("payments")
///     .kill_switch(
///         KillSwitch::new()
///             .activation_threshold(10)
///             .trip_threshold(0.15)
///             .restart_after(Duration::from_secs(60)),
///     )
///     .handler(|_: ConsumeContext<ChargeCard>| async { Ok(()) });
/// # drop(payments);
/// ```
#[doc(alias = "UseKillSwitch")]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KillSwitch {
    activation_threshold: u32,
    trip_threshold: f64,
    tracking_period: Duration,
    restart_after: Duration,
}

impl Default for KillSwitch {
    /// MassTransit's defaults: active after 100 messages, trips at 10% failed over a minute,
    /// restarts after a minute.
    fn default() -> Self {
        KillSwitch {
            activation_threshold: 100,
            trip_threshold: 0.10,
            tracking_period: Duration::from_secs(60),
            restart_after: Duration::from_secs(60),
        }
    }
}

impl KillSwitch {
    /// The defaults (see [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// How many messages must be consumed in a tracking period before the switch can trip
    /// (at least 1); also how many successes after a restart close it again.
    pub fn activation_threshold(mut self, messages: u32) -> Self {
        self.activation_threshold = messages.max(1);
        self
    }

    /// The share of failed messages, from 0.0 to 1.0, that trips the switch.
    pub fn trip_threshold(mut self, share: f64) -> Self {
        self.trip_threshold = share.clamp(0.0, 1.0);
        self
    }

    /// The window the counts are kept over; they start again at the end of each.
    pub fn tracking_period(mut self, period: Duration) -> Self {
        self.tracking_period = period.clamp(Duration::from_millis(1), Duration::from_secs(86_400));
        self
    }

    /// How long the endpoint stops once tripped (at least a second, as MassTransit requires,
    /// at most a day).
    pub fn restart_after(mut self, pause: Duration) -> Self {
        self.restart_after = pause.clamp(Duration::from_secs(1), Duration::from_secs(86_400));
        self
    }

    pub(crate) fn restart_delay(&self) -> Duration {
        self.restart_after
    }
}

/// What becomes of a failed message, as the kill switch decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The normal failure path: redelivery, `_error`, a fault.
    FailurePath,
    /// Back to the head of its queue: the endpoint stops, the message waits for it.
    Requeue,
    /// To the back of its queue: it failed first when the endpoint restarted.
    ToBack,
}

#[derive(Debug)]
enum Mode {
    Closed { since: Instant, attempts: u32, failures: u32 },
    Tripped { reason: String },
    Restarting { successes: u32 },
}

#[derive(Debug)]
struct State {
    mode: Mode,
    /// Counts subscriptions: outcomes of deliveries taken before the last restart say
    /// nothing of the restart.
    epoch: u64,
}

/// A kill switch at work on one endpoint: shared by its run loop, which stops and restarts
/// consuming, and its delivery tasks, which report each outcome.
#[derive(Debug)]
pub(crate) struct KillSwitchState {
    settings: KillSwitch,
    state: Mutex<State>,
    /// Bumped on every trip, to wake the run loop.
    trips: watch::Sender<u64>,
}

impl KillSwitchState {
    pub(crate) fn new(settings: KillSwitch) -> Self {
        KillSwitchState {
            settings,
            state: Mutex::new(State {
                mode: Mode::Closed { since: Instant::now(), attempts: 0, failures: 0 },
                epoch: 0,
            }),
            trips: watch::channel(0).0,
        }
    }

    pub(crate) fn settings(&self) -> &KillSwitch {
        &self.settings
    }

    /// The current subscription's number, for deliveries to report their outcome with.
    pub(crate) fn epoch(&self) -> u64 {
        self.state.locked().epoch
    }

    /// Why the switch is tripped, while it is.
    pub(crate) fn reason(&self) -> Option<String> {
        match &self.state.locked().mode {
            Mode::Tripped { reason } => Some(reason.clone()),
            _ => None,
        }
    }

    /// Whether the run loop must stop consuming now.
    pub(crate) fn is_tripped(&self) -> bool {
        matches!(self.state.locked().mode, Mode::Tripped { .. })
    }

    /// Resolves when the switch is tripped.
    pub(crate) async fn wait_tripped(&self) {
        let mut trips = self.trips.subscribe();
        loop {
            if self.is_tripped() {
                return;
            }
            if trips.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The run loop consumes again after the pause, on a new subscription.
    pub(crate) fn restart(&self) {
        let mut state = self.state.locked();
        state.mode = Mode::Restarting { successes: 0 };
        state.epoch += 1;
    }

    /// A message taken in subscription `epoch` was consumed.
    pub(crate) fn succeeded(&self, epoch: u64) {
        let mut state = self.state.locked();
        if state.epoch != epoch {
            return;
        }
        let activation = self.settings.activation_threshold;
        match &mut state.mode {
            Mode::Restarting { successes } => {
                *successes += 1;
                if *successes >= activation {
                    state.mode = Mode::Closed { since: Instant::now(), attempts: 0, failures: 0 };
                    tracing::info!("kill switch closed: the endpoint consumes as before");
                }
            }
            mode @ Mode::Closed { .. } => {
                self.count(mode, false);
            }
            Mode::Tripped { .. } => {}
        }
    }

    /// A message taken in subscription `epoch` failed its last attempt with `error`: what
    /// becomes of it.
    pub(crate) fn failed(&self, epoch: u64, error: &ConsumeError) -> Verdict {
        if error.kind() != ConsumeErrorKind::Failed {
            return Verdict::FailurePath;
        }
        let mut state = self.state.locked();
        if state.epoch != epoch {
            // Taken before the endpoint stopped: until the switch closes it waits, like the
            // rest of the queue, and says nothing of the restart.
            return match state.mode {
                Mode::Closed { .. } => Verdict::FailurePath,
                _ => Verdict::Requeue,
            };
        }
        let verdict = match &mut state.mode {
            mode @ Mode::Closed { .. } => {
                if !self.count(mode, true) {
                    return Verdict::FailurePath;
                }
                Verdict::Requeue
            }
            Mode::Tripped { .. } => return Verdict::Requeue,
            // The dependency answered since the restart: this message is at fault, not it.
            Mode::Restarting { successes } if *successes > 0 => return Verdict::FailurePath,
            Mode::Restarting { .. } => Verdict::ToBack,
        };
        let reason = format!("{}: {}", error.exception_type(), error.message());
        tracing::warn!(reason = %crate::logged::escaped(&reason, 1024), restart_after = ?self.settings.restart_after,
            "kill switch tripped: the endpoint stops consuming");
        state.mode = Mode::Tripped { reason };
        drop(state);
        self.trips.send_modify(|trips| *trips += 1);
        verdict
    }

    /// Counts an outcome while closed; whether it trips the switch.
    fn count(&self, mode: &mut Mode, failed: bool) -> bool {
        let Mode::Closed { since, attempts, failures } = mode else { return false };
        if since.elapsed() >= self.settings.tracking_period {
            (*since, *attempts, *failures) = (Instant::now(), 0, 0);
        }
        *attempts += 1;
        *failures += u32::from(failed);
        failed
            && *attempts >= self.settings.activation_threshold
            && f64::from(*failures) >= self.settings.trip_threshold * f64::from(*attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> ConsumeError {
        ConsumeError::new(ConsumeErrorKind::Failed, "PaymentsDown", "payment provider unavailable")
    }

    fn switch() -> KillSwitchState {
        KillSwitchState::new(KillSwitch::new().activation_threshold(4).trip_threshold(0.5))
    }

    #[test]
    fn trips_at_its_threshold_and_the_tripping_failure_waits_in_the_queue() {
        let switch = switch();
        switch.succeeded(0);
        assert_eq!(switch.failed(0, &failure()), Verdict::FailurePath);
        assert_eq!(switch.failed(0, &failure()), Verdict::FailurePath, "3 counted: not active yet");
        assert_eq!(switch.failed(0, &failure()), Verdict::Requeue, "3 of 4 failed: trips");
        assert!(switch.is_tripped());
        assert_eq!(switch.reason().as_deref(), Some("PaymentsDown: payment provider unavailable"));
        assert_eq!(switch.failed(0, &failure()), Verdict::Requeue, "tripped: the rest wait too");
    }

    #[test]
    fn permanent_errors_say_nothing_of_the_dependency() {
        let switch = switch();
        let permanent = ConsumeError::new(ConsumeErrorKind::Permanent, "Invalid", "no such order");
        for _ in 0..10 {
            assert_eq!(switch.failed(0, &permanent), Verdict::FailurePath);
        }
        assert!(!switch.is_tripped());
    }

    #[test]
    fn after_a_restart_a_failure_before_any_success_trips_again_and_goes_to_the_back() {
        let switch = switch();
        for _ in 0..4 {
            switch.failed(0, &failure());
        }
        switch.restart();
        assert!(!switch.is_tripped() && switch.reason().is_none(), "consuming again");
        assert_eq!(switch.failed(1, &failure()), Verdict::ToBack);
        assert!(switch.is_tripped());
    }

    #[test]
    fn after_a_restart_and_a_success_a_failing_message_takes_the_normal_path() {
        let switch = switch();
        for _ in 0..4 {
            switch.failed(0, &failure());
        }
        switch.restart();
        switch.succeeded(1);
        assert_eq!(
            switch.failed(1, &failure()),
            Verdict::FailurePath,
            "the dependency answers: the message is at fault"
        );
        assert!(!switch.is_tripped());
        for _ in 0..3 {
            switch.succeeded(1);
        }
        // Closed again: counting starts anew.
        assert_eq!(switch.failed(1, &failure()), Verdict::FailurePath);
        assert!(!switch.is_tripped());
    }

    #[test]
    fn outcomes_of_deliveries_taken_before_a_restart_do_not_decide_it() {
        let switch = switch();
        for _ in 0..4 {
            switch.failed(0, &failure());
        }
        switch.restart();
        assert_eq!(switch.failed(0, &failure()), Verdict::Requeue, "an old delivery, after its retries, waits");
        assert!(!switch.is_tripped(), "the restart is judged by its own deliveries");
        for _ in 0..4 {
            switch.succeeded(0);
        }
        assert_eq!(switch.failed(1, &failure()), Verdict::ToBack, "old successes did not close it either");
    }
}
