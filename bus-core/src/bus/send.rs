//! Building and dispatching outgoing messages: ids, addresses, headers, outbox.

use crate::sync::RwLockExt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::FutureExt as _;
use uuid::Uuid;

use super::{Bus, BusInner};
use crate::message::entity_name as type_entity_name;
use crate::outbox::{self, MessageTypes, Outbox, Outgoing, Route};
use crate::serializer::Serializer;
use crate::{address, telemetry, Envelope, Error, Headers, Message, Result, TransportMessage};

/// Options for one publish or send.
///
/// ```
/// use std::time::Duration;
/// use bus_core::SendOptions;
/// let options = SendOptions::new()
///     .header("Tenant", "acme")
///     .correlation_id(uuid::Uuid::now_v7())
///     .time_to_live(Duration::from_secs(60));
/// assert_eq!(options.headers.get_str("Tenant"), Some("acme"));
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SendOptions {
    /// Headers to write.
    pub headers: Headers,
    /// The message id (default: a new one). Set it to send a message again as the same one,
    /// so that receivers that keep the ids they saw take it only once.
    pub message_id: Option<Uuid>,
    /// Correlation id (default: the message's own, if it declares one).
    pub correlation_id: Option<Uuid>,
    /// Request id.
    pub request_id: Option<Uuid>,
    /// Where responses should go.
    pub response_address: Option<String>,
    /// Where faults should go.
    pub fault_address: Option<String>,
    /// How long the message may wait before it expires.
    pub time_to_live: Option<Duration>,
    /// Its priority in a priority queue (AMQP `priority`, as MassTransit's `SetPriority`).
    pub priority: Option<u8>,
    /// Headers set with [`header_time`](Self::header_time): the transport writes them as
    /// times of its own (AMQP timestamps); the PostgreSQL outbox and the schedulers store
    /// them so marked.
    pub time_headers: Vec<String>,
}

impl SendOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets a header to a time, as MassTransit sets a `DateTime` header: in the envelope as
    /// its round-trip text (seven fraction digits), and in the transport's own header table
    /// as a time (on RabbitMQ an AMQP timestamp, in seconds since the epoch).
    ///
    /// ```
    /// use bus_core::SendOptions;
    /// let at = chrono::DateTime::parse_from_rfc3339("2026-12-06T17:30:00Z").unwrap().to_utc();
    /// let options = SendOptions::new().header_time("Offer-Expires", at);
    /// assert_eq!(options.headers.get_str("Offer-Expires"), Some("2026-12-06T17:30:00.0000000Z"));
    /// ```
    pub fn header_time(mut self, name: impl Into<String>, time: chrono::DateTime<chrono::Utc>) -> Self {
        let name = name.into();
        self.headers.insert(name.clone(), crate::envelope::format_time(&time));
        self.time_headers.push(name);
        self
    }

    /// Sets the message id.
    pub fn message_id(mut self, id: Uuid) -> Self {
        self.message_id = Some(id);
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets where responses go.
    pub fn response_address(mut self, address: impl Into<String>) -> Self {
        self.response_address = Some(address.into());
        self
    }

    /// Sets where faults go.
    pub fn fault_address(mut self, address: impl Into<String>) -> Self {
        self.fault_address = Some(address.into());
        self
    }

    /// Sets the time to live.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.time_to_live = Some(ttl);
        self
    }

    /// Sets the priority, for an endpoint with a priority queue
    /// ([`Endpoint::max_priority`](crate::Endpoint::max_priority)): higher first. The
    /// in-memory transport keeps it on the message but delivers in order.
    #[doc(alias = "SetPriority")]
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }
}

/// Copies the consumed message's user headers onto a message produced while consuming it:
/// not the bus's own `MT-*` headers, nor broker headers (`x-*`), nor trace headers (the
/// consumer's own context writes those), nor any already set.
fn copy_flow_headers(consumed: &Headers, produced: &mut Headers) {
    produced.add_absent(consumed, |name, _| is_flow_header(name));
}

/// Whether a header of a consumed message flows on to what its consumer produces: not the
/// bus's own `MT-*` headers, nor broker headers (`x-*`), nor trace headers.
pub(crate) fn is_flow_header(name: &str) -> bool {
    let trace = ["traceparent", "tracestate", "baggage"].iter().any(|t| name.eq_ignore_ascii_case(t));
    !name.starts_with("MT-") && !name.starts_with("x-") && !trace
}

/// The message being consumed, when a message is produced while consuming it.
#[derive(Clone, Copy)]
pub(crate) struct Parent<'a> {
    pub(crate) envelope: &'a Envelope,
    pub(crate) source_address: &'a str,
    pub(crate) outbox: &'a Outbox,
}

/// Messages larger than this (in JSON bytes) are not kept beside their serialized form
/// while the transport takes them, unless an observer is to be told of them.
const LARGE_MESSAGE: usize = 16 * 1024;

