use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use super::{Middleware, Next};
use crate::{ConsumeError, ReceiveContext};

/// Lets at most `n` messages through to the rest of the pipeline at once.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit(Arc<Semaphore>);

impl ConcurrencyLimit {
    /// A limit of `n` (at least 1, at most [`Semaphore::MAX_PERMITS`]: more is no limit at all;
    /// [`BusBuilder::try_build`](crate::BusBuilder::try_build) refuses it).
    pub fn new(n: usize) -> Self {
        ConcurrencyLimit(Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS))))
    }
}

impl Middleware for ConcurrencyLimit {
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, Result<(), ConsumeError>> {
        Box::pin(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = self.0.acquire().await;
            next.run(ctx).await
        })
    }
}
