//! Reading a queue without taking from it: each message is fetched unacknowledged and held,
//! and what is not taken goes back where it was when the scan ends (or its connection does).

use bus_core::TransportMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
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
    held: Vec<u64>,
}

impl QueueScan {
    /// Starts reading `queue`; a missing queue is an error.
    pub(crate) async fn open(connection: &Connection, queue: &str) -> Result<Self> {
        let channel = connection.create_channel().await?;
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        match channel.queue_declare(queue.into(), options, Default::default()).await {
            Ok(_) => {}
            Err(error) if bus_rabbitmq::is_not_found(&error) => return Err(Error::NoSuchQueue(queue.to_owned())),
            Err(error) => return Err(error.into()),
        }
        Ok(QueueScan { channel, queue: queue.to_owned(), held: Vec::new() })
    }

    /// The next message, unacknowledged; `None` once the queue has no more ready.
    pub(crate) async fn next(&mut self) -> Result<Option<Fetched>> {
        let got = self.channel.basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: false }).await?;
        Ok(got.map(|got| {
            let delivery = got.delivery;
            let message = bus_rabbitmq::testing::transport_message(delivery.data.clone(), &delivery.properties);
            Fetched { tag: delivery.delivery_tag, properties: delivery.properties, body: delivery.data, message }
        }))
    }

    /// Keeps a fetched message, to give back when the scan ends.
    pub(crate) fn hold(&mut self, tag: u64) {
        self.held.push(tag);
    }

    /// Takes a fetched message out of the queue for good.
    pub(crate) async fn remove(&self, tag: u64) -> Result<()> {
        self.channel.basic_ack(tag, BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Gives back every message held, each to where it was.
    pub(crate) async fn finish(self) -> Result<()> {
        for tag in self.held {
            self.channel.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await?;
        }
        let _ = self.channel.close(200, "scanned".into()).await;
        Ok(())
    }
}