impl BusInner {
    fn envelope_for<M: Message>(
        &self,
        message: &M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
        destination: String,
    ) -> Result<Envelope> {
        let raw = serde_json::value::to_raw_value(message).map_err(Error::Serialize)?;
        let mut envelope = Envelope::new(M::message_types().iter().map(|t| (*t).to_owned()).collect(), raw);
        if self.serializers.default_serializer().writes_protobuf() {
            envelope.binary = message.to_protobuf().map(bytes::Bytes::from);
        }
        if options.message_id.is_some() {
            envelope.message_id = options.message_id;
        }
        envelope.correlation_id = options.correlation_id.or_else(|| message.correlation_id());
        envelope.request_id = options.request_id;
        envelope.response_address = options.response_address;
        envelope.fault_address = options.fault_address;
        envelope.destination_address = Some(destination);
        envelope.headers = options.headers;
        envelope.host = Some(self.host.clone());
        // A time to live too long to represent means no expiry.
        envelope.expiration_time = options
            .time_to_live
            .and_then(|ttl| chrono::Duration::from_std(ttl).ok())
            .and_then(|ttl| chrono::Utc::now().checked_add_signed(ttl));
        match parent {
            Some(parent) => {
                let consumed = parent.envelope;
                envelope.conversation_id = consumed.conversation_id.or_else(|| Some(crate::id::new_id()));
                envelope.initiator_id = consumed.correlation_id.or(consumed.request_id);
                envelope.source_address = Some(parent.source_address.to_owned());
                copy_flow_headers(&consumed.headers, &mut envelope.headers);
            }
            None => {
                envelope.conversation_id = Some(crate::id::new_id());
                envelope.source_address = Some(self.address.clone());
            }
        }
        Ok(envelope)
    }

    /// The name and address a message type is published under, computed once per type.
    fn publish_destination(&self, urn: &'static str) -> super::Destination {
        if let Some(found) = self.destinations.read_locked().get(urn) {
            return found.clone();
        }
        let entity = type_entity_name(urn);
        let address: Arc<str> = self.transport.address(&entity).into();
        let name = telemetry::span_name(&entity, "send");
        let found = (Arc::<str>::from(entity), address, name);
        self.destinations.write_locked().insert(urn, found.clone());
        found
    }

    pub(crate) fn outgoing(&self, route: Route, envelope: Envelope) -> Result<outbox::Boxed> {
        self.outgoing_with(route, envelope, self.serializers.default_serializer())
    }

    pub(crate) fn outgoing_with(
        &self,
        route: Route,
        mut envelope: Envelope,
        serializer: &dyn Serializer,
    ) -> Result<outbox::Boxed> {
        for middleware in &self.send_middleware {
            middleware.on_send(&mut envelope).map_err(Error::SendRejected)?;
        }
        let message = serializer.serialize(&envelope)?;
        Ok(Box::new(Outgoing { route, envelope, message }))
    }

    /// Hands a message to the transport, then tells the instrumentation.
    pub(crate) async fn dispatch(&self, mut outgoing: outbox::Boxed) -> Result<()> {
        let envelope = &mut outgoing.envelope;
        // The serialized bytes hold the message now. Without observers to be told of it,
        // a large one is not kept a second time while the transport confirms it: with many
        // publishes of large messages in flight, the copy doubled the memory they took.
        if !self.instruments.observed() && envelope.message.get().len() > LARGE_MESSAGE {
            envelope.message = serde_json::value::RawValue::NULL.to_owned();
            envelope.binary = None;
        }
        let message = std::mem::take(&mut outgoing.message);
        self.dispatch_message(&outgoing.route, message, Some(&outgoing.envelope)).await
    }

    /// Hands serialized bytes to the transport; `envelope` (what they hold) is for the
    /// instrumentation.
    pub(crate) async fn dispatch_message(
        &self,
        route: &Route,
        message: TransportMessage,
        envelope: Option<&Envelope>,
    ) -> Result<()> {
        match route {
            Route::Publish(MessageTypes::Static(types)) => self.transport.publish(types, message).await?,
            Route::Publish(MessageTypes::Owned(types)) => {
                let types: Vec<&str> = types.iter().map(String::as_str).collect();
                self.transport.publish(&types, message).await?;
            }
            Route::Send(destination) => self.transport.send(destination, message).await?,
        }
        if let Some(envelope) = envelope {
            self.instruments.sent(route, envelope);
        }
        Ok(())
    }
}

impl Bus {
    /// Publishes a message to every endpoint that consumes its type (or a contract it lists).
    ///
    /// Resolves when the transport has taken the message.
    pub async fn publish<M: Message>(&self, message: M) -> Result<()> {
        self.publish_with(message, SendOptions::default()).await
    }

    /// Publishes with options (headers, correlation id, time to live...).
    pub async fn publish_with<M: Message>(&self, message: M, options: SendOptions) -> Result<()> {
        self.publish_from(message, options, None).await
    }

    /// Sends a message to one endpoint, by address (`queue:orders`, `rabbitmq://host/orders`).
    pub async fn send<M: Message>(&self, address: &str, message: M) -> Result<()> {
        self.send_with(address, message, SendOptions::default()).await
    }

