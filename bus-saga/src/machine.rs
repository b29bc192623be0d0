//! The state machine: states, events with their correlation, and behaviour per state.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{BoxError, ConsumeContext, Endpoint, Message};
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::activities::{Activity, EventActivities, Produced, Redispatch};
use crate::instance::{FINAL, INITIAL};
use crate::runtime::{SagaEventConsumer, SagaRuntime};
use crate::{Error, SagaData, SagaInstance};

/// Custom handling of an event whose instance is missing.
pub type MissingHandler<E> =
    Arc<dyn for<'a> Fn(&'a ConsumeContext<E>) -> BoxFuture<'a, Result<(), BoxError>> + Send + Sync>;

/// What to do with an event whose instance does not exist (and that does not create one).
pub enum MissingInstance<E> {
    /// Move the message to `_skipped` (the default).
    Skip,
    /// Acknowledge it and do nothing.
    Discard,
    /// Fail it: retries, then `_error` and a fault.
    Fault,
    /// Run custom code.
    Execute(MissingHandler<E>),
}

impl<E> std::fmt::Debug for MissingInstance<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MissingInstance::Skip => "Skip",
            MissingInstance::Discard => "Discard",
            MissingInstance::Fault => "Fault",
            MissingInstance::Execute(_) => "Execute",
        })
    }
}

pub(crate) struct EventDefinition<E> {
    pub(crate) correlate: Box<dyn Fn(&E) -> Uuid + Send + Sync>,
    pub(crate) missing: MissingInstance<E>,
}

type Registration<S> = Arc<dyn Fn(Endpoint, Arc<SagaRuntime<S>>) -> Endpoint + Send + Sync>;

/// What an event did to an instance; see [`StateMachine::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new instance was created.
    Created,
    /// An existing instance changed.
    Updated,
    /// The instance reached the final state and is to be deleted.
    Completed,
    /// The event is ignored in the instance's state: nothing changes.
    Ignored,
    /// No instance and the event does not create one: the missing-instance policy applies.
    Missing,
}

/// A saved transition, as told to [`StateMachineBuilder::on_transition`] hooks.
#[derive(Debug, Clone)]
pub struct TransitionRecord {
    /// The saga's name.
    pub saga: String,
    /// The instance.
    pub id: Uuid,
    /// The event's URN.
    pub event: &'static str,
    /// The state before.
    pub begin_state: String,
    /// Every state the event moved the instance through, in order (the last is the end state).
    pub path: Vec<String>,
    /// What happened.
    pub outcome: Outcome,
}

type TransitionHook = Arc<dyn Fn(&TransitionRecord) + Send + Sync>;

/// The result of applying one event, before anything is saved or sent.
#[derive(Debug)]
pub struct Transition<S, E> {
    /// The instance after the event (for `Missing`, a fresh one that is not saved).
    pub instance: SagaInstance<S>,
    /// The state before the event (`Initial` for a new instance).
    pub begin_state: String,
    /// Every state the event moved the instance through, in order.
    pub path: Vec<String>,
    /// What happened.
    pub outcome: Outcome,
    /// Messages to publish, send or respond once the instance is saved.
    pub produced: Vec<Produced<E>>,
}

