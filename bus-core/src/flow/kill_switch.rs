//! The kill switch: an endpoint that fails too often stops consuming for a while.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

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
/// - After [`restart_after`](Self::restart_after) it consumes again. The first failure trips
///   it again; that message goes to the back of the queue, so that a message failing by
///   itself cannot keep the endpoint stopped (one that fails a restart a second time takes
///   the normal path). `activation_threshold` successes close it.
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
        self.tracking_period = period.max(Duration::from_millis(1));
        self
    }

    /// How long the endpoint stops once tripped.
    pub fn restart_after(mut self, pause: Duration) -> Self {
        self.restart_after = pause;
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
    /// To the back of its queue: it failed while the endpoint restarted.
    ToBack,
}

#[derive(Debug)]
enum Mode {
    Closed { since: Instant, attempts: u32, failures: u32 },
    Tripped,
    Restarting { successes: u32 },
}

/// A kill switch at work on one endpoint: shared by its run loop, which stops and restarts
/// consuming, and its delivery tasks, which report each outcome.
#[derive(Debug)]
pub(crate) struct KillSwitchState {
    settings: KillSwitch,
    mode: Mutex<Mode>,
    /// The last trip's reason while tripped or restarting, `None` while closed.
    tripped: watch::Sender<Option<String>>,
    /// Messages that failed as the first of a restart, since the switch last closed: each
    /// goes to the back once, so that a message failing by itself (the queue's only one,
    /// say) ends in `_error` rather than stopping the endpoint again and again.
    probed: Mutex<HashSet<Uuid>>,
}

impl KillSwitchState {
    pub(crate) fn new(settings: KillSwitch) -> Self {
        KillSwitchState {
            settings,
            mode: Mutex::new(Mode::Closed { since: Instant::now(), attempts: 0, failures: 0 }),
            tripped: watch::channel(None).0,
            probed: Mutex::default(),
        }
    }

    pub(crate) fn settings(&self) -> &KillSwitch {
        &self.settings
    }

    /// Why the switch is tripped or restarting, if it is.
    pub(crate) fn reason(&self) -> Option<String> {
        self.tripped.borrow().clone()
    }

    /// Whether the run loop must stop consuming now.
    pub(crate) fn is_tripped(&self) -> bool {
        matches!(*self.mode.locked(), Mode::Tripped)
    }

    /// Resolves when the switch trips.
    pub(crate) async fn wait_tripped(&self) {
        let mut changes = self.tripped.subscribe();
        loop {
            if self.is_tripped() {
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The run loop consumes again after the pause.
    pub(crate) fn restart(&self) {
        *self.mode.locked() = Mode::Restarting { successes: 0 };
    }

    /// A message was consumed.
    pub(crate) fn succeeded(&self) {
        let mut mode = self.mode.locked();
        if let Mode::Restarting { successes } = &mut *mode {
            *successes += 1;
            if *successes >= self.settings.activation_threshold {
                *mode = Mode::Closed { since: Instant::now(), attempts: 0, failures: 0 };
                drop(mode);
                self.probed.locked().clear();
                tracing::info!("kill switch closed: the endpoint consumes as before");
                self.tripped.send_replace(None);
            }
            return;
        }
        self.count(&mut mode, false);
    }

    /// A message failed its last attempt with `error`: what becomes of it.
    pub(crate) fn failed(&self, message_id: Option<Uuid>, error: &ConsumeError) -> Verdict {
        if error.kind() != ConsumeErrorKind::Failed {
            return Verdict::FailurePath;
        }
        let mut mode = self.mode.locked();
        match &*mode {
            Mode::Closed { .. } => {
                if self.count(&mut mode, true) {
                    *mode = Mode::Tripped;
                    drop(mode);
                    self.trip(error);
                    Verdict::Requeue
                } else {
                    Verdict::FailurePath
                }
            }
            Mode::Tripped => Verdict::Requeue,
            Mode::Restarting { .. } => {
                *mode = Mode::Tripped;
                drop(mode);
                self.trip(error);
                // To the back, the first time; a message that fails a restart again takes
                // the normal path.
                match message_id {
                    Some(id) if !self.probed.locked().insert(id) => Verdict::FailurePath,
                    _ => Verdict::ToBack,
                }
            }
        }
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

    fn trip(&self, error: &ConsumeError) {
        let reason = format!("{}: {}", error.exception_type(), error.message());
        tracing::warn!(reason = %crate::logged::escaped(&reason, 1024), restart_after = ?self.settings.restart_after,
            "kill switch tripped: the endpoint stops consuming");
        self.tripped.send_replace(Some(reason));
    }
}
