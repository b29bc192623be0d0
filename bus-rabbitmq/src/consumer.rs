//! Consuming an endpoint across reconnects: one task per endpoint re-subscribes on every new
//! session and forwards deliveries to the bus through a bounded channel.

use bus_core::logged::chain;
use bus_core::sync::MutexExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{Delivery, DeliveryStream, EndpointTopology, Headers, Settle, Settlement, TransportMessage};
use futures::future::BoxFuture;
use futures::{stream, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::mpsc;

use crate::acks::{Acks, Outstanding};
use crate::connection::{Session, Shared};
use crate::error::{Error, Result};
use crate::frame::fit;
use crate::headers::{forwarded_properties, transport_message};
use crate::publisher::publish;
use crate::topology::{self, delay_queue};

/// Whether an endpoint's consumer runs, as reported to health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConsumerState {
    Starting,
    /// Subscribed on the session of this generation.
    Consuming(u64),
    /// Subscribed on the session of this generation, after declaring again, at the instant
    /// given, what had been deleted behind the bus's back (what the text says): messages
    /// published to it meanwhile went nowhere, which health reports for a while.
    Repaired(u64, tokio::time::Instant, String),
    /// Lost its subscription; waiting for the connection to come back.
    Recovering(String),
    /// Could not subscribe, or could not declare its topology again, on a live connection.
    Failing(String),
    Stopped,
}

/// Starts the consumer task of an endpoint on the consuming connection `shared`, and returns
/// its deliveries; they are moved elsewhere through the publishing connection `publishing`.
pub(crate) fn start(
    shared: Arc<Shared>,
    publishing: Arc<Shared>,
    endpoint: EndpointTopology,
    prefetch: u16,
    state: Arc<Mutex<ConsumerState>>,
) -> DeliveryStream {
    let prefetch = prefetch.max(1);
    let (tx, rx) = mpsc::channel::<Delivery>(usize::from(prefetch));
    tokio::spawn(run(shared, publishing, endpoint, prefetch, tx, state));
    Box::pin(stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) }))
}

fn set(state: &Mutex<ConsumerState>, value: ConsumerState) {
    *state.locked() = value;
}