/// A saga's state machine, built like MassTransit's `MassTransitStateMachine<T>`.
///
/// ```
/// use bus_saga::{when, StateMachine, Outcome};
/// use bus_core::Message;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// #[serde(rename_all = "camelCase")]
/// struct DoorState { opened: u32 }
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[message(urn = "urn:message:Doors:Open")]
/// struct Open { door: uuid::Uuid }
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[message(urn = "urn:message:Doors:Close")]
/// struct Close { door: uuid::Uuid }
///
/// let machine = StateMachine::<DoorState>::builder("DoorState")
///     .states(["Opened", "Closed"])
///     .event::<Open>(|m| m.door)
///     .event::<Close>(|m| m.door)
///     .initially(when::<DoorState, Open>().then(|door, _| door.data.opened += 1).transition_to("Opened"))
///     .during("Opened", when::<DoorState, Close>().transition_to("Closed"))
///     .during("Closed", when::<DoorState, Open>().then(|door, _| door.data.opened += 1).transition_to("Opened"))
///     .build();
///
/// # tokio_test(async {
/// let door = uuid::Uuid::now_v7();
/// let opened = machine.apply(None, &Open { door }).await.unwrap();
/// assert_eq!((opened.outcome, opened.instance.current_state.as_str()), (Outcome::Created, "Opened"));
/// let closed = machine.apply(Some(opened.instance), &Close { door }).await.unwrap();
/// assert_eq!(closed.instance.current_state, "Closed");
/// // Close is not accepted while closed:
/// assert!(machine.apply(Some(closed.instance), &Close { door }).await.is_err());
/// # });
/// # fn tokio_test(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub struct StateMachine<S> {
    name: String,
    states: Vec<String>,
    events: HashMap<&'static str, Arc<dyn Any + Send + Sync>>,
    initially: HashMap<&'static str, Arc<dyn Any + Send + Sync>>,
    during: HashMap<String, HashMap<&'static str, Arc<dyn Any + Send + Sync>>>,
    during_any: HashMap<&'static str, Arc<dyn Any + Send + Sync>>,
    ignored: HashSet<(String, &'static str)>,
    completed_when_finalized: bool,
    conflict_attempts: u32,
    duplicate_window: usize,
    keep_finalized_for: Duration,
    registrations: Vec<Registration<S>>,
    hooks: Vec<TransitionHook>,
    /// Per event and produced message type: how to send the message again from stored JSON
    /// (a [`Redispatch<E>`]).
    redispatch: HashMap<(&'static str, &'static str), Arc<dyn Any + Send + Sync>>,
}

impl<S> std::fmt::Debug for StateMachine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("name", &self.name)
            .field("states", &self.states)
            .field("events", &self.events.keys().collect::<Vec<_>>())
            .field("completed_when_finalized", &self.completed_when_finalized)
            .finish()
    }
}

/// Applied events stored per instance unless [`StateMachineBuilder::duplicate_window`] says
/// otherwise.
pub const DEFAULT_DUPLICATE_WINDOW: usize = 10;

/// How long a finalized instance whose last messages could not leave is kept, unless
/// [`StateMachineBuilder::keep_finalized_for`] says otherwise: one day.
pub const DEFAULT_KEEP_FINALIZED_FOR: Duration = Duration::from_secs(24 * 3600);

/// Builds a [`StateMachine`].
pub struct StateMachineBuilder<S> {
    machine: StateMachine<S>,
}

impl<S> std::fmt::Debug for StateMachineBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.machine.fmt(f)
    }
}

struct Behavior<S, E> {
    activities: Vec<Activity<S, E>>,
}

impl<S: SagaData> StateMachine<S> {
    /// Keeps event `E`'s activities (erased) and how to send again what they produce.
    fn erase<E: Message>(&mut self, activities: EventActivities<S, E>) -> Arc<dyn Any + Send + Sync> {
        for (message_type, redispatch) in activities.redispatch {
            self.redispatch.insert((E::message_type(), message_type), Arc::new(redispatch));
        }
        Arc::new(Behavior { activities: activities.activities })
    }

    /// How to send again a message of type `message_type` that event `E` produced.
    pub(crate) fn redispatcher<E: Message>(&self, message_type: &str) -> Option<&Redispatch<E>> {
        self.redispatch
            .iter()
            .find(|((event, produced), _)| *event == E::message_type() && *produced == message_type)
            .and_then(|(_, redispatch)| redispatch.downcast_ref::<Redispatch<E>>())
    }
}

impl<S: SagaData> StateMachine<S> {
    /// Starts a state machine for instances named `name` (its endpoint's default name, as
    /// MassTransit names a saga's endpoint after its instance type, e.g. `OrderState`).
    pub fn builder(name: impl Into<String>) -> StateMachineBuilder<S> {
        StateMachineBuilder {
            machine: StateMachine {
                name: name.into(),
                states: vec![INITIAL.to_owned(), FINAL.to_owned()],
                events: HashMap::new(),
                initially: HashMap::new(),
                during: HashMap::new(),
                during_any: HashMap::new(),
                ignored: HashSet::new(),
                completed_when_finalized: true,
                conflict_attempts: 25,
                duplicate_window: DEFAULT_DUPLICATE_WINDOW,
                keep_finalized_for: DEFAULT_KEEP_FINALIZED_FOR,
                registrations: Vec::new(),
                hooks: Vec::new(),
                redispatch: HashMap::new(),
            },
        }
    }

