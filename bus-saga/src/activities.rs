//! What happens when an event arrives: `when::<E>().then(..).publish(..).transition_to(..)`.

use std::sync::Arc;

use bus_core::{BoxError, Message, ReceiveContext, SendOptions};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::Value;
use uuid::Uuid;

use crate::instance::FINAL;
use crate::request::{Request, RequestTimeoutExpired};
use crate::schedule::Schedule;
use crate::{Error, SagaInstance};

/// How a produced message leaves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProducedKind {
    /// Published.
    Publish,
    /// Sent to an address.
    Send(String),
    /// Sent to the event's response address (or published when it has none).
    Respond,
    /// Sent to the saga's own endpoint when `due` comes, under `token` (a schedule, or a
    /// request's timeout).
    Schedule {
        /// When it is delivered.
        due: DateTime<Utc>,
        /// The token it is scheduled (and cancelled) under.
        token: Uuid,
    },
    /// Cancels what waits under this token (no message).
    CancelScheduled(Uuid),
    /// A request sent to an address, whose response and fault come back to the saga's
    /// endpoint carrying `request_id`, and the instance's id as their initiator id.
    Request {
        /// Where the request goes.
        address: String,
        /// The request id the response carries: new for each request.
        request_id: Uuid,
        /// The instance that sent it, the request's correlation id.
        correlation_id: Uuid,
    },
}

/// How a produced message leaves: through the consume's outbox, or at once (confirmed
/// before the call returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leave {
    WithTheConsume,
    AtOnce,
}

/// Sends a produced message, with the message id given.
pub(crate) type Dispatch =
    Box<dyn for<'a> FnOnce(&'a ReceiveContext, Uuid, Leave) -> BoxFuture<'a, bus_core::Result<()>> + Send>;

/// A message an event's activities produced (or a scheduled message to cancel); it leaves
/// only after the instance is saved.
pub struct Produced {
    /// How it leaves.
    pub kind: ProducedKind,
    /// Its URN (empty for [`ProducedKind::CancelScheduled`]).
    pub message_type: &'static str,
    /// Its message id. Consumed by a saga, it is derived from the event's message id, the
    /// saga and the message's place among those the transition produced: applied or sent
    /// again, the event produces the same ids, so receivers that keep the ids they saw take
    /// each message once.
    pub message_id: Uuid,
    /// The message as JSON, for inspection in tests.
    pub json: Value,
    pub(crate) dispatch: Dispatch,
}

impl std::fmt::Debug for Produced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Produced")
            .field("kind", &self.kind)
            .field("message_type", &self.message_type)
            .field("message_id", &self.message_id)
            .field("json", &self.json)
            .finish()
    }
}

impl Produced {
    /// Reads the produced message as `M`.
    pub fn message<M: Message>(&self) -> Option<M> {
        (self.message_type == M::message_type()).then(|| serde_json::from_value(self.json.clone()).ok()).flatten()
    }
}

/// What a run of activities produced so far, and where ids come from.
pub(crate) struct Effects {
    pub(crate) produced: Vec<Produced>,
    /// The event's message id and the name ids are derived under (`saga/event type`);
    /// without an id (a state machine applied by hand), ids are random.
    ids: Option<(Uuid, String)>,
}

impl Effects {
    pub(crate) fn new(ids: Option<(Uuid, String)>) -> Self {
        Effects { produced: Vec::new(), ids }
    }

    /// The id of the next produced item, with `suffix` to tell apart the ids one item needs:
    /// a name-based (v5) UUID of the event's id, the same whenever the event is applied again.
    fn next_id(&self, suffix: &str) -> Uuid {
        match &self.ids {
            Some((event_id, name)) => {
                let name = format!("{name}/{}{suffix}", self.produced.len());
                Uuid::new_v5(event_id, name.as_bytes())
            }
            None => Uuid::now_v7(),
        }
    }