async fn run(
    shared: Arc<Shared>,
    publishing: Arc<Shared>,
    endpoint: EndpointTopology,
    prefetch: u16,
    tx: mpsc::Sender<Delivery>,
    state: Arc<Mutex<ConsumerState>>,
) {
    let queue = endpoint.queue.clone();
    let mut pause = shared.options.reconnect_min;
    // What was declared again before subscribing, for health to report.
    let mut repaired: Option<String> = None;
    'sessions: loop {
        let session = tokio::select! {
            session = shared.session_when_up() => match session {
                Some(session) => session,
                None => break,
            },
            () = tx.closed() => break,
        };
        let subscribed = async {
            let channel = session.connection.create_channel().await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let tag = format!("{}-{}", shared.options.connection_name, uuid::Uuid::now_v7().simple());
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer, tag))
        };
        let failure = match subscribed.await {
            Ok(subscribed) => Ok(subscribed),
            Err(error) if crate::error::is_not_found(&error) => {
                // The queue was deleted under the bus: declared again, at once, with the rest.
                let what = format!("queue `{queue}` was deleted");
                set(&state, ConsumerState::Recovering(what.clone()));
                match repair(&publishing, &session, &endpoint, &what).await {
                    Ok(()) => {
                        repaired = Some(what);
                        continue;
                    }
                    Err(error) => Err(chain(&error).to_string()),
                }
            }
            Err(error) => {
                tracing::warn!(queue = %queue, error = %chain(&error), "could not consume; trying again");
                Err(chain(&error).to_string())
            }
        };
        let (channel, mut consumer, tag) = match failure {
            Ok(subscribed) => subscribed,
            Err(error) => {
                set(&state, ConsumerState::Failing(error));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = tx.closed() => break,
                }
                pause = pause.saturating_mul(2).min(shared.options.reconnect_max);
                continue;
            }
        };
        pause = shared.options.reconnect_min;
        // Counted per channel: a channel left behind (its consumer cancelled by the broker)
        // closes once its own deliveries are settled, whatever the new one is doing.
        let outstanding = Arc::new(Outstanding::default());
        let acks = Acks::new(channel.clone(), outstanding.clone());
        match repaired.take() {
            Some(what) => set(&state, ConsumerState::Repaired(session.generation, tokio::time::Instant::now(), what)),
            None => set(&state, ConsumerState::Consuming(session.generation)),
        }
        tracing::info!(queue = %queue, generation = session.generation, "consuming");
        let mut check = tokio::time::interval(shared.options.topology_check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        loop {
            tokio::select! {
                // Stopping first: a delivery ready at the same moment must not skip the drain.
                biased;
                () = tx.closed() => {
                    drain_and_close(&channel, &tag, &outstanding).await;
                    break 'sessions;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let message = transport_message(delivery.data, &delivery.properties);
                        acks.delivered(delivery.delivery_tag);
                        let settle = RabbitMqSettle {
                            shared: publishing.clone(),
                            queue: queue.clone(),
                            tag: delivery.delivery_tag,
                            properties: delivery.properties,
                            acks: acks.clone(),
                            unsettled: true,
                        };
                        let delivery = Delivery::new(message, delivery.redelivered, settle);
                        if tx.send(delivery).await.is_err() {
                            // The bus stopped taking deliveries; the one in hand was requeued on drop.
                            drain_and_close(&channel, &tag, &outstanding).await;
                            break 'sessions;
                        }
                    }
                    Some(Err(error)) => {
                        set(&state, ConsumerState::Recovering(chain(&error).to_string()));
                        if is_consumer_timeout(&error) {
                            tracing::warn!(queue = %queue, error = %chain(&error),
                                "the broker closed this endpoint's channel: a delivery was not acknowledged within its \
                                 `consumer_timeout` (rabbitmq.conf; 30 minutes by default). Its unacknowledged \
                                 deliveries go back to the queue. Raise `consumer_timeout`, or make the consumer \
                                 finish sooner (a consumer timeout below it)");
                        } else {
                            tracing::warn!(queue = %queue, error = %chain(&error), "consumer lost; waiting for the connection");
                        }
                        break;
                    }
                    None => {
                        set(&state, ConsumerState::Recovering("consumer cancelled".to_owned()));
                        tracing::warn!(queue = %queue, "consumer cancelled by the broker; subscribing again");
                        // Deliveries in progress still ack on the old channel; close it after them.
                        let (old, outstanding) = (channel.clone(), outstanding.clone());
                        tokio::spawn(async move { drain_and_close(&old, "", &outstanding).await });
                        break;
                    }
                },
                _ = check.tick() => {
                    match topology::missing_from_endpoint(&session.connection, &endpoint).await {
                        Ok(None) => {
                            // Whole again (a repair that failed earlier, done by another since).
                            let mut current = state.locked();
                            if matches!(*current, ConsumerState::Failing(_)) {
                                *current = ConsumerState::Consuming(session.generation);
                            }
                        }
                        Ok(Some(missing)) => {
                            let what = format!("{missing} was deleted");
                            set(&state, ConsumerState::Recovering(what.clone()));
                            match repair(&publishing, &session, &endpoint, &what).await {
                                Ok(()) => set(&state, ConsumerState::Repaired(session.generation, tokio::time::Instant::now(), what)),
                                Err(error) => set(&state, ConsumerState::Failing(chain(&error).to_string())),
                            }
                        }
                        Err(error) => tracing::debug!(queue = %queue, error = %chain(&error), "could not check the endpoint's topology"),
                    }
                }
            }
        }
        // Wait for the supervisor to replace a dead session rather than spin on it.
        if !session.is_alive() {
            let mut link = shared.link.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(1), link.changed()).await;
        }
    }
    set(&state, ConsumerState::Stopped);
}

