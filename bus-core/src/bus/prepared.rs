//! Messages prepared to leave later: serialized and addressed now, handed to the transport
//! when their owner says so. What a database outbox stores.

use super::Bus;
use crate::outbox::{self, MessageTypes, Route};
use crate::{Message, ReceiveContext, Result, SendOptions, TransportMessage};

/// A message serialized and addressed but not yet handed to the transport: what a database
/// outbox stores in the transaction that produced it, to [`deliver`](Bus::deliver) once that
/// transaction has committed.
#[derive(Debug, Clone)]
pub struct PreparedMessage {
    /// Where it goes.
    pub destination: PreparedDestination,
    /// Its bytes and transport properties (message id, headers, content type...).
    pub message: TransportMessage,
}

/// Where a [`PreparedMessage`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedDestination {
    /// Published under these message types, its own first.
    Publish(Vec<String>),
    /// Sent to the endpoint of this name.
    Send(String),
}

impl From<outbox::Boxed> for PreparedMessage {
    fn from(outgoing: outbox::Boxed) -> Self {
        let outbox::Outgoing { route, message, .. } = *outgoing;
        let destination = match route {
            Route::Publish(MessageTypes::Static(types)) => {
                PreparedDestination::Publish(types.iter().map(|t| (*t).to_owned()).collect())
            }
            Route::Publish(MessageTypes::Owned(types)) => PreparedDestination::Publish(types),
            Route::Send(endpoint) => PreparedDestination::Send(endpoint),
        };
        PreparedMessage { destination, message }
    }
}

impl Bus {
    /// Prepares a publish without handing it to the transport: ids, addresses, headers and
    /// trace context are set now, as [`publish_with`](Bus::publish_with) sets them.
    ///
    /// ```
    /// use bus_core::{Bus, Message, PreparedDestination, SendOptions};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:OrderPlaced")]
    /// # struct OrderPlaced { order_id: u32 }
    /// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).build();
    /// let prepared = bus.prepare_publish(OrderPlaced { order_id: 7 }, SendOptions::new())?;
    /// assert_eq!(prepared.destination, PreparedDestination::Publish(vec!["urn:message:Shop:OrderPlaced".into()]));
    /// assert!(prepared.message.message_id.is_some());
    /// # Ok::<_, bus_core::Error>(())
    /// ```
    pub fn prepare_publish<M: Message>(&self, message: M, options: SendOptions) -> Result<PreparedMessage> {
        Ok(self.prepared_publish(message, options, None)?.into())
    }

    /// Prepares a send to `address` without handing it to the transport (see
    /// [`prepare_publish`](Self::prepare_publish)).
    pub fn prepare_send<M: Message>(&self, address: &str, message: M, options: SendOptions) -> Result<PreparedMessage> {
        Ok(self.prepared_send(address, message, options, None)?.into())
    }

    /// Hands a prepared message to the transport. Resolves when the transport has taken it
    /// (on RabbitMQ: confirmed it); its message id is the one it was prepared with.
    /// Fails with [`Error::Stopped`](crate::Error::Stopped) once the bus has stopped.
    pub async fn deliver(&self, prepared: PreparedMessage) -> Result<()> {
        self.inner.ensure_not_stopped()?;
        let PreparedMessage { destination, message } = prepared;
        let route = match destination {
            PreparedDestination::Publish(types) => Route::Publish(MessageTypes::Owned(types)),
            PreparedDestination::Send(endpoint) => Route::Send(endpoint),
        };
        // Read back for the observers and metrics; the bytes go as they were stored.
        let envelope = self.inner.serializers.deserialize(&message).ok();
        self.inner.dispatch_message(&route, message, envelope.as_ref()).await
    }
}

impl ReceiveContext {
    /// Takes the messages this attempt's consumer produced and the outbox holds, so that a
    /// database outbox stores them in the consumer's transaction instead of the bus releasing
    /// them (the endpoint's outbox must be on, as it is by default).
    pub fn take_held(&self) -> Vec<PreparedMessage> {
        self.outbox().take().into_iter().map(PreparedMessage::from).collect()
    }
}
