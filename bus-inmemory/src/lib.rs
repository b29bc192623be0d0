//! bus-inmemory: an in-process transport for bus-core with the broker's semantics, and a
//! test harness.
//!
//! Integration tests and examples run the same bus code on it as on RabbitMQ: fanout
//! exchanges per message type, competing consumers, prefetch, requeue, `_error` and
//! `_skipped` queues, delayed redelivery with timers, bounded queues with backpressure,
//! and messages that travel as bytes so serialization bugs show up.
//!
//! ```
//! use bus_core::{BoxError, ConsumeContext, Endpoint, Message};
//! use bus_inmemory::InMemoryTestHarness;
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug, Serialize, Deserialize, Message)]
//! # #[message(urn = "urn:message:Shop:Ping")]
//! # struct Ping;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let harness = InMemoryTestHarness::start(|bus| {
//!     bus.endpoint(Endpoint::new("ping").handler(|_: ConsumeContext<Ping>| async { Ok(()) }))
//! })
//! .await?;
//! harness.bus().publish(Ping).await?;
//! assert!(harness.consumed().any::<Ping>().await);
//! # Ok(()) }
//! ```

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

mod error;
mod harness;
mod queue;
mod scheduler;
mod transport;

pub use error::{Error, Result};
pub use harness::InMemoryTestHarness;
pub use scheduler::InMemoryScheduler;
pub use transport::{InMemoryOptions, InMemoryTransport};
