use crate::{BoxError, Envelope};

/// A step every outgoing message (published, sent, responded or a fault) goes through,
/// after its ids and headers are set and before it is serialized.
///
/// Steps run in the order they were added; an error refuses the message, and the
/// publish or send fails with [`Error::SendRejected`](crate::Error::SendRejected).
///
/// A closure is a send middleware:
///
/// ```
/// use bus_core::{BoxError, Bus, Envelope};
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
///     .send_middleware(|envelope: &mut Envelope| {
///         envelope.headers.insert_if_absent("Tenant", "acme");
///         Ok::<_, BoxError>(())
///     })
///     .build();
/// # drop(bus);
/// ```
pub trait SendMiddleware: Send + Sync + 'static {
    /// Inspects or changes one outgoing message.
    fn on_send(&self, envelope: &mut Envelope) -> Result<(), BoxError>;
}

impl<F> SendMiddleware for F
where
    F: Fn(&mut Envelope) -> Result<(), BoxError> + Send + Sync + 'static,
{
    fn on_send(&self, envelope: &mut Envelope) -> Result<(), BoxError> {
        self(envelope)
    }
}
