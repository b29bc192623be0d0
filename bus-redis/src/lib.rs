//! bus-redis: a durable message scheduler on Redis for bus-core.
//!
//! [`RedisScheduler`] keeps scheduled messages (`Bus::schedule_send`) in Redis until they are
//! due: a sorted set by due time, one hash per message. Due messages are claimed atomically
//! (a Lua script moves them to a set of claims with a lease), so several service instances
//! share one scheduler; a claim whose instance died before delivering is given back when its
//! lease runs out, so each message is delivered at least once, and once when nothing fails.

#![warn(clippy::print_stdout)]
#![doc(test(attr(deny(warnings))))]

mod scheduler;

pub use scheduler::{RedisScheduler, RedisSchedulerOptions};
