//! Building and dispatching outgoing messages: ids, addresses, headers, outbox.

use crate::sync::RwLockExt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::FutureExt as _;
use uuid::Uuid;

use super::{Bus, BusInner};
use crate::fault::{fault_urn, ExceptionInfo, Fault, FAULT_URN};
use crate::message::entity_name as type_entity_name;
use crate::observer::guarded;
use crate::outbox::{MessageTypes, Outbox, Outgoing, Route};
use crate::serializer::{MassTransitJsonSerializer, Serializer};
use crate::{address, telemetry, ConsumeError, Envelope, Error, Headers, Message, Result};

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
}

fn message_type_attribute(envelope: &Envelope) -> opentelemetry::KeyValue {
    opentelemetry::KeyValue::new("message_type", envelope.message_type.first().cloned().unwrap_or_default())
}

/// Copies the consumed message's user headers onto a message produced while consuming it:
/// not the bus's own `MT-*` headers, nor broker headers (`x-*`), nor trace headers (the
/// consumer's own context writes those), nor any already set.
fn copy_flow_headers(consumed: &Headers, produced: &mut Headers) {
    produced.add_absent(consumed, |name, _| is_flow_header(name));
}

fn is_flow_header(name: &str) -> bool {
    let trace = ["traceparent", "tracestate", "baggage"].iter().any(|t| name.eq_ignore_ascii_case(t));
    !name.starts_with("MT-") && !name.starts_with("x-") && !trace
}

/// The largest header value copied onto a fault, and the most copied in all: the headers
/// came from the wire, and a fault that does not fit in the broker's frame would be lost.
const FAULT_HEADER_VALUE_LIMIT: usize = 4096;
const FAULT_HEADERS_LIMIT: usize = 16 * 1024;

/// [`copy_flow_headers`] for a fault: values too large are left out, with a warning.
fn copy_flow_headers_to_fault(failed: &Headers, fault: &mut Headers) {
    let (mut budget, mut left_out) = (FAULT_HEADERS_LIMIT, 0usize);
    fault.add_absent(failed, |name, value| {
        if !is_flow_header(name) {
            return false;
        }
        let size = name.len() + crate::headers::value_len(value);
        if size > FAULT_HEADER_VALUE_LIMIT || size > budget {
            left_out += 1;
            return false;
        }
        budget -= size;
        true
    });
    if left_out > 0 {
        tracing::warn!(left_out, "headers too large to copy onto a fault were left out");
    }
}

