//! The conformance fixture for RabbitMQ: one vhost and one connection per test binary.

use std::time::Duration;

use bus_core::TransportMessage;
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::OnceCell;

use crate::rabbit_support::{rabbitmqctl, Vhost};
use crate::Fixture;

/// The broker every RabbitMQ test uses.
pub const BROKER_PORT: u16 = 5672;

/// A RabbitMQ transport on a vhost of its own, with a side connection to look into queues.
#[derive(Debug, Clone)]
pub struct RabbitFixture {
    transport: RabbitMqTransport,
    /// The side connection for checks; opened again when a broker error closed it, so that
    /// one test's refused operation cannot fail the others sharing it.
    inspector: std::sync::Arc<tokio::sync::Mutex<std::sync::Arc<lapin::Connection>>>,
    uri: String,
    vhost: String,
}

struct Held {
    fixture: RabbitFixture,
    // Kept for the life of the process; a later run deletes it (see `shared`).
    _vhost: Vhost,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("fixture", &self.fixture).finish()
    }
}

/// Panics with a message that says what to do when the broker does not answer.
pub fn require_broker() {
    if std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], BROKER_PORT).into(), Duration::from_secs(2)).is_err() {
        panic!(
            "RabbitMQ does not answer on 127.0.0.1:{BROKER_PORT}. These tests need a real broker: \
             run scripts/test.sh (it starts or installs RabbitMQ), or start it with `rabbitmq-server -detached`."
        );
    }
}

impl RabbitFixture {
    /// The fixture shared by every test of this binary, on a fresh vhost named after `prefix`.
    /// Vhosts left by earlier runs of the same binary are deleted first.
    pub async fn shared(prefix: &'static str) -> RabbitFixture {
        static HELD: OnceCell<Held> = OnceCell::const_new();
        let held = HELD
            .get_or_init(|| async move {
                require_broker();
                let listed =
                    tokio::task::spawn_blocking(|| rabbitmqctl(&["list_vhosts", "--quiet", "--no-table-headers"]))
                        .await
                        .expect("rabbitmqctl runs");
                for stale in listed.lines().map(str::trim).filter(|v| v.starts_with(&format!("{prefix}-"))) {
                    let stale = stale.to_owned();
                    let _ = tokio::task::spawn_blocking(move || rabbitmqctl(&["delete_vhost", &stale])).await;
                }
                let vhost = tokio::task::spawn_blocking(move || Vhost::create(prefix)).await.expect("vhost created");
                let uri = vhost.uri(BROKER_PORT);
                let fixture = RabbitFixture::connect(&uri).await;
                Held { fixture, _vhost: vhost }
            })
            .await;
        held.fixture.clone()
    }

    /// A fixture on the broker at `uri`.
    pub async fn connect(uri: &str) -> RabbitFixture {
        let options = RabbitMqOptions { publish_timeout: Duration::from_secs(10), ..RabbitMqOptions::default() };
        let transport = RabbitMqTransport::connect_with(uri, options)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ ({e}); run scripts/test.sh to start it"));
        let inspector = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot open the inspection connection: {e}"));
        let vhost = uri.rsplit('/').next().unwrap_or("").split('?').next().unwrap_or("").replace("%2f", "/");
        RabbitFixture {
            transport,
            inspector: std::sync::Arc::new(tokio::sync::Mutex::new(std::sync::Arc::new(inspector))),
            uri: uri.to_owned(),
            vhost,
        }
    }

    /// The broker URI (with credentials: tests only).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The vhost the fixture works in.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// A channel on the side connection, for raw publishing and checks.
    pub async fn channel(&self) -> lapin::Channel {
        let mut inspector = self.inspector.lock().await;
        if let Ok(channel) = inspector.create_channel().await {
            return channel;
        }
        let again = lapin::Connection::connect(&self.uri, lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot open the inspection connection again: {e}"));
        *inspector = std::sync::Arc::new(again);
        inspector.create_channel().await.expect("inspection channel opens")
    }
}

impl Fixture for RabbitFixture {
    type Transport = RabbitMqTransport;

    fn transport(&self) -> RabbitMqTransport {
        self.transport.clone()
    }

    async fn take_messages(&self, queue: &str, n: usize, timeout: Duration) -> Vec<TransportMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut taken = Vec::new();
        if n > 0 {
            // Until `n` are there, as the broker pushes them, one at a time.
            let mut channel = self.channel().await;
            if let Some((mut consumer, tag)) = self.consume_when_declared(&mut channel, queue, deadline).await {
                while taken.len() < n {
                    let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, consumer.next()).await else { break };
                    taken.push(accept(delivery.unwrap_or_else(|e| panic!("consuming `{queue}` fails: {e}"))).await);
                }
                // Cancelled and awaited before the close: a consumer dropped while active makes
                // lapin send `basic.cancel` from its own task, which can reach the broker after
                // `channel.close`; a frame on a closed channel closes the whole connection
                // (`CHANNEL_ERROR - expected 'channel.open'`), failing every test sharing it.
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
            }
            // Returns the one delivery the broker may have pushed beyond `n`, for the drain below.
            let _ = channel.close(200, "inspected".into()).await;
        }
        // Then every message waiting there, so that a check for exactly `n` sees one more that
        // arrived with them; for `n == 0`, a check that the queue is empty (it must exist).
        let channel = self.channel().await;
        loop {
            match channel.basic_get(queue.into(), BasicGetOptions::default()).await {
                Ok(Some(message)) => taken.push(accept(message.delivery).await),
                Ok(None) => break,
                // Never declared while we waited: it holds none.
                Err(e) if n > 0 && is_not_found(&e) => return taken,
                Err(e) => panic!("basic.get on `{queue}` fails: {e}"),
            }
        }
        let _ = channel.close(200, "inspected".into()).await;
        taken
    }
}

/// Acknowledges a delivery taken for inspection, and returns it as a transport message.
async fn accept(delivery: lapin::message::Delivery) -> TransportMessage {
    delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
    bus_rabbitmq::testing::transport_message(delivery.data, &delivery.properties)
}

/// Whether the broker refused because the queue does not exist (the refusal closes the channel).
fn is_not_found(error: &lapin::Error) -> bool {
    error.to_string().contains("NOT_FOUND")
}

impl RabbitFixture {
    /// Consumes `queue` with a prefetch of one, once it exists, and returns the consumer with
    /// its tag; `None` if it is not declared before `deadline`.
    async fn consume_when_declared(
        &self,
        channel: &mut lapin::Channel,
        queue: &str,
        deadline: tokio::time::Instant,
    ) -> Option<(lapin::Consumer, String)> {
        loop {
            channel.basic_qos(1, BasicQosOptions::default()).await.expect("basic.qos");
            let tag = format!("inspector-{}", uuid::Uuid::now_v7().simple());
            let options = BasicConsumeOptions::default();
            match channel.basic_consume(queue.into(), tag.as_str().into(), options, FieldTable::default()).await {
                Ok(consumer) => return Some((consumer, tag)),
                Err(e) if is_not_found(&e) && tokio::time::Instant::now() < deadline => {
                    *channel = self.channel().await;
                    // The broker announces no queue's declaration (without its event-exchange
                    // plugin): look again shortly, within the deadline.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) if is_not_found(&e) => return None,
                Err(e) => panic!("basic.consume on `{queue}` fails: {e}"),
            }
        }
    }
}
