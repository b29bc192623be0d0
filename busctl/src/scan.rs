//! Reading a queue without taking from it: each message is fetched unacknowledged, and what
//! is not taken goes back where it was when the scan ends (or its connection does).

use bus_core::TransportMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::{BasicProperties, Channel, Connection};

use crate::{Error, Result};

/// One message fetched by a scan.
pub(crate) struct Fetched {
    pub(crate) tag: u64,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Vec<u8>,
    /// The message as the bus reads it (headers, ids).
    pub(crate) message: TransportMessage,
}

/// A queue being read, holding what it fetched.
pub(crate) struct QueueScan {
    pub(crate) channel: Channel,
    queue: String,
    /// Messages fetched, and how many the queue held when the scan began: a scan reads no
    /// more, so that one of a queue still filling (a redriven message failing again) ends.
    fetched: u64,
    waiting: u64,
}

impl QueueScan {
    /// Starts reading `queue`; a missing queue is an error.
    pub(crate) async fn open(connection: &Connection, queue: &str) -> Result<Self> {
        let channel = connection.create_channel().await?;
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let waiting = match channel.queue_declare(queue.into(), options, Default::default()).await {
            Ok(declared) => u64::from(declared.message_count()),
            Err(error) if bus_rabbitmq::is_not_found(&error) => return Err(Error::NoSuchQueue(queue.to_owned())),
            Err(error) => return Err(error.into()),
        };
        Ok(QueueScan { channel, queue: queue.to_owned(), fetched: 0, waiting })
    }

    /// The next message, unacknowledged; `None` once the queue has no more ready.
    pub(crate) async fn next(&mut self) -> Result<Option<Fetched>> {
        if self.fetched >= self.waiting {
            return Ok(None);
        }
        self.fetched += 1;
        let got = self.channel.basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: false }).await?;
        Ok(got.map(|got| {
            let delivery = got.delivery;
            let message = bus_rabbitmq::testing::transport_message(delivery.data.clone(), &delivery.properties);
            Fetched { tag: delivery.delivery_tag, properties: delivery.properties, body: delivery.data, message }
        }))
    }

    /// Takes a fetched message out of the queue for good.
    pub(crate) async fn remove(&self, tag: u64) -> Result<()> {
        self.channel.basic_ack(tag, BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Gives back every message held, each to where it was, by closing the channel they
    /// were fetched on (rather than rejecting each, which a quorum queue counts against its
    /// delivery limit).
    pub(crate) async fn finish(self) -> Result<()> {
        self.channel.close(200, "scanned".into()).await?;
        Ok(())
    }
}
