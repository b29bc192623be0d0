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
        let body = Bytes::from(envelope.to_json()?);
        Ok(wire(envelope, body, Self::CONTENT_TYPE, envelope.headers.clone()))
    }

    fn deserialize(&self, message: &TransportMessage) -> Result<Envelope> {
        let mut envelope = Envelope::from_json(&message.body)?;
        merge_infrastructure_headers(&mut envelope.headers, message);
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infrastructure_headers_a_transport_added_reach_the_envelope() {
        let mut envelope = Envelope::new(
            vec!["urn:message:Shop:Ping".into()],
            serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).expect("raw"),
        );
        envelope.headers.insert("MT-Activity-Id", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        envelope.headers.insert("Tenant", "acme");
        let mut wire = MassTransitJsonSerializer.serialize(&envelope).expect("serialize");
        assert_eq!(wire.headers, envelope.headers, "every envelope header travels as a transport header");
        assert_eq!(MassTransitJsonSerializer.deserialize(&wire).expect("read").headers, envelope.headers);

        // A transport adds its own on the way (a redelivery count, a broker's header).
        wire.headers.insert("MT-Redelivery-Count", 2);
        wire.headers.insert("x-death", "broker");
        let back = MassTransitJsonSerializer.deserialize(&wire).expect("read");
        assert_eq!(back.headers.get_i64("MT-Redelivery-Count"), Some(2));
        assert!(!back.headers.contains("x-death"), "other transport headers stay out of the envelope");
        assert_eq!(back.headers.get_str("Tenant"), Some("acme"));
    }
}
