//! bus-rabbitmq: the RabbitMQ transport for bus-core, on lapin.
//!
//! Services that run in production use it; a Rust service and a .NET MassTransit v8 service
//! on the same broker see the same exchanges, queues and bindings.
//!
//! # Topology (MassTransit's)
//!
//! - each message type: a durable fanout exchange named `Namespace:Type`;
//! - each receive endpoint: a durable queue and a same-named fanout exchange bound to it,
//!   with the exchange of every consumed message type bound to the endpoint's exchange;
//! - publish goes to the message type's exchange; send goes to the endpoint's exchange;
//! - `{queue}_error` and `{queue}_skipped`, each a queue with its exchange;
//! - delayed redelivery without any plugin: one queue per delay, `{queue}_delay_{ms}ms`,
//!   with `x-message-ttl` and a dead-letter exchange that routes back to the endpoint;
//! - the bus's response endpoint is temporary (auto-delete), deleted when the bus stops;
//!   its `_error` and `_skipped` queues, not durable either, are declared when a message first
//!   needs one and stay after the bus stops, until the broker restarts.
//!
//! # Recovery
//!
//! The transport owns its recovery rather than trusting the client library's: a supervisor
//! watches each connection (heartbeats catch a silent network stall within about two
//! intervals), reconnects with capped exponential backoff, declares the whole topology again
//! and re-subscribes every consumer. An endpoint's queue or exchange deleted under a running
//! bus is declared again too (see [`RabbitMqOptions::topology_check_interval`]). Publishes during an outage wait up to
//! [`RabbitMqOptions::publish_timeout`] and then fail with a clear error. Health
//! ([`bus_core::Bus::health`]) says healthy only when an endpoint's consumer is subscribed on
//! the live connection, degraded while reconnecting, unhealthy when its consumer is not running.
//!
//! # Connections
//!
//! Two per transport, as MassTransit uses: one publishes (and declares, and moves messages to
//! `_error`), one consumes. A broker alarm blocks the connections that publish; consumers and
//! their acknowledgements go on meanwhile, health reports the alarm, and publishes wait for it
//! to clear, up to their timeout. From an `amqp://` or `amqps://` URI (`AMQP_ADDR`, else the local broker). TLS goes through
//! lapin's rustls support: the server's certificate is verified against the system's roots
//! plus [`TlsOptions::ca_pem`]; [`TlsOptions::client_cert_pem`] and
//! [`TlsOptions::client_key_pem`] add a client certificate for mutual TLS. The connection
//! carries a name the broker shows ([`RabbitMqOptions::connection_name`]); passwords never
//! appear in logs or errors ([`redact`]).
//!
//! # Delivery guarantee: at least once
//!
//! Every publish waits for the broker's confirm. A confirm lost with the connection means
//! the message may or may not have arrived, so it is published again: duplicates are
//! possible, loss is not. A delivery is acknowledged only after its consumers and their
//! outbox succeeded; one in progress when the connection drops is delivered again.
//! Acknowledgements are coalesced: deliveries settled in order share one `basic.ack` with
//! `multiple` set, which never reaches past a delivery still in progress.
//!
//! ```no_run
//! use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message};
//! use bus_rabbitmq::RabbitMqTransport;
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug, Serialize, Deserialize, Message)]
//! # #[message(urn = "urn:message:Shop:OrderPlaced")]
//! # struct OrderPlaced { order_id: u32 }
//! # #[tokio::main] async fn main() -> Result<(), BoxError> {
//! let transport = RabbitMqTransport::from_env().await?;
//! let bus = Bus::builder(transport)
//!     .endpoint(Endpoint::new("billing").handler(|ctx: ConsumeContext<OrderPlaced>| async move {
//!         println!("order {}", ctx.message().order_id);
//!         Ok(())
//!     }))
//!     .build();
//! bus.start().await?;
//! bus.publish(OrderPlaced { order_id: 1 }).await?;
//! # Ok(()) }
//! ```

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

mod acks;
mod connection;
mod consumer;
mod error;
mod frame;
mod headers;
mod options;
mod publisher;
mod topology;
mod transport;

pub use error::{is_not_found, Error, Result};
pub use options::{
    default_address, nodes, redact, ExchangeType, QueueSettings, QueueType, RabbitMqOptions, TlsOptions,
};
pub use transport::RabbitMqTransport;

/// Conversions tests use to read raw deliveries the way the transport does.
#[doc(hidden)]
pub mod testing {
    pub use crate::headers::transport_message;

    /// The AMQP properties the transport publishes `message` with (persistent).
    pub fn properties(message: &bus_core::TransportMessage) -> lapin::BasicProperties {
        crate::headers::properties(message, true)
    }
}