    /// The instance type's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The declared states, `Initial` and `Final` first.
    pub fn states(&self) -> &[String] {
        &self.states
    }

    /// Whether finalized instances are deleted.
    pub fn completed_when_finalized(&self) -> bool {
        self.completed_when_finalized
    }

    pub(crate) fn conflict_attempts(&self) -> u32 {
        self.conflict_attempts
    }

    pub(crate) fn duplicate_window(&self) -> usize {
        self.duplicate_window
    }

    pub(crate) fn keep_finalized_for(&self) -> Duration {
        self.keep_finalized_for
    }

    pub(crate) fn registrations(&self) -> &[Registration<S>] {
        &self.registrations
    }

    pub(crate) fn notify(&self, record: &TransitionRecord) {
        for hook in &self.hooks {
            hook(record);
        }
    }

    pub(crate) fn event<E: Message>(&self) -> Option<&EventDefinition<E>> {
        self.events.get(E::message_type()).and_then(|d| d.downcast_ref::<EventDefinition<E>>())
    }

    /// The instance id event `E` correlates to.
    pub fn correlate<E: Message>(&self, event: &E) -> Option<Uuid> {
        self.event::<E>().map(|d| (d.correlate)(event))
    }

    fn behavior<E: Message>(&self, state: &str) -> Option<&Behavior<S, E>> {
        let urn = E::message_type();
        let found = if state == INITIAL {
            self.initially.get(urn)
        } else if state == FINAL {
            // A finalized instance (kept when not completed) takes no more events.
            self.during.get(state).and_then(|b| b.get(urn))
        } else {
            self.during.get(state).and_then(|b| b.get(urn)).or_else(|| self.during_any.get(urn))
        };
        found.and_then(|b| b.downcast_ref::<Behavior<S, E>>())
    }

    /// Applies an event to an instance (`None`: it does not exist), without saving or sending
    /// anything: the state machine alone, testable without a broker or repository.
    pub async fn apply<E: Message>(
        &self,
        instance: Option<SagaInstance<S>>,
        event: &E,
    ) -> Result<Transition<S, E>, Error> {
        let id = self.correlate(event).unwrap_or_else(Uuid::nil);
        let (mut instance, created) = match instance {
            Some(instance) => (instance, false),
            None => (SagaInstance::new(id, S::default()), true),
        };
        let begin_state = instance.current_state.clone();
        let Some(behavior) = self.behavior::<E>(&begin_state) else {
            let outcome = if created {
                Outcome::Missing
            } else if self.ignored.contains(&(begin_state.clone(), E::message_type()))
                || self.ignored.contains(&("*".to_owned(), E::message_type()))
            {
                Outcome::Ignored
            } else {
                return Err(Error::NotAccepted { id, state: begin_state, event: E::message_type() });
            };
            return Ok(Transition { instance, begin_state, path: Vec::new(), outcome, produced: Vec::new() });
        };
        let mut produced = Vec::new();
        let mut path = Vec::new();
        for activity in &behavior.activities {
            match activity {
                Activity::Then(f) => f(&mut instance, event),
                Activity::ThenAsync(f) => f(&mut instance, event).await.map_err(Error::Activity)?,
                Activity::Produce(f) => produced.push(f(&instance, event)?),
                Activity::TransitionTo(state) => {
                    instance.current_state.clone_from(state);
                    path.push(state.clone());
                }
            }
        }
        let outcome = if instance.current_state == FINAL && self.completed_when_finalized {
            Outcome::Completed
        } else if created {
            Outcome::Created
        } else {
            Outcome::Updated
        };
        Ok(Transition { instance, begin_state, path, outcome, produced })
    }
}

impl<S: SagaData> StateMachineBuilder<S> {
    /// Declares states (in order, after `Initial` and `Final`).
    pub fn states<I: IntoIterator<Item = T>, T: Into<String>>(mut self, states: I) -> Self {
        for state in states {
            let state = state.into();
            if !self.machine.states.contains(&state) {
                self.machine.states.push(state);
            }
        }
        self
    }

    /// Declares event `E`, correlated to an instance by `correlate` (MassTransit's `CorrelateById`).
    /// A missing instance for a non-initial `E` is skipped.
    pub fn event<E: Message>(self, correlate: impl Fn(&E) -> Uuid + Send + Sync + 'static) -> Self {
        self.event_with(correlate, MissingInstance::Skip)
    }

