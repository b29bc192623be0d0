//! What a consumer and the middleware see of the message being consumed.

use std::any::{Any, TypeId};
use std::ops::Deref;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::Parent;
use crate::endpoint::EndpointInfo;
use crate::outbox::Outbox;
use crate::receive::EndpointRun;
use crate::{Bus, Envelope, Headers, Message, Result, SendOptions};

/// One delivery being consumed, shared by every consumer of it.
#[derive(Debug)]
pub(crate) struct ReceiveState {
    pub(crate) envelope: Envelope,
    /// The endpoint's run: the endpoint, the bus and the cancellation token, shared by every
    /// delivery of the run behind one pointer.
    pub(crate) run: Arc<EndpointRun>,
    pub(crate) redelivery_count: u32,
    pub(crate) redelivered: bool,
}

impl ReceiveState {
    pub(crate) fn bus(&self) -> &Bus {
        &self.run.bus
    }

    pub(crate) fn endpoint(&self) -> &EndpointInfo {
        self.run.endpoint.info()
    }

    /// Fires when the bus cancels its consumers.
    pub(crate) fn cancel(&self) -> &CancellationToken {
        &self.run.cancel
    }
}

/// One attempt of one consumer at one delivery: the context middleware works with.
///
/// Cheap to clone. It gives the envelope (ids, addresses, headers), the retry and
/// redelivery counts, a cancellation token that fires when the bus stops, and
/// `publish`/`send`/`respond` that carry the conversation on and go through the outbox.
#[derive(Debug, Clone)]
pub struct ReceiveContext {
    state: Arc<ReceiveState>,
    consumer_type: &'static str,
    retry_attempt: u32,
    outbox: Outbox,
    payloads: Payloads,
}

/// Values middleware hands down to the consumer (MassTransit's payloads): one per type.
#[derive(Clone, Default)]
struct Payloads(Option<Arc<Vec<Payload>>>);

/// One payload, by its type.
type Payload = (TypeId, Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Payloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payloads").field("count", &self.0.as_ref().map_or(0, |p| p.len())).finish()
    }
}

impl ReceiveContext {
    pub(crate) fn new(state: Arc<ReceiveState>, consumer_type: &'static str, outbox: Outbox) -> Self {
        ReceiveContext { state, consumer_type, retry_attempt: 0, outbox, payloads: Payloads::default() }
    }

    pub(crate) fn set_retry_attempt(&mut self, attempt: u32) {
        self.retry_attempt = attempt;
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Tells the instrumentation that a retry of a failed attempt is coming.
    pub(crate) fn record_retry(&self, retry: u32, delay: std::time::Duration, error: &crate::ConsumeError) {
        let state = &self.state;
        state.bus().inner.instruments.retrying(
            &state.endpoint().name,
            self.consumer_type,
            &state.envelope,
            retry,
            delay,
            error,
        );
    }

    /// Hands `value` down to the rest of the pipeline and the consumer, which find it with
    /// [`payload`](Self::payload); a value of the same type is replaced. How middleware gives
    /// a consumer what it set up for the attempt (a database transaction, say).
    ///
    /// ```
    /// use bus_core::middleware::{from_fn, Next};
    /// use bus_core::{ConsumeContext, Endpoint, Message, ReceiveContext};
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(urn = "urn:message:Shop:Ping")]
    /// # struct Ping;
    /// struct Tenant(String);
    /// let endpoint = Endpoint::new("tenants")
    ///     .middleware(from_fn(|mut ctx: ReceiveContext, next: Next| async move {
    ///         ctx.insert_payload(Tenant("acme".into()));
    ///         next.run(ctx).await
    ///     }))
    ///     .handler(|ctx: ConsumeContext<Ping>| async move {
    ///         let tenant = ctx.payload::<Tenant>().map(|t| t.0.as_str());
    ///         assert_eq!(tenant, Some("acme"));
    ///         Ok(())
    ///     });
    /// # drop(endpoint);
    /// ```
    #[doc(alias = "GetOrAddPayload")]
    pub fn insert_payload<T: Any + Send + Sync>(&mut self, value: T) {
        let mut payloads: Vec<_> = self.payloads.0.as_deref().cloned().unwrap_or_default();
        payloads.retain(|(id, _)| *id != TypeId::of::<T>());
        payloads.push((TypeId::of::<T>(), Arc::new(value)));
        self.payloads = Payloads(Some(Arc::new(payloads)));
    }

