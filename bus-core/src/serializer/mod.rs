//! Serializers: envelope to bytes and back; the content type on the wire picks the reader.

mod masstransit_json;
#[cfg(feature = "protobuf")]
mod protobuf;
mod raw_json;

use std::fmt::Debug;
use std::sync::Arc;

pub use masstransit_json::MassTransitJsonSerializer;
#[cfg(feature = "protobuf")]
pub use protobuf::ProtobufSerializer;
pub use raw_json::RawJsonSerializer;

use crate::{Envelope, Error, Headers, Result, TransportMessage};

/// The transport message of a serialized envelope: its body and content type, the given
/// transport headers, and the ids and time to live taken from the envelope.
fn wire(envelope: &Envelope, body: bytes::Bytes, content_type: &'static str, headers: Headers) -> TransportMessage {
    TransportMessage {
        body,
        content_type: Some(std::borrow::Cow::Borrowed(content_type)),
        headers,
        message_id: envelope.message_id,
        correlation_id: envelope.correlation_id,
        time_to_live: envelope.expiration_time.and_then(|t| (t - chrono::Utc::now()).to_std().ok()),
        // Not in the envelope (MassTransit sets them on the transport only): the bus sets them.
        priority: None,
        routing_key: None,
    }
}

/// Adds the infrastructure headers a transport added after sending (`MT-Redelivery-Count`,
/// `MT-Reason`...) to the envelope's headers; other transport headers (the broker's
/// `x-death`...) stay out of the envelope.
fn merge_infrastructure_headers(envelope: &mut Headers, transport: &TransportMessage) {
    envelope.add_absent(&transport.headers, |name, _| name.starts_with("MT-"));
}

/// Turns an [`Envelope`] into a [`TransportMessage`] and back.
pub trait Serializer: Debug + Send + Sync + 'static {
    /// The content type this serializer writes and reads, e.g. `application/vnd.masstransit+json`.
    fn content_type(&self) -> &'static str;

    /// Whether this serializer writes the message as protobuf (the bus then fills
    /// [`Envelope::binary`] from [`Message::to_protobuf`](crate::Message::to_protobuf)).
    fn writes_protobuf(&self) -> bool {
        false
    }

    /// Writes the envelope: body, content type and the transport headers that go with it.
    fn serialize(&self, envelope: &Envelope) -> Result<TransportMessage>;

    /// Reads a message from the wire. Never panics on bad input; says what was wrong.
    fn deserialize(&self, message: &TransportMessage) -> Result<Envelope>;
}

/// The serializers a bus knows: one to write with, all to read with by content type.
///
/// ```
/// use bus_core::serializer::{Serializers, RawJsonSerializer};
/// let serializers = Serializers::default().with_default(RawJsonSerializer);
/// assert_eq!(serializers.default_serializer().content_type(), "application/json");
/// assert!(serializers.for_content_type(Some("application/vnd.masstransit+json")).is_ok());
/// assert!(serializers.for_content_type(Some("text/plain")).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct Serializers {
    default: Arc<dyn Serializer>,
    all: Vec<Arc<dyn Serializer>>,
}

impl Default for Serializers {
    fn default() -> Self {
        let envelope: Arc<dyn Serializer> = Arc::new(MassTransitJsonSerializer);
        #[cfg_attr(not(feature = "protobuf"), allow(unused_mut))]
        let mut all: Vec<Arc<dyn Serializer>> = vec![envelope.clone(), Arc::new(RawJsonSerializer)];
        #[cfg(feature = "protobuf")]
        all.push(Arc::new(ProtobufSerializer));
        Serializers { default: envelope, all }
    }
}

impl Serializers {
    /// Writes with `serializer` (and reads its content type).
    pub fn with_default(mut self, serializer: impl Serializer) -> Self {
        let serializer: Arc<dyn Serializer> = Arc::new(serializer);
        self.all.retain(|s| s.content_type() != serializer.content_type());
        self.all.push(serializer.clone());
        self.default = serializer;
        self
    }

    /// Also reads `serializer`'s content type.
    pub fn with(mut self, serializer: impl Serializer) -> Self {
        self.all.retain(|s| s.content_type() != serializer.content_type());
        self.all.push(Arc::new(serializer));
        self
    }

    /// The serializer messages are written with.
    pub fn default_serializer(&self) -> &dyn Serializer {
        &*self.default
    }

    /// The serializer for a content type (parameters such as `charset` are ignored);
    /// a message without a content type is read as the default (MassTransit JSON).
    pub fn for_content_type(&self, content_type: Option<&str>) -> Result<&dyn Serializer> {
        let Some(content_type) = content_type else {
            return Ok(&*self.default);
        };
        let essence = content_type.split(';').next().unwrap_or("").trim();
        self.all
            .iter()
            .find(|s| s.content_type().eq_ignore_ascii_case(essence))
            .map(|s| &**s)
            .ok_or_else(|| Error::UnsupportedContentType(content_type.to_owned()))
    }

    /// Reads a message with the serializer its content type names.
    pub fn deserialize(&self, message: &TransportMessage) -> Result<Envelope> {
        self.for_content_type(message.content_type.as_deref())?.deserialize(message)
    }
}
