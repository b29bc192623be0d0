//! The consume pipeline: a stack of middleware around each consumer.
//!
//! For every consumer of a message the pipeline runs, outermost first:
//!
//! 1. [`ConcurrencyLimit`] (when the consumer has a limit),
//! 2. the endpoint's middleware, then the consumer's, in the order they were added,
//! 3. [`Retry`] (the in-process retry policy, when it allows any retry),
//! 4. [`Timeout`] (when the consumer has a timeout): a hung attempt becomes a failed one,
//! 5. the endpoint's attempt middleware (`Endpoint::attempt_middleware`), once per attempt,
//! 6. the consumer, whose panic is a failed attempt like an error (retried likewise).
//!
//! Delayed redelivery, `_error` and faults happen after the pipeline, once all retries
//! are spent (see `docs/failures.md`).
//!
//! Outgoing messages go through [`SendMiddleware`] steps before they are serialized.

mod circuit_breaker;
mod concurrency;
mod from_fn;
mod retry;
mod send;
mod timeout;

use std::fmt;
use std::sync::Arc;

use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
use futures::FutureExt as _;

pub use circuit_breaker::{CircuitBreaker, CircuitState, CIRCUIT_BREAKER_OPEN};
pub use concurrency::ConcurrencyLimit;
pub use from_fn::{from_fn, FromFn};
pub use retry::{Retry, RetryPolicy};
pub use send::SendMiddleware;
pub use timeout::Timeout;

use crate::consumer::ErasedConsumer;
use crate::{ConsumeError, ReceiveContext};

/// A payload (see [`ReceiveContext::insert_payload`]) that attempt middleware sets when it
/// stores what the consume produces durably with the consume's own writes, in one
/// transaction (a database outbox): the messages cannot be lost once the attempt succeeds.
/// A saga then deletes a finalized instance in that transaction, rather than keeping it
/// until its last messages have left.
#[derive(Debug, Clone, Copy, Default)]
pub struct DurableOutbox;

/// The text a panic was raised with.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// A step of the consume pipeline.
///
/// Call `next.run(ctx)` to go on to the rest of the pipeline (zero, one or several times),
/// or return without calling it to stop the message here.
pub trait Middleware: Send + Sync + 'static {
    /// Handles one consume attempt.
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, Result<(), ConsumeError>>;
}

struct PipelineInner {
    middleware: Vec<Arc<dyn Middleware>>,
    consumer: Arc<dyn ErasedConsumer>,
}

/// The rest of the pipeline after the current middleware.
#[derive(Clone)]
pub struct Next {
    pipeline: Arc<PipelineInner>,
    index: usize,
}

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next").field("index", &self.index).finish_non_exhaustive()
    }
}

impl Next {
    /// Runs the rest of the pipeline.
    pub fn run(self, ctx: ReceiveContext) -> BoxFuture<'static, Result<(), ConsumeError>> {
        Box::pin(async move {
            match self.pipeline.middleware.get(self.index).cloned() {
                Some(middleware) => {
                    let next = Next { pipeline: self.pipeline, index: self.index + 1 };
                    middleware.handle(ctx, next).await
                }
                // A panic in the consumer is a failed attempt, so the retry policy sees it and
                // the endpoint's other messages carry on.
                None => match AssertUnwindSafe(self.pipeline.consumer.consume(ctx)).catch_unwind().await {
                    Ok(result) => result,
                    Err(panic) => Err(ConsumeError::panicked(panic_message(&*panic))),
                },
            }
        })
    }
}

/// A consumer with its middleware stack, ready to run.
#[derive(Clone)]
pub(crate) struct Pipeline(Next);

impl Pipeline {
    pub(crate) fn new(middleware: Vec<Arc<dyn Middleware>>, consumer: Arc<dyn ErasedConsumer>) -> Self {
        Pipeline(Next { pipeline: Arc::new(PipelineInner { middleware, consumer }), index: 0 })
    }

    pub(crate) fn run(&self, ctx: ReceiveContext) -> BoxFuture<'static, Result<(), ConsumeError>> {
        self.0.clone().run(ctx)
    }
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline").field("layers", &self.0.pipeline.middleware.len()).finish()
    }
}
