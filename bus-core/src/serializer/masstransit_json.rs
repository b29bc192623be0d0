use std::borrow::Cow;

use bytes::Bytes;

use super::Serializer;
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
        Ok(TransportMessage {
            body: Bytes::from(envelope.to_json()?),
            content_type: Some(Cow::Borrowed(Self::CONTENT_TYPE)),
            // MassTransit copies every envelope header into the transport headers.
            headers: envelope.headers.clone(),
            message_id: envelope.message_id,
            correlation_id: envelope.correlation_id,
            time_to_live: envelope.expiration_time.and_then(|t| (t - chrono::Utc::now()).to_std().ok()),
        })
    }

    fn deserialize(&self, message: &TransportMessage) -> Result<Envelope> {
        let mut envelope = Envelope::from_json(&message.body)?;
        // Infrastructure headers added by the transport after sending (MT-Redelivery-Count,
        // MT-Reason...). Other transport headers (the broker's `x-death`...) stay out of the envelope.
        for (name, value) in &message.headers {
            if name.starts_with("MT-") {
                envelope.headers.insert_if_absent(name, value.clone());
            }
        }
        Ok(envelope)
    }
}
