use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use super::{wire, Serializer};
use crate::{Envelope, Error, Headers, HostInfo, Result, TransportMessage};

const MESSAGE_ID: &str = "MessageId";
const CORRELATION_ID: &str = "CorrelationId";
const REQUEST_ID: &str = "RequestId";
const CONVERSATION_ID: &str = "ConversationId";
const INITIATOR_ID: &str = "MT-InitiatorId";
const SOURCE_ADDRESS: &str = "MT-Source-Address";
const RESPONSE_ADDRESS: &str = "MT-Response-Address";
const FAULT_ADDRESS: &str = "MT-Fault-Address";
const MESSAGE_TYPE: &str = "MT-MessageType";
const HOST_INFO: &str = "MT-Host-Info";

/// Raw JSON, `application/json`: the body is the bare message; identity travels in headers.
///
/// A raw message without `MT-MessageType` has no type: every consumer on the endpoint
/// that receives it is offered it, as MassTransit does for raw JSON.
///
/// ```
/// use bus_core::serializer::{RawJsonSerializer, Serializer};
/// use bus_core::Envelope;
/// let mut envelope = Envelope::new(vec!["urn:message:Shop:Ping".into()],
///     serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).unwrap());
/// envelope.correlation_id = Some(uuid::Uuid::now_v7());
/// let wire = RawJsonSerializer.serialize(&envelope).unwrap();
/// assert_eq!(&wire.body[..], br#"{"n":1}"#);
/// let back = RawJsonSerializer.deserialize(&wire).unwrap();
/// assert_eq!(back.correlation_id, envelope.correlation_id);
/// assert_eq!(back.message_type, envelope.message_type);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RawJsonSerializer;

impl RawJsonSerializer {
    /// The content type.
    pub const CONTENT_TYPE: &'static str = "application/json";
}

fn put_id(headers: &mut Headers, name: &str, id: Option<Uuid>) {
    if let Some(id) = id {
        headers.insert(name, id.to_string());
    }
}

fn put_str(headers: &mut Headers, name: &str, value: &Option<String>) {
    if let Some(value) = value {
        headers.insert(name, value.as_str());
    }
}

fn read_id(headers: &Headers, name: &str) -> Result<Option<Uuid>> {
    match headers.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Uuid::parse_str(s.trim())
            .map(Some)
            .map_err(|e| Error::deserialize(format!("header {name} is not a GUID: `{s}`"), Some(Box::new(e) as _))),
        Some(other) => Err(Error::deserialize(format!("header {name} is not a GUID: {other}"), None)),
    }
}

fn read_str(headers: &Headers, name: &str) -> Option<String> {
    headers.get_str(name).map(str::to_owned)
}

/// The headers the envelope's fields travel in, taken out of the envelope's headers.
const ENVELOPE_HEADERS: [&str; 10] = [
    MESSAGE_ID,
    CORRELATION_ID,
    REQUEST_ID,
    CONVERSATION_ID,
    INITIATOR_ID,
    SOURCE_ADDRESS,
    RESPONSE_ADDRESS,
    FAULT_ADDRESS,
    MESSAGE_TYPE,
    HOST_INFO,
];

/// A received `MT-Host-Info`, parsed once per distinct text and thread: a producer writes
/// the same one on every message.
fn read_host(text: &str) -> Option<Arc<HostInfo>> {
    thread_local! {
        static LAST: RefCell<Option<(Box<str>, Arc<HostInfo>)>> = const { RefCell::new(None) };
    }
    let cached = LAST.with(|last| last.borrow().as_ref().filter(|(seen, _)| **seen == *text).map(|(_, h)| h.clone()));
    if cached.is_some() {
        return cached;
    }
    let host = Arc::new(serde_json::from_str::<HostInfo>(text).ok()?);
    LAST.with(|last| *last.borrow_mut() = Some((text.into(), host.clone())));
    Some(host)
}

impl Serializer for RawJsonSerializer {
    fn content_type(&self) -> &'static str {
        Self::CONTENT_TYPE
    }

    fn serialize(&self, envelope: &Envelope) -> Result<TransportMessage> {
        let mut headers = envelope.headers.clone();
        put_id(&mut headers, MESSAGE_ID, envelope.message_id);
        put_id(&mut headers, CORRELATION_ID, envelope.correlation_id);
        put_id(&mut headers, REQUEST_ID, envelope.request_id);
        put_id(&mut headers, CONVERSATION_ID, envelope.conversation_id);
        put_id(&mut headers, INITIATOR_ID, envelope.initiator_id);
        put_str(&mut headers, SOURCE_ADDRESS, &envelope.source_address);
        put_str(&mut headers, RESPONSE_ADDRESS, &envelope.response_address);
        put_str(&mut headers, FAULT_ADDRESS, &envelope.fault_address);
        headers.insert(MESSAGE_TYPE, envelope.message_type.join(";"));
        if let Some(host) = &envelope.host {
            // The envelope serializer's JSON of the host, made once per host and thread.
            headers.insert(HOST_INFO, crate::envelope::host_json(host).get());
        }
        let body = Bytes::copy_from_slice(envelope.message.get().as_bytes());
        Ok(wire(envelope, body, Self::CONTENT_TYPE, headers))
    }

    fn deserialize(&self, message: &TransportMessage) -> Result<Envelope> {
        let text = std::str::from_utf8(&message.body)
            .map_err(|e| Error::deserialize(format!("body is not UTF-8: {e}"), Some(Box::new(e) as _)))?;
        let raw: Box<RawValue> = serde_json::from_str(text)
            .map_err(|e| Error::deserialize(format!("body is not valid JSON: {e}"), Some(Box::new(e) as _)))?;
        let all = &message.headers;
        let message_type = all
            .get_str(MESSAGE_TYPE)
            .map(|s| s.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let host = all.get_str(HOST_INFO).and_then(read_host);
        let message_id = read_id(all, MESSAGE_ID)?.or(message.message_id);
        let correlation_id = read_id(all, CORRELATION_ID)?.or(message.correlation_id);
        Ok(Envelope {
            message_id,
            request_id: read_id(all, REQUEST_ID)?,
            correlation_id,
            conversation_id: read_id(all, CONVERSATION_ID)?,
            initiator_id: read_id(all, INITIATOR_ID)?,
            source_address: read_str(all, SOURCE_ADDRESS),
            destination_address: None,
            response_address: read_str(all, RESPONSE_ADDRESS),
            fault_address: read_str(all, FAULT_ADDRESS),
            message_type,
            message: raw,
            binary: None,
            expiration_time: None,
            sent_time: None,
            headers: all.without(&ENVELOPE_HEADERS),
            host,
        })
    }
}
