//! The crate's error type.

use uuid::Uuid;

/// Result with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong running a saga.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another message changed (or created) the instance first; the saga reloads and tries again.
    #[error("saga instance {0} was changed concurrently")]
    Conflict(Uuid),
    /// Concurrency conflicts went on past the configured number of attempts.
    #[error("saga instance {id} still conflicting after {attempts} attempts")]
    TooManyConflicts {
        /// The instance.
        id: Uuid,
        /// Attempts made.
        attempts: u32,
    },
    /// The event is not accepted in the instance's current state (and not ignored there).
    #[error("event {event} is not accepted in state {state} of saga instance {id}")]
    NotAccepted {
        /// The instance.
        id: Uuid,
        /// Its current state.
        state: String,
        /// The event's URN.
        event: &'static str,
    },
    /// The event is configured to fault when its instance does not exist.
    #[error("no saga instance {id} for event {event}")]
    MissingInstance {
        /// The instance looked for.
        id: Uuid,
        /// The event's URN.
        event: &'static str,
    },
    /// The repository's store failed (Redis unreachable...).
    #[error("saga repository failed")]
    Repository(#[source] bus_core::BoxError),
    /// An instance could not be read or written as JSON.
    #[error("saga instance {id} is not valid JSON")]
    Serialization {
        /// The instance.
        id: Uuid,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The saga's state has a field named like one of the instance's own (`correlationId`,
    /// `currentState`, `version`): stored as JSON, the two would collide.
    #[error("saga state field `{0}` collides with the instance's own; rename it (e.g. with #[serde(rename)])")]
    ReservedField(&'static str),
    /// An activity of the state machine failed.
    #[error("saga activity failed")]
    Activity(#[source] bus_core::BoxError),
    /// An event delivered again after its transition was saved produced a message type its
    /// activities no longer produce (the state machine changed meanwhile), so it cannot be
    /// sent again.
    #[error("saga instance {id}: cannot send {message_type} again; the event's activities no longer produce it")]
    Redispatch {
        /// The instance.
        id: Uuid,
        /// The stored message's URN.
        message_type: String,
    },
    /// The stored instance's version is the largest a `u64` holds (the store was written by
    /// something else): it cannot be updated, since its next version would repeat an old one.
    #[error("saga instance {0} is at the last possible version and cannot be updated")]
    VersionExhausted(Uuid),
    /// A behaviour names a state that is not declared (a typo, or a state left out of
    /// `states`).
    #[error("state `{state}` is not declared (used in {used_in})")]
    UnknownState {
        /// The state named.
        state: String,
        /// Where: `initially`, `during Pending`, `when_enter Done`...
        used_in: String,
    },
    /// A behaviour handles an event that is not declared, so nothing says how it finds its
    /// instance.
    #[error("event {event} is handled ({used_in}) but not declared with a correlation")]
    UndeclaredEvent {
        /// The event's URN.
        event: &'static str,
        /// Where it is handled.
        used_in: String,
    },
    /// An event declared twice (say with `event` and as a request's response): the second
    /// would replace the first's correlation.
    #[error("event {0} is declared twice")]
    EventDeclaredTwice(&'static str),
    /// A composite event with no events, more than 32, or one listed twice.
    #[error("composite event {0} must list 1 to 32 distinct events")]
    InvalidComposite(&'static str),
    /// `when_leave` activities that move the instance: leaving a state goes where the
    /// transition that leaves it goes.
    #[error("the activities run when leaving state `{0}` may not transition")]
    TransitionWhileLeaving(String),
    /// A declared state that no transition reaches from `Initial`.
    #[error("state `{0}` is declared but no transition reaches it")]
    UnreachableState(String),
    /// `when_enter` / `when_leave` activities kept moving the instance between states.
    #[error("saga instance {id}: transitions from when_enter/when_leave activities loop (at state {state})")]
    TransitionLoop {
        /// The instance.
        id: Uuid,
        /// The state it was moving to when the loop was cut.
        state: String,
    },
    /// An event correlates by a field the repository cannot look instances up by (for
    /// Redis: a field missing from `RedisSagaOptions::indexed_fields`).
    #[error("the saga repository cannot find instances by field `{0}`; index it")]
    NotIndexed(String),
    /// Repository settings that cannot work where the store runs (indexed fields on a Redis
    /// Cluster without a hash tag in the key prefix).
    #[error("{0}")]
    Configuration(String),
    /// A [`SagaProbe`](crate::SagaProbe) waited in vain.
    #[error("saga instance {id} did not reach {waited_for} in time (last state: {last_state:?})")]
    WaitTimedOut {
        /// The instance.
        id: Uuid,
        /// What it waited for.
        waited_for: String,
        /// The instance's state when it gave up (`None`: no instance).
        last_state: Option<String>,
    },
    /// A probe of a state machine that was put in no saga ([`Saga::new`](crate::Saga::new)).
    #[error("state machine {0} is in no saga")]
    NotInASaga(String),
    /// Publishing, sending or responding failed.
    #[error(transparent)]
    Bus(#[from] bus_core::Error),
}

impl Error {
    /// The version after `version` of instance `id`.
    pub(crate) fn next_version(id: Uuid, version: u64) -> Result<u64> {
        version.checked_add(1).ok_or(Error::VersionExhausted(id))
    }

    /// Whether trying again may succeed: conflicts and an unreachable store do; an event not
    /// accepted in its state does not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Conflict(_) | Error::TooManyConflicts { .. } | Error::Repository(_) => true,
            Error::Bus(e) => e.is_transient(),
            _ => false,
        }
    }
}

#[cfg(feature = "redis")]
impl From<redis::RedisError> for Error {
    fn from(error: redis::RedisError) -> Self {
        Error::Repository(Box::new(error))
    }
}
