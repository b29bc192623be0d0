//! Flow control on receive endpoints: how many messages, how fast, in what order, and when
//! to stop. See `docs/flow-control.md` for when to use which.
//!
//! - [`RateLimit`]: at most so many messages per interval;
//! - [`KillSwitch`]: stop consuming while what the consumers call is down;
//! - partitions ([`Endpoint::partition_by`](crate::Endpoint::partition_by)): one message of a
//!   key at a time, in delivery order;
//! - the circuit breaker is middleware: [`CircuitBreaker`](crate::middleware::CircuitBreaker);
//! - batches: [`Batch`](crate::Batch);
//! - a bus-wide limit on concurrent consumes: [`BusBuilder::concurrency_limit`](crate::BusBuilder::concurrency_limit).

pub(crate) mod kill_switch;
pub(crate) mod partitioner;
pub(crate) mod rate_limit;

pub use kill_switch::KillSwitch;
pub use partitioner::DEFAULT_PARTITIONS;
pub use rate_limit::RateLimit;