    /// The value of type `T` that middleware handed down, if any.
    pub fn payload<T: Any + Send + Sync>(&self) -> Option<&T> {
        let payloads = self.payloads.0.as_deref()?;
        payloads.iter().find(|(id, _)| *id == TypeId::of::<T>()).and_then(|(_, value)| value.downcast_ref())
    }

    /// The envelope of the message being consumed.
    pub fn envelope(&self) -> &Envelope {
        &self.state.envelope
    }

    /// The message id.
    pub fn message_id(&self) -> Option<Uuid> {
        self.state.envelope.message_id
    }

    /// The correlation id.
    pub fn correlation_id(&self) -> Option<Uuid> {
        self.state.envelope.correlation_id
    }

    /// The conversation id shared by every message of this flow.
    pub fn conversation_id(&self) -> Option<Uuid> {
        self.state.envelope.conversation_id
    }

    /// The id of the message whose consumer produced this one.
    pub fn initiator_id(&self) -> Option<Uuid> {
        self.state.envelope.initiator_id
    }

    /// The request id, when the message is a request.
    pub fn request_id(&self) -> Option<Uuid> {
        self.state.envelope.request_id
    }

    /// Where the message came from.
    pub fn source_address(&self) -> Option<&str> {
        self.state.envelope.source_address.as_deref()
    }

    /// Where the message was sent or published to.
    pub fn destination_address(&self) -> Option<&str> {
        self.state.envelope.destination_address.as_deref()
    }

    /// Where responses go.
    pub fn response_address(&self) -> Option<&str> {
        self.state.envelope.response_address.as_deref()
    }

    /// Where faults go.
    pub fn fault_address(&self) -> Option<&str> {
        self.state.envelope.fault_address.as_deref()
    }

    /// When the message was sent.
    pub fn sent_time(&self) -> Option<DateTime<Utc>> {
        self.state.envelope.sent_time
    }

    /// The message headers (envelope headers plus transport headers).
    pub fn headers(&self) -> &Headers {
        &self.state.envelope.headers
    }

    /// The name of the endpoint consuming the message.
    pub fn endpoint_name(&self) -> &str {
        &self.state.endpoint().name
    }

    /// The address of the endpoint consuming the message.
    pub fn endpoint_address(&self) -> &str {
        &self.state.endpoint().address
    }