    fn push<M: Message>(&mut self, kind: ProducedKind, message: M) -> Result<(), Error> {
        let json = serde_json::to_value(&message).map_err(|e| Error::Activity(Box::new(e)))?;
        let target = kind.clone();
        let dispatch: Dispatch = Box::new(move |ctx: &ReceiveContext, message_id, leave| {
            Box::pin(async move { self::dispatch(ctx, target, message_id, message, leave).await })
        });
        let message_id = self.next_id("");
        self.produced.push(Produced { kind, message_type: M::message_type(), message_id, json, dispatch });
        Ok(())
    }

    fn cancel(&mut self, token: Uuid) {
        let dispatch: Dispatch = Box::new(move |ctx: &ReceiveContext, _, _| {
            Box::pin(async move { ctx.cancel_scheduled(token).await.map(drop) })
        });
        let message_id = self.next_id("");
        self.produced.push(Produced {
            kind: ProducedKind::CancelScheduled(token),
            message_type: "",
            message_id,
            json: Value::Null,
            dispatch,
        });
    }

    /// The token of a schedule made now: derived from the event's id, so that the event
    /// applied again schedules under the same token, which replaces the first.
    fn next_token(&self) -> Uuid {
        self.next_id("/token")
    }
}

/// Sends `message` as `kind` says, with the message id it was given when produced.
async fn dispatch<M: Message>(
    ctx: &ReceiveContext,
    kind: ProducedKind,
    message_id: Uuid,
    message: M,
    leave: Leave,
) -> bus_core::Result<()> {
    let ctx = match leave {
        Leave::WithTheConsume => ctx.clone(),
        Leave::AtOnce => ctx.without_outbox(),
    };
    let options = SendOptions::new().message_id(message_id);
    match kind {
        ProducedKind::Publish => ctx.publish_with(message, options).await,
        ProducedKind::Send(address) => ctx.send_with(&address, message, options).await,
        // As `ConsumeContext::respond`, with the id.
        ProducedKind::Respond => {
            let mut options = options;
            options.request_id = ctx.request_id();
            match ctx.response_address() {
                Some(address) => ctx.send_with(address, message, options).await,
                None => ctx.publish_with(message, options).await,
            }
        }
        // Back to the endpoint the saga consumes on, as MassTransit schedules to the saga's
        // input address.
        ProducedKind::Schedule { due, token } => {
            let address = ctx.endpoint_name().to_owned();
            ctx.schedule_send_with(token, due, &address, message, options).await
        }
        ProducedKind::Request { address, request_id, correlation_id } => {
            // Its answers carry the request id, and the request's correlation id as their
            // initiator id (as MassTransit's and this bus's responders set it).
            let mut options = options
                .response_address(ctx.endpoint_address())
                .fault_address(ctx.endpoint_address())
                .correlation_id(correlation_id);
            options.request_id = Some(request_id);
            ctx.send_with(&address, message, options).await
        }
        ProducedKind::CancelScheduled(token) => ctx.cancel_scheduled(token).await.map(drop),
    }
}

/// Sends again a message a transition produced, from what was stored with its instance.
pub(crate) type Redispatch = Arc<
    dyn for<'a> Fn(&'a ReceiveContext, ProducedKind, Uuid, Value, Leave) -> BoxFuture<'a, Result<(), BoxError>>
        + Send
        + Sync,
>;

/// Sends again what was stored: a message of type `M`, or a cancellation.
pub(crate) fn redispatch<M: Message>() -> (&'static str, Redispatch) {
    let redispatch: Redispatch = Arc::new(|ctx, kind, message_id, json, leave| {
        Box::pin(async move {
            let message: M = serde_json::from_value(json)?;
            dispatch(ctx, kind, message_id, message, leave).await?;
            Ok(())
        })
    });
    (M::message_type(), redispatch)
}

type Then<S, E> = Arc<dyn Fn(&mut SagaInstance<S>, &E) + Send + Sync>;
type ThenAsync<S, E> =
    Arc<dyn for<'a> Fn(&'a mut SagaInstance<S>, &'a E) -> BoxFuture<'a, Result<(), BoxError>> + Send + Sync>;
