//! What happens when an event arrives: `when::<E>().then(..).publish(..).transition_to(..)`.

use std::sync::Arc;

use bus_core::{BoxError, ConsumeContext, Message, SendOptions};
use futures::future::BoxFuture;
use serde_json::Value;
use uuid::Uuid;

use crate::instance::FINAL;
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
}

/// How a produced message leaves: through the consume's outbox, or at once (confirmed
/// before the call returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leave {
    WithTheConsume,
    AtOnce,
}

/// Sends a produced message, with the message id given.
pub(crate) type Dispatch<E> =
    Box<dyn for<'a> FnOnce(&'a ConsumeContext<E>, Uuid, Leave) -> BoxFuture<'a, bus_core::Result<()>> + Send>;

/// A message an event's activities produced; it leaves only after the instance is saved.
pub struct Produced<E> {
    /// How it leaves.
    pub kind: ProducedKind,
    /// Its URN.
    pub message_type: &'static str,
    /// Its message id. Consumed by a saga, it is derived from the event's message id, the
    /// saga and the message's place among those the transition produced: applied or sent
    /// again, the event produces the same ids, so receivers that keep the ids they saw take
    /// each message once.
    pub message_id: Uuid,
    /// The message as JSON, for inspection in tests.
    pub json: Value,
    pub(crate) dispatch: Dispatch<E>,
}

impl<E> std::fmt::Debug for Produced<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Produced")
            .field("kind", &self.kind)
            .field("message_type", &self.message_type)
            .field("message_id", &self.message_id)
            .field("json", &self.json)
            .finish()
    }
}

impl<E> Produced<E> {
    /// Reads the produced message as `M`.
    pub fn message<M: Message>(&self) -> Option<M> {
        (self.message_type == M::message_type()).then(|| serde_json::from_value(self.json.clone()).ok()).flatten()
    }
}

type Then<S, E> = Arc<dyn Fn(&mut SagaInstance<S>, &E) + Send + Sync>;
type ThenAsync<S, E> =
    Arc<dyn for<'a> Fn(&'a mut SagaInstance<S>, &'a E) -> BoxFuture<'a, Result<(), BoxError>> + Send + Sync>;
type Produce<S, E> = Arc<dyn Fn(&SagaInstance<S>, &E) -> Result<Produced<E>, Error> + Send + Sync>;

pub(crate) enum Activity<S, E> {
    Then(Then<S, E>),
    ThenAsync(ThenAsync<S, E>),
    Produce(Produce<S, E>),
    TransitionTo(String),
}

impl<S, E> Clone for Activity<S, E> {
    fn clone(&self) -> Self {
        match self {
            Activity::Then(f) => Activity::Then(f.clone()),
            Activity::ThenAsync(f) => Activity::ThenAsync(f.clone()),
            Activity::Produce(f) => Activity::Produce(f.clone()),
            Activity::TransitionTo(s) => Activity::TransitionTo(s.clone()),
        }
    }
}

/// The activities run when event `E` arrives, in order. Start with [`when`].
pub struct EventActivities<S, E> {
    pub(crate) activities: Vec<Activity<S, E>>,
    /// How to send each type of message the activities produce again, from stored JSON.
    pub(crate) redispatch: Vec<(&'static str, Redispatch<E>)>,
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
    EventActivities { activities: Vec::new(), redispatch: Vec::new() }
}

/// Sends `message` as `kind` says, with the message id it was given when produced.
async fn dispatch<E: Message, M: Message>(
    ctx: &ConsumeContext<E>,
    kind: ProducedKind,
    message_id: Uuid,
    message: M,
    leave: Leave,
) -> bus_core::Result<()> {
    let ctx = match leave {
        Leave::WithTheConsume => ctx.receive_context().clone(),
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
    }
}

fn produced<E: Message, M: Message>(kind: ProducedKind, message: M) -> Result<Produced<E>, Error> {
    let json = serde_json::to_value(&message).map_err(|e| Error::Activity(Box::new(e)))?;
    let target = kind.clone();
    let dispatch: Dispatch<E> = Box::new(move |ctx: &ConsumeContext<E>, message_id, leave| {
        Box::pin(async move { self::dispatch(ctx, target, message_id, message, leave).await })
    });
    // The saga runtime gives it an id derived from the event's, the same whenever the event
    // is applied again; a new one stands in until then.
    Ok(Produced { kind, message_type: M::message_type(), message_id: Uuid::now_v7(), json, dispatch })
}

/// Sends again a message event `E` produced, from what was stored with its instance.
pub(crate) type Redispatch<E> = Arc<
    dyn for<'a> Fn(&'a ConsumeContext<E>, ProducedKind, Uuid, Value, Leave) -> BoxFuture<'a, Result<(), BoxError>>
        + Send
        + Sync,
>;

fn redispatch<E: Message, M: Message>() -> (&'static str, Redispatch<E>) {
    let redispatch: Redispatch<E> = Arc::new(|ctx, kind, message_id, json, leave| {
        Box::pin(async move {
            let message: M = serde_json::from_value(json)?;
            dispatch(ctx, kind, message_id, message, leave).await?;
            Ok(())
        })
    });
    (M::message_type(), redispatch)
}

impl<S: Send + Sync + 'static, E: Message> EventActivities<S, E> {
    /// Changes the instance.
    pub fn then(mut self, f: impl Fn(&mut SagaInstance<S>, &E) + Send + Sync + 'static) -> Self {
        self.activities.push(Activity::Then(Arc::new(f)));
        self
    }

    /// A custom async activity; an error fails the message (and it is retried by policy).
    pub fn then_async<F>(mut self, f: F) -> Self
    where
        F: for<'a> Fn(&'a mut SagaInstance<S>, &'a E) -> BoxFuture<'a, Result<(), BoxError>> + Send + Sync + 'static,
    {
        self.activities.push(Activity::ThenAsync(Arc::new(f)));
        self
    }

    /// Publishes a message built from the instance and the event.
    pub fn publish<M: Message>(mut self, f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static) -> Self {
        self.activities.push(Activity::Produce(Arc::new(move |i, e| produced(ProducedKind::Publish, f(i, e)))));
        self.redispatch.push(redispatch::<E, M>());
        self
    }

    /// Sends a message built from the instance and the event to `address`.
    pub fn send<M: Message>(
        mut self,
        address: impl Into<String>,
        f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static,
    ) -> Self {
        let address = address.into();
        self.activities
            .push(Activity::Produce(Arc::new(move |i, e| produced(ProducedKind::Send(address.clone()), f(i, e)))));
        self.redispatch.push(redispatch::<E, M>());
        self
    }

    /// Responds to the event (a request) with a message built from the instance and the event.
    pub fn respond<M: Message>(mut self, f: impl Fn(&SagaInstance<S>, &E) -> M + Send + Sync + 'static) -> Self {
        self.activities.push(Activity::Produce(Arc::new(move |i, e| produced(ProducedKind::Respond, f(i, e)))));
        self.redispatch.push(redispatch::<E, M>());
        self
    }

    /// Moves the instance to `state`.
    pub fn transition_to(mut self, state: impl Into<String>) -> Self {
        self.activities.push(Activity::TransitionTo(state.into()));
        self
    }

    /// Moves the instance to the final state; with "completed when finalized" it is deleted.
    pub fn finalize(self) -> Self {
        self.transition_to(FINAL)
    }
}
