//! Small helpers shared by the cases (and by the other test binaries through `tests::record`).

use std::sync::Arc;

use bus_core::testing::MessageLog;
use bus_core::{BoxError, ConsumeContext, Message, ReceiveEndpointBuilder};

/// Adds a handler of `M` that records every envelope it consumes into `log`.
pub fn record<M: Message>(e: &mut ReceiveEndpointBuilder, log: &MessageLog) {
    let log = log.clone();
    e.handler(move |ctx: ConsumeContext<M>| {
        let log = log.clone();
        async move {
            log.record(ctx.envelope());
            Ok::<_, BoxError>(())
        }
    });
}

/// A fresh log, shareable with handlers.
pub(crate) fn log() -> Arc<MessageLog> {
    Arc::new(MessageLog::default())
}
