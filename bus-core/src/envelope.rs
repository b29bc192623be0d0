//! The MassTransit message envelope: ids, addresses, message types, headers and the message.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use crate::{Headers, HostInfo};

/// A message with everything MassTransit's JSON envelope carries.
///
/// The message itself stays raw JSON until a consumer asks for its type, so several
/// consumers of different contracts each read it as their own type and an unknown type
/// costs no parsing.
///
/// Its `Deserialize` reads from text held in memory (`serde_json::from_str` or `from_slice`,
/// as [`Envelope::from_json`] does), not from a reader: parts of it are borrowed while read.
///
/// ```
/// use bus_core::Envelope;
/// let json = br#"{"MessageId":"0a790000-5d3a-0015-4ccf-08dd5f3c2a41",
///                 "messageType":["urn:message:Shop:OrderPlaced"],
///                 "message":{"orderId":7},"sentTime":"2026-03-02T14:07:31.5131874Z"}"#;
/// let envelope = Envelope::from_json(json).unwrap();
/// assert_eq!(envelope.message_type, ["urn:message:Shop:OrderPlaced"]);
/// assert_eq!(envelope.message.get(), r#"{"orderId":7}"#);
/// ```
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Unique id of this message.
    pub message_id: Option<Uuid>,
    /// Id of the request this message is or answers.
    pub request_id: Option<Uuid>,
    /// Business correlation id.
    pub correlation_id: Option<Uuid>,
    /// Id shared by every message of one flow.
    pub conversation_id: Option<Uuid>,
    /// Correlation (or request) id of the message whose consumer produced this one.
    pub initiator_id: Option<Uuid>,
    /// Address of the endpoint (or bus) that produced the message.
    pub source_address: Option<String>,
    /// Where the message was sent or published to.
    pub destination_address: Option<String>,
    /// Where responses go.
    pub response_address: Option<String>,
    /// Where faults go.
    pub fault_address: Option<String>,
    /// The message's URNs, its own first.
    pub message_type: Vec<String>,
    /// The message as raw JSON (`null` when it travelled as protobuf).
    pub message: Box<RawValue>,
    /// The message as protobuf, when the serializer carries it so.
    pub binary: Option<bytes::Bytes>,
    /// When the message expires.
    pub expiration_time: Option<DateTime<Utc>>,
    /// When the message was sent.
    pub sent_time: Option<DateTime<Utc>>,
    /// User and infrastructure headers.
    pub headers: Headers,
    /// The process that wrote the message.
    pub host: Option<Arc<HostInfo>>,
}

impl Envelope {
    /// An envelope around a raw JSON message, with a new message id and the current time.
    pub fn new(message_type: Vec<String>, message: Box<RawValue>) -> Self {
        Envelope {
            message_id: Some(crate::id::new_id()),
            sent_time: Some(Utc::now()),
            ..Envelope::bare(message_type, message)
        }
    }

