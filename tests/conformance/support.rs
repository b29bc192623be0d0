//! Small helpers shared by the cases (and by the other test binaries through `tests::record`).

use std::sync::Arc;

use bus_core::testing::MessageLog;
use bus_core::{ConsumeContext, Endpoint, Headers, Message, TransportMessage};
use bytes::Bytes;

/// Adds a handler of `M` that records every envelope it consumes into `log`.
pub fn record<M: Message>(e: Endpoint, log: &MessageLog) -> Endpoint {
    e.handler_with_state(log.clone(), |ctx: ConsumeContext<M>, log| async move {
        log.record(ctx.envelope());
        Ok(())
    })
}

/// A fresh log, shareable with handlers.
pub(crate) fn log() -> Arc<MessageLog> {
    Arc::new(MessageLog::default())
}

/// A transport message with this body and content type, as a foreign producer would send it.
pub(crate) fn raw(body: impl Into<Bytes>, content_type: &'static str) -> TransportMessage {
    TransportMessage {
        body: body.into(),
        content_type: Some(content_type.into()),
        headers: Headers::new(),
        ..Default::default()
    }
}

/// A header of a message taken from a queue; panics, naming it, when it is missing.
pub(crate) fn header<'a>(message: &'a TransportMessage, name: &str) -> &'a str {
    message.headers.get_str(name).unwrap_or_else(|| panic!("header {name} missing: {:?}", message.headers))
}