type Produce<S, E> = Arc<dyn Fn(&mut SagaInstance<S>, &E, &mut Effects) -> Result<(), Error> + Send + Sync>;
type Condition<S, E> = Arc<dyn Fn(&SagaInstance<S>, &E) -> bool + Send + Sync>;
type Caught<S, E> = Arc<dyn Fn(&mut SagaInstance<S>, &E, &Error) + Send + Sync>;

pub(crate) enum Activity<S, E> {
    Then(Then<S, E>),
    ThenAsync(ThenAsync<S, E>),
    Produce(Produce<S, E>),
    TransitionTo(String),
    If(Condition<S, E>, Vec<Activity<S, E>>, Vec<Activity<S, E>>),
    /// Runs the first list; an error in it runs the second instead of failing the event.
    Catch(Vec<Activity<S, E>>, Vec<Activity<S, E>>),
    /// In a catch's handler: sees the error caught.
    Caught(Caught<S, E>),
}

impl<S, E> Clone for Activity<S, E> {
    fn clone(&self) -> Self {
        match self {
            Activity::Then(f) => Activity::Then(f.clone()),
            Activity::ThenAsync(f) => Activity::ThenAsync(f.clone()),
            Activity::Produce(f) => Activity::Produce(f.clone()),
            Activity::TransitionTo(s) => Activity::TransitionTo(s.clone()),
            Activity::If(c, a, b) => Activity::If(c.clone(), a.clone(), b.clone()),
            Activity::Catch(a, b) => Activity::Catch(a.clone(), b.clone()),
            Activity::Caught(f) => Activity::Caught(f.clone()),
        }
    }
}

impl<S, E> Activity<S, E> {
    /// Every state the activities (and those nested in them) may move to.
    pub(crate) fn targets<'a>(activities: &'a [Activity<S, E>], out: &mut Vec<&'a str>) {
        for activity in activities {
            match activity {
                Activity::TransitionTo(state) => out.push(state),
                Activity::If(_, a, b) | Activity::Catch(a, b) => {
                    Activity::targets(a, out);
                    Activity::targets(b, out);
                }
                _ => {}
            }
        }
    }
}

/// The activities run when event `E` arrives, in order. Start with [`when`]; activities run
/// when an instance enters or leaves a state are `EventActivities<S, ()>`.
pub struct EventActivities<S, E> {
    pub(crate) activities: Vec<Activity<S, E>>,
    /// How to send each type of message the activities produce again, from stored JSON.
    pub(crate) redispatch: Vec<(&'static str, Redispatch)>,
}

impl<S, E> std::fmt::Debug for EventActivities<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventActivities")
            .field("event", &std::any::type_name::<E>())
            .field("activities", &self.activities.len())
            .finish()
    }
}

/// The start of an event's activities, as MassTransit's `When(Event)`.
pub fn when<S, E: Message>() -> EventActivities<S, E> {
    EventActivities::empty()
}

impl<S, E> EventActivities<S, E> {
    pub(crate) fn empty() -> Self {
        EventActivities { activities: Vec::new(), redispatch: Vec::new() }
    }

    /// The activities a nested builder (`if_then`, `catch`) added to an empty list.
    fn nested(&mut self, build: impl FnOnce(Self) -> Self) -> Vec<Activity<S, E>> {
        let nested = build(Self::empty());
        self.redispatch.extend(nested.redispatch);
        nested.activities
    }
}

impl<S: Send + Sync + 'static, E: Send + Sync + 'static> EventActivities<S, E> {
    /// Changes the instance.
    pub fn then(mut self, f: impl Fn(&mut SagaInstance<S>, &E) + Send + Sync + 'static) -> Self {
        self.activities.push(Activity::Then(Arc::new(f)));
        self
    }

    /// A custom async activity; an error fails the message (and it is retried by policy),
    /// unless a [`catch`](Self::catch) after it handles it.
    pub fn then_async<F>(mut self, f: F) -> Self
    where
        F: for<'a> Fn(&'a mut SagaInstance<S>, &'a E) -> BoxFuture<'a, Result<(), BoxError>> + Send + Sync + 'static,
    {
        self.activities.push(Activity::ThenAsync(Arc::new(f)));
        self
    }