    /// An envelope with only its message types and message: no ids, addresses, times,
    /// headers or host. Where a serializer of a format that carries none of them starts;
    /// [`new`](Self::new) adds a new message id and the current time.
    ///
    /// ```
    /// use bus_core::Envelope;
    /// let message = serde_json::value::to_raw_value(&serde_json::json!({ "orderId": 7 }))?;
    /// let envelope = Envelope::bare(vec!["urn:message:Shop:OrderPlaced".into()], message);
    /// assert!(envelope.message_id.is_none() && envelope.sent_time.is_none());
    /// assert_eq!(envelope.message.get(), r#"{"orderId":7}"#);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn bare(message_type: Vec<String>, message: Box<RawValue>) -> Self {
        Envelope {
            message_id: None,
            request_id: None,
            correlation_id: None,
            conversation_id: None,
            initiator_id: None,
            source_address: None,
            destination_address: None,
            response_address: None,
            fault_address: None,
            message_type,
            message,
            binary: None,
            expiration_time: None,
            sent_time: None,
            headers: Headers::new(),
            host: None,
        }
    }

    /// Reads an envelope from MassTransit JSON (property names match case-insensitively).
    pub fn from_json(bytes: &[u8]) -> crate::Result<Self> {
        // UTF-8 checked once for the whole body: read from bytes, serde_json checks every
        // string and raw value on its own, which cost more than a third of reading them.
        let text = std::str::from_utf8(bytes).map_err(|e| {
            crate::Error::deserialize(format!("body is not valid JSON: {e}"), Some(Box::new(e) as crate::BoxError))
        })?;
        serde_json::from_str(text).map_err(|e| {
            let reason = if e.is_syntax() || e.is_eof() {
                format!("body is not valid JSON: {e}")
            } else {
                format!("body is not a MassTransit envelope: {e}")
            };
            crate::Error::deserialize(reason, Some(Box::new(e) as crate::BoxError))
        })
    }

    /// Writes the envelope as MassTransit JSON.
    ///
    /// The same bytes as serializing it with serde_json, written directly: property names
    /// are constants, ids and times need no escaping, and other strings are only escaped
    /// when they hold a character that needs it. Through serde_json's serializer, escaping
    /// alone was a quarter of the cost of a publish.
    pub fn to_json(&self) -> crate::Result<Vec<u8>> {
        // Sized to fit (the body is kept as it is while the message waits in a queue, so
        // spare capacity is memory held per waiting message), and written in one go.
        let mut out = Vec::with_capacity(self.json_len_estimate());
        self.write_json(&mut out).map_err(crate::Error::Serialize)?;
        Ok(out)
    }

    /// The length of the JSON `to_json` writes, to a byte or two, unless strings need
    /// escaping or headers hold other than strings. (A body a little too large lands in the
    /// allocator's next size class: a quarter more memory for every waiting message.)
    fn json_len_estimate(&self) -> usize {
        const NAMES_AND_PUNCTUATION: usize = 230;
        const NULL: usize = 4;
        let uuid = |id: Option<Uuid>| id.map_or(NULL, |_| 38);
        let time = |t: &Option<DateTime<Utc>>| t.map_or(NULL, |_| TIME_LEN + 2);
        let text = |s: &Option<String>| s.as_ref().map_or(NULL, |s| s.len() + 2);
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.as_str().map_or(16, str::len) + 6).sum();
        let host = self.host.as_ref().map_or(NULL, |h| host_json(h).get().len());
        NAMES_AND_PUNCTUATION
            + uuid(self.message_id)
            + uuid(self.request_id)
            + uuid(self.correlation_id)
            + uuid(self.conversation_id)
            + uuid(self.initiator_id)
            + time(&self.expiration_time)
            + time(&self.sent_time)
            + text(&self.source_address)
            + text(&self.destination_address)
            + text(&self.response_address)
            + text(&self.fault_address)
            + self.message_type.iter().map(|t| t.len() + 3).sum::<usize>()
            + self.message.get().len()
            + headers
            + host
    }

    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.push(b'{');
        write_name(out, Field::MessageId);
        write_uuid(out, self.message_id);
        write_name(out, Field::RequestId);
        write_uuid(out, self.request_id);
        write_name(out, Field::CorrelationId);
        write_uuid(out, self.correlation_id);
        write_name(out, Field::ConversationId);
        write_uuid(out, self.conversation_id);
        write_name(out, Field::InitiatorId);
        write_uuid(out, self.initiator_id);
        write_name(out, Field::SourceAddress);
        write_opt_str(out, self.source_address.as_deref())?;
        write_name(out, Field::DestinationAddress);
        write_opt_str(out, self.destination_address.as_deref())?;
        write_name(out, Field::ResponseAddress);
        write_opt_str(out, self.response_address.as_deref())?;
        write_name(out, Field::FaultAddress);
        write_opt_str(out, self.fault_address.as_deref())?;
        write_name(out, Field::MessageType);
        out.push(b'[');
        for (i, urn) in self.message_type.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, urn)?;
        }
        out.push(b']');
        write_name(out, Field::Message);
        out.extend_from_slice(self.message.get().as_bytes());
        write_name(out, Field::ExpirationTime);
        write_opt_time(out, self.expiration_time.as_ref());
        write_name(out, Field::SentTime);
        write_opt_time(out, self.sent_time.as_ref());
        write_name(out, Field::Headers);
        out.push(b'{');
        for (i, (name, value)) in self.headers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, name)?;
            out.push(b':');
            match value {
                Value::String(text) => write_str(out, text)?,
                other => serde_json::to_writer(&mut *out, other)?,
            }
        }
        out.push(b'}');
        write_name(out, Field::Host);
        match &self.host {
            Some(host) => out.extend_from_slice(host_json(host).get().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
        Ok(())
    }

    /// Reads the message as type `T`.
    ///
    /// Property names written in PascalCase (as some .NET serializers do) are matched too:
    /// when the message does not read as it is, it is read again with camelCase names.
    pub fn message_as<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        serde_json::from_str(self.message.get())
            .or_else(|first| {
                let retry = serde_json::from_str::<Value>(self.message.get())
                    .ok()
                    .map(crate::wire::camel_case_keys)
                    .and_then(|v| serde_json::from_value(v).ok());
                retry.ok_or(first)
            })
            .map_err(|e| {
                crate::Error::deserialize(
                    format!("message does not match {}: {}", std::any::type_name::<T>(), without_values(&e)),
                    Some(Box::new(e) as crate::BoxError),
                )
            })
    }

    /// Reads the message as message type `M`: from protobuf when it travelled so, else JSON.
    pub fn message_of<M: crate::Message>(&self) -> crate::Result<M> {
        match &self.binary {
            Some(bytes) => M::from_protobuf(bytes).ok_or_else(|| {
                crate::Error::deserialize(format!("protobuf body does not decode as {}", M::message_type()), None)
            }),
            None => self.message_as(),
        }
    }

    /// Whether the envelope lists `urn` among its message types.
    pub fn has_message_type(&self, urn: &str) -> bool {
        self.message_type.iter().any(|t| t == urn)
    }
}

