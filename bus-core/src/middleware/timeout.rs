use std::time::Duration;

use futures::future::BoxFuture;

use super::{Middleware, Next};
use crate::{ConsumeError, ReceiveContext};

/// Fails an attempt that takes longer than its bound; the hung future is dropped.
#[derive(Debug, Clone, Copy)]
pub struct Timeout(pub Duration);

impl Middleware for Timeout {
    fn handle<'a>(&'a self, ctx: ReceiveContext, next: Next) -> BoxFuture<'a, Result<(), ConsumeError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.0, next.run(ctx)).await {
                Ok(result) => result,
                Err(_) => Err(ConsumeError::timed_out(self.0)),
            }
        })
    }
}