    /// Declares event `E` with what to do when its instance is missing.
    pub fn event_with<E: Message>(
        mut self,
        correlate: impl Fn(&E) -> Uuid + Send + Sync + 'static,
        missing: MissingInstance<E>,
    ) -> Self {
        let definition = EventDefinition { correlate: Box::new(correlate), missing };
        self.machine.events.insert(E::message_type(), Arc::new(definition));
        self.machine.registrations.push(Arc::new(|endpoint: Endpoint, runtime: Arc<SagaRuntime<S>>| {
            endpoint.consumer(SagaEventConsumer::<S, E>::new(runtime))
        }));
        self
    }

    /// What events do to a new instance (MassTransit's `Initially`).
    pub fn initially<E: Message>(mut self, activities: EventActivities<S, E>) -> Self {
        let behavior = self.machine.erase(activities);
        self.machine.initially.insert(E::message_type(), behavior);
        self
    }

    /// What an event does in `state` (MassTransit's `During`).
    pub fn during<E: Message>(mut self, state: &str, activities: EventActivities<S, E>) -> Self {
        let behavior = self.machine.erase(activities);
        self.machine.during.entry(state.to_owned()).or_default().insert(E::message_type(), behavior);
        self
    }

    /// What an event does in any state but `Initial` and `Final` (MassTransit's `DuringAny`).
    pub fn during_any<E: Message>(mut self, activities: EventActivities<S, E>) -> Self {
        let behavior = self.machine.erase(activities);
        self.machine.during_any.insert(E::message_type(), behavior);
        self
    }

    /// Event `E` is acknowledged without effect in `state` (`"*"`: in every state).
    pub fn ignore<E: Message>(mut self, state: &str) -> Self {
        self.machine.ignored.insert((state.to_owned(), E::message_type()));
        self
    }

    /// Whether instances are deleted when they reach the final state (default: yes).
    pub fn completed_when_finalized(mut self, completed: bool) -> Self {
        self.machine.completed_when_finalized = completed;
        self
    }

    /// How many times an event is run again after a concurrency conflict before it fails
    /// (and goes through the endpoint's retry policy). Default 25.
    pub fn conflict_attempts(mut self, attempts: u32) -> Self {
        self.machine.conflict_attempts = attempts.max(1);
        self
    }

    /// How many of an instance's latest applied events are stored with it, each with the
    /// messages its transition produced (default 10). One of them delivered again sends its
    /// messages again, with the same ids, instead of being applied to a state the instance
    /// has moved past; an older one is applied as a new event (and usually not accepted in
    /// the current state, so it ends in `_error`). As MassTransit's duplicate detection
    /// window, but counted in events; 0 keeps none. Larger windows store more per instance.
    ///
    /// ```
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct S;
    /// let machine = bus_saga::StateMachine::<S>::builder("OrderState").duplicate_window(50).build();
    /// # let _ = machine;
    /// ```
    pub fn duplicate_window(mut self, events: usize) -> Self {
        self.machine.duplicate_window = events;
        self
    }

    /// How long an instance finalized by an event whose messages could not all leave (the
    /// broker refused them, or was out of reach) is kept, so that the event, delivered again
    /// (redelivered, or moved back from `_error`), finds what it produced and sends it: the
    /// instance is deleted as soon as they have left, and the repository drops it after this
    /// time if they never do (default one day).
    ///
    /// ```
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct S;
    /// use std::time::Duration;
    /// let machine = bus_saga::StateMachine::<S>::builder("OrderState")
    ///     .keep_finalized_for(Duration::from_secs(3600))
    ///     .build();
    /// # let _ = machine;
    /// ```
    pub fn keep_finalized_for(mut self, keep_for: Duration) -> Self {
        self.machine.keep_finalized_for = keep_for.max(Duration::from_millis(1));
        self
    }

    /// Calls `hook` after every saved transition (for logs, metrics, tests).
    pub fn on_transition(mut self, hook: impl Fn(&TransitionRecord) + Send + Sync + 'static) -> Self {
        self.machine.hooks.push(Arc::new(hook));
        self
    }

    /// The state machine.
    pub fn build(self) -> Arc<StateMachine<S>> {
        Arc::new(self.machine)
    }
}
