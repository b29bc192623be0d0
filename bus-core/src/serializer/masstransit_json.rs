use bytes::Bytes;

use super::{merge_infrastructure_headers, wire, Serializer};
use crate::{Envelope, Result, TransportMessage};

/// MassTransit's JSON envelope, `application/vnd.masstransit+json`: the default.
///
/// ```
/// use bus_core::serializer::{MassTransitJsonSerializer, Serializer};
/// use bus_core::Envelope;
/// let envelope = Envelope::new(vec!["urn:message:Shop:Ping".into()],
///     serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).unwrap());
/// let wire = MassTransitJsonSerializer.serialize(&envelope).unwrap();
/// let back = MassTransitJsonSerializer.deserialize(&wire).unwrap();
/// assert_eq!(back.message_id, envelope.message_id);
/// assert_eq!(back.message.get(), r#"{"n":1}"#);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MassTransitJsonSerializer;

impl MassTransitJsonSerializer {
    /// The content type.
    pub const CONTENT_TYPE: &'static str = "application/vnd.masstransit+json";
}

impl Serializer for MassTransitJsonSerializer {
    fn content_type(&self) -> &'static str {
        Self::CONTENT_TYPE
    }

    fn serialize(&self, envelope: &Envelope) -> Result<TransportMessage> {
        // MassTransit copies every envelope header into the transport headers.
        Ok(wire(envelope, Bytes::from(envelope.to_json()?), Self::CONTENT_TYPE, envelope.headers.clone()))
    }

    fn deserialize(&self, message: &TransportMessage) -> Result<Envelope> {
        let mut envelope = Envelope::from_json(&message.body)?;
        merge_infrastructure_headers(&mut envelope.headers, &message.headers);
        Ok(envelope)
    }
}
