//! Confirmed publishing: pipelined over a few confirm channels, re-sent when a confirm is
//! lost with the connection, bounded in time during an outage. Mandatory publishes (sends and
//! moves, which must fail when nothing receives them) go one at a time per channel over
//! channels of their own, so that a returned message is always matched to its own publish.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use tokio::time::Instant;

use crate::connection::Shared;
use crate::error::{is_connection_loss, Error, Result};

/// Publishes `body` to `exchange` and waits for the broker's confirm, until `deadline` (the
/// whole operation's: time spent declaring the exchange first counts against it).
///
/// Many calls may be in flight at once on one channel; each resolves with its own confirm.
/// A confirm lost with the connection means the message may or may not have arrived: it is
/// published again on the next connection (at least once; duplicates possible, loss not).
pub(crate) async fn publish(
    shared: &Arc<Shared>,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: &BasicProperties,
    mandatory: bool,
    deadline: Instant,
) -> Result<()> {
    let (exchange_name, routing_key) = (crate::topology::short(exchange)?, crate::topology::short(routing_key)?);
    loop {
        let session = shared.session(deadline).await?;
        let attempt = async {
            let options = BasicPublishOptions { mandatory, ..BasicPublishOptions::default() };
            if mandatory {
                // Alone on its channel until confirmed, so that a returned message is its own.
                let channel = session.sender().await?;
                channel
                    .basic_publish(exchange_name.clone(), routing_key.clone(), options, body, properties.clone())
                    .await?
                    .await
            } else {
                let channel = session.publisher().await?;
                channel
                    .basic_publish(exchange_name.clone(), routing_key.clone(), options, body, properties.clone())
                    .await?
                    .await
            }
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(confirmation)) => {
                if confirmation.is_nack() {
                    return Err(Error::Nacked(exchange.to_owned()));
                }
                // Only a mandatory publish can come back, and only on its own channel.
                if mandatory && confirmation.take_message().is_some() {
                    return Err(Error::Unroutable(exchange.to_owned()));
                }
                return Ok(());
            }
            Ok(Err(error)) if is_connection_loss(&error) || !session.is_alive() => {
                tracing::debug!(%error, exchange, "publish interrupted by a connection loss; publishing again");
                // The supervisor notices the loss and brings up a new session; `session()` waits for it.
                if session.is_alive() {
                    tokio::task::yield_now().await;
                }
            }
            Ok(Err(error)) => {
                return Err(Error::Refused {
                    operation: format!("publishing to `{exchange}`"),
                    source: Box::new(error),
                });
            }
            Err(_) => return Err(Error::Unavailable(shared.options.publish_timeout)),
        }
    }
}
