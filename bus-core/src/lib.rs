//! bus-core: the transport-independent heart of a MassTransit-compatible message bus.
//!
//! Services depend on it to define messages ([`Message`]), consume them ([`Consumer`],
//! [`ConsumeContext`]) and publish, send and request through a [`Bus`]. Transports
//! (`bus-inmemory`, `bus-rabbitmq`) implement [`Transport`]; sagas (`bus-saga`) build on
//! consumers. Features:
//!
//! - MassTransit's JSON envelope and raw JSON on the wire, picked by content type;
//! - publish (fan-out by message type), send (one endpoint), request/response with timeouts and faults;
//! - a consume pipeline of middleware: retry, timeout, panic capture, concurrency limits, your own;
//! - delayed redelivery, `_error` and `_skipped` queues, `Fault<T>`, an in-memory outbox;
//! - flow control: partitions, rate limits, circuit breakers, kill switches, batches;
//! - graceful shutdown that loses nothing.
//!
//! ```
//! use bus_core::{BoxError, ConsumeContext, Endpoint, Message};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! #[serde(rename_all = "camelCase")]
//! #[message(urn = "urn:message:DistributedAppWithMassTransitShared:NewOrderEvent")]
//! struct NewOrderEvent { user_email: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let harness = bus_inmemory::InMemoryTestHarness::start(|bus| {
//!     bus.endpoint(Endpoint::new("orders").handler(|ctx: ConsumeContext<NewOrderEvent>| async move {
//!         println!("order from {}", ctx.message().user_email);
//!         Ok(())
//!     }))
//! })
//! .await?;
//! harness.bus().publish(NewOrderEvent { user_email: "ann@example.com".into() }).await?;
//! assert!(harness.consumed().any::<NewOrderEvent>().await);
//! harness.stop().await?;
//! # Ok(()) }
//! ```

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

pub mod address;
mod batch;
mod bus;
mod consume_error;
mod consumer;
mod context;
mod endpoint;
mod endpoint_name;
pub mod envelope;
mod error;
pub mod fault;
pub mod flow;
mod headers;
mod health;
mod host;
mod id;
mod instrumentation;
pub mod logged;
pub mod message;
pub mod middleware;
mod observer;
mod outbox;
mod receive;
mod redelivery;
mod scheduler_service;
mod scheduling;
pub mod serializer;
mod stalled_moves;
pub mod sync;
pub mod telemetry;
pub mod testing;
mod transport;
pub mod wire;

pub use batch::{Batch, BatchCompletion, BatchOptions};
pub use bus::{
    Bus, BusBuilder, EitherResponse, PreparedDestination, PreparedMessage, RequestClient, Response, SendOptions,
};
pub use bus_derive::Message;
pub use consume_error::{ConsumeError, ConsumeErrorKind};
pub use consumer::{Consumer, Permanent, Skip};
pub use context::{ConsumeContext, ReceiveContext};
pub use endpoint::{default_prefetch, ConsumerOptions, Endpoint, TracePropagation, DEFAULT_MAX_MESSAGE_SIZE};
pub use endpoint_name::{
    DefaultEndpointNameFormatter, EndpointNameFormatter, KebabCaseEndpointNameFormatter, SnakeCaseEndpointNameFormatter,
};
pub use envelope::Envelope;
pub use error::{BoxError, Error, Result};
pub use fault::{ExceptionInfo, Fault};
pub use flow::{KillSwitch, RateLimit};
pub use headers::{names as header_names, Headers, Iter as HeadersIter};
pub use health::{BusHealth, EndpointHealth, HealthStatus};
pub use host::HostInfo;
pub use message::Message;
pub use observer::BusObserver;
pub use redelivery::RedeliveryPolicy;
pub use scheduler_service::{CancelScheduledMessage, ScheduleMessage, SchedulerService};
pub use scheduling::{DueTime, MessageScheduler, ScheduledMessage};
pub use transport::{
    Delivery, DeliveryStream, EndpointTopology, ExchangeBinding, Settle, Settlement, Subscription, Transport,
    TransportMessage,
};

/// Re-exports for the derive macro; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::message::ToCorrelationId;
    #[cfg(feature = "protobuf")]
    pub use prost;
    pub use uuid::Uuid;
}