/// Declares again the topology of an endpoint of which `what` was deleted behind the bus's
/// back, and the bindings this bus's published types had to the exchanges it consumes from
/// (a deleted type exchange took them with it): `publishing` knows what it declared.
async fn repair(publishing: &Shared, session: &Session, endpoint: &EndpointTopology, what: &str) -> Result<()> {
    tracing::warn!(queue = %endpoint.queue, what,
        "endpoint topology deleted under the running bus; declaring it again (messages published to it meanwhile were not routed)");
    topology::declare_endpoint(&session.connection, endpoint, &publishing.options).await?;
    let consumed: Vec<String> = endpoint.message_types.iter().map(|t| bus_core::message::entity_name(t)).collect();
    let sources: Vec<(String, Vec<String>)> = publishing
        .declared()
        .publish_exchanges
        .iter()
        .filter(|(_, contracts)| contracts.iter().any(|c| consumed.contains(c)))
        .map(|(source, contracts)| (source.clone(), contracts.clone()))
        .collect();
    for (source, contracts) in sources {
        topology::declare_publish_exchange(&session.connection, &source, &contracts, &publishing.options).await?;
    }
    Ok(())
}

/// Whether the broker closed a consumer's channel for its `consumer_timeout`.
fn is_consumer_timeout(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if e.get_id() == 406 && e.get_message().as_str().contains("delivery acknowledgement"))
}

/// How long a stopping endpoint waits for its deliveries in progress before closing their
/// channel; longer than any stop timeout a bus should use.
const DRAIN_BOUND: Duration = Duration::from_secs(300);

/// Stops the subscription, lets deliveries in progress settle on this channel, then closes it.
async fn drain_and_close(channel: &lapin::Channel, tag: &str, outstanding: &Outstanding) {
    if !tag.is_empty() {
        let _ = channel.basic_cancel(tag.into(), BasicCancelOptions::default()).await;
    }
    outstanding.wait_zero(DRAIN_BOUND).await;
    if channel.status().connected() {
        let _ = channel.close(200, "endpoint stopped".into()).await;
    }
}

/// Settles one RabbitMQ delivery on the channel it came from.
struct RabbitMqSettle {
    /// The publishing connection, for moves.
    shared: Arc<Shared>,
    queue: String,
    tag: u64,
    /// The delivery's AMQP properties as they came, for forwarding it unchanged.
    properties: lapin::BasicProperties,
    acks: Arc<Acks>,
    /// Until settled: dropped like this (its task aborted mid-settle), it is requeued.
    unsettled: bool,
}

impl Drop for RabbitMqSettle {
    fn drop(&mut self) {
        if self.unsettled {
            self.requeue_later();
        }
    }
}

impl RabbitMqSettle {
    fn ack(&mut self) {
        self.unsettled = false;
        self.acks.ack(self.tag);
    }

    async fn requeue(&mut self) -> Result<()> {
        // From here `Acks::requeue` settles it, even if this future is dropped half-way.
        self.unsettled = false;
        self.acks
            .requeue(self.tag)
            .await
            .map_err(|source| Error::Refused { operation: "basic.nack".into(), source: Box::new(source) })
    }

