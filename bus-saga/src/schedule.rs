//! Schedules: a message a saga sends itself later (a timeout), with its token kept in the
//! instance.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

type TokenField<S> = Arc<dyn Fn(&mut S) -> &mut Option<Uuid> + Send + Sync>;

/// A schedule of message `M` for instances of `S` (MassTransit's `Schedule`): how long after
/// it is started the message comes, and the field of the instance that keeps its token.
///
/// Start it with [`EventActivities::schedule`](crate::EventActivities::schedule), cancel it
/// with [`unschedule`](crate::EventActivities::unschedule), and declare its message as an
/// event with [`StateMachineBuilder::schedule`](crate::StateMachineBuilder::schedule). When
/// the message arrives, its token (header `MT-Scheduling-TokenId`) is compared with the one
/// kept: a message of a schedule since cancelled or started again is ignored, the current
/// one clears the token and is handled as any event.
///
/// ```
/// use std::time::Duration;
/// use bus_saga::Schedule;
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
/// # #[message(urn = "urn:message:Shop:OrderTimeout")] struct OrderTimeout { order_id: uuid::Uuid }
/// #[derive(Clone, Default)]
/// struct OrderState { timeout_token: Option<uuid::Uuid> }
///
/// let timeout = Schedule::<OrderState, OrderTimeout>::new(Duration::from_secs(30), |s| &mut s.timeout_token);
/// assert_eq!(timeout.delay(), Duration::from_secs(30));
/// ```
pub struct Schedule<S, M> {
    delay: Duration,
    token: TokenField<S>,
    _message: PhantomData<fn() -> M>,
}

impl<S, M> Clone for Schedule<S, M> {
    fn clone(&self) -> Self {
        Schedule { delay: self.delay, token: self.token.clone(), _message: PhantomData }
    }
}

impl<S, M> std::fmt::Debug for Schedule<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("message", &std::any::type_name::<M>())
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

impl<S, M> Schedule<S, M> {
    /// A schedule whose message comes `delay` after it is started, its token kept in the
    /// field `token` returns.
    pub fn new<F>(delay: Duration, token: F) -> Self
    where
        F: Fn(&mut S) -> &mut Option<Uuid> + Send + Sync + 'static,
    {
        Schedule { delay, token: Arc::new(token), _message: PhantomData }
    }

    /// How long after it is started the message comes.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The token the instance keeps, if the schedule is waiting.
    pub fn token(&self, data: &mut S) -> Option<Uuid> {
        *(self.token)(data)
    }

    pub(crate) fn take_token(&self, data: &mut S) -> Option<Uuid> {
        (self.token)(data).take()
    }

    pub(crate) fn set_token(&self, data: &mut S, token: Uuid) {
        *(self.token)(data) = Some(token);
    }
}
