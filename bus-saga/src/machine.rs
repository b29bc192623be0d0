//! The state machine: states, events with their correlation, and behaviour per state.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{BoxError, ConsumeContext, Endpoint, Message};
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::activities::{cancel_timeout, Activity, Effects, EventActivities, Produced, Redispatch};
use crate::instance::{FINAL, INITIAL};
use crate::probe::BoundRuntime;
use crate::request::{Request, RequestTimeoutExpired};
use crate::runtime::{SagaEventConsumer, SagaRuntime};
use crate::schedule::Schedule;
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

/// How an event finds its instance.
pub(crate) enum Correlate<E> {
    /// By a field of the message (MassTransit's `CorrelateById`).
    Id(Box<dyn Fn(&E) -> Uuid + Send + Sync>),
    /// By the initiator id it carries: an answer to a request the instance sent, whose
    /// correlation id was the instance's.
    Initiator,
    /// By a field of the instance's data equal to a value of the message (MassTransit's
    /// `CorrelateBy`), looked up in the repository.
    Field { field: String, value: Box<dyn Fn(&E) -> serde_json::Value + Send + Sync> },
}

/// Checks an event against the instance before its behaviour runs: `false` ignores it (a
/// stale timeout, an answer to a request no longer pending).
pub(crate) type Guard<S, E> = Box<dyn Fn(&mut SagaInstance<S>, &E, &EventInfo, &mut Effects) -> bool + Send + Sync>;

pub(crate) struct EventDefinition<S, E> {
    pub(crate) correlate: Correlate<E>,
    pub(crate) missing: MissingInstance<E>,
    pub(crate) guard: Option<Guard<S, E>>,
}

/// What the runtime knows of a delivered event beyond its message.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EventInfo {
    pub(crate) message_id: Option<Uuid>,
    pub(crate) request_id: Option<Uuid>,
    pub(crate) initiator_id: Option<Uuid>,
    /// The instance the runtime found (and locked) for the event, which a new instance takes.
    pub(crate) instance_id: Option<Uuid>,
    pub(crate) scheduling_token: Option<Uuid>,
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
pub struct Transition<S> {
    /// The instance after the event (for `Missing`, a fresh one that is not saved).
    pub instance: SagaInstance<S>,
    /// The state before the event (`Initial` for a new instance).
    pub begin_state: String,
    /// Every state the event moved the instance through, in order.
    pub path: Vec<String>,
    /// What happened.
    pub outcome: Outcome,
    /// Messages to publish, send, respond or schedule (and schedules to cancel) once the
    /// instance is saved.
    pub produced: Vec<Produced>,
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
///     .build()
///     .expect("every state and event is declared");
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
    /// Per produced message type: how to send the message again from stored JSON.
    redispatch: HashMap<&'static str, Redispatch>,
    /// What runs when an instance enters or leaves a state (`Final`'s: `finally`).
    enter: HashMap<String, Vec<Activity<S, ()>>>,
    leave: HashMap<String, Vec<Activity<S, ()>>>,
    composites: Vec<Composite<S>>,
    /// Where each behaviour is used and where it may move, checked by `build`.
    uses: Vec<BehaviorUse>,
    /// Events declared with `ignore`, checked by `build`.
    ignore_uses: Vec<(String, &'static str)>,
    /// An event declared more than once (each declaration would replace the last), for
    /// `build` to refuse.
    declared_twice: Option<&'static str>,
    /// An event given a missing-instance policy before (or without) being declared.
    undeclared_policy: Option<&'static str>,
    /// The saga it was last put in, for probes.
    bound: BoundRuntime<S>,
}

/// Where a behaviour was declared, for `build`'s checks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UsedIn {
    Initially,
    During(String),
    DuringAny,
    Enter(String),
    Leave(String),
}

impl std::fmt::Display for UsedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UsedIn::Initially => f.write_str("initially"),
            UsedIn::During(state) => write!(f, "during {state}"),
            UsedIn::DuringAny => f.write_str("during_any"),
            UsedIn::Enter(state) => write!(f, "when_enter {state}"),
            UsedIn::Leave(state) => write!(f, "when_leave {state}"),
        }
    }
}