    /// Requeues from a context that cannot wait. Without a runtime the delivery stays open
    /// (never covered by a multiple ack) and the broker requeues it when the channel closes.
    fn requeue_later(&mut self) {
        self.unsettled = false;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (acks, tag) = (self.acks.clone(), self.tag);
                runtime.spawn(async move {
                    let _ = acks.requeue(tag).await;
                });
            }
            Err(_) => self.acks.leave_open(),
        }
    }

    /// Publishes the message elsewhere (confirmed), with its original properties plus
    /// `added` headers, then acks it here; on failure it is requeued so nothing is lost.
    ///
    /// A target deleted behind the bus's back (an `_error` queue removed by an operator, say)
    /// is declared again, with the rest of the endpoint's topology, and the move tried once
    /// more. A delivery whose channel has closed before the move starts is not moved: the
    /// broker has put it back in its queue already, and a copy here would be a second one.
    /// (One that closes while the move is under way leaves a copy in both: at least once.)
    async fn forward(
        &mut self,
        exchange: &str,
        routing_key: &str,
        message: TransportMessage,
        added: &Headers,
    ) -> Result<()> {
        if !self.acks.is_open() {
            self.unsettled = false;
            self.acks.leave_open();
            return Err(Error::DeliveryGone);
        }
        let expires = exchange != format!("{}_error", self.queue);
        let mut properties = forwarded_properties(&self.properties, added, expires);
        let cut = fit(&mut properties, self.shared.frame_max(), added);
        if !cut.is_empty() {
            tracing::warn!(queue = %self.queue, headers = ?cut, target = exchange,
                "header values too large for one frame were cut from a moved message");
        }
        let deadline = tokio::time::Instant::now() + self.shared.options.publish_timeout;
        let make_properties = || properties.clone();
        let mut result =
            publish(&self.shared, exchange, routing_key, &message.body, make_properties, true, deadline).await;
        if result.as_ref().is_err_and(is_missing_target) {
            match self.declare_again(deadline).await {
                Ok(()) => {
                    tracing::warn!(queue = %self.queue, target = exchange, "a dead-letter or delay queue was missing; declared it again");
                    result =
                        publish(&self.shared, exchange, routing_key, &message.body, make_properties, true, deadline)
                            .await;
                }
                Err(error) => {
                    tracing::warn!(queue = %self.queue, error = %chain(&error), "could not declare the endpoint's topology again")
                }
            }
        }
        match result {
            Ok(()) => {
                self.ack();
                Ok(())
            }
            Err(error) => {
                let _ = self.requeue().await;
                Err(error)
            }
        }
    }

    /// Declares the endpoint's topology again: its `_error`, `_skipped` and delay queues
    /// among it (only the first two for a temporary endpoint, which has no delays).
    async fn declare_again(&self, deadline: tokio::time::Instant) -> Result<()> {
        let endpoint = self.shared.declared().endpoints.get(&self.queue).cloned();
        let Some(endpoint) = endpoint else { return Ok(()) };
        let session = self.shared.session(deadline).await?;
        let options = &self.shared.options;
        if endpoint.temporary {
            topology::declare_dead_letter_queues(&session.connection, &endpoint, options).await
        } else {
            topology::declare_endpoint(&session.connection, &endpoint, options).await
        }
    }
}

/// Whether a move failed because its target queue (unroutable) or exchange (404) is gone.
fn is_missing_target(error: &Error) -> bool {
    match error {
        Error::Unroutable(_) => true,
        Error::Refused { source, .. } => crate::error::is_not_found(source),
        _ => false,
    }
}

impl Settle for RabbitMqSettle {
    fn settle(
        mut self: Box<Self>,
        message: TransportMessage,
        settlement: Settlement,
    ) -> BoxFuture<'static, bus_core::Result<()>> {
        if matches!(settlement, Settlement::Ack) {
            // Nothing to wait for: the ack goes out with the channel's next flush.
            self.ack();
            return Box::pin(std::future::ready(Ok(())));
        }
        let mut this = self;
        Box::pin(async move {
            let result = match settlement {
                // Taken above; kept here so that the match stays whole.
                Settlement::Ack => {
                    this.ack();
                    Ok(())
                }
                Settlement::Requeue => this.requeue().await,
                Settlement::MoveTo { queue, headers } => this.forward(&queue, "", message, &headers).await,
                Settlement::Redeliver { delay, headers } => {
                    let waiting = delay_queue(&this.queue, delay);
                    this.forward("", &waiting, message, &headers).await
                }
            };
            result.map_err(Into::into)
        })
    }

    fn is_live(&self) -> bool {
        self.acks.is_open()
    }

    fn abandon(mut self: Box<Self>, _message: TransportMessage) {
        // Returned to the queue now if possible; otherwise the broker requeues it when the
        // channel closes. Either way it is not lost.
        self.requeue_later();
    }
}