    fn produce<M: Message>(
        mut self,
        kind: impl Fn() -> ProducedKind + Send + Sync + 'static,
        f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static,
    ) -> Self {
        self.activities.push(Activity::Produce(Arc::new(move |i, e, effects| effects.push(kind(), f(i, e)))));
        self.redispatch.push(redispatch::<M>());
        self
    }

    /// Publishes a message built from the instance and the event.
    pub fn publish<M: Message>(self, f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static) -> Self {
        self.produce(|| ProducedKind::Publish, f)
    }

    /// Sends a message built from the instance and the event to `address`.
    pub fn send<M: Message>(
        self,
        address: impl Into<String>,
        f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static,
    ) -> Self {
        let address = address.into();
        self.produce(move || ProducedKind::Send(address.clone()), f)
    }

    /// Responds to the event (a request) with a message built from the instance and the event.
    pub fn respond<M: Message>(self, f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static) -> Self {
        self.produce(|| ProducedKind::Respond, f)
    }

    /// Moves the instance to `state` (a name, or a value of your state enum that is
    /// `AsRef<str>`), running what the machine does when it leaves its state and enters the
    /// new one. [`build`](crate::StateMachineBuilder::build) refuses a state not declared.
    pub fn transition_to(mut self, state: impl AsRef<str>) -> Self {
        self.activities.push(Activity::TransitionTo(state.as_ref().to_owned()));
        self
    }

    /// Moves the instance to the final state; with "completed when finalized" it is deleted.
    pub fn finalize(self) -> Self {
        self.transition_to(FINAL)
    }

    /// Runs `then`'s activities only when `condition` holds (MassTransit's `If`).
    ///
    /// ```
    /// # use bus_saga::when;
    /// # #[derive(Clone, Default)] struct Order { total: u32, review: bool }
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
    /// # #[message(urn = "urn:message:Shop:Placed")] struct Placed { total: u32 }
    /// let placed = when::<Order, Placed>()
    ///     .then(|order, placed| order.data.total = placed.total)
    ///     .if_then(|order, _| order.data.total > 1000, |big| big.then(|order, _| order.data.review = true));
    /// # let _ = placed;
    /// ```
    pub fn if_then(
        self,
        condition: impl Fn(&SagaInstance<S>, &E) -> bool + Send + Sync + 'static,
        then: impl FnOnce(Self) -> Self,
    ) -> Self {
        self.if_else(condition, then, |otherwise| otherwise)
    }

    /// Runs `then`'s activities when `condition` holds, else `otherwise`'s (MassTransit's
    /// `IfElse`).
    pub fn if_else(
        mut self,
        condition: impl Fn(&SagaInstance<S>, &E) -> bool + Send + Sync + 'static,
        then: impl FnOnce(Self) -> Self,
        otherwise: impl FnOnce(Self) -> Self,
    ) -> Self {
        let then = self.nested(then);
        let otherwise = self.nested(otherwise);
        self.activities.push(Activity::If(Arc::new(condition), then, otherwise));
        self
    }

    /// Handles an error of the activities before it (MassTransit's `Catch`): instead of
    /// failing the event, `handler`'s activities run (a transition to a failed state, a
    /// published fault event), and the activities after the catch go on. What the failed
    /// activities changed and produced before the error stays; see
    /// [`then_caught`](Self::then_caught) for the error itself.
    ///
    /// ```
    /// # use bus_saga::when;
    /// # #[derive(Clone, Default)] struct Payment { error: Option<String> }
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
    /// # #[message(urn = "urn:message:Shop:Charge")] struct Charge;
    /// let charge = when::<Payment, Charge>()
    ///     .then_async(|_, _| Box::pin(async { Err("card declined".into()) }))
    ///     .transition_to("Charged")
    ///     .catch(|failed| failed.then_caught(|p, _, error| p.data.error = Some(error.to_string())).transition_to("Declined"));
    /// # let _ = charge;
    /// ```
    pub fn catch(mut self, handler: impl FnOnce(Self) -> Self) -> Self {
        let handler = self.nested(handler);
        let body = std::mem::take(&mut self.activities);
        self.activities.push(Activity::Catch(body, handler));
        self
    }