    /// Sends with options.
    pub async fn send_with<M: Message>(&self, address: &str, message: M, options: SendOptions) -> Result<()> {
        self.send_from(address, message, options, None).await
    }

    pub(crate) async fn publish_from<M: Message>(
        &self,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<()> {
        if parent.is_none() {
            self.inner.ensure_not_stopped()?;
        }
        let (span, outgoing) = self.outgoing_publish(message, options, parent)?;
        self.release_in(span, outgoing, parent).await
    }

    pub(crate) async fn send_from<M: Message>(
        &self,
        address: &str,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<()> {
        if parent.is_none() {
            self.inner.ensure_not_stopped()?;
        }
        let (span, outgoing) = self.outgoing_send(address, message, options, parent)?;
        self.release_in(span, outgoing, parent).await
    }

    /// A publish prepared to leave later: its send span covers its preparation.
    pub(super) fn prepared_publish<M: Message>(
        &self,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<outbox::Boxed> {
        let (span, outgoing) = self.outgoing_publish(message, options, parent)?;
        self.inner.instruments.send_done(span, &Ok(()));
        Ok(outgoing)
    }

    /// A send prepared to leave later.
    pub(super) fn prepared_send<M: Message>(
        &self,
        address: &str,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<outbox::Boxed> {
        let (span, outgoing) = self.outgoing_send(address, message, options, parent)?;
        self.inner.instruments.send_done(span, &Ok(()));
        Ok(outgoing)
    }

    /// A publish built and serialized, with its send span.
    fn outgoing_publish<M: Message>(
        &self,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<(telemetry::MessageSpan, outbox::Boxed)> {
        let inner = &self.inner;
        let (entity, destination, span_name) = inner.publish_destination(M::message_type());
        let (priority, time_headers) = (options.priority, options.time_headers.clone());
        let routing_key = inner
            .routing_keys
            .get(M::message_type())
            .and_then(|key| key.downcast_ref::<super::builder::RoutingKey<M>>())
            .map(|key| key(&message));
        let mut envelope = inner.envelope_for(&message, options, parent, destination.to_string())?;
        let destination = telemetry::SendDestination { entity: &entity, shared: Some((span_name, &entity)) };
        let span = inner.instruments.sending(destination, "publish", &mut envelope, M::message_types());
        let mut outgoing = inner.outgoing(Route::Publish(MessageTypes::Static(M::message_types())), envelope)?;
        outgoing.message.priority = priority;
        outgoing.message.routing_key = routing_key;
        mark_times(&mut outgoing.message.headers, &time_headers);
        Ok((span, outgoing))
    }

    /// A send built and serialized, with its send span.
    fn outgoing_send<M: Message>(
        &self,
        address: &str,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<(telemetry::MessageSpan, outbox::Boxed)> {
        let inner = &self.inner;
        let name = address::entity_name(address)?.to_owned();
        let destination = if address.contains("://") { address.to_owned() } else { inner.transport.address(&name) };
        let (priority, time_headers) = (options.priority, options.time_headers.clone());
        let mut envelope = inner.envelope_for(&message, options, parent, destination)?;
        let destination = telemetry::SendDestination { entity: &name, shared: None };
        let span = inner.instruments.sending(destination, "send", &mut envelope, M::message_types());
        let mut outgoing = inner.outgoing(Route::Send(name), envelope)?;
        outgoing.message.priority = priority;
        mark_times(&mut outgoing.message.headers, &time_headers);
        Ok((span, outgoing))
    }

    /// Releases (or holds) `outgoing` with its send span current, then ends the span.
    async fn release_in(
        &self,
        span: telemetry::MessageSpan,
        outgoing: outbox::Boxed,
        parent: Option<Parent<'_>>,
    ) -> Result<()> {
        // Without a trace there is nothing for the transport's work to be part of.
        let result = if span.is_traced() {
            self.release_or_hold(outgoing, parent).with_context(span.context().clone()).await
        } else {
            self.release_or_hold(outgoing, parent).await
        };
        self.inner.instruments.send_done(span, &result);
        result
    }

    async fn release_or_hold(&self, outgoing: outbox::Boxed, parent: Option<Parent<'_>>) -> Result<()> {
        let outgoing = match parent {
            Some(parent) => match parent.outbox.hold(outgoing) {
                Some(outgoing) => outgoing,
                None => return Ok(()),
            },
            None => outgoing,
        };
        self.inner.dispatch(outgoing).await
    }
}

/// Marks the transport headers set with [`SendOptions::header_time`] as times, for the
/// transport to write as its own time type; the envelope keeps their text.
fn mark_times(headers: &mut crate::Headers, names: &[String]) {
    for name in names {
        let seconds = headers.get_str(name).and_then(crate::envelope::parse_time).map(|t| t.timestamp());
        if let Some(seconds) = seconds {
            headers.insert(name.clone(), crate::wire::time_header(seconds));
        }
    }
}
