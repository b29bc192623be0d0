use std::future::Future;

use futures::future::BoxFuture;

use super::{Middleware, Next};
use crate::{ConsumeError, ReceiveContext};

/// Middleware from an async closure; see [`from_fn`].
#[derive(Debug, Clone)]
pub struct FromFn<F>(F);

/// Makes middleware from an async function of the context and the rest of the pipeline.
///
/// ```
/// use bus_core::middleware::from_fn;
/// let log = from_fn(|ctx, next| async move {
///     let id = ctx.message_id();
///     let result = next.run(ctx).await;
///     if result.is_err() { eprintln!("message {id:?} failed"); }
///     result
/// });
/// # let _ = log;
/// ```
pub fn from_fn<F, Fut>(f: F) -> FromFn<F>
where
    F: Fn(ReceiveContext, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ConsumeError>> + Send + 'static,
{
    FromFn(f)
}

impl<F, Fut> Middleware for FromFn<F>
where
    F: Fn(ReceiveContext, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ConsumeError>> + Send + 'static,
{
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, Result<(), ConsumeError>> {
        Box::pin((self.0)(ctx, next))
    }
}
