//! Confirmed publishing: pipelined over a few confirm channels, re-sent when a confirm is
//! lost with the connection, bounded in time during an outage. Mandatory publishes (sends and
//! moves, which must fail when nothing receives them) go one at a time per channel over
//! channels of their own, so that a returned message is always matched to its own publish.

use bus_core::logged::chain;
use std::sync::Arc;

use bus_core::sync::MutexExt;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use tokio::time::Instant;

use crate::connection::Shared;
use crate::error::{is_connection_loss, Error, Result};
use crate::frame::header_frame_size;

/// Publishes `body` to `exchange` and waits for the broker's confirm, until `deadline` (the
/// whole operation's: time spent declaring the exchange first counts against it).
///
/// Many calls may be in flight at once on one channel; each resolves with its own confirm.
/// A confirm lost with the connection means the message may or may not have arrived: it is
/// published again on the next connection (at least once; duplicates possible, loss not).
///
/// A refusal closes the channel it came on, and the broker fails every confirm pending there
/// with it: the refused publish and its innocent neighbours alike. So a publish refused on a
/// shared channel is tried once more alone on a channel of its own, where only a publish the
/// broker really refuses fails again.
///
/// Properties that do not fit in one frame fail at once ([`Error::FrameTooLarge`]): sent,
/// they would make the broker close the whole connection.
///
/// `make_properties` makes the message's properties: once, and again for each attempt after
/// the first (lapin takes them, and copying them up front for an attempt that is rarely
/// needed costs a traced message about as much as making them).
pub(crate) async fn publish(
    shared: &Arc<Shared>,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    make_properties: impl Fn() -> BasicProperties,
    mandatory: bool,
    deadline: Instant,
) -> Result<()> {
    let (exchange_name, routing_key) = (crate::topology::short(exchange)?, crate::topology::short(routing_key)?);
    let first = make_properties();
    let size = header_frame_size(&first);
    let mut made = Some(first);
    let mut alone = mandatory;
    loop {
        let session = shared.session(deadline).await?;
        shared.unblocked(deadline).await?;
        let limit = session.frame_max();
        if size > limit {
            return Err(Error::FrameTooLarge { size, limit });
        }
        let options = BasicPublishOptions { mandatory, ..BasicPublishOptions::default() };
        let properties = made.take().unwrap_or_else(&make_properties);
        let result = if alone {
            // Alone on its channel until confirmed, so that a returned message is its own.
            let Ok(channel) = tokio::time::timeout_at(deadline, session.sender()).await else {
                return Err(Error::Unavailable(shared.options.publish_timeout));
            };
            match channel {
                Err(error) => Some(Err(error)),
                Ok(channel) => {
                    let attempt = async {
                        channel
                            .basic_publish(exchange_name.clone(), routing_key.clone(), options, body, properties)
                            .await?
                            .await
                    };
                    let result = tokio::time::timeout_at(deadline, attempt).await.ok();
                    if result.is_none() {
                        // Its confirm may still come, and would be taken for the next publish's
                        // (with a returned message): the channel is not used again.
                        channel.discard();
                    }
                    result
                }
            }
        } else {
            let attempt = async {
                let channel = session.publisher().await?;
                let publishing =
                    channel.basic_publish(exchange_name.clone(), routing_key.clone(), options, body, properties);
                in_order(session.publish_order(), publishing).await?.await
            };
            tokio::time::timeout_at(deadline, attempt).await.ok()
        };
        match result {
            Some(Ok(confirmation)) => {
                if confirmation.is_nack() {
                    return Err(Error::Nacked(exchange.to_owned()));
                }
                // Only a mandatory publish can come back, and only on its own channel.
                if mandatory && confirmation.take_message().is_some() {
                    return Err(Error::Unroutable(exchange.to_owned()));
                }
                return Ok(());
            }
            Some(Err(error)) if is_connection_loss(&error) || !session.is_alive() => {
                tracing::debug!(error = %chain(&error), exchange, "publish interrupted by a connection loss; publishing again");
                // The supervisor notices the loss and brings up a new session; `session()` waits for it.
                if session.is_alive() {
                    tokio::task::yield_now().await;
                }
            }
            Some(Err(error)) if !alone => {
                tracing::debug!(error = %chain(&error), exchange, "publish failed with its channel; trying it alone");
                alone = true;
            }
            Some(Err(error)) => {
                return Err(Error::Refused {
                    operation: format!("publishing to `{exchange}`"),
                    source: Box::new(error),
                });
            }
            None => return Err(Error::Unavailable(shared.options.publish_timeout)),
        }
    }
}

/// Runs the first poll of `publishing` (a `basic_publish`) under `order`, then the rest freely.
///
/// lapin numbers a publish for its confirm and queues its frames in that first poll, but not
/// atomically: two tasks publishing on one channel from two threads can take numbers in one
/// order and queue frames in the other. The broker numbers messages as their frames arrive,
/// so its confirm for one then resolves the other's: with a refused or returned message among
/// them, a publish the broker never took was reported confirmed. Under `order`, numbers and
/// frames go in the same order; waiting for the confirm stays concurrent.
async fn in_order<F: std::future::Future>(order: &std::sync::Mutex<()>, publishing: F) -> F::Output {
    let mut publishing = std::pin::pin!(publishing);
    let first = std::future::poll_fn(|cx| {
        let _numbering_and_queueing = order.locked();
        std::task::Poll::Ready(publishing.as_mut().poll(cx))
    })
    .await;
    match first {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => publishing.await,
    }
}
