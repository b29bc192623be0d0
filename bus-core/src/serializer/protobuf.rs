use std::collections::HashMap;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use super::{merge_infrastructure_headers, wire, Serializer};
use crate::envelope::{format_time, parse_time};
use crate::{Envelope, Error, Headers, Result, TransportMessage};

/// The envelope on the wire as protobuf: the same fields as MassTransit's JSON envelope,
/// with the message as the message type's own protobuf encoding.
#[derive(Clone, PartialEq, prost::Message)]
struct EnvelopeProto {
    #[prost(string, tag = "1")]
    message_id: String,
    #[prost(string, tag = "2")]
    request_id: String,
    #[prost(string, tag = "3")]
    correlation_id: String,
    #[prost(string, tag = "4")]
    conversation_id: String,
    #[prost(string, tag = "5")]
    initiator_id: String,
    #[prost(string, tag = "6")]
    source_address: String,
    #[prost(string, tag = "7")]
    destination_address: String,
    #[prost(string, tag = "8")]
    response_address: String,
    #[prost(string, tag = "9")]
    fault_address: String,
    #[prost(string, repeated, tag = "10")]
    message_type: Vec<String>,
    #[prost(bytes = "vec", tag = "11")]
    message: Vec<u8>,
    #[prost(string, tag = "12")]
    expiration_time: String,
    #[prost(string, tag = "13")]
    sent_time: String,
    /// Header values as JSON text, so numbers and booleans keep their type.
    #[prost(map = "string, string", tag = "14")]
    headers: HashMap<String, String>,
}

fn id(id: Option<Uuid>) -> String {
    id.map(|u| u.to_string()).unwrap_or_default()
}

fn read_id(field: &str, text: &str) -> Result<Option<Uuid>> {
    if text.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(text)
        .map(Some)
        .map_err(|e| Error::deserialize(format!("{field} is not a GUID: `{text}`"), Some(Box::new(e) as _)))
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn read_text(value: String) -> Option<String> {
    Some(value).filter(|v| !v.is_empty())
}

/// Protobuf, `application/vnd.rust-bus+protobuf`: for message types that are prost messages
/// (`#[derive(prost::Message, Message)] #[message(protobuf)]`). Smaller and faster than JSON;
/// not understood by MassTransit.
///
/// ```
/// use bus_core::serializer::{ProtobufSerializer, Serializer};
/// use bus_core::{Envelope, Message};
///
/// #[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize, Message)]
/// #[message(urn = "urn:message:Shop:Ping", protobuf)]
/// struct Ping {
///     #[prost(uint32, tag = "1")]
///     n: u32,
/// }
///
/// let mut envelope = Envelope::new(vec![Ping::message_type().into()], serde_json::value::RawValue::NULL.to_owned());
/// envelope.binary = Ping { n: 7 }.to_protobuf().map(Into::into);
/// let wire = ProtobufSerializer.serialize(&envelope).unwrap();
/// let back = ProtobufSerializer.deserialize(&wire).unwrap();
/// assert_eq!(back.message_of::<Ping>().unwrap(), Ping { n: 7 });
/// assert_eq!(back.message_id, envelope.message_id);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtobufSerializer;

impl ProtobufSerializer {
    /// The content type.
    pub const CONTENT_TYPE: &'static str = "application/vnd.rust-bus+protobuf";
}

impl Serializer for ProtobufSerializer {
    fn content_type(&self) -> &'static str {
        Self::CONTENT_TYPE
    }

    fn writes_protobuf(&self) -> bool {
        true
    }

    fn serialize(&self, envelope: &Envelope) -> Result<TransportMessage> {
        let Some(message) = &envelope.binary else {
            return Err(Error::Configuration(format!(
                "{} has no protobuf encoding: derive prost::Message and declare #[message(protobuf)]",
                envelope.message_type.first().map_or("the message", String::as_str)
            )));
        };
        let proto = EnvelopeProto {
            message_id: id(envelope.message_id),
            request_id: id(envelope.request_id),
            correlation_id: id(envelope.correlation_id),
            conversation_id: id(envelope.conversation_id),
            initiator_id: id(envelope.initiator_id),
            source_address: text(&envelope.source_address),
            destination_address: text(&envelope.destination_address),
            response_address: text(&envelope.response_address),
            fault_address: text(&envelope.fault_address),
            message_type: envelope.message_type.clone(),
            message: message.to_vec(),
            expiration_time: envelope.expiration_time.as_ref().map(format_time).unwrap_or_default(),
            sent_time: envelope.sent_time.as_ref().map(format_time).unwrap_or_default(),
            headers: envelope.headers.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        };
        let body = Bytes::from(prost::Message::encode_to_vec(&proto));
        Ok(wire(envelope, body, Self::CONTENT_TYPE, envelope.headers.clone()))
    }

    fn deserialize(&self, message: &TransportMessage) -> Result<Envelope> {
        let proto: EnvelopeProto = prost::Message::decode(&message.body[..])
            .map_err(|e| Error::deserialize(format!("body is not a protobuf envelope: {e}"), Some(Box::new(e) as _)))?;
        if proto.message_type.is_empty() {
            return Err(Error::deserialize("envelope has no messageType", None));
        }
        let mut headers: Headers = proto
            .headers
            .into_iter()
            .map(|(k, v)| {
                let value = serde_json::from_str(&v).unwrap_or(Value::String(v));
                (k, value)
            })
            .collect();
        merge_infrastructure_headers(&mut headers, message);
        Ok(Envelope {
            message_id: read_id("messageId", &proto.message_id)?,
            request_id: read_id("requestId", &proto.request_id)?,
            correlation_id: read_id("correlationId", &proto.correlation_id)?,
            conversation_id: read_id("conversationId", &proto.conversation_id)?,
            initiator_id: read_id("initiatorId", &proto.initiator_id)?,
            source_address: read_text(proto.source_address),
            destination_address: read_text(proto.destination_address),
            response_address: read_text(proto.response_address),
            fault_address: read_text(proto.fault_address),
            message_type: proto.message_type,
            message: RawValue::NULL.to_owned(),
            binary: Some(Bytes::from(proto.message)),
            expiration_time: parse_time(&proto.expiration_time),
            sent_time: parse_time(&proto.sent_time),
            headers,
            host: None,
        })
    }
}