    /// In a [`catch`](Self::catch) handler: changes the instance knowing the error.
    /// Outside one it does nothing.
    pub fn then_caught(mut self, f: impl Fn(&mut SagaInstance<S>, &E, &Error) + Send + Sync + 'static) -> Self {
        self.activities.push(Activity::Caught(Arc::new(f)));
        self
    }

    /// Schedules the message `f` builds to the saga's own endpoint after `schedule`'s delay,
    /// keeping its token in the instance (MassTransit's `Schedule`). Scheduled again while one
    /// waits, the earlier one is cancelled. Needs a scheduler on the bus
    /// ([`BusBuilder::scheduler`](bus_core::BusBuilder::scheduler)).
    pub fn schedule<M: Message>(
        mut self,
        schedule: &Schedule<S, M>,
        f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static,
    ) -> Self {
        let schedule = schedule.clone();
        self.activities.push(Activity::Produce(Arc::new(move |instance, event, effects| {
            if let Some(previous) = schedule.take_token(&mut instance.data) {
                effects.cancel(previous);
            }
            let token = effects.next_token();
            schedule.set_token(&mut instance.data, token);
            let due = bus_core::DueTime::from(schedule.delay()).time();
            effects.push(ProducedKind::Schedule { due, token }, f(instance, event))
        })));
        self.redispatch.push(redispatch::<M>());
        self
    }

    /// Cancels `schedule`'s message if one waits, and forgets its token (MassTransit's
    /// `Unschedule`).
    pub fn unschedule<M: Message>(mut self, schedule: &Schedule<S, M>) -> Self {
        let schedule = schedule.clone();
        self.activities.push(Activity::Produce(Arc::new(move |instance, _, effects| {
            if let Some(token) = schedule.take_token(&mut instance.data) {
                effects.cancel(token);
            }
            Ok(())
        })));
        self
    }

    /// Sends the request `f` builds to `request`'s service, keeping its request id in the
    /// instance and scheduling its timeout (MassTransit's `Request`). Its response `R`, its
    /// `Fault<Q>` and its [`RequestTimeoutExpired<Q>`] come back to the saga as events
    /// declared by [`StateMachineBuilder::request`](crate::StateMachineBuilder::request).
    pub fn request<Q: Message, R: Message>(
        mut self,
        request: &Request<S, Q, R>,
        f: impl Fn(&SagaInstance<S>, &E) -> Q + Send + Sync + 'static,
    ) -> Self {
        let request = request.clone();
        self.activities.push(Activity::Produce(Arc::new(move |instance, event, effects| {
            // A new id for each request (derived from the event's, the same if the event is
            // applied again), so that an answer to an earlier one is told apart.
            let request_id = effects.next_token();
            request.set_request_id(&mut instance.data, request_id);
            let (address, correlation_id) = (request.service_address().to_owned(), instance.correlation_id);
            effects.push(ProducedKind::Request { address, request_id, correlation_id }, f(instance, event))?;
            if let Some(timeout) = request.timeout_after() {
                let due = bus_core::DueTime::from(timeout).time();
                let token = request.timeout_token(request_id);
                let expired = RequestTimeoutExpired::<Q>::new(instance.correlation_id, request_id);
                effects.push(ProducedKind::Schedule { due, token }, expired)?;
            }
            Ok(())
        })));
        self.redispatch.push(redispatch::<Q>());
        self.redispatch.push(redispatch::<RequestTimeoutExpired<Q>>());
        self
    }
}

/// Cancels a waiting request timeout (a response or fault came first).
pub(crate) fn cancel_timeout(effects: &mut Effects, token: Uuid) {
    effects.cancel(token);
}