/// serde_json's reason a message did not read, without the values it quotes from the message.
///
/// `invalid type: string "4111 1111 1111 1111", expected u64` would put part of a message
/// into logs and fault headers; this keeps what was found and what was expected, and where:
/// `invalid type: string, expected u64 at line 1 column 29`. The whole error stays the
/// source of the bus's error, for code that wants it.
fn without_values(error: &serde_json::Error) -> String {
    let text = error.to_string();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = text.strip_prefix(prefix).and_then(|rest| rest.split_once(", expected ")) {
            let kind = if found.starts_with("floating point") {
                "floating point"
            } else {
                found.split([' ', '`', '"']).next().unwrap_or_default()
            };
            return format!("{prefix}{kind}, expected {expected}");
        }
    }
    if let Some((_, expected)) = text.strip_prefix("unknown variant `").and_then(|rest| rest.split_once("`, expected "))
    {
        return format!("unknown variant, expected {expected}");
    }
    text
}

/// The envelope's fields: each name as MassTransit writes it, in the order written. The one
/// list of them: the writer, the reader and [`FIELDS`] all use it.
const FIELD_NAMES: [(&str, Field); 15] = [
    ("messageId", Field::MessageId),
    ("requestId", Field::RequestId),
    ("correlationId", Field::CorrelationId),
    ("conversationId", Field::ConversationId),
    ("initiatorId", Field::InitiatorId),
    ("sourceAddress", Field::SourceAddress),
    ("destinationAddress", Field::DestinationAddress),
    ("responseAddress", Field::ResponseAddress),
    ("faultAddress", Field::FaultAddress),
    ("messageType", Field::MessageType),
    ("message", Field::Message),
    ("expirationTime", Field::ExpirationTime),
    ("sentTime", Field::SentTime),
    ("headers", Field::Headers),
    ("host", Field::Host),
];

/// The envelope's fields as MassTransit names them, in the order they are written.
pub const FIELDS: [&str; 15] = {
    let mut names = [""; 15];
    let mut i = 0;
    while i < names.len() {
        names[i] = FIELD_NAMES[i].0;
        i += 1;
    }
    names
};

