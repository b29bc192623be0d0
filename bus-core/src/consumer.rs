//! Consumers: what receives messages of a type.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::{BoxError, ConsumeContext, ConsumeError, Message, ReceiveContext};

/// Receives messages of type `M`.
///
/// A struct with shared state implements it; a plain async function registers with
/// [`Endpoint::handler`](crate::Endpoint::handler).
/// Return `Err` to fail the attempt (the retry policy decides what follows); wrap the
/// error in [`Permanent`] to skip retries.
///
/// ```
/// use bus_core::{BoxError, ConsumeContext, Consumer, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[message(urn = "urn:message:Shop:OrderPlaced")]
/// struct OrderPlaced { order_id: u32 }
///
/// struct AuditConsumer { prefix: String }
///
/// impl Consumer<OrderPlaced> for AuditConsumer {
///     async fn consume(&self, ctx: ConsumeContext<OrderPlaced>) -> Result<(), BoxError> {
///         println!("{}: order {}", self.prefix, ctx.message().order_id);
///         Ok(())
///     }
/// }
///
/// let bus = bus_core::Bus::builder(bus_inmemory::InMemoryTransport::new())
///     .endpoint(bus_core::Endpoint::new("audit").consumer(AuditConsumer { prefix: "audit".into() }))
///     .build();
/// # drop(bus);
/// # let _ = OrderPlaced { order_id: 1 };
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not consume `{M}`",
    label = "this type does not implement `Consumer<{M}>`",
    note = "implement `Consumer<{M}>` for it, or register an async fn with `.handler(...)`"
)]
pub trait Consumer<M: Message>: Send + Sync + 'static {
    /// Handles one message.
    fn consume(&self, ctx: ConsumeContext<M>) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// An async function used as a consumer.
pub(crate) struct FnConsumer<F, M> {
    f: F,
    _message: PhantomData<fn(M)>,
}

impl<F, M> FnConsumer<F, M> {
    pub(crate) fn new(f: F) -> Self {
        FnConsumer { f, _message: PhantomData }
    }
}

impl<F, Fut, M> Consumer<M> for FnConsumer<F, M>
where
    M: Message,
    F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send,
{
    fn consume(&self, ctx: ConsumeContext<M>) -> impl Future<Output = Result<(), BoxError>> + Send {
        (self.f)(ctx)
    }
}

/// Marks a consumer error as permanent: the message is not retried or redelivered.
///
/// ```
/// use bus_core::{BoxError, Permanent};
/// let err: BoxError = Permanent::new(std::io::Error::other("order does not exist")).into();
/// assert!(err.downcast_ref::<Permanent>().is_some());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct Permanent {
    type_name: &'static str,
    #[source]
    source: BoxError,
}

impl Permanent {
    /// Wraps an error as permanent.
    pub fn new<E: Into<BoxError> + 'static>(error: E) -> Self {
        Permanent { type_name: std::any::type_name::<E>(), source: error.into() }
    }

    /// The wrapped error's type name.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

/// Returned by a consumer that decides the message is not for it after all: the message
/// moves to `{queue}_skipped` (with `MT-Reason: dead-letter`), as if no consumer matched.
///
/// Sagas use it for an event whose instance does not exist.
///
/// ```
/// use bus_core::{BoxError, Skip};
/// let err: BoxError = Skip::new("no saga instance 42").into();
/// assert_eq!(err.to_string(), "skipped: no saga instance 42");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("skipped: {reason}")]
pub struct Skip {
    reason: String,
}

impl Skip {
    /// Skips the message for `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Skip { reason: reason.into() }
    }
}

/// A consumer with its message type erased: the pipeline's innermost call.
pub(crate) trait ErasedConsumer: Send + Sync + 'static {
    fn consume(&self, ctx: ReceiveContext) -> BoxFuture<'_, Result<(), ConsumeError>>;
}

pub(crate) struct TypedConsumer<M, C> {
    consumer: C,
    _message: PhantomData<fn(M)>,
}

impl<M: Message, C: Consumer<M>> TypedConsumer<M, C> {
    pub(crate) fn erased(consumer: C) -> Arc<dyn ErasedConsumer> {
        Arc::new(TypedConsumer { consumer, _message: PhantomData })
    }
}

impl<M: Message, C: Consumer<M>> ErasedConsumer for TypedConsumer<M, C> {
    fn consume(&self, ctx: ReceiveContext) -> BoxFuture<'_, Result<(), ConsumeError>> {
        Box::pin(async move {
            let message: M = ctx.envelope().message_of().map_err(ConsumeError::deserialize)?;
            let ctx = ConsumeContext::new(message, ctx);
            self.consumer.consume(ctx).await.map_err(ConsumeError::from_consumer)
        })
    }
}
