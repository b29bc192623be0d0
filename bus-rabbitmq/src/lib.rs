//! bus-rabbitmq: the RabbitMQ transport for bus-core (on lapin).
//!
//! Not built yet: it arrives with its own issue (MassTransit-compatible topology,
//! confirmed publishing, recovery). Until then, use `bus_inmemory::InMemoryTransport`.

#![warn(clippy::print_stdout)]