/// Writes `"name":` of `field`, after a comma unless it is the first.
fn write_name(out: &mut Vec<u8>, field: Field) {
    let index = field as usize;
    if index > 0 {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(FIELD_NAMES[index].0.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Formats a time as MassTransit does: UTC with seven fractional digits.
///
/// ```
/// let time = bus_core::envelope::parse_time("2026-03-02T14:07:31.5131874Z").unwrap();
/// assert_eq!(bus_core::envelope::format_time(&time), "2026-03-02T14:07:31.5131874Z");
/// ```
pub fn format_time(time: &DateTime<Utc>) -> String {
    let mut buffer = [0u8; TIME_LEN];
    write_time(time, &mut buffer).to_owned()
}

/// The length of a time as [`format_time`] writes it (for years 0 to 9999).
const TIME_LEN: usize = 28;

/// Writes `time` as [`format_time`] does into `buffer`, digit by digit: through `write!`,
/// formatting the two times of each envelope cost a tenth of writing it.
fn write_time<'b>(time: &DateTime<Utc>, buffer: &'b mut [u8; TIME_LEN]) -> &'b str {
    use chrono::{Datelike, Timelike};
    fn digits(out: &mut [u8], mut value: u32) {
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    // Times outside years 0 to 9999 cannot be written in this format: the nearest one that
    // can is written (clamping the year alone could make a date that does not exist).
    let bound = |y, m, d, h, min, s, nanos| {
        chrono::NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|date| date.and_hms_nano_opt(h, min, s, nanos))
            .map(|t| t.and_utc())
            .unwrap_or_default()
    };
    let clamped;
    let time = match time.year() {
        year if year > 9999 => {
            clamped = bound(9999, 12, 31, 23, 59, 59, 999_999_900);
            &clamped
        }
        year if year < 0 => {
            clamped = bound(0, 1, 1, 0, 0, 0, 0);
            &clamped
        }
        _ => time,
    };
    digits(&mut buffer[0..4], time.year().unsigned_abs());
    buffer[4] = b'-';
    digits(&mut buffer[5..7], time.month());
    buffer[7] = b'-';
    digits(&mut buffer[8..10], time.day());
    buffer[10] = b'T';
    digits(&mut buffer[11..13], time.hour());
    buffer[13] = b':';
    digits(&mut buffer[14..16], time.minute());
    buffer[16] = b':';
    // A leap second (nanoseconds past 1e9) is written as second 59.9999999, as .NET has none.
    let (second, ticks) = match time.timestamp_subsec_nanos() {
        nanos if nanos >= 1_000_000_000 => (59, 9_999_999),
        nanos => (time.second(), nanos / 100),
    };
    digits(&mut buffer[17..19], second);
    buffer[19] = b'.';
    digits(&mut buffer[20..27], ticks);
    buffer[27] = b'Z';
    // Every byte written above is an ASCII digit or separator.
    std::str::from_utf8(buffer).unwrap_or_default()
}

/// Reads a time as .NET writes it (see [`parse_time`]), for `#[serde(deserialize_with)]`.
pub(crate) fn read_time<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
    parse_time(&text).ok_or_else(|| serde::de::Error::custom(format!("not a date and time: {text:?}")))
}

/// Parses an ISO-8601 time as .NET writes it (up to 7 fractional digits, `Z`, an offset, or none).
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok().map(|n| n.and_utc()))
}

/// The JSON of a host, written once per host and thread: every message of a bus carries the
/// same one, and escaping its strings each time was a tenth of the envelope's cost.
///
/// The cache keeps a clone of the `Arc`, so the host it describes can no longer change (it
/// is shared) and its address cannot be reused by another host.
pub(crate) fn host_json(host: &Arc<HostInfo>) -> Arc<RawValue> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Arc<HostInfo>, Arc<RawValue>)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((cached, json)) = last.as_ref() {
            if Arc::ptr_eq(cached, host) {
                return json.clone();
            }
        }
        let json: Arc<RawValue> = serde_json::value::to_raw_value(&**host)
            .map(Arc::from)
            .unwrap_or_else(|_| Arc::from(RawValue::NULL.to_owned()));
        *last = Some((host.clone(), json.clone()));
        json
    })
}

