//! Delayed redelivery: the second level of retries, through the transport.

use std::time::Duration;

/// After in-process retries are spent, deliver the message again later through the
/// transport, once after each delay, counting in `MT-Redelivery-Count`.
///
/// ```
/// use std::time::Duration;
/// use bus_core::RedeliveryPolicy;
/// let policy = RedeliveryPolicy::intervals([Duration::from_secs(5), Duration::from_secs(30)]);
/// assert_eq!(policy.delay_after(0), Some(Duration::from_secs(5)));
/// assert_eq!(policy.delay_after(1), Some(Duration::from_secs(30)));
/// assert_eq!(policy.delay_after(2), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedeliveryPolicy {
    delays: Vec<Duration>,
}

impl RedeliveryPolicy {
    /// One redelivery after each delay.
    pub fn intervals(delays: impl IntoIterator<Item = Duration>) -> Self {
        RedeliveryPolicy { delays: delays.into_iter().collect() }
    }

    /// The delay before the next redelivery of a message redelivered `count` times so far.
    pub fn delay_after(&self, count: u32) -> Option<Duration> {
        self.delays.get(count as usize).copied()
    }

    /// All delays, in order.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}
