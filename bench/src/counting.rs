//! An endpoint that counts what it consumes and wakes the run at the last message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus_core::{ConsumeContext, Endpoint, Message};
use tokio::sync::Notify;

/// `endpoint` consuming `M` and doing nothing else, and the wake-up given when it has
/// consumed `count` messages (a permit is kept, so waiting after that still returns).
pub(crate) fn counting<M: Message>(endpoint: Endpoint, count: u64) -> (Endpoint, Arc<Notify>) {
    counting_with::<M>(endpoint, count, || {})
}

/// As [`counting`], running `each` for every message consumed, in the consumer.
pub(crate) fn counting_with<M: Message>(
    endpoint: Endpoint,
    count: u64,
    each: impl Fn() + Send + Sync + 'static,
) -> (Endpoint, Arc<Notify>) {
    let consumed = AtomicU64::new(0);
    let done = Arc::new(Notify::new());
    let wake = done.clone();
    let endpoint = endpoint.handler(move |ctx: ConsumeContext<M>| {
        std::hint::black_box(ctx.message());
        each();
        if consumed.fetch_add(1, Ordering::Relaxed) + 1 == count {
            wake.notify_one();
        }
        async { Ok(()) }
    });
    (endpoint, done)
}