/// The host read from an envelope, parsed once per distinct host and thread: a producer
/// writes the same host on every message. Compared as raw JSON text, so any difference
/// (even in spacing) reads it again.
fn read_host(raw: &RawValue) -> Result<Option<Arc<HostInfo>>, serde_json::Error> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Box<str>, Arc<HostInfo>)>> = const { std::cell::RefCell::new(None) };
    }
    if raw.get() == "null" {
        return Ok(None);
    }
    let cached =
        LAST.with(|last| last.borrow().as_ref().filter(|(text, _)| **text == *raw.get()).map(|(_, host)| host.clone()));
    if let Some(host) = cached {
        return Ok(Some(host));
    }
    let host = serde_json::from_str::<HostField>(raw.get())?.0.map(Arc::new);
    if let Some(host) = &host {
        LAST.with(|last| *last.borrow_mut() = Some((raw.get().into(), host.clone())));
    }
    Ok(host)
}

fn write_uuid(out: &mut Vec<u8>, id: Option<Uuid>) {
    match id {
        Some(id) => {
            out.push(b'"');
            out.extend_from_slice(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

fn write_opt_time(out: &mut Vec<u8>, time: Option<&DateTime<Utc>>) {
    match time {
        Some(time) => {
            out.push(b'"');
            out.extend_from_slice(write_time(time, &mut [0u8; TIME_LEN]).as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

fn write_opt_str(out: &mut Vec<u8>, text: Option<&str>) -> Result<(), serde_json::Error> {
    match text {
        Some(text) => write_str(out, text),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// A JSON string: copied as it is when no character needs escaping (addresses and URNs
/// never do), else written by serde_json.
fn write_str(out: &mut Vec<u8>, text: &str) -> Result<(), serde_json::Error> {
    // No early exit: a plain fold over the bytes is one the compiler vectorizes.
    let needs_escape = text.bytes().fold(false, |found, b| found | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if needs_escape {
        return serde_json::to_writer(&mut *out, text);
    }
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
    Ok(())
}

/// An envelope field, numbered in the order written (see [`FIELD_NAMES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    MessageId,
    RequestId,
    CorrelationId,
    ConversationId,
    InitiatorId,
    SourceAddress,
    DestinationAddress,
    ResponseAddress,
    FaultAddress,
    MessageType,
    Message,
    ExpirationTime,
    SentTime,
    Headers,
    Host,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an envelope property name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                // The names as MassTransit writes them first (the common case, and the cheaper
                // comparison), then any other casing.
                let found = FIELD_NAMES.into_iter().find(|(name, _)| *name == v);
                let found = found.or_else(|| FIELD_NAMES.into_iter().find(|(name, _)| name.eq_ignore_ascii_case(v)));
                Ok(found.map_or(Field::Other, |(_, f)| f))
            }
        }
        d.deserialize_identifier(FieldVisitor)
    }
}

/// A GUID or null; an empty string counts as null, as .NET tolerates it.
struct OptUuid(Option<Uuid>);

impl<'de> Deserialize<'de> for OptUuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
        match text.as_deref().map(str::trim) {
            None | Some("") => Ok(OptUuid(None)),
            Some(s) => Uuid::parse_str(s)
                .map(|u| OptUuid(Some(u)))
                .map_err(|e| de::Error::custom(format!("invalid GUID `{s}`: {e}"))),
        }
    }
}

struct OptTime(Option<DateTime<Utc>>);

impl<'de> Deserialize<'de> for OptTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
        match text.as_deref() {
            None | Some("") => Ok(OptTime(None)),
            Some(s) => {
                parse_time(s).map(|t| OptTime(Some(t))).ok_or_else(|| de::Error::custom(format!("invalid time `{s}`")))
            }
        }
    }
}

/// The envelope's `host`, read without an intermediate map; names match case-insensitively.
struct HostField(Option<HostInfo>);

impl<'de> Deserialize<'de> for HostField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HostVisitor;
        impl<'de> Visitor<'de> for HostVisitor {
            type Value = HostField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a host object or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<HostField, E> {
                Ok(HostField(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<HostField, E> {
                Ok(HostField(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<HostField, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HostField, A::Error> {
                let mut host = HostInfo::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match key.to_ascii_lowercase().as_str() {
                        "machinename" => &mut host.machine_name,
                        "processname" => &mut host.process_name,
                        "assembly" => &mut host.assembly,
                        "assemblyversion" => &mut host.assembly_version,
                        "frameworkversion" => &mut host.framework_version,
                        "masstransitversion" => &mut host.mass_transit_version,
                        "operatingsystemversion" => &mut host.operating_system_version,
                        "processid" => {
                            host.process_id = match map.next_value::<Value>()? {
                                Value::Number(n) => n.as_i64(),
                                Value::String(s) => s.parse().ok(),
                                _ => None,
                            };
                            continue;
                        }
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = match map.next_value::<Value>()? {
                        Value::String(s) => Some(s),
                        Value::Null => None,
                        other => Some(other.to_string()),
                    };
                }
                Ok(HostField(Some(host)))
            }
        }
        d.deserialize_option(HostVisitor)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a MassTransit envelope object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
                let mut message_type: Option<Vec<String>> = None;
                let mut message: Option<Box<RawValue>> = None;
                let mut env = Envelope::bare(Vec::new(), RawValue::NULL.to_owned());
                while let Some(field) = map.next_key::<Field>()? {
                    match field {
                        Field::MessageId => env.message_id = map.next_value::<OptUuid>()?.0,
                        Field::RequestId => env.request_id = map.next_value::<OptUuid>()?.0,
                        Field::CorrelationId => env.correlation_id = map.next_value::<OptUuid>()?.0,
                        Field::ConversationId => env.conversation_id = map.next_value::<OptUuid>()?.0,
                        Field::InitiatorId => env.initiator_id = map.next_value::<OptUuid>()?.0,
                        Field::SourceAddress => env.source_address = map.next_value()?,
                        Field::DestinationAddress => env.destination_address = map.next_value()?,
                        Field::ResponseAddress => env.response_address = map.next_value()?,
                        Field::FaultAddress => env.fault_address = map.next_value()?,
                        Field::MessageType => message_type = map.next_value()?,
                        Field::Message => message = Some(map.next_value()?),
                        Field::ExpirationTime => env.expiration_time = map.next_value::<OptTime>()?.0,
                        Field::SentTime => env.sent_time = map.next_value::<OptTime>()?.0,
                        Field::Headers => {
                            env.headers = map.next_value::<Option<Headers>>()?.unwrap_or_default();
                        }
                        Field::Host => {
                            // Borrowed, not copied: it is only compared with the last host read.
                            let raw = map.next_value::<&'de RawValue>()?;
                            env.host = read_host(raw).map_err(de::Error::custom)?;
                        }
                        Field::Other => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                env.message_type = match message_type {
                    Some(types) if !types.is_empty() => types,
                    _ => return Err(de::Error::custom("envelope has no messageType")),
                };
                env.message = message.ok_or_else(|| de::Error::custom("envelope has no message"))?;
                Ok(env)
            }
        }
        d.deserialize_map(EnvelopeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Charge {
        amount: u64,
        kind: Kind,
    }

    #[derive(Debug, serde::Deserialize)]
    enum Kind {
        Card,
    }

    fn reason(message: &str) -> String {
        let envelope =
            Envelope::new(vec![], serde_json::value::RawValue::from_string(message.to_owned()).expect("raw"));
        envelope.message_as::<Charge>().expect_err("does not match").to_string()
    }

    #[test]
    fn a_message_that_does_not_match_is_explained_without_its_values() {
        let cases = [
            (r#"{"amount":"4111-SECRET","kind":"Card"}"#, "invalid type: string, expected u64 at line 1 column 23"),
            (r#"{"amount":-4111,"kind":"Card"}"#, "invalid value: integer, expected u64"),
            (r#"{"amount":41.11,"kind":"Card"}"#, "invalid type: floating point, expected u64"),
            (r#"{"amount":1,"kind":"SECRET-KIND"}"#, "unknown variant, expected `Card`"),
            (r#"{"kind":"Card"}"#, "missing field `amount`"),
        ];
        for (message, expected) in cases {
            let reason = reason(message);
            assert!(reason.contains(expected), "{message}: {reason}");
            for secret in ["4111", "SECRET"] {
                assert!(!reason.contains(secret), "{message}: {reason}");
            }
        }
    }
}