struct BehaviorUse {
    /// The event's URN (`None` for state activities).
    event: Option<&'static str>,
    used_in: UsedIn,
    targets: Vec<String>,
}

type FireComposite<S> = Arc<
    dyn for<'a> Fn(&'a StateMachine<S>, &'a mut SagaInstance<S>, &'a mut Run) -> BoxFuture<'a, Result<(), Error>>
        + Send
        + Sync,
>;

/// An event raised when all of a set of events have arrived, in any order.
struct Composite<S> {
    event: &'static str,
    members: Vec<&'static str>,
    status: Arc<dyn Fn(&mut S) -> &mut u32 + Send + Sync>,
    fire: FireComposite<S>,
}

/// One event's run through its activities.
pub(crate) struct Run {
    effects: Effects,
    path: Vec<String>,
    caught: Option<Error>,
    /// Transitions made from within `when_enter`/`when_leave`, nested: bounded, so that two
    /// states entering each other fail instead of looping.
    depth: u32,
}

/// How deep transitions from `when_enter`/`when_leave` activities may nest.
const MAX_NESTED_TRANSITIONS: u32 = 32;

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
    /// Keeps event `E`'s activities (erased), how to send again what they produce, and
    /// where they may move for `build`'s checks.
    fn erase<E: Send + Sync + 'static>(
        &mut self,
        event: Option<&'static str>,
        used_in: UsedIn,
        activities: EventActivities<S, E>,
    ) -> Vec<Activity<S, E>> {
        self.redispatch.extend(activities.redispatch);
        let mut targets = Vec::new();
        Activity::targets(&activities.activities, &mut targets);
        let targets = targets.into_iter().map(str::to_owned).collect();
        self.uses.push(BehaviorUse { event, used_in, targets });
        activities.activities
    }

    /// How to send again a message of type `message_type` a transition produced.
    pub(crate) fn redispatcher(&self, message_type: &str) -> Option<&Redispatch> {
        self.redispatch.get(message_type)
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
                enter: HashMap::new(),
                leave: HashMap::new(),
                composites: Vec::new(),
                uses: Vec::new(),
                ignore_uses: Vec::new(),
                declared_twice: None,
                undeclared_policy: None,
                bound: BoundRuntime::new(),
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

    pub(crate) fn bind(&self, runtime: &Arc<SagaRuntime<S>>) {
        self.bound.bind(runtime);
    }

    pub(crate) fn bound_runtime(&self) -> Option<Arc<SagaRuntime<S>>> {
        self.bound.get()
    }

    pub(crate) fn notify(&self, record: &TransitionRecord) {
        for hook in &self.hooks {
            hook(record);
        }
    }

    pub(crate) fn event<E: Message>(&self) -> Option<&EventDefinition<S, E>> {
        self.events.get(E::message_type()).and_then(|d| d.downcast_ref::<EventDefinition<S, E>>())
    }

    /// The instance id event `E` correlates to, by its message alone (`None` for an event
    /// not declared, or correlated by the request id it carries).
    pub fn correlate<E: Message>(&self, event: &E) -> Option<Uuid> {
        self.correlate_with(event, &EventInfo::default())
    }

    pub(crate) fn correlate_with<E: Message>(&self, event: &E, info: &EventInfo) -> Option<Uuid> {
        match &self.event::<E>()?.correlate {
            Correlate::Id(f) => Some(f(event)),
            Correlate::Initiator => info.initiator_id,
            Correlate::Field { field, value } => Some(self.id_for_field(field, &value(event))),
        }
    }

    /// The field and value event `E` correlates by, when it correlates by a field.
    pub(crate) fn field_correlation<E: Message>(&self, event: &E) -> Option<(&str, serde_json::Value)> {
        match &self.event::<E>()?.correlate {
            Correlate::Field { field, value } => Some((field, value(event))),
            _ => None,
        }
    }

    /// The id of a new instance created by an event correlated by `field` equal to `value`:
    /// derived from them, so that two such events at once create one instance (the second
    /// meets the first's insert as a conflict, and is applied to it).
    pub(crate) fn id_for_field(&self, field: &str, value: &serde_json::Value) -> Uuid {
        Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{}/{field}/{value}", self.name).as_bytes())
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

    /// Runs activities in order on the instance.
    fn run<'a, E: Send + Sync + 'static>(
        &'a self,
        activities: &'a [Activity<S, E>],
        instance: &'a mut SagaInstance<S>,
        event: &'a E,
        run: &'a mut Run,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            for activity in activities {
                match activity {
                    Activity::Then(f) => f(instance, event),
                    Activity::ThenAsync(f) => f(instance, event).await.map_err(Error::Activity)?,
                    Activity::Produce(f) => f(instance, event, &mut run.effects)?,
                    Activity::TransitionTo(state) => self.transition(state, instance, run).await?,
                    Activity::If(condition, then, otherwise) => {
                        let branch = if condition(instance, event) { then } else { otherwise };
                        self.run(branch, instance, event, run).await?;
                    }
                    Activity::Catch(body, handler) => {
                        if let Err(error) = self.run(body, instance, event, run).await {
                            tracing::debug!(saga = %self.name, id = %instance.correlation_id, error = %bus_core::logged::chain(&error), "saga activity failed; caught");
                            let outer = run.caught.replace(error);
                            let handled = self.run(handler, instance, event, run).await;
                            run.caught = outer;
                            handled?;
                        }
                    }
                    Activity::Caught(f) => {
                        if let Some(error) = &run.caught {
                            f(instance, event, error);
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// Moves the instance to `state`: what leaving its state does, then what entering the
    /// new one does (nothing when it stays where it is).
    fn transition<'a>(
        &'a self,
        state: &'a str,
        instance: &'a mut SagaInstance<S>,
        run: &'a mut Run,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if instance.current_state == state {
                run.path.push(state.to_owned());
                return Ok(());
            }
            run.depth += 1;
            if run.depth > MAX_NESTED_TRANSITIONS {
                return Err(Error::TransitionLoop { id: instance.correlation_id, state: state.to_owned() });
            }
            let leaving = instance.current_state.clone();
            if let Some(leave) = self.leave.get(&leaving) {
                self.run(leave, instance, &(), run).await?;
            }
            instance.current_state = state.to_owned();
            run.path.push(state.to_owned());
            if let Some(enter) = self.enter.get(state) {
                self.run(enter, instance, &(), run).await?;
            }
            run.depth -= 1;
            Ok(())
        })
    }

    /// Applies an event to an instance (`None`: it does not exist), without saving or sending
    /// anything: the state machine alone, testable without a broker or repository.
    pub async fn apply<E: Message>(
        &self,
        instance: Option<SagaInstance<S>>,
        event: &E,
    ) -> Result<Transition<S>, Error> {
        self.apply_with(instance, event, &EventInfo::default()).await
    }

    /// [`apply`](Self::apply), knowing the delivered event's ids: produced ids and tokens
    /// derive from its message id, and schedules and requests check their tokens.
    pub(crate) async fn apply_with<E: Message>(
        &self,
        instance: Option<SagaInstance<S>>,
        event: &E,
        info: &EventInfo,
    ) -> Result<Transition<S>, Error> {
        let id = info.instance_id.or_else(|| self.correlate_with(event, info)).unwrap_or_else(Uuid::nil);
        let (mut instance, created) = match instance {
            Some(instance) => (instance, false),
            None => (SagaInstance::new(id, S::default()), true),
        };
        let begin_state = instance.current_state.clone();
        let ids = info.message_id.map(|m| (m, format!("{}/{}", self.name, E::message_type())));
        let mut run = Run { effects: Effects::new(ids), path: Vec::new(), caught: None, depth: 0 };
        let guard = self.event::<E>().and_then(|d| d.guard.as_ref());
        if let Some(guard) = guard.filter(|_| !created) {
            if !guard(&mut instance, event, info, &mut run.effects) {
                tracing::debug!(saga = %self.name, %id, event = E::message_type(), "stale timeout or answer; ignored");
                return Ok(Transition {
                    instance,
                    begin_state,
                    path: Vec::new(),
                    outcome: Outcome::Ignored,
                    produced: Vec::new(),
                });
            }
        }
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
        self.run(&behavior.activities, &mut instance, event, &mut run).await?;
        self.complete_composites(E::message_type(), &mut instance, &mut run).await?;
        let outcome = if instance.current_state == FINAL && self.completed_when_finalized {
            Outcome::Completed
        } else if created {
            Outcome::Created
        } else {
            Outcome::Updated
        };
        Ok(Transition { instance, begin_state, path: run.path, outcome, produced: run.effects.produced })
    }

    /// Marks `event` as arrived in the composites it is part of, and raises those it
    /// completes, in the state the instance is in now.
    async fn complete_composites(
        &self,
        event: &str,
        instance: &mut SagaInstance<S>,
        run: &mut Run,
    ) -> Result<(), Error> {
        for composite in &self.composites {
            let Some(position) = composite.members.iter().position(|m| *m == event) else { continue };
            let all = u32::MAX >> (32 - composite.members.len());
            let status = (composite.status)(&mut instance.data);
            let before = *status;
            *status |= 1 << position;
            if *status == all && before != all {
                (composite.fire)(self, instance, run).await?;
            }
        }
        Ok(())
    }

    /// The checks `build` makes.
    fn check(&self) -> Result<(), Error> {
        if let Some(event) = self.declared_twice {
            return Err(Error::EventDeclaredTwice(event));
        }
        if let Some(event) = self.undeclared_policy {
            return Err(Error::UndeclaredEvent { event, used_in: "on_missing_instance".to_owned() });
        }
        for composite in &self.composites {
            let distinct: HashSet<&str> = composite.members.iter().copied().collect();
            if composite.members.is_empty() || composite.members.len() > 32 || distinct.len() != composite.members.len()
            {
                return Err(Error::InvalidComposite(composite.event));
            }
        }
        let known = |state: &str| self.states.iter().any(|s| s == state);
        for used in &self.uses {
            if let UsedIn::During(state) | UsedIn::Enter(state) | UsedIn::Leave(state) = &used.used_in {
                if !known(state) {
                    return Err(Error::UnknownState { state: state.clone(), used_in: used.used_in.to_string() });
                }
            }
            if let Some(target) = used.targets.iter().find(|t| !known(t)) {
                return Err(Error::UnknownState { state: target.clone(), used_in: used.used_in.to_string() });
            }
            if let (UsedIn::Leave(state), false) = (&used.used_in, used.targets.is_empty()) {
                return Err(Error::TransitionWhileLeaving(state.clone()));
            }
            if let Some(event) = used.event {
                let declared = self.events.contains_key(event) || self.composites.iter().any(|c| c.event == event);
                if !declared {
                    return Err(Error::UndeclaredEvent { event, used_in: used.used_in.to_string() });
                }
            }
        }
        for (state, event) in &self.ignore_uses {
            if state != "*" && !known(state) {
                return Err(Error::UnknownState { state: state.clone(), used_in: format!("ignore {event}") });
            }
            if !self.events.contains_key(event) {
                return Err(Error::UndeclaredEvent { event, used_in: format!("ignore in {state}") });
            }
        }
        for composite in &self.composites {
            if let Some(member) = composite.members.iter().find(|m| !self.events.contains_key(*m)) {
                return Err(Error::UndeclaredEvent {
                    event: member,
                    used_in: format!("composite {}", composite.event),
                });
            }
        }
        let reachable = self.reachable();
        if let Some(state) = self.states.iter().skip(2).find(|s| !reachable.contains(s.as_str())) {
            return Err(Error::UnreachableState(state.clone()));
        }
        // `Final` need not be reached, unless something waits there (`finally`, or a
        // behaviour `during` it) that would then never run.
        let used_in_final = self
            .uses
            .iter()
            .any(|u| matches!(&u.used_in, UsedIn::During(s) | UsedIn::Enter(s) | UsedIn::Leave(s) if s == FINAL));
        if used_in_final && !reachable.contains(FINAL) {
            return Err(Error::UnreachableState(FINAL.to_owned()));
        }
        Ok(())
    }

    /// The states an instance can reach from `Initial`.
    fn reachable(&self) -> HashSet<&str> {
        let mut reached: HashSet<&str> = HashSet::from([INITIAL]);
        let mut queue = vec![INITIAL];
        while let Some(state) = queue.pop() {
            for used in &self.uses {
                let from_here = match &used.used_in {
                    UsedIn::Initially => state == INITIAL,
                    UsedIn::During(s) | UsedIn::Enter(s) => s == state,
                    // Leaving moves nowhere (`build` refuses a transition there).
                    UsedIn::Leave(_) => false,
                    UsedIn::DuringAny => state != INITIAL && state != FINAL,
                };
                if !from_here {
                    continue;
                }
                for target in &used.targets {
                    if reached.insert(target) {
                        queue.push(target);
                    }
                }
            }
        }
        reached
    }
}

impl<S: SagaData> StateMachineBuilder<S> {
    /// Declares states (in order, after `Initial` and `Final`): names, or the values of your
    /// state enum when it is `AsRef<str>`. Every state a behaviour names must be declared,
    /// and every declared state reachable: [`build`](Self::build) checks.
    pub fn states<I: IntoIterator<Item = T>, T: AsRef<str>>(mut self, states: I) -> Self {
        for state in states {
            let state = state.as_ref();
            if !self.machine.states.iter().any(|s| s == state) {
                self.machine.states.push(state.to_owned());
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
        self,
        correlate: impl Fn(&E) -> Uuid + Send + Sync + 'static,
        missing: MissingInstance<E>,
    ) -> Self {
        self.declare(EventDefinition { correlate: Correlate::Id(Box::new(correlate)), missing, guard: None })
    }

    /// Declares event `E`, correlated to the instance whose data has `field` (a top-level
    /// field, as serialized: `"orderNumber"`) equal to what `value` reads from the message
    /// (MassTransit's `CorrelateBy`). The repository looks it up: in memory by a scan, in
    /// Redis by a secondary index (list the field in `RedisSagaOptions::indexed_fields`), in
    /// PostgreSQL by a query. When none matches, an event handled `initially` creates one
    /// (its id derived from the field and value); any other meets the missing-instance
    /// policy (skipped).
    ///
    /// ```
    /// use bus_saga::{when, StateMachine};
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
    /// # #[serde(rename_all = "camelCase")]
    /// # struct Order { order_number: String }
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
    /// # #[message(urn = "urn:message:Shop:Shipped")] struct Shipped { order_number: String }
    /// let machine = StateMachine::<Order>::builder("Order")
    ///     .states(["Shipped"])
    ///     .event_correlated_by::<Shipped, _>("orderNumber", |m| m.order_number.clone())
    ///     .initially(when::<Order, Shipped>().then(|o, m| o.data.order_number = m.order_number.clone()).transition_to("Shipped"))
    ///     .build()
    ///     .unwrap();
    /// # drop(machine);
    /// ```
    pub fn event_correlated_by<E: Message, V: serde::Serialize>(
        self,
        field: impl Into<String>,
        value: impl Fn(&E) -> V + Send + Sync + 'static,
    ) -> Self {
        let value = Box::new(move |event: &E| serde_json::to_value(value(event)).unwrap_or(serde_json::Value::Null));
        let correlate = Correlate::Field { field: field.into(), value };
        self.declare(EventDefinition { correlate, missing: MissingInstance::Skip, guard: None })
    }

    /// Changes what happens to declared event `E` when its instance is missing (MassTransit's
    /// `OnMissingInstance`); `build` refuses it for an event not declared before.
    ///
    /// ```
    /// use bus_saga::{MissingInstance, StateMachine};
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct S;
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
    /// # #[message(urn = "urn:message:Shop:Late")] struct Late { id: uuid::Uuid }
    /// let machine = StateMachine::<S>::builder("S")
    ///     .event::<Late>(|m| m.id)
    ///     .on_missing_instance::<Late>(MissingInstance::Discard)
    ///     .build()
    ///     .unwrap();
    /// # drop(machine);
    /// ```
    pub fn on_missing_instance<E: Message>(mut self, missing: MissingInstance<E>) -> Self {
        let definition = self
            .machine
            .events
            .get_mut(E::message_type())
            .and_then(Arc::get_mut)
            .and_then(|d| d.downcast_mut::<EventDefinition<S, E>>());
        match definition {
            Some(definition) => definition.missing = missing,
            None => {
                self.machine.undeclared_policy.get_or_insert(E::message_type());
            }
        }
        self
    }

    fn declare<E: Message>(mut self, definition: EventDefinition<S, E>) -> Self {
        if self.machine.events.insert(E::message_type(), Arc::new(definition)).is_some() {
            self.machine.declared_twice.get_or_insert(E::message_type());
            return self;
        }
        self.machine.registrations.push(Arc::new(|endpoint: Endpoint, runtime: Arc<SagaRuntime<S>>| {
            // Events of one instance run one at a time, in delivery order: they would
            // otherwise meet as optimistic-concurrency conflicts and be tried again. The key
            // is the id the event correlates to; an event correlated by a field is keyed by
            // the field's value (its derived id), so it may still meet the instance's other
            // events, as a conflict, retried.
            let partitions = endpoint.partitions().unwrap_or(bus_core::flow::DEFAULT_PARTITIONS);
            let machine = runtime.machine.clone();
            endpoint.consumer(SagaEventConsumer::<S, E>::new(runtime)).partition_by_envelope(
                move |event: &E, envelope: &bus_core::Envelope| {
                    let info = EventInfo { initiator_id: envelope.initiator_id, ..EventInfo::default() };
                    machine.correlate_with(event, &info)
                },
                partitions,
            )
        }));
        self
    }

    /// Declares `schedule`'s message `M` as an event, correlated by `correlate`. A message
    /// whose token is not the one the instance keeps (a schedule cancelled or started again
    /// since) is ignored; the current one clears the kept token. One whose instance is gone
    /// is discarded.
    pub fn schedule<M: Message>(
        self,
        schedule: &Schedule<S, M>,
        correlate: impl Fn(&M) -> Uuid + Send + Sync + 'static,
    ) -> Self {
        let schedule = schedule.clone();
        let guard: Guard<S, M> = Box::new(move |instance, _, info, _| match info.scheduling_token {
            // Sent by hand rather than by the scheduler: taken as it is.
            None => true,
            Some(token) if schedule.token(&mut instance.data) == Some(token) => {
                schedule.take_token(&mut instance.data);
                true
            }
            Some(_) => false,
        });
        self.declare(EventDefinition {
            correlate: Correlate::Id(Box::new(correlate)),
            missing: MissingInstance::Discard,
            guard: Some(guard),
        })
    }

    /// Declares `request`'s answers as events of the instance that sent it (MassTransit's
    /// `Request`): its response `R` (completed) and `Fault<Q>` (faulted), correlated by the
    /// request id they carry, and [`RequestTimeoutExpired<Q>`]. The first of them to come
    /// while the request is pending clears its id from the instance (and a response or
    /// fault cancels the timeout); any that comes when it is no longer pending is ignored.
    pub fn request<Q: Message, R: Message>(self, request: &Request<S, Q, R>) -> Self {
        /// A response or fault: current only while its request is pending.
        fn answer<S: SagaData, Q: Message, R: 'static, A: Message>(request: &Request<S, Q, R>) -> Guard<S, A> {
            let request = request.clone();
            Box::new(move |instance, _, info, effects| {
                let pending = request.pending(&mut instance.data);
                if pending.is_none() || pending != info.request_id {
                    return false;
                }
                request.take_request_id(&mut instance.data);
                if request.timeout_after().is_some() {
                    if let Some(request_id) = pending {
                        cancel_timeout(effects, request.timeout_token(request_id));
                    }
                }
                true
            })
        }
        let completed = EventDefinition::<S, R> {
            correlate: Correlate::Initiator,
            missing: MissingInstance::Skip,
            guard: Some(answer::<S, Q, R, R>(request)),
        };
        let faulted = EventDefinition::<S, bus_core::Fault<Q>> {
            correlate: Correlate::Initiator,
            missing: MissingInstance::Skip,
            guard: Some(answer::<S, Q, R, bus_core::Fault<Q>>(request)),
        };
        let timed_out = {
            let request = request.clone();
            let guard: Guard<S, RequestTimeoutExpired<Q>> = Box::new(move |instance, expired, info, _| {
                let pending = request.pending(&mut instance.data);
                let current = pending == Some(expired.request_id)
                    && info.scheduling_token.is_none_or(|token| token == request.timeout_token(expired.request_id));
                if current {
                    request.take_request_id(&mut instance.data);
                }
                current
            });
            EventDefinition::<S, RequestTimeoutExpired<Q>> {
                correlate: Correlate::Id(Box::new(|m: &RequestTimeoutExpired<Q>| m.correlation_id)),
                missing: MissingInstance::Discard,
                guard: Some(guard),
            }
        };
        self.declare(completed).declare(faulted).declare(timed_out)
    }

    /// Declares composite event `C`, raised once all of `events` have arrived, in any order
    /// (MassTransit's `CompositeEvent`). Which have arrived is kept as bits in the `u32`
    /// field `status` returns; `C` is then handled in the state the instance is in, as any
    /// event (`during(state, when::<S, C>()...)`), right after the event that completed it.
    /// Only events handled in the instance's state count. From 1 to 32 distinct events, or
    /// `build` refuses it.
    ///
    /// ```
    /// use bus_core::Message;
    /// use bus_saga::{when, StateMachine};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Serialize, Deserialize, Message)] #[message(urn = "urn:message:Shop:Paid")] struct Paid { order: uuid::Uuid }
    /// # #[derive(Debug, Serialize, Deserialize, Message)] #[message(urn = "urn:message:Shop:Packed")] struct Packed { order: uuid::Uuid }
    /// #[derive(Debug, Default, Serialize, Deserialize, Message)]
    /// #[message(urn = "urn:message:Shop:ReadyToShip")]
    /// struct ReadyToShip;
    /// #[derive(Clone, Default, Serialize, Deserialize)]
    /// struct Order { ready: u32 }
    ///
    /// let machine = StateMachine::<Order>::builder("Order")
    ///     .states(["Open", "Shipping"])
    ///     .event::<Paid>(|m| m.order)
    ///     .event::<Packed>(|m| m.order)
    ///     .composite_event::<ReadyToShip>(|o| &mut o.ready, &[Paid::message_type(), Packed::message_type()])
    ///     .initially(when::<Order, Paid>().transition_to("Open"))
    ///     .initially(when::<Order, Packed>().transition_to("Open"))
    ///     .during("Open", when::<Order, Paid>())
    ///     .during("Open", when::<Order, Packed>())
    ///     .during("Open", when::<Order, ReadyToShip>().transition_to("Shipping"))
    ///     .build()
    ///     .unwrap();
    /// # drop(machine);
    /// ```
    pub fn composite_event<C: Message + Default>(
        mut self,
        status: impl Fn(&mut S) -> &mut u32 + Send + Sync + 'static,
        events: &[&'static str],
    ) -> Self {
        let fire: FireComposite<S> = Arc::new(|machine, instance, run| {
            Box::pin(async move {
                let state = instance.current_state.clone();
                match machine.behavior::<C>(&state) {
                    Some(behavior) => machine.run(&behavior.activities, instance, &C::default(), run).await,
                    None => Ok(()),
                }
            })
        });
        let members = events.to_vec();
        self.machine.composites.push(Composite { event: C::message_type(), members, status: Arc::new(status), fire });
        self
    }

    /// What events do to a new instance (MassTransit's `Initially`).
    pub fn initially<E: Message>(mut self, activities: EventActivities<S, E>) -> Self {
        let activities = self.machine.erase(Some(E::message_type()), UsedIn::Initially, activities);
        self.machine.initially.insert(E::message_type(), Arc::new(Behavior { activities }));
        self
    }

    /// What an event does in `state` (MassTransit's `During`).
    pub fn during<E: Message>(mut self, state: impl AsRef<str>, activities: EventActivities<S, E>) -> Self {
        let state = state.as_ref().to_owned();
        let activities = self.machine.erase(Some(E::message_type()), UsedIn::During(state.clone()), activities);
        self.machine.during.entry(state).or_default().insert(E::message_type(), Arc::new(Behavior { activities }));
        self
    }

    /// What an event does in any state but `Initial` and `Final` (MassTransit's `DuringAny`).
    pub fn during_any<E: Message>(mut self, activities: EventActivities<S, E>) -> Self {
        let activities = self.machine.erase(Some(E::message_type()), UsedIn::DuringAny, activities);
        self.machine.during_any.insert(E::message_type(), Arc::new(Behavior { activities }));
        self
    }

    /// What happens whenever an instance enters `state`, after the activities that moved
    /// it there (MassTransit's `WhenEnter`).
    ///
    /// ```
    /// use bus_saga::StateMachine;
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct S { entered: u32 }
    /// let builder = StateMachine::<S>::builder("S")
    ///     .states(["Open"])
    ///     .when_enter("Open", |open| open.then(|instance, _| instance.data.entered += 1));
    /// # drop(builder);
    /// ```
    pub fn when_enter(
        mut self,
        state: impl AsRef<str>,
        activities: impl FnOnce(EventActivities<S, ()>) -> EventActivities<S, ()>,
    ) -> Self {
        let state = state.as_ref().to_owned();
        let activities = self.machine.erase(None, UsedIn::Enter(state.clone()), activities(EventActivities::empty()));
        self.machine.enter.entry(state).or_default().extend(activities);
        self
    }

    /// What happens whenever an instance leaves `state`, before it enters the next
    /// (MassTransit's `WhenLeave`). It may not move the instance itself: `build` refuses a
    /// `transition_to` here.
    pub fn when_leave(
        mut self,
        state: impl AsRef<str>,
        activities: impl FnOnce(EventActivities<S, ()>) -> EventActivities<S, ()>,
    ) -> Self {
        let state = state.as_ref().to_owned();
        let activities = self.machine.erase(None, UsedIn::Leave(state.clone()), activities(EventActivities::empty()));
        self.machine.leave.entry(state).or_default().extend(activities);
        self
    }

    /// What happens when an instance is finalized, whichever event finalized it
    /// (MassTransit's `Finally`): `when_enter` of the final state. Messages it produces
    /// leave before the instance is deleted.
    pub fn finally(self, activities: impl FnOnce(EventActivities<S, ()>) -> EventActivities<S, ()>) -> Self {
        self.when_enter(FINAL, activities)
    }

    /// Event `E` is acknowledged without effect in `state` (`"*"`: in every state).
    pub fn ignore<E: Message>(mut self, state: impl AsRef<str>) -> Self {
        let state = state.as_ref().to_owned();
        self.machine.ignore_uses.push((state.clone(), E::message_type()));
        self.machine.ignored.insert((state, E::message_type()));
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
    /// let machine = bus_saga::StateMachine::<S>::builder("OrderState").duplicate_window(50).build().unwrap();
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
    ///     .build()
    ///     .unwrap();
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

    /// The state machine, checked: an error names the first mistake found, among a state
    /// used but not declared ([`Error::UnknownState`]), an event handled but not declared
    /// (so with no correlation: [`Error::UndeclaredEvent`]), and a declared state no
    /// transition reaches from `Initial`, or a final state with `finally` (or behaviour)
    /// that nothing finalizes ([`Error::UnreachableState`]).
    ///
    /// ```
    /// use bus_saga::{when, Error, StateMachine};
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct Door;
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
    /// # #[message(urn = "urn:message:Doors:Open")] struct Open { door: uuid::Uuid }
    /// let typo = StateMachine::<Door>::builder("Door")
    ///     .states(["Opened"])
    ///     .event::<Open>(|m| m.door)
    ///     .initially(when::<Door, Open>().transition_to("Opend"))
    ///     .build();
    /// assert!(matches!(typo, Err(Error::UnknownState { state, .. }) if state == "Opend"));
    /// ```
    pub fn build(self) -> Result<Arc<StateMachine<S>>, Error> {
        self.machine.check()?;
        Ok(Arc::new(self.machine))
    }
}
