//! bus-saga: state-machine sagas for bus-core, with in-memory and Redis repositories.
//!
//! A saga orchestrates a long-running workflow: events are correlated to an instance by a
//! message field, move it between states, and publish the next commands. Services that
//! coordinate several others use it. Features:
//!
//! - state machines that read like MassTransit's (`initially`, `during`, `during_any`,
//!   `ignore`, `then`, `publish`, `send`, `respond`, `transition_to`, `finalize`, `if_then`,
//!   `if_else`, `catch`, `when_enter`, `when_leave`, `finally`, composite events), checked by
//!   [`StateMachineBuilder::build`] (unknown states, undeclared events, unreachable states),
//!   testable with [`StateMachine::apply`] and no broker or repository;
//! - [`Schedule`]s (timeouts kept by token in the instance) and [`Request`]s (a response, a
//!   fault or a timeout as events of the instance);
//! - correlation by the instance's id or by a field of it
//!   ([`StateMachineBuilder::event_correlated_by`]);
//! - [`SagaProbe`]s that wait in tests until an instance exists, reaches a state or is
//!   finalized;
//! - missing instances skipped, discarded, faulted or handled by your code, per event;
//! - the instance is saved before any message it produced leaves (through the outbox), and
//!   saved with it: the event's message id and type, and the messages its transition
//!   produced. An event delivered again after its save sends those messages again and changes
//!   nothing, rather than meeting the state it already moved to: when they could not all
//!   leave (the broker down longer than the publish timeout; the endpoint's redelivery, or an
//!   operator moving it back from `_error`, brings it again), or when its ack was lost with a
//!   connection. At least once, as any outbox, but each produced message's id is derived from
//!   the event's id (and the saga, and its place among the messages), so whenever the event
//!   is applied or sent again its messages carry the same ids, and receivers that keep the
//!   ids they saw take each once;
//! - [`InMemorySagaRepository`] and [`RedisSagaRepository`] (insert-if-absent, atomic
//!   compare-and-set on `version`, optional pessimistic locks, secondary indexes), with
//!   concurrency conflicts retried automatically on fresh state and counted.
//!
//! The guide: `docs/sagas.md`.
//!
//! Known limits: an instance keeps its latest applied events only (10 by default, see
//! [`StateMachineBuilder::duplicate_window`]), so an event that comes back after more than
//! that many later events meets the state they led to (and, not accepted there, ends in
//! `_error` with the reason); its messages must then be re-sent by hand. An event that
//! finalized its instance (deleted when "completed when finalized") finds no instance when it
//! comes back: one that also created it is applied again (its messages get the same ids),
//! any other meets the missing-instance policy (skipped by default).
//!
//! ```
//! use bus_core::{BoxError, Message};
//! use bus_inmemory::InMemoryTestHarness;
//! use bus_saga::{when, InMemorySagaRepository, Saga, StateMachine};
//! # use serde::{Deserialize, Serialize};
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! #[serde(rename_all = "camelCase")]
//! struct TripState { legs: u32 }
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! #[message(urn = "urn:message:Trips:TripBooked")]
//! struct TripBooked { trip: uuid::Uuid }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let machine = StateMachine::<TripState>::builder("TripState")
//!     .states(["Booked"])
//!     .event::<TripBooked>(|m| m.trip)
//!     .initially(when::<TripState, TripBooked>().then(|trip, _| trip.data.legs = 1).transition_to("Booked"))
//!     .build()?;
//! let repository = InMemorySagaRepository::new();
//! let saga = Saga::new(machine, repository.clone());
//! let harness = InMemoryTestHarness::start(move |bus| bus.endpoint(saga.endpoint())).await?;
//! let trip = uuid::Uuid::now_v7();
//! harness.bus().publish(TripBooked { trip }).await?;
//! harness.consumed().wait_for::<TripBooked>(1, std::time::Duration::from_secs(5)).await?;
//! assert_eq!(repository.get(trip).map(|i| i.current_state), Some("Booked".to_owned()));
//! # Ok(()) }
//! ```

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

mod activities;
mod error;
mod instance;
mod machine;
mod probe;
mod register;
mod repository;
mod request;
mod runtime;
mod schedule;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use activities::{when, EventActivities, Produced, ProducedKind};
pub use error::{Error, Result};
pub use instance::{check_state_fields, AppliedEvent, SagaInstance, StoredMessage, FINAL, INITIAL};
pub use machine::{
    MissingHandler, MissingInstance, Outcome, StateMachine, StateMachineBuilder, Transition, TransitionRecord,
    DEFAULT_DUPLICATE_WINDOW, DEFAULT_KEEP_FINALIZED_FOR,
};
#[cfg(feature = "testing")]
pub use probe::SagaHarnessExt;
pub use probe::{SagaProbe, DEFAULT_PROBE_TIMEOUT};
pub use register::{Saga, SagaEndpointExt};
pub use repository::{InMemorySagaRepository, SagaRepository};
#[cfg(feature = "redis")]
pub use repository::{RedisSagaOptions, RedisSagaRepository};
pub use request::{Request, RequestTimeoutExpired, DEFAULT_REQUEST_TIMEOUT};
pub use runtime::SagaStats;
pub use schedule::Schedule;

/// What a saga's own data must be: serde, a default for new instances, cheap enough to clone.
pub trait SagaData: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static> SagaData for T {}