/// The message being consumed, when a message is produced while consuming it.
#[derive(Clone, Copy)]
pub(crate) struct Parent<'a> {
    pub(crate) envelope: &'a Envelope,
    pub(crate) source_address: &'a str,
    pub(crate) outbox: &'a Outbox,
}

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
                envelope.conversation_id = consumed.conversation_id.or_else(|| Some(Uuid::now_v7()));
                envelope.initiator_id = consumed.correlation_id.or(consumed.request_id);
                envelope.source_address = Some(parent.source_address.to_owned());
                copy_flow_headers(&consumed.headers, &mut envelope.headers);
            }
            None => {
                envelope.conversation_id = Some(Uuid::now_v7());
                envelope.source_address = Some(self.address.clone());
            }
        }
        Ok(envelope)
    }

    /// The exchange and address a message type is published to, computed once per type.
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

    fn outgoing(&self, route: Route, envelope: Envelope) -> Result<Outgoing> {
        self.outgoing_with(route, envelope, self.serializers.default_serializer())
    }

    fn outgoing_with(&self, route: Route, mut envelope: Envelope, serializer: &dyn Serializer) -> Result<Outgoing> {
        for middleware in &self.send_middleware {
            middleware.on_send(&mut envelope).map_err(Error::SendRejected)?;
        }
        let message = serializer.serialize(&envelope)?;
        Ok(Outgoing { route, envelope, message })
    }

    /// Hands a message to the transport, then tells the observers.
    pub(crate) async fn dispatch(&self, outgoing: Outgoing) -> Result<()> {
        let Outgoing { route, envelope, message } = outgoing;
        match route {
            Route::Publish(MessageTypes::Static(types)) => {
                self.transport.publish(types, message).await?;
                let message_type = types.first().copied().unwrap_or_default();
                self.metrics.published.add(1, &[opentelemetry::KeyValue::new("message_type", message_type)]);
                for observer in &self.observers {
                    guarded(|| observer.on_publish(&envelope));
                }
                return Ok(());
            }
            Route::Publish(MessageTypes::Owned(types)) => {
                let types: Vec<&str> = types.iter().map(String::as_str).collect();
                self.transport.publish(&types, message).await?;
            }
            Route::Send(destination) => {
                self.transport.send(&destination, message).await?;
                self.metrics.sent.add(1, &[message_type_attribute(&envelope)]);
                for observer in &self.observers {
                    guarded(|| observer.on_send(&destination, &envelope));
                }
                return Ok(());
            }
        }
        self.metrics.published.add(1, &[message_type_attribute(&envelope)]);
        for observer in &self.observers {
            guarded(|| observer.on_publish(&envelope));
        }
        Ok(())
    }

    /// Publishes or sends one `Fault` for a message that finally failed: to its
    /// `faultAddress`, else its `responseAddress`, else published.
    ///
    /// The fault is typed by `consumed`, the message type of the consumer that failed, as
    /// MassTransit types it (`Fault<T>` of the consumer's `T`). The message's other types
    /// came from the wire: each would be a fault exchange declared on the broker, so they
    /// are named only in its `faultMessageTypes`.
    pub(crate) async fn emit_fault(
        &self,
        failed: &Envelope,
        consumed: &'static str,
        error: &ConsumeError,
        consumer_type: &str,
        source_address: &str,
    ) -> Result<()> {
        let fault = Fault {
            fault_id: Uuid::now_v7(),
            faulted_message_id: failed.message_id,
            timestamp: chrono::Utc::now(),
            exceptions: vec![ExceptionInfo {
                exception_type: error.exception_type().to_owned(),
                message: error.message().to_owned(),
                stack_trace: Some(error.causes()).filter(|s| !s.is_empty()),
                source: Some(consumer_type.to_owned()),
            }],
            host: (*self.host).clone(),
            fault_message_types: failed.message_type.clone(),
            message: &*failed.message,
        };
        let types = vec![fault_urn(consumed), FAULT_URN.to_owned()];
        let raw = serde_json::value::to_raw_value(&fault).map_err(Error::Serialize)?;
        let mut envelope = Envelope::new(types.clone(), raw);
        envelope.correlation_id = failed.correlation_id;
        envelope.request_id = failed.request_id;
        envelope.conversation_id = failed.conversation_id;
        envelope.initiator_id = failed.message_id;
        envelope.source_address = Some(source_address.to_owned());
        envelope.host = Some(self.host.clone());
        copy_flow_headers_to_fault(&failed.headers, &mut envelope.headers);
        // The first of `faultAddress` and `responseAddress` that names an endpoint; one that
        // does not (it came from the wire) is skipped, not the end of the fault.
        let target = [failed.fault_address.as_deref(), failed.response_address.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|target| match address::entity_name(target) {
                Ok(name) => Some((target, name.to_owned())),
                Err(error) => {
                    tracing::warn!(address = target, %error, "fault address is not an endpoint; trying the next");
                    None
                }
            });
        let route = match target {
            Some((target, name)) => {
                envelope.destination_address = Some(target.to_owned());
                Route::Send(name)
            }
            None => {
                envelope.destination_address = Some(self.transport.address(&type_entity_name(&types[0])));
                Route::Publish(MessageTypes::Owned(types))
            }
        };
        // Always MassTransit JSON: a fault has no protobuf form, and a bus writing protobuf by
        // default would otherwise drop every fault (requesters then timed out).
        let outgoing = self.outgoing_with(route, envelope, &MassTransitJsonSerializer)?;
        self.dispatch(outgoing).await
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
        let inner = &self.inner;
        if parent.is_none() {
            inner.ensure_not_stopped()?;
        }
        let (entity, destination, span_name) = inner.publish_destination(M::message_type());
        let mut envelope = inner.envelope_for(&message, options, parent, destination.to_string())?;
        let span = telemetry::send_span(
            &inner.tracer,
            inner.transport.system(),
            telemetry::SendDestination { entity: &entity, shared: Some((span_name, &entity)) },
            "publish",
            &envelope,
            M::message_types(),
        );
        if span.is_traced() {
            telemetry::inject(span.context(), &mut envelope.headers);
        }
        let outgoing = inner.outgoing(Route::Publish(MessageTypes::Static(M::message_types())), envelope)?;
        self.release_in(span, outgoing, parent).await
    }

    pub(crate) async fn send_from<M: Message>(
        &self,
        address: &str,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<()> {
        let inner = &self.inner;
        if parent.is_none() {
            inner.ensure_not_stopped()?;
        }
        let name = address::entity_name(address)?.to_owned();
        let destination = if address.contains("://") { address.to_owned() } else { inner.transport.address(&name) };
        let mut envelope = inner.envelope_for(&message, options, parent, destination)?;
        let span = telemetry::send_span(
            &inner.tracer,
            inner.transport.system(),
            telemetry::SendDestination { entity: &name, shared: None },
            "send",
            &envelope,
            M::message_types(),
        );
        if span.is_traced() {
            telemetry::inject(span.context(), &mut envelope.headers);
        }
        let outgoing = inner.outgoing(Route::Send(name), envelope)?;
        self.release_in(span, outgoing, parent).await
    }

    /// Releases (or holds) `outgoing` with its send span current, then ends the span.
    async fn release_in(
        &self,
        span: telemetry::MessageSpan,
        outgoing: Outgoing,
        parent: Option<Parent<'_>>,
    ) -> Result<()> {
        let result = self.release_or_hold(outgoing, parent).with_context(span.context().clone()).await;
        if let Err(error) = &result {
            span.record_exception("SendException", &error.to_string());
        }
        span.end();
        result
    }

    async fn release_or_hold(&self, outgoing: Outgoing, parent: Option<Parent<'_>>) -> Result<()> {
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
