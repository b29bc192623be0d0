use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Middleware, Next};
use crate::{ConsumeError, ReceiveContext};

/// Turns a panic in the consumer into a failed attempt, so the endpoint and its other
/// messages carry on. Always the innermost layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanic;

impl Middleware for CatchPanic {
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, Result<(), ConsumeError>> {
        Box::pin(async move {
            match AssertUnwindSafe(next.run(ctx)).catch_unwind().await {
                Ok(result) => result,
                Err(panic) => Err(ConsumeError::panicked(panic_message(&*panic))),
            }
        })
    }
}

/// The text a panic was raised with.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