    /// The consumer's type name.
    pub fn consumer_type(&self) -> &'static str {
        self.consumer_type
    }

    /// Which in-process retry this is: 0 for the first attempt.
    pub fn retry_attempt(&self) -> u32 {
        self.retry_attempt
    }

    /// How many delayed redeliveries the message has had (`MT-Redelivery-Count`).
    pub fn redelivery_count(&self) -> u32 {
        self.state.redelivery_count
    }

    /// Whether the transport delivered this message before (MassTransit's
    /// `ReceiveContext.Redelivered`): a consumer lost before it acknowledged, a requeue. It
    /// may have been consumed already; an idempotent consumer checks.
    pub fn redelivered(&self) -> bool {
        self.state.redelivered
    }

    /// Fires when the bus stops and in-flight work should end.
    pub fn cancellation_token(&self) -> &CancellationToken {
        self.state.cancel()
    }

    /// The bus this message arrived on.
    pub fn bus(&self) -> &Bus {
        self.state.bus()
    }

    /// This context with the outbox out of the way: what it publishes, sends or responds
    /// leaves at once, and each call returns once the transport has taken the message (on
    /// RabbitMQ, once the broker confirmed it), still as part of this flow (ids carried on).
    /// For what must be known to have left before the consumer goes on, such as a saga's
    /// last messages before its instance is deleted.
    pub fn without_outbox(&self) -> ReceiveContext {
        ReceiveContext { outbox: Outbox::new(false), ..self.clone() }
    }

    pub(crate) fn parent(&self) -> Parent<'_> {
        Parent { envelope: &self.state.envelope, source_address: &self.state.endpoint().address, outbox: &self.outbox }
    }

    /// Publishes a message as part of this flow (ids carried on; held in the outbox until
    /// the consume succeeds).
    pub async fn publish<T: Message>(&self, message: T) -> Result<()> {
        self.publish_with(message, SendOptions::default()).await
    }

    /// Publishes with options.
    pub async fn publish_with<T: Message>(&self, message: T, options: SendOptions) -> Result<()> {
        self.state.bus().publish_from(message, options, Some(self.parent())).await
    }

    /// Sends a message to an address as part of this flow.
    pub async fn send<T: Message>(&self, address: &str, message: T) -> Result<()> {
        self.send_with(address, message, SendOptions::default()).await
    }

    /// Sends with options.
    pub async fn send_with<T: Message>(&self, address: &str, message: T, options: SendOptions) -> Result<()> {
        self.state.bus().send_from(address, message, options, Some(self.parent())).await
    }

    /// Responds to the message: sent to its `responseAddress` with its `requestId`, or
    /// published when it has no response address.
    pub async fn respond<T: Message>(&self, message: T) -> Result<()> {
        let options = SendOptions { request_id: self.state.envelope.request_id, ..SendOptions::default() };
        match self.state.envelope.response_address.clone() {
            Some(address) => self.send_with(&address, message, options).await,
            None => self.publish_with(message, options).await,
        }
    }
}

/// The typed context a consumer receives: the message plus its [`ReceiveContext`].
///
/// Everything of the receive context (ids, headers, `publish`, `respond`, the cancellation
/// token) is reachable directly through `Deref`.
///
/// ```
/// # use bus_core::{Bus, ConsumeContext, Endpoint, Message, BoxError};
/// # use serde::{Deserialize, Serialize};
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[message(urn = "urn:message:Shop:CheckStock")]
/// struct CheckStock { sku: String }
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[message(urn = "urn:message:Shop:StockLevel")]
/// struct StockLevel { sku: String, count: u32 }
///
/// async fn check_stock(ctx: ConsumeContext<CheckStock>) -> Result<(), BoxError> {
///     assert!(ctx.conversation_id().is_some());
///     ctx.respond(StockLevel { sku: ctx.message().sku.clone(), count: 3 }).await?;
///     Ok(())
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
///     .endpoint(Endpoint::new("stock").handler(check_stock))
///     .build();
/// bus.start().await?;
/// let level = bus.request::<CheckStock, StockLevel>(CheckStock { sku: "A-1".into() }).await?;
/// assert_eq!(level.message().count, 3);
/// bus.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ConsumeContext<M> {
    message: M,
    receive: ReceiveContext,
}

impl<M> ConsumeContext<M> {
    pub(crate) fn new(message: M, receive: ReceiveContext) -> Self {
        ConsumeContext { message, receive }
    }

    /// The message.
    pub fn message(&self) -> &M {
        &self.message
    }

    /// Takes the message out of the context.
    pub fn into_message(self) -> M {
        self.message
    }

    /// The untyped receive context.
    pub fn receive_context(&self) -> &ReceiveContext {
        &self.receive
    }
}

impl<M> Deref for ConsumeContext<M> {
    type Target = ReceiveContext;
    fn deref(&self) -> &ReceiveContext {
        &self.receive
    }
}
