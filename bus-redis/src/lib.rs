//! bus-redis: Redis for bus-core, however Redis is deployed.
//!
//! - [`RedisConnection`] reaches one server, a Redis Cluster or a master watched by Sentinel
//!   ([`RedisConfig`]), and follows a failover; the saga repository of `bus-saga` and the
//!   scheduler here both run on it.
//! - [`RedisScheduler`] keeps scheduled messages (`Bus::schedule_send`) in Redis until they
//!   are due: a sorted set by due time, one hash per message. Due messages are claimed
//!   atomically (a Lua script moves them to a set of claims with a lease), so several service
//!   instances share one scheduler; a claim whose instance died before delivering is given
//!   back when its lease runs out, so each message is delivered at least once, and once when
//!   nothing fails. Its keys share one hash tag, so on a Redis Cluster they live in one slot.

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

mod connection;
mod scheduler;

pub use connection::{has_hash_tag, same_slot, RedisConfig, RedisConnection, RedisTimeouts};
pub use scheduler::{RedisScheduler, RedisSchedulerOptions};
